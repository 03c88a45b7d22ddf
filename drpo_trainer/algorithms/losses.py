"""Per-token policy losses: the registry, the one entry point, and their metrics.

Every loss in `POLICY_LOSSES` has the same signature

    loss_fn(logprobs, old_logprobs, advantages, mask, *, <its parameters>) -> (per_token_loss, metrics)

on float32 (float64 if given) (B, T) tensors (advantages already broadcast to tokens, A and mu detached), and
returns the unmasked per-token loss and its own metrics. `compute_policy_loss` is what a
trainer calls: it validates, upcasts bf16 inputs to float32, applies the optional
train/inference mismatch correction, calls the loss, aggregates (drpo_trainer.algorithms.aggregation)
and adds the metrics common to all losses. The learner never branches on the loss name.

Notation (docs/algorithms.md): r = exp(logprobs - old_logprobs), pi = exp(logprobs),
mu = exp(old_logprobs). Formulas follow /docs/algorithms.md and the papers cited per loss.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import torch

from drpo_trainer.algorithms.aggregation import aggregate_loss, masked_max, masked_mean, masked_min
from drpo_trainer.algorithms.loss_params import declare_loss_params, validate_loss_params
from drpo_trainer.algorithms.loss_params import loss_param_defaults as loss_param_defaults  # public here too
from drpo_trainer.metrics import Reduction

LossFn = Callable[..., tuple[torch.Tensor, dict]]

POLICY_LOSSES: dict[str, LossFn] = {}
# The metrics that combine over micro-batches and ranks by max / min (all others are token means).
RATIO_METRIC_REDUCTIONS: dict[str, Reduction] = {
    "policy/ratio_max": "max",
    "policy/ratio_min": "min",
    "policy/abs_pi_minus_mu_max": "max",
}
MISMATCH_METRIC_REDUCTIONS: dict[str, Reduction] = {"mismatch/abs_prob_diff_max": "max"}
_METRIC_REDUCTIONS: dict[str, dict[str, Reduction]] = {}


def register_policy_loss(
    name: str,
    bounds: Optional[dict[str, tuple[float, float]]] = None,
    extrema: Optional[dict[str, Reduction]] = None,
):
    """Decorator adding a loss to the registry. Its keyword-only arguments are its parameters;
    `extrema` names its metrics that combine by "max" or "min" instead of a token mean."""

    def wrap(fn: LossFn) -> LossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        params = inspect.signature(fn).parameters.values()
        defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        declare_loss_params(name, defaults, bounds)  # config validation reads them there, without torch
        POLICY_LOSSES[name] = fn
        _METRIC_REDUCTIONS[name] = {**RATIO_METRIC_REDUCTIONS, **(extrema or {})}
        return fn

    return wrap


def policy_loss_names() -> list[str]:
    return sorted(POLICY_LOSSES)


def metric_reductions(name: str) -> dict[str, Reduction]:
    """The metrics of `compute_policy_loss(name, ...)` that combine by max or min, e.g.
    {'drpo/weight_max': 'max', ...}; every other metric is a token mean (weight: the mask sum).
    Pass it as `MetricAccumulator.add(metrics, weight, reduce=metric_reductions(name))`."""
    _check_name(name)
    return _METRIC_REDUCTIONS[name]


def _check_name(name: str) -> None:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid losses: {', '.join(policy_loss_names())}")


# ---------------------------------------------------------------------------------------------
# The losses. Inputs: float32 (B, T); `advantages` and `old_logprobs` carry no grad.


@register_policy_loss("drpo", extrema={"drpo/weight_min": "min", "drpo/weight_max": "max"})
def drpo_loss(logprobs, old_logprobs, advantages, mask, *, delta: float = 12.5):
    """DRPO, Eq. 8 of the DRPO paper: a quadratic trust region weighted by the behaviour probability.

        L_t = -A r + |A| mu (r - 1)^2 / (2 delta)

    Gradient w.r.t. log pi: -A r w with w = 1 - sign(A (r - 1)) |pi - mu| / delta, so
    w in [1 - 1/delta, 1 + 1/delta]: moves away from mu in the direction A pushes are
    attenuated (w = 0 at |pi - mu| = delta, corrective beyond), moves back are amplified.
    No mask and no truncation: r stays differentiable. With delta = 12.5 (paper default)
    |pi - mu| <= 1 keeps w in [0.92, 1.08]. mu (r - 1)^2 is computed as (r - 1)(pi - mu),
    which is finite for any log-prob gap (mu (r-1)^2 overflows float32 for gaps above ~44).
    Metrics: drpo/weight_{mean,min,max}, drpo/negative_weight_fraction.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    pi, mu = torch.exp(logprobs), torch.exp(old_logprobs)
    loss = -advantages * ratio + advantages.abs() * (ratio - 1.0) * (pi - mu) / (2.0 * delta)
    with torch.no_grad():
        weight = 1.0 - torch.sign(advantages * (ratio - 1.0)) * (pi - mu).abs() / delta
        metrics = {
            "drpo/weight_mean": masked_mean(weight, mask),
            "drpo/weight_min": masked_min(weight, mask),
            "drpo/weight_max": masked_max(weight, mask),
            "drpo/negative_weight_fraction": masked_mean((weight < 0).float(), mask),
        }
    return loss, metrics


@register_policy_loss("spo", extrema={"spo/weight_min": "min", "spo/weight_max": "max"})
def spo_loss(logprobs, old_logprobs, advantages, mask, *, epsilon: float = 0.2):
    """SPO (Simple Policy Optimization, Xie et al. 2024): a quadratic penalty on the ratio.

        L_t = -A r + |A| (r - 1)^2 / (2 epsilon)

    Gradient w.r.t. log pi: -A r w with w = 1 - sign(A (r - 1)) |r - 1| / epsilon, zero at
    |r - 1| = epsilon and unbounded for rare tokens (r can be huge when mu is small), which is
    what DRPO's mu factor fixes. No mask. The log-ratio is clamped to [-20, 20] only inside
    the penalty: beyond that (r - 1)^2 overflows float32 (log-ratio ~44) and such a token is
    far outside any trust region anyway. Metrics: spo/weight_{mean,min,max}.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    safe_ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    loss = -advantages * ratio + advantages.abs() * (safe_ratio - 1.0) ** 2 / (2.0 * epsilon)
    with torch.no_grad():
        weight = 1.0 - torch.sign(advantages * (ratio - 1.0)) * (ratio - 1.0).abs() / epsilon
        metrics = {
            "spo/weight_mean": masked_mean(weight, mask),
            "spo/weight_min": masked_min(weight, mask),
            "spo/weight_max": masked_max(weight, mask),
        }
    return loss, metrics


def _dppo_surrogate(logprobs, old_logprobs, advantages, mask, keep, clip_c):
    """-A sg(min(r, C)) M log pi, written so that its value is -A M min(r, C) (readable in logs).

    min(r, C) / r = exp(min(0, log C - log r)) is formed in log space: no 0/0 when r underflows.
    """
    log_ratio = logprobs - old_logprobs
    trunc = torch.exp(torch.clamp(math.log(clip_c) - log_ratio, max=0.0)).detach()
    loss = -advantages * keep * trunc * torch.exp(log_ratio)
    with torch.no_grad():
        metrics = {
            "dppo/masked_fraction": masked_mean(1.0 - keep, mask),
            "dppo/truncated_fraction": masked_mean((log_ratio > math.log(clip_c)).float(), mask),
        }
    return loss, metrics


def _harmful(advantages, logprobs, old_logprobs):
    # The move goes the way A pushes, away from mu: A > 0 and pi > mu, or A < 0 and pi < mu.
    return advantages * (logprobs - old_logprobs) > 0


@register_policy_loss("dppo_tv")
def dppo_tv_loss(logprobs, old_logprobs, advantages, mask, *, delta: float = 0.15, clip_c: float = 20.0):
    """DPPO with the Binary-TV mask (DPPO paper): a hard trust region on |pi - mu|.

        grad = -A sg(min(r, C)) M grad log pi,  M = 0 if A (r - 1) > 0 and |pi - mu| > delta, else 1

    i.e. a token is dropped when it already moved more than delta (in probability) in the
    direction its advantage pushes; moves back toward mu are always kept. C (`clip_c`)
    truncates the importance weight (1e4 = off). Metrics: dppo/masked_fraction,
    dppo/truncated_fraction.
    """
    with torch.no_grad():
        gap = (torch.exp(logprobs) - torch.exp(old_logprobs)).abs()
        keep = (~(_harmful(advantages, logprobs, old_logprobs) & (gap > delta))).float()
    return _dppo_surrogate(logprobs, old_logprobs, advantages, mask, keep, clip_c)


def binary_kl(old_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(mu) || Bernoulli(pi)) = mu log(mu/pi) + (1-mu) log((1-mu)/(1-pi)), in float64.

    xlogy gives 0 log 0 = 0; 1 - p is -expm1(log p) to keep precision near p = 1.
    """
    lmu, lpi = old_logprobs.double(), logprobs.double()
    mu, one_mu, one_pi = torch.exp(lmu), -torch.expm1(lmu), -torch.expm1(lpi)
    xlogy = torch.special.xlogy
    return mu * (lmu - lpi) + xlogy(one_mu, one_mu) - xlogy(one_mu, one_pi)


@register_policy_loss("dppo_kl")
def dppo_kl_loss(logprobs, old_logprobs, advantages, mask, *, delta: float = 0.05, clip_c: float = 20.0):
    """DPPO with the Binary-KL mask (DPPO paper): a hard trust region on the token's binary KL.

        D = mu log(mu/pi) + (1 - mu) log((1 - mu)/(1 - pi))
        grad = -A sg(min(r, C)) M grad log pi,  M = 0 if A (r - 1) > 0 and D > delta, else 1

    Same direction rule as dppo_tv; D is computed in float64 and is only used for the mask.
    Metrics: dppo/masked_fraction, dppo/truncated_fraction.
    """
    with torch.no_grad():
        div = binary_kl(old_logprobs, logprobs)
        keep = (~(_harmful(advantages, logprobs, old_logprobs) & (div > delta))).float()
    return _dppo_surrogate(logprobs, old_logprobs, advantages, mask, keep, clip_c)


@register_policy_loss("grpo", bounds={"clip_low": (0.0, 1.0)})
def grpo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.28):
    """PPO ratio clip with separate bounds (GRPO / DAPO "clip-higher").

        L_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))

    The gradient is PPO's: -A r where the unclipped branch is active, 0 where the clipped one
    is (A > 0 and r > 1 + clip_high, or A < 0 and r < 1 - clip_low). Metric:
    grpo/clip_fraction = fraction of tokens where the clipped branch is strictly larger.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        metrics = {"grpo/clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
    return loss, metrics


@register_policy_loss("pg")
def pg_loss(logprobs, old_logprobs, advantages, mask):
    """Unregularised importance-weighted surrogate, L_t = -A r (the "no trust region" baseline).

    Gradient -A r grad log pi; at r = 1 this is the plain policy gradient.
    """
    return -advantages * torch.exp(logprobs - old_logprobs), {}


# ---------------------------------------------------------------------------------------------
# Entry point.


def compute_policy_loss(
    name: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    horizon: Optional[int] = None,
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    mismatch_correction: Optional[str] = None,
    tis_cap: float = 2.0,
    mis_lower: float = 0.5,
    mis_upper: float = 2.0,
    **params,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss `name` aggregated over the masked tokens, and its metrics.

    logprobs (B, T) with grad (log pi); old_logprobs (B, T) (log mu, detached here);
    advantages (B,) or (B, T) (detached here); mask (B, T), 1 for completion tokens.
    `params` are the loss's parameters (see `loss_param_defaults`). Aggregation: see
    `drpo_trainer.algorithms.aggregation.aggregate_loss`; pass `global_num_tokens` / `global_num_seqs`
    (whole mini-batch over micro-batches and ranks) so that the micro-batch losses sum to the
    mini-batch loss. Optional mismatch correction with `rollout_logprobs`, rho =
    exp(old_logprobs - rollout_logprobs): 'tis' multiplies each token's loss by the detached
    min(rho, tis_cap); 'mis' zeroes tokens with rho outside [mis_lower, mis_upper]
    (the counts are unchanged, so the global normalisation stays valid).
    Returns (scalar loss in float32, or float64 for float64 inputs, dict of 0-dim detached float32
    metrics over the masked tokens: token means, except the extrema named by `metric_reductions(name)`).
    """
    _check_name(name)
    loss_params = validate_loss_params(name, params)
    lp, old, adv, m = _prepare_inputs(logprobs, old_logprobs, advantages, mask)
    loss_mat, metrics = POLICY_LOSSES[name](lp, old, adv, m, **loss_params)

    if mismatch_correction is not None:
        weight, mismatch = _mismatch_weight(
            old, rollout_logprobs, m, mismatch_correction, tis_cap=tis_cap, mis_lower=mis_lower, mis_upper=mis_upper
        )
        loss_mat = loss_mat * weight
        metrics.update(mismatch)

    loss = aggregate_loss(
        loss_mat,
        m,
        loss_agg_mode,
        horizon=horizon,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
    )
    metrics.update(_ratio_metrics(lp, old, m))
    return loss, metrics


def _prepare_inputs(logprobs, old_logprobs, advantages, mask):
    if logprobs.dim() != 2 or old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must all be (B, T); got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape == logprobs.shape[:1]:
        advantages = advantages[:, None].expand_as(logprobs)
    elif advantages.shape != logprobs.shape:
        raise ValueError(
            f"advantages must be (B,) = {tuple(logprobs.shape[:1])} or (B, T) = {tuple(logprobs.shape)}; "
            f"got {tuple(advantages.shape)}"
        )
    # At least float32 whatever the input dtype: in bf16, r - 1 near r = 1 has a resolution of 0.008.
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = (mask > 0).to(dtype)
    old = old_logprobs.detach().to(dtype)
    # Padding positions see logprobs == old_logprobs (r = 1): finite whatever they held, no gradient.
    lp = torch.where(m > 0, logprobs.to(dtype), old)
    adv = torch.where(m > 0, advantages.detach().to(dtype), torch.zeros((), dtype=dtype, device=lp.device))
    return lp, old, adv, m


def _ratio_metrics(lp, old, m) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        log_ratio = lp - old
        ratio = torch.exp(log_ratio)
        gap = (torch.exp(lp) - torch.exp(old)).abs()
        return {
            "policy/ratio_mean": masked_mean(ratio, m),
            "policy/ratio_max": masked_max(ratio, m),
            "policy/ratio_min": masked_min(ratio, m),
            # k3 estimator of KL(mu || pi) on tokens sampled from mu: (r - 1) - log r >= 0.
            "policy/approx_kl_k3": masked_mean((ratio - 1.0) - log_ratio, m),
            "policy/abs_pi_minus_mu_mean": masked_mean(gap, m),
            "policy/abs_pi_minus_mu_max": masked_max(gap, m),
        }


# ---------------------------------------------------------------------------------------------
# Train/inference mismatch: rollout engine vs learner log-probs of the same weights.

MISMATCH_CORRECTIONS = ("tis", "mis")


def _mismatch_weight(old, rollout_logprobs, m, mode, *, tis_cap, mis_lower, mis_upper):
    if mode not in MISMATCH_CORRECTIONS:
        raise ValueError(f"unknown mismatch_correction {mode!r}; valid: {', '.join(MISMATCH_CORRECTIONS)} or None")
    if rollout_logprobs is None or rollout_logprobs.shape != old.shape:
        got = None if rollout_logprobs is None else tuple(rollout_logprobs.shape)
        raise ValueError(
            f"mismatch_correction={mode!r} needs rollout_logprobs of shape {tuple(old.shape)} (got {got}); "
            "pass the engine's log-probs or set mismatch_correction=None"
        )
    if not (0 <= mis_lower < mis_upper) or tis_cap <= 0:
        raise ValueError(
            f"need 0 <= mis_lower < mis_upper and tis_cap > 0; got mis_lower={mis_lower}, "
            f"mis_upper={mis_upper}, tis_cap={tis_cap}"
        )
    with torch.no_grad():
        rho = torch.exp(old - torch.where(m > 0, rollout_logprobs.to(old.dtype), old))
        if mode == "tis":
            weight = rho.clamp(max=tis_cap)
            return weight, {"mismatch/tis_weight_mean": masked_mean(weight, m)}
        weight = ((rho >= mis_lower) & (rho <= mis_upper)).float()
        return weight, {"mismatch/mis_masked_fraction": masked_mean(1.0 - weight, m)}


def mismatch_metrics(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the rollout engine's log-probs are from the learner's, over the masked tokens.

    mismatch/abs_prob_diff_mean, _max: |exp(rollout_logprobs) - exp(old_logprobs)| (the max combines
    by max: MISMATCH_METRIC_REDUCTIONS);
    mismatch/k3_kl: mean of (rho - 1) - log rho with rho = exp(old - rollout), the k3
    estimator of KL(engine || learner) on tokens sampled by the engine.
    """
    if rollout_logprobs.shape != old_logprobs.shape or mask.shape != old_logprobs.shape:
        raise ValueError(
            "old_logprobs, rollout_logprobs and mask must share a shape; got "
            f"{tuple(old_logprobs.shape)}, {tuple(rollout_logprobs.shape)}, {tuple(mask.shape)}"
        )
    with torch.no_grad():
        m = (mask > 0).float()
        old = old_logprobs.float()
        rollout = torch.where(m > 0, rollout_logprobs.float(), old)
        gap = (torch.exp(rollout) - torch.exp(old)).abs()
        log_rho = old - rollout
        return {
            "mismatch/abs_prob_diff_mean": masked_mean(gap, m),
            "mismatch/abs_prob_diff_max": masked_max(gap, m),
            "mismatch/k3_kl": masked_mean(torch.expm1(log_rho) - log_rho, m),
        }
