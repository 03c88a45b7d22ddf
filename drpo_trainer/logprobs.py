"""Memory-efficient token log-probs (and entropy) of a causal LM on packed rows.

Owns the learner's only path from tokens to ``log pi(token)``: the decoder runs once
on the packed row, then the output head is applied ``chunk_tokens`` positions at a
time under ``torch.utils.checkpoint``, so the (N, V) fp32 logits never exist whole,
in forward or backward (at a 151,936 vocabulary, 8,192 tokens of fp32 logits are
5 GB). Only positions whose target is not ``IGNORE_INDEX`` reach the head at all,
so prompt tokens cost no head compute.

Conventions
-----------
- ``targets[0, j]`` is the token that position ``j`` predicts (the next token of the
  same sequence), or ``IGNORE_INDEX`` (-100) where no log-prob is needed (prompt
  positions, the last token of each packed sequence, padding). See
  ``drpo_trainer.packing.pack_sequences``, which builds such targets.
- Outputs are (1, N) fp32; at ignored positions both the log-prob and the entropy
  are exactly 0.0 with zero gradient.
- Log-probs are of ``log_softmax(logits / temperature)``, the sampling distribution.

ZeRO-3 (why the head is reached through module calls)
-----------------------------------------------------
Under ZeRO-3 every parameter is partitioned and gathered by DeepSpeed hooks that
fire on *module calls*; the gathers are collectives, and DeepSpeed asserts that all
ranks record the same module order. A per-chunk ``lm_head(chunk)`` call would make
the number of head calls depend on the local token count, which differs between
ranks (hang or assertion). So the function instead calls the model's root module
once (through the DeepSpeed engine when given one, which keeps its forward/backward
bookkeeping) with its ``forward`` temporarily replaced, and inside it calls the head
module once with *its* ``forward`` temporarily replaced by the chunked computation.
DeepSpeed's hooks thus gather the head weight once per call (also tied embeddings)
and re-gather it before the head's backward, where each chunk is recomputed with the
gathered weight. The module call sequence is identical on every rank whatever N is.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DeepSpeed engine / DDP wrapper (``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _check_inputs(input_ids: Tensor, position_ids: Tensor, targets: Tensor, temperature: float) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"input_ids must be one packed row of shape (1, N), got {tuple(input_ids.shape)}; "
            "pack the sequences with drpo_trainer.packing.pack_sequences."
        )
    if position_ids.shape != input_ids.shape or targets.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, position_ids {tuple(position_ids.shape)} and targets "
            f"{tuple(targets.shape)} must have the same (1, N) shape."
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use the rollout sampling temperature.")


def _check_head_is_plain(core: nn.Module) -> None:
    """Refuse models whose logits are not just ``head(hidden)`` (the chunked path would differ)."""
    config = getattr(core, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"model config has {name}={value}: its logits are not lm_head(hidden), which the chunked "
                "log-prob path assumes; add that transform to drpo_trainer.logprobs._head_chunk."
            )


def _head_chunk(
    head_forward: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``targets`` and entropy for one chunk: (C, H) hidden -> two (C,) tensors."""
    logits = head_forward(hidden).float()  # (C, V); the only V-sized tensors live here
    if temperature != 1.0:
        logits = logits / temperature
    log_normalizer = torch.logsumexp(logits, dim=-1)  # (C,)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normalizer
    if not with_entropy:
        return logprobs, torch.zeros_like(logprobs)
    # H = logZ - sum_v p_v * z_v, with p = softmax(z): avoids a second (C, V) log-softmax tensor
    entropy = log_normalizer - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


def _chunked_head(
    head_forward: Callable[[Tensor], Tensor],
    hidden: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_tokens: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    """Apply the head ``chunk_tokens`` rows at a time: (M, H) hidden -> (M,) log-probs, (M,) entropy.

    With grad enabled each chunk runs under non-reentrant checkpointing: forward keeps
    no (C, V) tensor, backward recomputes one chunk's logits at a time.
    """
    recompute = torch.is_grad_enabled()
    logprob_parts, entropy_parts = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (head_forward, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        if recompute:
            lp, ent = checkpoint(_head_chunk, *args, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _head_chunk(*args, temperature, with_entropy)
        logprob_parts.append(lp)
        entropy_parts.append(ent)
    return torch.cat(logprob_parts), torch.cat(entropy_parts)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Temporarily replace ``module.forward`` so that ``module(...)`` runs every hook around ``forward``."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # back to the class's forward


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Per-position ``log_softmax(logits / temperature)[target]`` (and entropy) of a packed row.

    Args:
        model: a Hugging Face causal LM, or a DeepSpeed engine / DDP wrapping one.
        input_ids, position_ids: (1, N) packed row; position ids restart at 0 for each
            packed sequence, which is how transformers isolates their attention.
        targets: (1, N) next token per position, ``IGNORE_INDEX`` where not needed.
        temperature: the sampling temperature (> 0).
        chunk_tokens: head rows per chunk; peak head memory ~ chunk_tokens x V x 4 bytes x few.
        with_entropy: also return the entropy of the tempered distribution.

    Returns:
        ``(logprobs, entropy)``, each (1, N) fp32 (entropy None unless ``with_entropy``),
        0.0 at ignored positions. Differentiable w.r.t. every model parameter.
    """
    _check_inputs(input_ids, position_ids, targets, temperature)
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}; see trainer.logprob_chunk_tokens.")
    core = unwrap_model(model)
    _check_head_is_plain(core)
    decoder, head = core.get_decoder(), core.get_output_embeddings()
    head_forward = type(head).forward.__get__(head)  # the head's own computation, without hooks
    n_tokens = input_ids.shape[1]

    def chunked_head_forward(hidden_rows: Tensor, row_targets: Tensor) -> tuple[Tensor, Tensor]:
        return _chunked_head(
            head_forward, hidden_rows, row_targets, temperature=temperature, chunk_tokens=chunk_tokens,
            with_entropy=with_entropy,
        )

    def root_forward(input_ids: Tensor, position_ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # attention_mask=None + restarting position ids: transformers' mask builder detects the
        # packed sequences and isolates them; use_cache=False, else a cache disables that detection.
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
        hidden = hidden.last_hidden_state[0]  # (N, H)
        flat_targets = targets[0]
        rows = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)  # (M,)
        weight = 1.0
        if rows.numel() == 0:
            # Nothing to score (e.g. a rank's empty padding micro-batch): still run the head on one
            # row, scaled by 0, so every rank makes the same module calls and gradient reductions.
            rows, weight = rows.new_zeros(1), 0.0
        row_targets = flat_targets[rows].clamp(min=0)
        with _forward_replaced(head, chunked_head_forward):
            logprob_rows, entropy_rows = head(hidden[rows], row_targets)
        logprobs = hidden.new_zeros(n_tokens, dtype=torch.float32).index_put((rows,), logprob_rows * weight)
        entropy = hidden.new_zeros(n_tokens, dtype=torch.float32).index_put((rows,), entropy_rows * weight)
        return logprobs.unsqueeze(0), entropy.unsqueeze(0)

    with _forward_replaced(core, root_forward):
        logprobs, entropy = model(input_ids=input_ids, position_ids=position_ids, targets=targets)
    return logprobs, (entropy if with_entropy else None)


def naive_token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Reference path: full (1, N, V) fp32 logits, then log-softmax. Same contract as ``token_logprobs``.

    For tests and benchmarks only; its memory grows as N x V.
    """
    _check_inputs(input_ids, position_ids, targets, temperature)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
    log_probs = torch.log_softmax(out.logits.float() / temperature, dim=-1)  # (1, N, V)
    ignored = targets == IGNORE_INDEX
    logprobs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logprobs = logprobs.masked_fill(ignored, 0.0)
    if not with_entropy:
        return logprobs, None
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, entropy.masked_fill(ignored, 0.0)
