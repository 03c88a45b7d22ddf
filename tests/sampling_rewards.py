"""Rewards for the dynamic-sampling tests (reward.import_modules=[sampling_rewards], reward.name=
sampling_rewards:<function>; importable by the verifier workers because the tests' folder is on the path).

`even_answer_flat_reward` makes every problem whose gold answer ends in an even digit a zero-variance
group, with certainty, and (almost) every other problem's group informative: dynamic sampling must drop
the first kind and keep the second.
"""

from __future__ import annotations

from resume_helpers import text_value_reward

from drpo_trainer.rewards import register_reward


def even_answer(answer: str) -> bool:
    return answer.strip()[-1:] in "02468"


@register_reward("even_answer_flat")
def even_answer_flat_reward(completion: str, answer: str, **_: object) -> float:
    """0 for every completion of a problem with an even gold answer; else a value that differs between
    any two different completions (resume_helpers.text_value_reward)."""
    return 0.0 if even_answer(answer) else text_value_reward(completion, answer)


@register_reward("flat")
def flat_reward(completion: str, answer: str, **_: object) -> float:
    """0 for everything: every group has zero variance."""
    return 0.0
