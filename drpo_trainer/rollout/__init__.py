"""Rollout engines: sample G completions per prompt and report their log-probs.

`make_engine(cfg, ...)` picks the backend; `vllm` is imported only by `vllm_engine`.
"""

from drpo_trainer.rollout.base import Completion, RolloutEngine, SamplingSpec

__all__ = ["Completion", "RolloutEngine", "SamplingSpec"]
