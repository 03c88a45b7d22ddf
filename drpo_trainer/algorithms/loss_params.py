"""The parameters of each policy loss: names, defaults and bounds, without torch.

Config validation (drpo_trainer/config.py) checks `algorithm.loss` and `algorithm.loss_params`
here, so that loading a config imports no torch. The loss functions live in
drpo_trainer/algorithms/losses.py; its `register_policy_loss` checks that a built-in loss's
keyword-only arguments and defaults are the ones declared below, and declares the schema of a
loss registered at runtime from its signature, so both modules read one table.
"""

from __future__ import annotations

import math
from typing import Optional

Bounds = dict[str, tuple[float, float]]

# name -> {parameter: default}; the built-in losses' functions must have exactly these keyword-only arguments
BUILTIN_DEFAULTS: dict[str, dict[str, float]] = {
    "drpo": {"delta": 12.5},
    "spo": {"epsilon": 0.2},
    "dppo_tv": {"delta": 0.15, "clip_c": 20.0},
    "dppo_kl": {"delta": 0.05, "clip_c": 20.0},
    "grpo": {"clip_low": 0.2, "clip_high": 0.28},
    "pg": {},
}
# Open interval (low, high) of a parameter; parameters not listed must be in (0, inf).
BUILTIN_BOUNDS: dict[str, Bounds] = {"grpo": {"clip_low": (0.0, 1.0)}}

_DEFAULTS: dict[str, dict[str, float]] = {k: dict(v) for k, v in BUILTIN_DEFAULTS.items()}
_BOUNDS: dict[str, Bounds] = {k: dict(BUILTIN_BOUNDS.get(k, {})) for k in BUILTIN_DEFAULTS}


def declare_loss_params(name: str, defaults: dict[str, float], bounds: Optional[Bounds] = None) -> None:
    """Declare (or, for a built-in loss, check) the parameters of loss `name`."""
    if name in BUILTIN_DEFAULTS:
        if defaults != BUILTIN_DEFAULTS[name] or dict(bounds or {}) != BUILTIN_BOUNDS.get(name, {}):
            raise ValueError(
                f"policy loss {name!r}: parameters {defaults} / bounds {bounds} differ from its declared schema "
                f"{BUILTIN_DEFAULTS[name]} / {BUILTIN_BOUNDS.get(name, {})} in drpo_trainer/algorithms/loss_params.py"
            )
        return
    _DEFAULTS[name] = dict(defaults)
    _BOUNDS[name] = dict(bounds or {})


def loss_names() -> list[str]:
    """Every loss whose parameters can be validated (the built-in ones and those registered since)."""
    return sorted(_DEFAULTS)


def loss_param_defaults(name: str) -> dict[str, float]:
    """The parameters of a loss and their defaults, e.g. {'delta': 12.5} for drpo."""
    if name not in _DEFAULTS:
        raise ValueError(
            f"unknown policy loss {name!r}; valid losses: {', '.join(loss_names())}. Fix: set algorithm.loss to "
            "one of them (or register yours with register_policy_loss before loading the config)"
        )
    return dict(_DEFAULTS[name])


def validate_loss_params(name: str, params: dict) -> dict[str, float]:
    """Check a loss name and its parameters; return the full parameter set (defaults filled in).

    Raises ValueError naming the unknown loss or parameter and listing the valid ones, or
    naming a value outside its range (NaN and infinities are outside every range).
    """
    defaults = loss_param_defaults(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k} (default {v})" for k, v in defaults.items()) or "none"
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for policy loss {name!r}; valid: {valid}. "
            "Fix: set only these in algorithm.loss_params"
        )
    full = {**defaults, **params}
    for key, value in full.items():
        low, high = _BOUNDS[name].get(key, (0.0, math.inf))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low < value < high):
            raise ValueError(
                f"policy loss {name!r}: {key}={value!r} must be a number in the open interval ({low}, {high}); "
                f"the default is {defaults[key]}. Fix: set algorithm.loss_params.{key} inside that interval"
            )
    return {k: float(v) for k, v in full.items()}
