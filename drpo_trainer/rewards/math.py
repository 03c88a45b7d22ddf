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

from drpo_trainer.rewards.answer_form import AnswerForm, answer_form, plain_text, unicode_form
from drpo_trainer.rewards.extract import extract_final_answer, normalize_gold
from drpo_trainer.rewards.registry import register_reward

# math-verify's own per-call limit (whole seconds: signal.alarm) for plain main-thread calls.
_MATH_VERIFY_TIMEOUT_S = 5


@functools.lru_cache(maxsize=1)
def _math_verify() -> Any:
    import math_verify  # deferred: pulls in sympy and the LaTeX parser (~0.5 s)

    return math_verify


@functools.lru_cache(maxsize=1)
def _latex_config() -> list:
    # The box we wrap around the answer is the only thing to find.
    return [_math_verify().LatexExtractionConfig(boxed_match_priority=0)]


@functools.lru_cache(maxsize=1)
def _expression_config() -> list:
    return [_math_verify().ExprExtractionConfig()]


def _own_timeout_s() -> Optional[int]:
    """math-verify's timeout for this call, or None when its signal-based timeout cannot be used."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return None  # the caller's deadline is armed; math-verify's alarm would replace it
    return _MATH_VERIFY_TIMEOUT_S


def _parse_whole(expression: str, timeout_s: Optional[int]) -> Optional[list]:
    """math-verify's parse of all of `expression`, or None.

    LaTeX first. A plain-expression parse (for answers LaTeX parsing rejects, e.g. '3 + 4i') counts
    only when it read the whole answer: on ``7 \\to 5`` or ``7 \\foo 5`` it finds just the last
    number, 5, which must not stand for the answer.
    """
    mv = _math_verify()
    parsed = mv.parse("\\boxed{" + expression + "}", extraction_config=_latex_config(), parsing_timeout=timeout_s)
    if len(parsed) == 2 and not isinstance(parsed[0], str):
        return parsed
    parsed = mv.parse(expression, extraction_config=_expression_config(), parsing_timeout=timeout_s)
    if len(parsed) == 2 and not isinstance(parsed[0], str) and _no_spaces(parsed[1]) == _no_spaces(expression):
        return parsed
    return None


def _no_spaces(text: str) -> str:
    return "".join(text.split())


def _has_relation(obj: Any) -> bool:
    """Whether a parsed answer states something (an equation, inequality or logical formula)."""
    from sympy import Basic
    from sympy.core.relational import Relational
    from sympy.logic.boolalg import And, BooleanAtom, Not, Or

    if isinstance(obj, (Relational, And, Or, Not, BooleanAtom)):
        return True
    try:
        return isinstance(obj, Basic) and bool(obj.has(Relational))
    except Exception:  # some sympy objects cannot be searched; treat them as stating nothing
        return False


def _same(gold: AnswerForm, pred: AnswerForm, timeout_s: Optional[int]) -> bool:
    """The comparison rules of docs/rewards.md, "What scores and what does not"."""
    if gold.kind != pred.kind:
        return False  # a statement never equals a value, either way round
    if plain_text(gold.text) == plain_text(pred.text):
        return True
    if gold.exact_only or pred.exact_only:
        return False
    gold_parsed = _parse_gold(gold.text, timeout_s)
    pred_parsed = _parse_whole(pred.text, timeout_s)
    if gold_parsed is None or pred_parsed is None:
        return False
    # a value must parse to a value, a statement to a statement, or math-verify would compare sides
    if _has_relation(gold_parsed[0]) != (gold.kind == "statement"):
        return False
    if _has_relation(pred_parsed[0]) != (pred.kind == "statement"):
        return False
    return bool(_math_verify().verify(list(gold_parsed), pred_parsed, timeout_seconds=timeout_s))


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str, timeout_s: Optional[int]) -> Optional[tuple]:
    # Cached: a prompt's gold answer is verified against all of its samples_per_prompt completions.
    # sympy objects are immutable, so sharing the parsed result is safe.
    parsed = _parse_whole(text, timeout_s)
    return None if parsed is None else tuple(parsed)


@functools.lru_cache(maxsize=1)
def _primed() -> bool:
    """Run each kind of comparison once, so that sympy's lazy set-up (imports, dispatch tables)
    happens now and not inside some sample's deadline: a set-up interrupted by the deadline leaves
    sympy broken (slow and wrong) for the rest of the process. Not cached if interrupted."""
    timeout_s = _own_timeout_s()
    for gold, pred in (("0.5", "\\frac{1}{2}"), ("x < 5", "5 > x"), ("x^2 = 1", "7 = 1"), ("2", "(3)!")):
        gold_parsed, pred_parsed = _parse_whole(gold, timeout_s), _parse_whole(pred, timeout_s)
        if gold_parsed is None or pred_parsed is None:
            raise RuntimeError(f"math-verify could not parse {gold!r} or {pred!r}: is math-verify's version supported?")
        _has_relation(gold_parsed[0]), _has_relation(pred_parsed[0])
        _math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s)
    return True


def verify_answer(predicted: str, answer: str) -> bool:
    """True when the extracted answer `predicted` is equivalent to gold `answer` under the rules of
    docs/rewards.md (relations, percent, Unicode, scientific notation), equivalence by math-verify."""
    _primed()
    gold = answer_form(normalize_gold(unicode_form(answer)))
    pred = answer_form(predicted)
    if gold is None or pred is None:
        return False  # an empty answer never scores, and an empty gold answer matches nothing
    return _same(gold, pred, _own_timeout_s())


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
    """Import math-verify and run each kind of comparison once, before the first sample's deadline."""
    verify_answer("\\frac{1}{2}", "0.5")


math_reward.warm_up = warm_up  # type: ignore[attr-defined]  # run once per verifier worker at start-up
