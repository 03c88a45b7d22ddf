"""The rule-based math reward: final answer extracted here, equivalence decided by math-verify.

``math_reward(completion, answer)`` is 1.0 when the completion's final answer (see
:mod:`drpo_trainer.rewards.extract`) is mathematically equivalent to the gold answer according to
math-verify, else 0.0. math-verify is imported on first use, so importing this module is cheap.

Why the answer is extracted before math-verify sees it: ``math_verify.parse`` on a raw completion
with several ``\\boxed{}`` does not reliably pick the last one. Both sides are parsed as
``\\boxed{<answer>}``, which lets math-verify's LaTeX normalisation (``\\dfrac``, ``^\\circ``,
``\\%``, ``\\text{}``, thousands separators, ``x = 5``) apply to plain and LaTeX answers alike.

Timeouts: math-verify's own timeouts use ``signal.alarm``, which works only in the main thread
and would replace any real-time timer already armed by the caller. They are used when this runs
in the main thread with no timer armed (a plain call); otherwise (a verifier worker, which arms
its own per-sample deadline, or a thread) they are switched off and the caller bounds the time.
Untrusted text in a training run always goes through :class:`~drpo_trainer.rewards.pool.RewardScorer`.
"""

from __future__ import annotations

import functools
import signal
import threading
from typing import Any, Optional

from drpo_trainer.rewards.extract import extract_final_answer, normalize_gold
from drpo_trainer.rewards.registry import register_reward

# math-verify's own per-call limit (whole seconds: signal.alarm) for plain main-thread calls.
_MATH_VERIFY_TIMEOUT_S = 5


@functools.lru_cache(maxsize=1)
def _math_verify() -> Any:
    import math_verify  # deferred: pulls in sympy and the LaTeX parser (~0.5 s)

    return math_verify


@functools.lru_cache(maxsize=1)
def _extraction_config() -> list:
    mv = _math_verify()
    # The box we wrap around the answer is the only thing to find; plain-expression extraction
    # is the fallback for answers LaTeX parsing rejects (e.g. '3 + 4i' written without braces).
    return [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]


def _own_timeout_s() -> Optional[int]:
    """math-verify's timeout for this call, or None when its signal-based timeout cannot be used."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return None  # the caller's deadline is armed; math-verify's alarm would replace it
    return _MATH_VERIFY_TIMEOUT_S


def _parse(expression: str, timeout_s: Optional[int]) -> list:
    mv = _math_verify()
    return mv.parse("\\boxed{" + expression + "}", extraction_config=_extraction_config(), parsing_timeout=timeout_s)


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout_s: Optional[int]) -> tuple:
    # Cached: a prompt's gold answer is verified against all of its samples_per_prompt completions.
    # sympy objects are immutable, so sharing the parsed result is safe.
    return tuple(_parse(normalize_gold(answer), timeout_s))


def verify_answer(predicted: str, answer: str) -> bool:
    """True when the extracted answer `predicted` is equivalent to gold `answer` (math-verify)."""
    timeout_s = _own_timeout_s()
    gold = list(_parse_gold(answer, timeout_s))
    if not gold:
        return False
    pred = _parse(predicted, timeout_s)
    if not pred:
        return False
    return bool(_math_verify().verify(gold, pred, timeout_seconds=timeout_s))


@register_reward("math")
def math_reward(completion: str, answer: str, extraction: str = "boxed", **_: Any) -> float:
    """1.0 if the final answer of `completion` equals gold `answer` mathematically, else 0.0.

    `extraction` picks where the final answer is: 'boxed' (the last ``\\boxed{}``, default),
    'answer_line' (the last ``Answer: X``) or 'auto' (boxed, else the answer line). No final
    answer scores 0.0. Gold answers may be plain ('391', '1/2') or LaTeX (``\\frac{1}{2}``).
    """
    predicted = extract_final_answer(completion, extraction)
    if predicted is None:
        return 0.0
    return 1.0 if verify_answer(predicted, answer) else 0.0


def warm_up() -> None:
    """Import math-verify and run one verification, so a new worker's first sample is not slow."""
    verify_answer("\\frac{1}{2}", "0.5")


math_reward.warm_up = warm_up  # type: ignore[attr-defined]  # run once per verifier worker at start-up
