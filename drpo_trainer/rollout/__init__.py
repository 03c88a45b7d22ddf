"""Rollout engines: sample G completions per prompt and report their log-probs.

`make_engine` picks the backend by `rollout.backend`; each backend reads its own config section
(`rollout.hf`, `rollout.vllm`) and the keys both share. `vllm` is imported only by `vllm_engine`.
"""

from __future__ import annotations

from drpo_trainer.rollout.base import Completion, RolloutEngine, SamplingSpec

__all__ = ["ENGINE_NAMES", "Completion", "RolloutEngine", "SamplingSpec", "make_engine"]

ENGINE_NAMES = ("hf", "vllm")


def make_engine(cfg, model_path: str, *, tokenizer, device, seed: int) -> RolloutEngine:
    r = cfg.rollout
    dtype = r.dtype or cfg.model.dtype
    if r.backend == "hf":
        from drpo_trainer.rollout.hf_engine import HFEngine

        return HFEngine(
            model_path,
            dtype=dtype,
            device=device,
            generation_batch_size=r.hf.generation_batch_size,
            tokenizer=tokenizer,
            quantization=r.quantization,
        )
    if r.backend == "vllm":
        from drpo_trainer.rollout.vllm_engine import VLLMEngine

        new_tokens = max(r.max_new_tokens, cfg.eval.max_new_tokens or 0)  # the eval may sample longer
        max_len = r.vllm.max_model_len or (cfg.data.max_prompt_tokens + new_tokens)
        return VLLMEngine(
            model_path,
            r.vllm,
            seed=seed,
            max_model_len=max_len,
            dtype=dtype,
            quantization=r.quantization,
            routing_replay=r.routing_replay,
        )
    raise ValueError(
        f"unknown rollout backend {r.backend!r}; known engines: {', '.join(ENGINE_NAMES)}. "
        "Fix: set rollout.backend to one of them"
    )
