"""A sha256 over files' names, sizes and contents: what a resume checks it still has (the training
data, a LoRA run's base model weights)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def files_sha256(files: list[Path], names: list[str]) -> str:
    """One hex digest over `name:size:sha256(content)` per file, in the given order."""
    total = hashlib.sha256()
    for f, name in zip(files, names):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        total.update(f"{name}:{Path(f).stat().st_size}:{h.hexdigest()}\n".encode())
    return total.hexdigest()
