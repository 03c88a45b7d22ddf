"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle, and a pickle can call any importable function while it loads. A
checkpoint may come from someone else, and its MANIFEST.json proves nothing (whoever ships the
files writes it too), so every load of a checkpoint file goes through here:

- `scan`: before anything is loaded, the globals each file's pickle names are read (without
  executing it); a file that needs a type outside the allow-list is refused with one line naming
  the type and the file.
- `weights_only_loads`: around DeepSpeed's own loads (which pass `weights_only=False`), torch's
  switch TORCH_FORCE_WEIGHTS_ONLY_LOAD makes every `torch.load` use the restricted unpickler, with
  the allow-list added for the duration. A file the scan missed still cannot run code.
- `load_plain`: our own files (RNG states, a rank's state) hold tensors and plain data only.

The allow-list is what DeepSpeed 0.19 stores, found by saving real checkpoints (one process
unpartitioned, ZeRO-3, bf16, and the universal conversion) and listing what `weights_only=True`
rejects: the ZeRO optimizer states hold a `LossScaler` and a `ZeroStageEnum`. `DynamicLossScaler`
is what fp16 stores instead (DeepSpeed's `CreateLossScaler`; fp16 cannot run on CPU). Loading an
allow-listed class creates the object and fills its `__dict__`; none of their code runs.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import torch

from drpo_trainer.config import ConfigError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
# The previous release's RNG files: the numpy generator state held an ndarray. Building an array
# from its dtype, shape and bytes runs no code; only RNG files may hold these.
LEGACY_RNG_TYPES = (
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",  # the dtype of the generator's key words (filled in by the pickle's BUILD)
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",  # the name numpy 1 wrote
)
_MOVED = {"numpy.core.multiarray._reconstruct": "numpy._core.multiarray._reconstruct"}


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file needs a type outside the allow-list (exit 2 through the CLI)."""


def resolve(names: Iterable[str]) -> list:
    """The objects behind allow-listed names, as torch.serialization.safe_globals takes them
    (imported only when a load needs them: checking names does not import DeepSpeed)."""
    out: list = []
    for name in names:
        module, attr = _MOVED.get(name, name).rsplit(".", 1)
        obj = getattr(importlib.import_module(module), attr)
        out.append(obj if f"{obj.__module__}.{obj.__qualname__}" == name else (obj, name))
    return out


def _refusal(what: str, path: Path) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} needs {what}, which a checkpoint file may not hold (loading it could run code): refused, "
        "nothing of it ran. Fix: use a checkpoint written by drpo-train (docs/security.md)"
    )


def scan(paths: Iterable[Path], allowed: Iterable[str] = ()) -> None:
    """Refuse the first file whose pickle names a global outside torch's safe set and `allowed`."""
    names = set(allowed)
    for path in paths:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (ValueError, RuntimeError, pickle.UnpicklingError) as err:  # not a torch zip file, odd opcodes
            raise _refusal(f"a format the safe reader does not accept ({str(err).splitlines()[0]})", path) from None
        bad = [g for g in unsafe if g not in names]
        if bad:
            raise _refusal(", ".join(bad), path)


def checkpoint_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*.pt") if p.is_file())


@contextmanager
def weights_only_loads(allowed: Iterable[str] = DEEPSPEED_TYPES, where: Path | str = "the checkpoint"):
    """Every torch.load inside (DeepSpeed's included) uses weights_only=True with `allowed` added;
    a refusal becomes an UnsafeCheckpointError naming the type and `where`."""
    objects = resolve(allowed)
    saved = {k: os.environ.get(k) for k in (FORCE, FORCE_NOT)}
    os.environ[FORCE] = "1"
    os.environ.pop(FORCE_NOT, None)  # torch refuses both at once; ours wins for the duration
    try:
        with torch.serialization.safe_globals(objects):
            yield
    except pickle.UnpicklingError as err:
        raise _refusal(_global_in(str(err)), Path(where)) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _global_in(message: str) -> str:
    """The type torch's restricted unpickler refused, from its message."""
    for pattern in (r"GLOBAL (\S+)", r"unrecognized function (\S+)", r"but got <class '([^']+)'>"):
        found = re.search(pattern, message)
        if found:
            return found.group(1)
    return "a type the safe reader refused"


def load_plain(path: Path, allowed: Iterable[str] = ()) -> Any:
    """A file of tensors and plain data (dict, list, tuple, str, int, float, bool, None)."""
    scan([path], allowed)
    try:
        with torch.serialization.safe_globals(resolve(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(_global_in(str(err)), path) from None
