"""Conversions between drpo-trainer's rollout types and vLLM's, for drpo_trainer/rollout/vllm_engine.py:
SamplingSpec -> SamplingParams keyword arguments, RequestOutputs -> Completions and probe log-probs,
learner tensor names -> the checkpoint names vLLM's loaders read. Plain Python on vLLM-shaped
objects: it never imports vllm, and tests/test_vllm_conversion.py runs it on CPU with fake
RequestOutput / CompletionOutput objects.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch

from drpo_trainer.learner.routing import routes_from_routed_experts
from drpo_trainer.rollout.base import Completion, SamplingSpec


def to_vllm_sampling_kwargs(spec: SamplingSpec) -> dict[str, Any]:
    """SamplingSpec -> keyword arguments of vllm.SamplingParams (sampled-token log-probs on)."""
    if not spec.temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling with log-probs, got {spec.temperature}")
    if spec.n < 1 or spec.max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={spec.n}, max_new_tokens={spec.max_new_tokens}")
    if spec.top_k < 0 or not 0 < spec.top_p <= 1:
        raise ValueError(
            f"top_k must be >= 0 (0 = off) and top_p in (0, 1], got top_k={spec.top_k}, top_p={spec.top_p}"
        )
    return {
        "n": spec.n,
        "temperature": float(spec.temperature),
        "top_p": float(spec.top_p),
        "top_k": int(spec.top_k),  # vLLM reads 0 as "off", like SamplingSpec
        "min_p": 0.0,
        "max_tokens": int(spec.max_new_tokens),
        "logprobs": 0,  # the sampled token's log-prob only
        "skip_special_tokens": True,
    }


def _sampled_logprob(position: Any, token_id: int, where: str) -> float:
    try:
        entry = position[token_id]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: the engine returned no log-prob for the sampled token {token_id}") from None
    value = float(entry.logprob)
    if not math.isfinite(value):
        raise ValueError(
            f"{where}: log-prob of sampled token {token_id} is {value}; the engine's weights or logits are broken"
        )
    return value


def completions_from_outputs(
    outputs: Sequence[Any], prompt_ids: list[list[int]], n: Optional[int] = None
) -> list[Completion]:
    """vLLM RequestOutputs (one per prompt, in prompt order) -> Completions grouped by prompt."""
    if len(outputs) != len(prompt_ids):
        raise ValueError(f"the engine returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    result: list[Completion] = []
    for i, (out, prompt) in enumerate(zip(outputs, prompt_ids)):
        got_prompt = getattr(out, "prompt_token_ids", None)
        if got_prompt is not None and list(got_prompt) != list(prompt):
            raise ValueError(f"output {i} belongs to another prompt (outputs must be in prompt order)")
        samples = sorted(out.outputs, key=lambda c: c.index)
        if n is not None and len(samples) != n:
            raise ValueError(f"prompt {i}: expected {n} samples, the engine returned {len(samples)}")
        for c in samples:
            where = f"prompt {i} sample {c.index}"
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"{where} finished with reason {c.finish_reason!r} (not 'stop' or 'length'); "
                    "the engine aborted it: check the vLLM log (out of memory? rollout.vllm.max_model_len too small?)"
                )
            ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(ids):
                got = None if c.logprobs is None else len(c.logprobs)
                raise ValueError(f"{where}: {len(ids)} tokens but {got} log-prob positions; request logprobs=0")
            lps = [_sampled_logprob(c.logprobs[t], tok, where) for t, tok in enumerate(ids)]
            routed = getattr(c, "routed_experts", None)  # set with enable_return_routed_experts (CUDA)
            result.append(
                Completion(
                    prompt_index=i,
                    prompt_ids=list(prompt),
                    completion_ids=ids,
                    rollout_logprobs=lps,
                    finish_reason=c.finish_reason,
                    text=c.text or "",
                    routes=None
                    if routed is None
                    else routes_from_routed_experts(routed, len(prompt) + len(ids), where),
                )
            )
    return result


def prompt_logprobs_from_outputs(outputs: Sequence[Any], sequences: list[list[int]]) -> list[list[float]]:
    """Prompt log-probs of tokens 1..L-1 of each scored sequence (position 0 has none), at T = 1."""
    if len(outputs) != len(sequences):
        raise ValueError(f"the engine returned {len(outputs)} outputs for {len(sequences)} probe sequences")
    scored = []
    for i, (out, seq) in enumerate(zip(outputs, sequences)):
        plp = out.prompt_logprobs
        if plp is None or len(plp) != len(seq):
            got = None if plp is None else len(plp)
            raise ValueError(
                f"probe {i}: {len(seq)} tokens but {got} prompt log-prob positions; request prompt_logprobs=0"
            )
        scored.append([_sampled_logprob(plp[t], seq[t], f"probe {i} position {t}") for t in range(1, len(seq))])
    return scored


def meta_model(model_path: str) -> torch.nn.Module:
    """The model's module tree on the meta device (no memory): it carries transformers' mapping
    between in-memory parameter names and the checkpoint's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))


def to_checkpoint_layout(layout: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list:
    """Learner tensors under transformers' in-memory names -> the tensors `save_pretrained` would
    write (vLLM loads checkpoints). transformers 5 fuses MoE experts in memory
    (`mlp.experts.gate_up_proj`, shape (E, 2I, H)) and splits them on save into
    `mlp.experts.{e}.gate_proj.weight` / `up_proj.weight`; dense models keep their names."""
    from transformers.core_model_loading import revert_weight_conversion

    return list(revert_weight_conversion(layout, dict(named_tensors)).items())
