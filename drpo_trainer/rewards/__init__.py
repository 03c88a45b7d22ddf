"""Rewards: rule-based math verification and the registry of reward functions.

Public API:
  math_reward(completion, answer, extraction="boxed") -> float   plain in-process call
  score_math(completions, answers, *, num_workers, timeout_s, ...) -> list[float]
  make_reward_scorer(cfg.reward) -> RewardScorer                  what the trainer uses
  register_reward(name) / get_reward(name)                        custom rewards

Light on import: standard library only; math-verify loads on first verification, and only
in the processes that verify.
"""

from drpo_trainer.rewards.extract import EXTRACTION_MODES, extract_final_answer
from drpo_trainer.rewards.math import math_reward
from drpo_trainer.rewards.pool import RewardScorer, make_reward_scorer, score_math
from drpo_trainer.rewards.registry import get_reward, register_reward, registered_rewards

__all__ = [
    "EXTRACTION_MODES",
    "RewardScorer",
    "extract_final_answer",
    "get_reward",
    "make_reward_scorer",
    "math_reward",
    "register_reward",
    "registered_rewards",
    "score_math",
]
