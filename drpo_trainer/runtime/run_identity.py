"""What may not change silently when a run resumes: its resolved config, its training data and, for
LoRA adapters (model.lora), the base model they were trained on.

A checkpoint holds the resolved config (`config.yaml`) and a fingerprint of the training files'
contents (`data_fingerprint` in `loop_state.json`). Before anything heavy is loaded, the CLI
compares them with the run being started: a change refuses to resume, naming every changed key,
unless the user allows it (`--allow-config-change trainer.max_steps,optim`), and the run then
says which changes take effect. Keys that cannot change what is trained (tracking, eval,
checkpoint cadence, the run directory) are reported but always allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from drpo_trainer.config import RENAMED_KEYS, Config, ConfigError, dump_config

DATA_KEY = "data.contents"  # the pseudo-key of the training files' contents
ALWAYS_ALLOWED = (
    "output_dir",  # a run directory may be moved or copied
    "tracking.",
    "eval.",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "checkpoint.export_final",
)


def data_fingerprint(files: list[str]) -> str:
    """sha256 over the training files' names, sizes and contents, in order."""
    from drpo_trainer.io.fingerprint import files_sha256

    return files_sha256([Path(f) for f in files], [Path(f).name for f in files])


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_changes(saved_yaml: str, current: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, this run's value)} for every key that differs. A checkpoint
    written before a key moved has it under its old name: it is compared under the new one."""
    old = {RENAMED_KEYS.get(k, k): v for k, v in _flatten(yaml.safe_load(saved_yaml) or {}).items()}
    new = _flatten(yaml.safe_load(dump_config(current)))
    # a key added since the checkpoint was written held its default then, in effect
    defaults = _flatten(yaml.safe_load(dump_config(Config())))
    old = {**{k: v for k, v in defaults.items() if k in new and k not in old}, **old}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _allowed(key: str, allowed: list[str]) -> bool:
    return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allowed) or key.startswith(ALWAYS_ALLOWED)


def newest_checkpoint_files(resume: str, output_dir: str) -> Optional[Path]:
    """The checkpoint a resume will use: the newest whose files have their manifest's sizes and whose
    config.yaml and loop_state.json their hashes (cheap; the run then hashes every file). A damaged
    one is skipped with a warning; CheckpointError (a ConfigError) when none is usable."""
    from drpo_trainer.io.checkpoint import SMALL_FILES, resolve_resume

    return resolve_resume(resume, output_dir, hashes=SMALL_FILES)


def check_world_change(cfg: Config, resume: Optional[str], world_size: int) -> None:
    """A checkpoint of another process count must be convertible (ZeRO-3): say so before loading."""
    path = newest_checkpoint_files(resume, cfg.output_dir) if resume else None
    if path is None or not (path / "loop_state.json").is_file():
        return
    from drpo_trainer.io import reshard as universal

    saved = universal.saved_world_size(path)
    if saved != world_size and "lora_base" in json.loads((path / "loop_state.json").read_text()):
        raise ConfigError(
            f"resume from {path}: a LoRA checkpoint (model.lora) resumes only with the process count that wrote "
            f"it ({saved}; this run has {world_size}). Fix: resume with {saved} learner process(es)"
        )
    if saved != world_size:
        universal.check_convertible(path, world_size)


def _check_lora_base(cfg: Config, path: Path) -> None:
    """A LoRA checkpoint holds adapters only: they resume onto the base model they were trained on, or not at all."""
    saved = json.loads((path / "loop_state.json").read_text()).get("lora_base")
    if saved is None or cfg.model.lora is None:  # full fine-tuning, or a switch the config check refuses
        return
    from drpo_trainer.learner.lora import check_base_reference

    model_path = cfg.model.path
    if model_path.startswith("builtin:"):
        from drpo_trainer.builtin.tiny_model import resolve_model_path

        model_path = resolve_model_path(model_path)
    try:
        check_base_reference(saved, model_path, f"resume from {path}")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None


def check_resume(cfg: Config, resume: Optional[str], allowed: list[str]) -> list[str]:
    """Raise ConfigError if resuming `cfg` would silently change the config or the data; else return
    the lines describing the changes that take effect (allowed ones)."""
    path = newest_checkpoint_files(resume, cfg.output_dir) if resume else None
    if path is None:
        return []
    changes = config_changes((path / "config.yaml").read_text(), cfg)
    saved_data = json.loads((path / "loop_state.json").read_text()).get("data_fingerprint")
    if saved_data is not None and saved_data != data_fingerprint(cfg.data.train_files):
        changes[DATA_KEY] = ("the checkpoint's training data", "other contents")
    _check_lora_base(cfg, path)
    refused = [k for k in changes if not _allowed(k, allowed)]
    described = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
    if refused:
        raise ConfigError(
            f"resume from {path}: this run differs from the checkpoint's in "
            + "; ".join(d for k, d in zip(changes, described) if k in refused)
            + f". Fix: resume with the checkpoint's config (its config.yaml), or allow the change with "
            f"--allow-config-change {','.join(refused)}"
        )
    return described
