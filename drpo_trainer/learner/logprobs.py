"""Memory-efficient token log-probs (and entropy) of a causal LM on packed rows.

Owns the learner's only path from tokens to ``log pi(token)``: the decoder runs once
on the packed row, then the output head is applied ``chunk_tokens`` positions at a
time by a custom autograd function (``_ChunkedHeadLogprobs``) that keeps only (N,)
statistics in forward and recomputes one chunk's logits at a time in backward, so the
(N, V) fp32 logits never exist whole, in forward or backward (at a 151,936 vocabulary,
8,192 tokens of fp32 logits are 5 GB); at most about two (chunk_tokens, V) fp32 buffers
are live. Only positions whose target is not ``IGNORE_INDEX`` reach the head at all,
so prompt tokens cost no head compute. Works with the decoder's gradient checkpointing
(the decoder is run as usual) and with tied input/output embeddings.

Conventions
-----------
- ``targets[0, j]`` is the token that position ``j`` predicts (the next token of the
  same sequence), or ``IGNORE_INDEX`` (-100) where no log-prob is needed (prompt
  positions, the last token of each packed sequence, padding). See
  ``drpo_trainer.learner.packing.pack_sequences``, which builds such targets.
- Outputs are (1, N) fp32; at ignored positions both the log-prob and the entropy
  are exactly 0.0 with zero gradient.
- Log-probs are of the sampling distribution: ``log_softmax(logits / temperature)``, and
  with ``top_k > 0`` or ``top_p < 1`` that distribution truncated to the kept tokens and
  renormalised (``truncation_mask``: vLLM's and transformers' rule). A token outside the kept
  set has probability 0; its log-prob is the finite floor ``OUT_OF_SUPPORT_LOGPROB`` with zero
  gradient, so a ratio against it is exactly 0 and nothing becomes NaN.

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
gathered weight; the head's parameter gradients are accumulated once per backward. The
module call sequence is identical on every rank whatever N is, and a rank with nothing
to score still runs the head on one row with weight 0.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from drpo_trainer.learner.packing import IGNORE_INDEX

OUT_OF_SUPPORT_LOGPROB = -1e4  # log-prob of a token the truncated sampling distribution excludes


def truncation_mask(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Optional[Tensor]:
    """(C, V) tempered logits -> (C, V) bool mask of the tokens top-k then top-p sampling keeps,
    or None when neither is on. The rule of vLLM's sampler and transformers' warpers: top-k keeps
    every logit >= the k-th largest (ties kept); top-p then drops the smallest tokens whose
    cumulative probability (of the top-k distribution, ascending) stays <= 1 - p, always keeping
    the most likely one."""
    vocab = logits.shape[-1]
    use_k, use_p = 0 < top_k < vocab, top_p < 1.0
    if not (use_k or use_p):
        return None
    keep = torch.ones_like(logits, dtype=torch.bool)
    if use_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        keep = logits >= kth
    if use_p:
        sorted_logits, order = logits.masked_fill(~keep, float("-inf")).sort(dim=-1)  # ascending
        drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= 1.0 - top_p
        drop[..., -1] = False
        keep &= ~torch.zeros_like(keep).scatter_(-1, order, drop)
    return keep


def sampling_logprobs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(..., V) raw logits -> (..., V) log-probs of the sampling distribution (dense; engines and
    tests). Excluded tokens get OUT_OF_SUPPORT_LOGPROB."""
    z = logits.float() / temperature
    keep = truncation_mask(z.reshape(-1, z.shape[-1]), top_k, top_p)
    if keep is None:
        return torch.log_softmax(z, dim=-1)
    keep = keep.view(z.shape)
    return torch.log_softmax(z.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, OUT_OF_SUPPORT_LOGPROB)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DeepSpeed engine / DDP wrapper (``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _check_inputs(input_ids: Tensor, position_ids: Tensor, targets: Tensor, temperature: float) -> None:
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be packed rows of shape (R, N), got {tuple(input_ids.shape)}; "
            "pack the sequences with drpo_trainer.learner.packing.pack_sequences."
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
                "log-prob path assumes; add that transform to drpo_trainer.learner.logprobs._ChunkedHeadLogprobs."
            )


def _tempered_logits(logits: Tensor, sampling: tuple[float, int, float]) -> tuple[Tensor, Optional[Tensor]]:
    """(C, V) head output -> fp32 logits / T (in place where already fp32), excluded tokens at -inf,
    and the kept mask (or None)."""
    temperature, top_k, top_p = sampling
    z = logits.float()
    if temperature != 1.0:
        z.div_(temperature)
    keep = truncation_mask(z, top_k, top_p)
    if keep is not None:
        z.masked_fill_(~keep, float("-inf"))
    return z, keep


def _chunk_stats(
    head_forward: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, sampling: tuple, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """No-grad log-prob, entropy and log-normalizer of one chunk: (C, H) -> three (C,) tensors."""
    z, _ = _tempered_logits(head_forward(hidden), sampling)  # (C, V); every step below is in place
    target_logits = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # -inf for an excluded target
    row_max = z.amax(dim=-1, keepdim=True)
    sum_exp = z.sub_(row_max).exp_().sum(-1)  # z now holds unnormalised probabilities
    log_normalizer = row_max.squeeze(-1) + sum_exp.log()
    logprobs = (target_logits - log_normalizer).clamp_(min=OUT_OF_SUPPORT_LOGPROB)  # finite floor, not -inf
    if not with_entropy:
        return logprobs, torch.zeros_like(logprobs), log_normalizer
    z.div_(sum_exp.unsqueeze(-1))  # p
    entropy = -torch.special.xlogy(z, z).sum(-1)  # H = -sum p log p (0 log 0 = 0)
    return logprobs, entropy, log_normalizer


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """(M, H) hidden rows -> (M,) log-probs and entropies, the head applied chunk by chunk.

    Forward keeps only (M,) statistics. Backward recomputes one chunk's logits at a time
    and writes dL/dlogits in place into that buffer (at most two (C, V) fp32 tensors live),
    then pulls it through the head with ``torch.autograd.grad``; head-parameter gradients
    are summed over chunks and returned once, so each parameter gets ONE accumulation per
    backward (ZeRO-3 reduces a gradient when it is accumulated).
    """

    @staticmethod
    def forward(ctx, head_forward, hidden, targets, sampling, chunk_tokens, with_entropy, *params):
        parts = [
            _chunk_stats(
                head_forward, hidden[s : s + chunk_tokens], targets[s : s + chunk_tokens], sampling, with_entropy
            )
            for s in range(0, hidden.shape[0], chunk_tokens)
        ]
        logprobs, entropy, log_normalizer = (torch.cat(p) for p in zip(*parts))
        ctx.save_for_backward(hidden, targets, log_normalizer, entropy)
        # Parameters are kept as plain references: ZeRO-3 swaps their storage between forward
        # and backward (partitioned, then re-gathered before this backward runs).
        ctx.params, ctx.head_forward = params, head_forward
        ctx.sampling, ctx.chunk_tokens, ctx.with_entropy = sampling, chunk_tokens, with_entropy
        ctx.set_materialize_grads(False)  # an entropy that feeds no loss costs no backward work
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, targets, log_normalizer, entropy = ctx.saved_tensors
        params = ctx.params
        wanted = [ctx.needs_input_grad[1]] + [p.requires_grad for p in params]
        grad_hidden = torch.zeros_like(hidden) if wanted[0] else None
        grad_params: list[Optional[Tensor]] = [None] * len(params)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(log_normalizer)
        for s in range(0, hidden.shape[0], ctx.chunk_tokens):
            e = s + ctx.chunk_tokens
            with torch.enable_grad():
                h = hidden[s:e].detach().requires_grad_(wanted[0])
                logits = ctx.head_forward(h)  # (C, V)
            g_lp = grad_logprobs[s:e].unsqueeze(-1)
            temperature = ctx.sampling[0]
            with torch.no_grad():
                z, keep = _tempered_logits(logits.detach(), ctx.sampling)  # becomes dL/dlogits in place
                z.sub_(log_normalizer[s:e].unsqueeze(-1))  # log p (-inf where excluded)
                if keep is not None:  # an excluded target's floor log-prob is a constant: no gradient
                    g_lp = g_lp * keep.gather(-1, targets[s:e].unsqueeze(-1))
                if use_entropy:
                    # dlogp_t/dz = onehot_t - p;  dH/dz = -p * (log p + H); excluded tokens have p = 0
                    p = z.exp()
                    if keep is not None:
                        z.masked_fill_(~keep, 0.0)
                    g_h = grad_entropy[s:e].unsqueeze(-1)
                    z.add_(entropy[s:e].unsqueeze(-1)).mul_(g_h).add_(g_lp).mul_(p).neg_()
                    del p
                else:
                    z.exp_().mul_(-g_lp)
                z.scatter_add_(-1, targets[s:e].unsqueeze(-1), g_lp)
                if temperature != 1.0:
                    z.div_(temperature)
            inputs = [t for t, w in zip([h, *params], wanted) if w]
            grads = iter(torch.autograd.grad(logits, inputs, grad_outputs=z.to(logits.dtype)))
            del z, logits
            if wanted[0]:
                grad_hidden[s:e] = next(grads)
            for i, w in enumerate(wanted[1:]):
                if w:
                    g = next(grads)
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        return (None, grad_hidden, None, None, None, None, *grad_params)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Temporarily replace ``module.forward`` so that ``module(...)`` runs every hook around ``forward``."""
    previous = module.__dict__.get("forward")  # an instance-level forward set by other wrappers
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward  # back to the class's forward
        else:
            module.forward = previous


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Per-position log-prob of the target under the sampling distribution (and its entropy).

    Args:
        model: a Hugging Face causal LM, or a DeepSpeed engine / DDP wrapping one.
        input_ids, position_ids: (1, N) packed row; position ids restart at 0 for each
            packed sequence, which is how transformers isolates their attention.
        targets: (1, N) next token per position, ``IGNORE_INDEX`` where not needed.
        temperature: the sampling temperature (> 0).
        top_k, top_p: the sampling truncation (0 and 1.0 = off), see ``truncation_mask``.
        chunk_tokens: head rows per chunk; peak head memory ~ 2 x chunk_tokens x V x 4 bytes.
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
    sampling = (temperature, top_k, top_p)
    n_tokens = input_ids.numel()  # over all rows

    def chunked_head_forward(hidden_rows: Tensor, row_targets: Tensor) -> tuple[Tensor, Tensor]:
        return _ChunkedHeadLogprobs.apply(
            head_forward, hidden_rows, row_targets, sampling, chunk_tokens, with_entropy, *head.parameters()
        )

    def root_forward(input_ids: Tensor, position_ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # attention_mask=None + restarting position ids: transformers' mask builder detects the
        # packed sequences and isolates them; use_cache=False, else a cache disables that detection.
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
        hidden = hidden.last_hidden_state.flatten(0, 1)  # (R * N, H)
        flat_targets = targets.reshape(-1)
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
        return logprobs.view(targets.shape), entropy.view(targets.shape)

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
    top_k: int = 0,
    top_p: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Reference path: full (1, N, V) fp32 logits, then log-softmax. Same contract as ``token_logprobs``.

    For tests and benchmarks only; its memory grows as N x V.
    """
    _check_inputs(input_ids, position_ids, targets, temperature)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
    log_probs = sampling_logprobs(out.logits, temperature, top_k, top_p)  # (1, N, V)
    ignored = targets == IGNORE_INDEX
    logprobs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logprobs = logprobs.masked_fill(ignored, 0.0)
    if not with_entropy:
        return logprobs, None
    probs = log_probs.exp()  # exactly 0 at excluded tokens (exp of the floor)
    entropy = -(probs * log_probs).sum(-1)
    return logprobs, entropy.masked_fill(ignored, 0.0)
