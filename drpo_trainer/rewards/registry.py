"""The reward registry: names in ``reward.name`` -> functions ``fn(completion, answer, **kwargs) -> float``.

A reward is registered with ``@register_reward("name")``. Verifier workers are fresh interpreters,
so they find a reward by importing the module that defines it (``fn.__module__``) and reading
the attribute ``fn.__qualname__``: a reward must therefore be a top-level function of an importable
module (not ``__main__``, not a lambda or nested function). ``reward.name`` may also be written
``package.module:function``; that module is imported on lookup, so no import is needed in the
launching script. The built-in ``math`` reward registers itself when the package
(``drpo_trainer.rewards``) is imported, which any import of this module does first.
"""

from __future__ import annotations

import importlib
from typing import Callable

RewardFn = Callable[..., float]

_REWARDS: dict[str, RewardFn] = {}


def _where(fn: RewardFn) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn(completion, answer, **kwargs) -> float` selectable as ``reward.name: <name>``."""
    if not name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no ':' (':' means module:function)")

    def decorator(fn: RewardFn) -> RewardFn:
        old = _REWARDS.get(name)
        # Re-importing the same module (a worker, a test re-run) re-registers the same function.
        if old is not None and _where(old) != _where(fn):
            raise ValueError(
                f"reward name {name!r} is already registered to {_where(old)}; cannot register {_where(fn)}. "
                "Fix: choose another name."
            )
        _REWARDS[name] = fn
        return fn

    return decorator


def registered_rewards() -> list[str]:
    return sorted(_REWARDS)


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`, or the function at ``module:function``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(
                f"reward {name!r}: cannot import module {module_name!r} ({exc}). Fix: make it importable "
                "(install the package or add its folder to PYTHONPATH)."
            ) from None
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
        if not callable(fn):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
        return fn
    if name not in _REWARDS:
        raise ValueError(
            f"unknown reward {name!r}. Registered: {', '.join(sorted(_REWARDS))}. Fix: set reward.name to one of "
            "these, import the module that registers yours before building the scorer, or write "
            "reward.name=package.module:function."
        )
    return _REWARDS[name]


def importable_ref(fn: RewardFn) -> tuple[str, str]:
    """(module, qualname) by which a fresh worker interpreter can import `fn`; ValueError if none."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        raise ValueError(
            f"reward function {fn!r} (module {module!r}, name {qualname!r}) cannot be imported by the verifier "
            "workers. Fix: define it as a top-level function in an importable module (not the launched "
            "script, not a lambda or nested function)."
        )
    return module, qualname
