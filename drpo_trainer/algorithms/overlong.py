"""DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13): a length penalty added
to the verifier's reward before the advantages (config `reward.overlong_penalty`, `reward.overlong_buffer`).

With L_max = rollout.max_new_tokens, L_cache = the buffer and s = the scale, a completion of |y|
tokens (its EOS included, as the engine returns it) gets

    0                                    |y| <= L_max - L_cache
    s * (L_max - L_cache - |y|) / L_cache     L_max - L_cache < |y| <= L_max     (linear, -s at L_max)
    -s                                   |y| > L_max  (cannot happen: the engine stops at L_max)

Standard library only: the producer and the sample log call it on plain lengths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from drpo_trainer.config import Config

# Means over the completions of a batch: combined over ranks as completion-weighted means (the default
# reduction of drpo_trainer.metrics.MetricAccumulator), so they need no entry of their own.
OVERLONG_METRICS = ("reward/overlong_penalty_mean", "reward/overlong_penalised_fraction")


def overlong_penalty(length: int, *, max_new_tokens: int, buffer: int, scale: float) -> float:
    """The penalty (<= 0) of a completion of `length` tokens; see the module docstring."""
    if buffer < 1 or buffer > max_new_tokens:
        raise ValueError(f"buffer={buffer} must be in [1, max_new_tokens={max_new_tokens}]")
    start = max_new_tokens - buffer  # the last length with no penalty
    if length <= start:
        return 0.0
    return -scale * min(length - start, buffer) / buffer


def overlong_penalties(
    lengths: Sequence[int], *, max_new_tokens: int, buffer: int, scale: float
) -> tuple[list[float], dict[str, float]]:
    """(the penalty of each completion, its metrics): the mean penalty and the fraction penalised (< 0)."""
    out = [overlong_penalty(n, max_new_tokens=max_new_tokens, buffer=buffer, scale=scale) for n in lengths]
    n = max(len(out), 1)
    mean_key, fraction_key = OVERLONG_METRICS
    return out, {mean_key: sum(out) / n, fraction_key: sum(p < 0 for p in out) / n}


def completion_penalties(cfg: Config, completions) -> Optional[tuple[list[float], dict[str, float]]]:
    """`overlong_penalties` of the completions under the run's config; None when reward.overlong_penalty is 0."""
    r = cfg.reward
    if not r.overlong_penalty:
        return None
    lengths = [len(c.completion_ids) for c in completions]
    return overlong_penalties(
        lengths, max_new_tokens=cfg.rollout.max_new_tokens, buffer=r.overlong_buffer, scale=r.overlong_penalty
    )
