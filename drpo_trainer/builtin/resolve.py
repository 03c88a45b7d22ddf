"""`model.path: builtin:...` -> the cached build of that embedded model (built first if absent)."""

from __future__ import annotations

from drpo_trainer.builtin import tiny_model, tiny_moe


def resolve_model_path(path: str) -> str:
    """`path` unchanged for a model directory or hub id; `builtin:tiny-math` and `builtin:tiny-math-moe`
    resolve to their cached builds (see tiny_model.resolve_model_path for the locking rules)."""
    if path == tiny_moe.BUILTIN_NAME:
        return str(tiny_moe.ensure_built(tiny_model.default_cache_dir() / tiny_moe.BUILD_VERSION))
    return tiny_model.resolve_model_path(path)
