"""The user's side of a configuration: a YAML file and dotted overrides read into one tree, and
every problem told back in one line naming the key, the value and the fix.

Owns `ConfigError`, reading the file, override parsing and merging, the wording of pydantic's
validation errors, and the table of keys that moved (`RENAMED_KEYS`): a file or an override that
still uses an old name is refused with "renamed to <new name>", and a checkpoint's saved config
written before the move is read with the new names (drpo_trainer/runtime/run_identity.py).
Imports only the standard library, yaml and pydantic; drpo_trainer/config.py (the schema)
re-exports what callers need.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration problem, reported with the key and how to fix it."""


_MISSING = object()

# old dotted key -> new dotted key. Keys of one rollout backend moved under rollout.hf / rollout.vllm.
RENAMED_KEYS: dict[str, str] = {
    "rollout.generation_batch_size": "rollout.hf.generation_batch_size",
    "rollout.tensor_parallel_size": "rollout.vllm.tensor_parallel_size",
    "rollout.gpu_memory_utilization": "rollout.vllm.gpu_memory_utilization",
    "rollout.enable_sleep_mode": "rollout.vllm.enable_sleep_mode",
    "rollout.max_model_len": "rollout.vllm.max_model_len",
    "rollout.kv_cache_gib": "rollout.vllm.kv_cache_gib",
    "eval.k": "eval.samples_per_prompt",
}
# why a key moved, by the start of its old name (said once in the refusal)
_RENAME_REASONS = {
    "rollout.": "the keys of one rollout backend live under rollout.hf / rollout.vllm",
    "eval.k": "the name training uses for completions per prompt",
}


def read_config_file(path: Any) -> dict:
    """The mapping in a YAML file; ConfigError (one line with the fix) for a missing, non-UTF-8 or invalid file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}. Fix: pass an existing YAML file, e.g. configs/tiny_cpu.yaml")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}). "
            "Fix: save the file as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (model:, rollout:, ...), not {type(raw).__name__}")
    return raw


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """['trainer.max_steps=3', 'tracking.wandb.tags=[a,b]'] -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override '{arg}' is not of the form key=value (e.g. trainer.max_steps=20)")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override '{arg}' has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        _set_dotted(tree, key, value)
    return tree


def merge_dicts(base: dict, over: dict, *, replace: tuple[str, ...] = ()) -> dict:
    """`base` with `over` merged in key by key, recursively (neither is modified); a key in `replace`
    takes `over`'s mapping whole (eval.files: the override names every eval set)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in replace:
            out[k] = merge_dicts(out[k], v, replace=replace)
        else:
            out[k] = v
    return out


def drop_params_of_a_switched_loss(raw: dict, over: dict) -> None:
    """`algorithm.loss=grpo` on the command line over a file written for drpo: the file's
    loss_params ({delta: 12.5}) belong to drpo, so grpo starts from its own defaults (said once)."""
    file_algo, over_algo = raw.get("algorithm") or {}, over.get("algorithm") or {}
    if not isinstance(file_algo, dict) or not isinstance(over_algo, dict):
        return
    new, old = over_algo.get("loss"), file_algo.get("loss", "drpo")
    if new is None or new == old or "loss_params" in over_algo or not file_algo.get("loss_params"):
        return
    print(
        f"drpo-train: algorithm.loss={new} replaces the file's {old}; its loss_params {file_algo['loss_params']} "
        f"are dropped ({new} uses its defaults unless you set algorithm.loss_params.*)",
        file=sys.stderr,
    )
    raw["algorithm"] = {k: v for k, v in file_algo.items() if k != "loss_params"}


# pydantic error types of a value outside its bounds: the message gets the key's default as the fix
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number")


def check_renamed(raw: dict) -> None:
    """Refuse a config tree (file merged with overrides) that uses a key's old name."""
    found = []
    for old, new in RENAMED_KEYS.items():
        node: Any = raw
        for part in old.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            found.append((old, new))
    if found:
        moved = "; ".join(f"{old} was renamed to {new}" for old, new in found)
        why = dict.fromkeys(r for old, _ in found for start, r in _RENAME_REASONS.items() if old.startswith(start))
        raise ConfigError(
            f"{moved} ({'; '.join(why)}). "
            f"Fix: use the new name{'s' if len(found) > 1 else ''}, e.g. {found[0][1]}={_value(raw, found[0][0])}"
        )


def _value(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node[part]
    return node


def _section(model: type[BaseModel], loc: tuple) -> Any:
    """The model class at `loc` (all but its last part), or None where `loc` leaves the models."""
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    cls = _section(model, loc)
    return [] if cls is None else list(cls.model_fields)


def _default(model: type[BaseModel], loc: tuple) -> tuple[str, Any]:
    """The key and default of the field a bound error is about (`optim.betas.0` -> optim.betas and
    its default); ("", _MISSING) inside a mapping (a loss parameter: the loss's message names it)."""
    for end in range(len(loc), 0, -1):
        cls = _section(model, loc[:end])
        field = None if cls is None else cls.model_fields.get(str(loc[end - 1]))
        if field is not None:
            value = field.get_default(call_default_factory=True)
            if isinstance(value, dict):
                break
            return ".".join(map(str, loc[:end])), value.model_dump() if isinstance(value, BaseModel) else value
    return "", _MISSING


def _is_union_tag(part: Any) -> bool:
    # pydantic names the member of a union (int | 'longest') that failed: not a key
    return isinstance(part, str) and (part.startswith(("function-", "constrained-", "literal[")) or part == "int")


def format_errors(err: ValidationError, model: type[BaseModel]) -> str:
    """pydantic's errors -> "invalid configuration: KEY: problem (got VALUE). Fix: ..." (one line
    when there is one error, which is the common case; a union's members' errors share a line)."""
    by_key: dict[str, list[str]] = {}
    fixes: dict[str, str] = {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not _is_union_tag(p))
        key = ".".join(str(p) for p in loc) or "<config>"
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else ""
            by_key.setdefault(key, []).append(f"unknown key. {hint} Valid keys here: {', '.join(known)}")
            continue
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or key == "<config>" else f" (got {got!r})"
        by_key.setdefault(key, []).append(e["msg"].removeprefix("Value error, ") + got_s)
        if e["type"] in _BOUND_ERRORS:
            field_key, default = _default(model, loc)
            fixes.setdefault(
                key,
                f"set {field_key} within its range, e.g. its default {default!r}"
                if field_key
                else "give a finite number in range",
            )
    lines = []
    for key, msgs in by_key.items():
        fix = f". Fix: {fixes[key]}" if key in fixes else ""
        lines.append(f"  {key}: {' or: '.join(msgs)}{fix}" if key != "<config>" else f"  {msgs[0]}")
    if len(lines) == 1:
        return f"invalid configuration: {lines[0].strip()}"
    return (
        "invalid configuration:\n" + "\n".join(lines) + "\nSee `drpo-train --print-config` for every key and default."
    )
