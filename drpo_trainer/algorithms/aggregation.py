"""Turning per-token losses into one number, and statistics over masked tokens.

Owns the four `loss_agg_mode`s and the masked reductions the metrics use. Every mode is a
sum over this call's tokens divided by a count; passing the counts of the whole
mini-batch (`global_num_tokens`, `global_num_seqs`, summed over micro-batches and ranks)
instead of the local ones makes the sum of the micro-batch losses equal the mini-batch
loss, so splitting a mini-batch never changes the gradient.

A *sequence* is a row of the (B, T) tensors with at least one mask token; rows that are
all padding contribute nothing and are not counted. Use `count_tokens_and_seqs` to
compute the global counts with the same rule.
"""

from __future__ import annotations

from typing import Optional

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def count_tokens_and_seqs(mask: torch.Tensor) -> tuple[int, int]:
    """(number of mask tokens, number of rows with at least one mask token) of a (B, T) mask."""
    m = mask.float()
    return int(m.sum().item()), int((m.sum(dim=-1) > 0).sum().item())


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    horizon: Optional[int] = None,
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
) -> torch.Tensor:
    """Aggregate a (B, T) per-token loss over the mask.

    token-mean               sum_{b,t} L m / N_tokens
    seq-mean-token-sum       sum_b (sum_t L m) / N_seqs
    seq-mean-token-sum-norm  sum_b (sum_t L m / horizon) / N_seqs      (horizon fixed, e.g. max length)
    seq-mean-token-mean      sum_b (sum_t L m / n_b) / N_seqs          (n_b = tokens of row b)

    N_tokens / N_seqs are `global_num_tokens` / `global_num_seqs` when given (the whole
    mini-batch over micro-batches and ranks), else this call's counts. Empty rows and an
    all-zero mask give 0, never NaN.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"loss and mask must both be (B, T); got {tuple(loss_mat.shape)} and {tuple(mask.shape)}")
    m = mask.to(loss_mat.dtype)
    # where() rather than L * m: a padded position may hold inf/NaN, and inf * 0 = NaN.
    masked = torch.where(m > 0, loss_mat * m, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if mode == "token-mean":
        n = global_num_tokens if global_num_tokens is not None else m.sum()
        return masked.sum() / _at_least_one(n, loss_mat)

    row_sum = masked.sum(dim=-1)  # (B,)
    if mode == "seq-mean-token-sum":
        per_seq = row_sum
    elif mode == "seq-mean-token-sum-norm":
        if horizon is None or horizon <= 0:
            raise ValueError(
                f"loss_agg_mode 'seq-mean-token-sum-norm' needs a fixed horizon > 0 (got {horizon!r}); "
                "pass horizon= the maximum response length (algorithm.horizon / rollout.max_new_tokens)"
            )
        per_seq = row_sum / float(horizon)
    else:  # seq-mean-token-mean
        per_seq = row_sum / m.sum(dim=-1).clamp(min=1.0)
    n = global_num_seqs if global_num_seqs is not None else (m.sum(dim=-1) > 0).sum()
    return per_seq.sum() / _at_least_one(n, loss_mat)


def _at_least_one(n, like: torch.Tensor) -> torch.Tensor:
    # A count of zero only happens when there is nothing to average: the sum is 0 too.
    return torch.as_tensor(n, dtype=like.dtype, device=like.device).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Masked statistics for metrics (detached, float32). Means over no tokens are 0; max / min over
# no tokens are -inf / +inf, the identities of the max / min reductions across micro-batches.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    x = torch.where(m > 0, x.detach().float(), torch.zeros((), device=x.device))
    return (x * m).sum() / m.sum().clamp(min=1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return torch.where(mask > 0, x, torch.full_like(x, float("-inf"))).max()


def masked_min(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return torch.where(mask > 0, x, torch.full_like(x, float("inf"))).min()
