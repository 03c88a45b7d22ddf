"""Rollout engines: sample G completions per prompt and report their log-probs.

`make_engine` picks the backend; `vllm` is imported only by `vllm_engine`.
"""

from __future__ import annotations

from drpo_trainer.rollout.base import Completion, RolloutEngine, SamplingSpec

__all__ = ["Completion", "RolloutEngine", "SamplingSpec", "make_engine"]


def make_engine(cfg, model_path: str, *, tokenizer, device, seed: int) -> RolloutEngine:
    r = cfg.rollout
    if r.backend == "hf":
        from drpo_trainer.rollout.hf_engine import HFEngine

        return HFEngine(
            model_path,
            dtype=r.dtype or cfg.model.dtype,
            device=device,
            generation_batch_size=r.generation_batch_size,
            tokenizer=tokenizer,
            quantization=r.quantization,
        )
    from drpo_trainer.rollout.vllm_engine import VLLMEngine

    max_len = r.max_model_len or (cfg.data.max_prompt_tokens + r.max_new_tokens)
    return VLLMEngine(model_path, r, seed=seed, max_model_len=max_len, dtype=r.dtype or cfg.model.dtype)
