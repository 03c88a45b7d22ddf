"""What a command may write over or delete: run directories and export directories.

- A new run (no `--resume`) refuses an `output_dir` that already holds a run (`config.yaml`,
  `metrics.jsonl` or `checkpoints/`): starting there would cut its metrics, replace its config
  and drop its newer checkpoints. `--resume auto` continues that run; a new directory starts anew.
- An export writes into a fresh temporary directory beside its target and renames it into place.
  It replaces only an earlier export (marked by `EXPORT_MARKER`) or, with `--overwrite`, another
  directory; never the current directory or one above it, a run directory, or the checkpoint it
  reads or a directory holding it, whatever the options.

- An evaluation (`drpo-train eval`) writes into a directory that does not exist, is empty, or holds
  an earlier evaluation (marked by `EVAL_MARKER`); never a run directory, the current directory or
  one above it, or a directory inside the model it evaluates.

The checks run before anything is written; each refusal is one line with the fix (ConfigError).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from drpo_trainer.config import ConfigError

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")
EXPORT_MARKER = ".drpo-export"
EVAL_MARKER = ".drpo-eval"


def run_files(path: Path) -> list[str]:
    """The names that make `path` a run directory (a checkpoint directory holds config.yaml too)."""
    return [name for name in RUN_FILES if (Path(path) / name).exists()]


def check_output_dir(output_dir: str | os.PathLike, resume: Optional[str]) -> None:
    """ConfigError unless a run may start in `output_dir`: a directory (or nothing yet) that we can
    write, holding no run unless this one continues it (--resume auto, or a checkpoint inside it)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file. Fix: set output_dir to a directory")
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: {existing} is not writable. Fix: set output_dir to a writable place")
    found = run_files(out) if out.is_dir() else []
    if not found or resume == "auto":
        return
    if resume is not None and _inside(Path(resume), out):
        return
    what = "a new run" if resume is None else f"a run resumed from {resume}, outside it,"
    raise ConfigError(
        f"output_dir {out} holds a run ({', '.join(found)}): {what} would overwrite it. "
        "Fix: continue it with --resume auto, or set output_dir to a new directory"
    )


def _inside(path: Path, parent: Path) -> bool:
    path, parent = path.resolve(), parent.resolve()
    return path == parent or parent in path.parents


def check_export_target(out_dir: str | os.PathLike, checkpoint: str | os.PathLike, *, overwrite: bool) -> None:
    """ConfigError unless an export of `checkpoint` may be written to `out_dir`."""
    out, ckpt = Path(out_dir), Path(checkpoint)
    fix = "Fix: export to a new directory"
    if _inside(Path.cwd(), out):
        raise ConfigError(f"export: {out} is the current directory or holds it: it is never replaced. {fix}")
    if _inside(out, ckpt) or _inside(ckpt, out):
        raise ConfigError(f"export: {out} is the checkpoint {ckpt}, inside it or holds it: never replaced. {fix}")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"export: {out} is a file, not a directory. {fix}")
    found = run_files(out)
    if found:
        raise ConfigError(
            f"export: {out} holds a run or a checkpoint ({', '.join(found)}): it is never replaced. {fix}"
        )
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file() and not overwrite:
        raise ConfigError(
            f"export: {out} is not empty and is not an earlier export (no {EXPORT_MARKER}). "
            f"{fix}, or pass --overwrite to replace it"
        )


def staging_dir(out_dir: Path) -> Path:
    """A new empty directory beside `out_dir` (same filesystem: the final rename is atomic)."""
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def publish_export(staged: Path, out_dir: Path, source: str) -> None:
    """Mark `staged` as an export and put it at `out_dir`; what was there (checked by
    `check_export_target`) is moved aside first and removed only once the new one is in place."""
    (staged / EXPORT_MARKER).write_text(json.dumps({"source": source}) + "\n")
    out_dir = Path(out_dir).absolute()
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    os.rename(staged, out_dir)
    if old is not None:
        shutil.rmtree(old)


def check_eval_target(out_dir: str | os.PathLike, model: Optional[str | os.PathLike]) -> None:
    """ConfigError unless `drpo-train eval` may write its results to `out_dir` (`model`: the evaluated
    directory, or None for a model that is not a local directory)."""
    out = Path(out_dir)
    fix = "Fix: pass --out with a new directory"
    if _inside(Path.cwd(), out):
        raise ConfigError(f"eval: --out {out} is the current directory or holds it: never written into. {fix}")
    if model is not None and _inside(out, Path(model)):
        raise ConfigError(f"eval: --out {out} is inside the model {model} it evaluates. {fix}")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"eval: --out {out} is a file, not a directory. {fix}")
    found = run_files(out)
    if found:
        raise ConfigError(f"eval: --out {out} holds a run or a checkpoint ({', '.join(found)}). {fix}")
    if any(out.iterdir()) and not (out / EVAL_MARKER).is_file():
        raise ConfigError(
            f"eval: --out {out} is not empty and holds no earlier evaluation (no {EVAL_MARKER}): its files are "
            f"never replaced. {fix}"
        )
