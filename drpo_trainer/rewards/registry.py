"""The reward registry: names in ``reward.name`` -> functions ``fn(completion, answer, **kwargs) -> float``.

A reward is registered with ``@register_reward("name")``. Verifier workers are fresh interpreters,
so they find a reward by importing the module that defines it (``fn.__module__``) and reading
the attribute ``fn.__qualname__``: a reward must therefore be a top-level function of an importable
module (not ``__main__``, not a lambda or nested function). The built-in ``math`` reward
registers itself when the package (``drpo_trainer.rewards``) is imported, which any import of
this module does first.

Only registered functions can be selected. The user's own modules are imported when named in
``reward.import_modules``; ``reward.name`` is then a registered name, or ``module:function`` for a
registered function of one of those modules. A ``module:function`` path to anything else, such
as ``pydoc:pipepager`` (which would run the gold answer as a shell command), is refused before
its module is imported: the config names a reward, not arbitrary code to call.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Callable, Sequence

RewardFn = Callable[..., float]

_REWARDS: dict[str, RewardFn] = {}
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _where(fn: RewardFn) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn(completion, answer, **kwargs) -> float` selectable as ``reward.name: <name>``."""
    if not name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no ':' (':' means module:function)")

    def decorator(fn: RewardFn) -> RewardFn:
        old = _REWARDS.get(name)
        # Re-importing the same module (a worker, a test re-run) re-registers the same function; a
        # script run as __main__ and then imported by its module name registers it twice, and the
        # importable copy (the one workers can find) replaces the script's.
        script_copy = old is not None and old.__module__ == "__main__" and old.__qualname__ == fn.__qualname__
        if old is not None and _where(old) != _where(fn) and not script_copy:
            raise ValueError(
                f"reward name {name!r} is already registered to {_where(old)}; cannot register {_where(fn)}. "
                "Fix: choose another name."
            )
        _REWARDS[name] = fn
        return fn

    return decorator


def registered_rewards() -> list[str]:
    return sorted(_REWARDS)


def import_reward_modules(modules: Sequence[str]) -> None:
    """Import the modules named in ``reward.import_modules``; their ``@register_reward`` functions register."""
    for module in modules:
        if not _MODULE_PATH.fullmatch(module):
            raise ValueError(
                f"reward.import_modules: {module!r} is not a module path. Fix: write a dotted module name "
                "such as my_project.rewards"
            )
        try:
            importlib.import_module(module)
        except Exception as exc:  # the user's module may fail in any way; say so in one line
            detail = (str(exc).splitlines() or [""])[0]
            raise ValueError(
                f"reward.import_modules: cannot import {module!r} ({type(exc).__name__}: {detail}). Fix: make it "
                "importable (install the package or add its folder to PYTHONPATH)"
            ) from None


def _is_registered(fn: object) -> bool:
    return any(fn is registered for registered in _REWARDS.values())


def get_reward(name: str, import_modules: Sequence[str] = ()) -> RewardFn:
    """The reward registered as `name`, after importing `import_modules`.

    ``module:function`` names a registered function by where it is defined; `module` must be one
    of `import_modules`. Nothing else is ever imported or called: an arbitrary importable callable
    (``pydoc:pipepager``, ``os:system``) is refused before its module is imported.
    """
    import_modules = list(import_modules)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if module_name not in import_modules:
            raise ValueError(
                f"reward {name!r}: module {module_name!r} is not in reward.import_modules, and only functions "
                "registered with @register_reward by a module named there can be used. Fix: decorate your "
                f'function with @register_reward("<name>"), list its module in reward.import_modules and set '
                "reward.name to <name>"
            )
        import_reward_modules(import_modules)
        fn: object = sys.modules[module_name]
        for part in attr.split("."):
            fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
        if not _is_registered(fn):
            raise ValueError(
                f"reward {name!r}: {module_name}.{attr} is not a registered reward. Fix: decorate it with "
                f'@register_reward("<name>") in {module_name} (your own code), then set reward.name to <name>'
            )
        return fn  # type: ignore[return-value]
    import_reward_modules(import_modules)
    if name not in _REWARDS:
        raise ValueError(
            f"unknown reward {name!r}. Registered: {', '.join(sorted(_REWARDS))}. Fix: set reward.name to one of "
            "these, or list the module that registers yours (@register_reward) in reward.import_modules."
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
