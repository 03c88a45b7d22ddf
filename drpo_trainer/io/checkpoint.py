"""Checkpoint files that never lose a run: atomic publish, manifest, verified resume.

What a trainer run puts in a checkpoint and takes back out is drpo_trainer.runtime.run (`save_run`,
`restore_run`); the HF export is drpo_trainer.io.export. Functions that every rank calls take the
run's `DistContext` (default: `DistContext.current()`).

Layout of `<output_dir>/checkpoints/`:

    step_000010/
        ds/state/...          DeepSpeed ZeRO shards: model, optimizer, LR scheduler (every rank)
        rng/rank_00000.pt     python / numpy / torch RNG states of each rank (tensors, ints, lists)
        ranks/state_00000.pt  a rank's own loop state, if it has any (asynchronous layout: the
                              batches sampled ahead of the learner, docs/async.md); plain data
        loop_state.json       step, data position, W&B run id, world size, ... (model.lora: the base
                              model's path and weights sha256, "lora_base"; ds/ then holds only the
                              adapters and their optimizer state)
        config.yaml           the resolved config of the run
        hf/                   model config + tokenizer (what `drpo-train export` needs besides weights)
        MANIFEST.json         size and sha256 of every file above, written last
    latest                    name of the newest published checkpoint, replaced last

A checkpoint is written under `.tmp-step_N`, hashed (files split over ranks), then renamed
into place in one `os.rename`; the `latest` pointer moves after that, and old ones are
pruned last. A crash at any point leaves either a `.tmp-step_N` (ignored, removed by the
next save) or a complete `step_N`. Resume walks every `step_*` newest first and takes the
first whose manifest matches the files, warning about each one it skips; when checkpoints exist
and none matches, it refuses to start rather than start over.

Nothing here runs code from a checkpoint: every file is loaded with `weights_only=True` and an
allow-list (drpo_trainer.io.safe_load, docs/security.md). A write that fails (a full disk) stops
the run with the path and the free space; the checkpoints already published stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from drpo_trainer.config import ConfigError
from drpo_trainer.io.safe_load import (
    DEEPSPEED_TYPES,
    LEGACY_RNG_TYPES,
    checkpoint_files,
    load_plain,
    scan,
    weights_only_loads,
)
from drpo_trainer.runtime.distributed import DistContext, all_gather_plain

STATE_TAG = "state"
MANIFEST = "MANIFEST.json"
SMALL_FILES = ("config.yaml", "loop_state.json")  # what the checks before a resume read


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed as asked (missing, incomplete, none valid): exit 2."""


class CheckpointWriteError(Exception):
    """Writing a checkpoint failed (a full disk): exit 1; published checkpoints are untouched."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_share(root: Path, names: list[str], ctx: DistContext) -> dict[str, list]:
    """This rank's share of the files (round robin), hashed; gathered on every rank."""
    rank, world = ctx.rank, ctx.world_size
    mine = {n: [(root / n).stat().st_size, _sha256(root / n)] for n in names[rank::world]}
    if world == 1:
        return mine
    return {k: v for part in all_gather_plain(mine, ctx) for k, v in part.items()}


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    """This process's RNG states as tensors, ints, floats and lists (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 words, widened: torch stores int64 plainly
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]  # a tuple holding an ndarray in the previous release's files
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    engine,
    output_dir: str,
    step: int,
    loop_state: dict,
    *,
    config_yaml: str,
    hf_save=None,
    keep_last: int = 2,
    ctx: Optional[DistContext] = None,
    rank_state: Optional[dict] = None,
    adapters_only: bool = False,
) -> Path:
    """Every rank calls this. Returns the published directory. `adapters_only` (model.lora): the frozen
    base weights are left out, the model state is the adapters' (`loop_state` then names the base
    model, "lora_base", and a load restores the adapters onto it). `rank_state`: this rank's own state,
    plain data only (dicts, lists, str, int, float, bool, None, tensors: it is loaded back with
    weights_only=True), given back by `load_checkpoint` to the same rank of the same world size.
    Raises CheckpointWriteError when a file cannot be written; nothing published is touched then."""
    ctx = ctx or DistContext.current()
    root = checkpoints_dir(output_dir)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    try:
        _write(engine, tmp, step, loop_state, config_yaml, hf_save, ctx, rank_state, adapters_only)
        if ctx.rank == 0:
            _publish(root, tmp, final, step, keep_last)
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _is_write_failure(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # ours, half written: give the space back
        raise CheckpointWriteError(_write_failure(root, tmp, err)) from None
    ctx.barrier()
    return final


def _write(
    engine, tmp: Path, step: int, loop_state: dict, config_yaml: str, hf_save, ctx, rank_state, adapters_only=False
) -> None:
    """Every rank writes its files into `tmp`; rank 0 adds the manifest of them all."""
    rank, world = ctx.rank, ctx.world_size
    root = tmp.parent
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for debris in root.glob(".tmp-step_*"):  # of a crash during an earlier write
            shutil.rmtree(debris, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        (tmp / "ranks").mkdir()
    ctx.barrier()
    frozen = {"exclude_frozen_parameters": True} if adapters_only else {}
    engine.save_checkpoint(str(tmp / "ds"), tag=STATE_TAG, save_latest=False, **frozen)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank_state is not None:
        torch.save(rank_state, tmp / "ranks" / f"state_{rank:05d}.pt")
    if rank == 0:
        (tmp / "loop_state.json").write_text(json.dumps({**loop_state, "step": step, "world_size": world}, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        if hf_save is not None:
            hf_save(tmp / "hf")
    ctx.barrier()
    manifest = _hash_share(tmp, _files(tmp), ctx)
    if rank == 0:
        with open(tmp / MANIFEST, "w") as f:
            json.dump({"files": manifest}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def _publish(root: Path, tmp: Path, final: Path, step: int, keep_last: int) -> None:
    """Rank 0: one rename makes the checkpoint visible; then the pointer moves; then old ones go."""
    _drop_newer(root, step)
    if final.exists():  # the same step written again (a resumed run re-reaching it)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    _prune(root, keep_last)


def _is_write_failure(err: RuntimeError) -> bool:
    """torch.save reports a failed write as a RuntimeError from its zip writer."""
    text = str(err)
    return any(k in text for k in ("PytorchStreamWriter", "file write failed", "No space left"))


def _write_failure(root: Path, tmp: Path, err: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    pointer = root / "latest"
    kept = f"checkpoint {pointer.read_text().strip()} is intact" if pointer.is_file() else "no earlier checkpoint"
    reason = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
    return (
        f"could not write checkpoint {tmp} ({free} on {root}): {reason}; {kept}. "
        "Fix: free space there (or lower checkpoint.keep_last) and continue with --resume auto"
    )


def _step_dirs(root: Path) -> list[Path]:
    """Published checkpoints, newest first (`.tmp-step_*` debris of an unfinished write excluded)."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=_step_of, reverse=True)


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def _drop_newer(root: Path, step: int) -> None:
    """Checkpoints past `step` belong to a future this run abandoned (it resumed from an older
    one); left in place they would outrank the new ones and be resumed from."""
    for newer in [p for p in _step_dirs(root) if _step_of(p) > step]:
        warnings.warn(f"removing {newer}: this run continues from an older checkpoint (step {step})", stacklevel=4)
        shutil.rmtree(newer, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    for old in _step_dirs(root)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(
    path: Path, *, hashes: bool | tuple[str, ...] = True, shared: bool = False, ctx: Optional[DistContext] = None
) -> Optional[str]:
    """None when every file of the manifest is there with its size (and hash); else the problem.
    `hashes`: True hashes every file, False none, a tuple of names only those (SMALL_FILES: cheap).

    shared=True is a collective of the ranks of `ctx`: each checks every size but hashes only its
    round-robin share of the files, and all return the same answer (at 30B scale one rank alone
    would hash for minutes while the others wait)."""
    ctx = ctx or DistContext.current()
    rank, world = (ctx.rank, ctx.world_size) if shared else (0, 1)
    problem = _verify_share(path, hashes, rank, world)
    if world == 1:
        return problem
    return next((p for p in all_gather_plain(problem, ctx) if p is not None), None)


def _verify_share(path: Path, hashes: bool | tuple[str, ...], rank: int, world: int) -> Optional[str]:
    mf = path / MANIFEST
    if not mf.is_file():
        return "no MANIFEST.json (the write did not finish)"
    try:
        files = json.loads(mf.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        return f"unreadable manifest: {exc}"
    for i, (rel, (size, digest)) in enumerate(sorted(files.items())):
        p = path / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {size}"
        mine = i % world == rank if hashes is True else bool(hashes) and rel in hashes and rank == 0
        if mine and _sha256(p) != digest:
            return f"{rel} does not match its sha256"
    return None


def find_checkpoint(
    output_dir: str,
    *,
    shared: bool = False,
    ctx: Optional[DistContext] = None,
    hashes: bool | tuple[str, ...] = True,
) -> Optional[Path]:
    """The newest valid checkpoint, warning about each newer one skipped; None when there is none at
    all; CheckpointError listing what is wrong with each when there are some and none is valid.

    Ranked by step, not by the `latest` pointer: a crash between the publishing rename and the
    pointer move leaves a complete checkpoint newer than the pointer, and it is the one to use
    (newer checkpoints of an abandoned future are removed by the next save, see `_drop_newer`)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    ctx = ctx or DistContext.current()
    skipped = []
    for cand in _step_dirs(root):
        problem = verify_checkpoint(cand, hashes=hashes, shared=shared, ctx=ctx)
        if problem is None:
            for name, why in skipped if not shared or ctx.is_main else []:
                warnings.warn(f"skipping checkpoint {root / name}: {why}; falling back to an older one", stacklevel=2)
            return cand
        skipped.append((cand.name, problem))
    if skipped:
        raise CheckpointError(
            f"--resume auto: no checkpoint in {root} is complete ("
            + "; ".join(f"{name}: {why}" for name, why in skipped)
            + "); nothing was changed. Fix: restore the missing files, resume a complete checkpoint "
            "with --resume PATH, or start anew in another output_dir"
        )
    return None


def load_checkpoint(
    engine, path: Path, *, universal_dir: Optional[Path] = None, ctx: Optional[DistContext] = None
) -> dict:
    """Every rank calls this; restores engine (model, optimizer, scheduler) and this rank's RNG.

    `universal_dir`: load the engine state from DeepSpeed's universal conversion of the checkpoint
    (another world size, see drpo_trainer.io.reshard); ranks the checkpoint had no RNG state for
    keep their freshly seeded streams. Every file is read with weights_only=True: one that needs a
    type outside the allow-list raises UnsafeCheckpointError before anything is loaded."""
    ctx = ctx or DistContext.current()
    rank, world = ctx.rank, ctx.world_size
    state = json.loads((path / "loop_state.json").read_text())
    if state["world_size"] != world and universal_dir is None:
        raise RuntimeError(
            f"checkpoint {path} was written by {state['world_size']} processes, this run has {world}: "
            "resume through drpo_trainer.io.reshard (drpo-train does this when the world size changes)"
        )
    load_dir = universal_dir if universal_dir is not None else path / "ds"
    rng = path / "rng" / f"rank_{rank:05d}.pt"
    own = path / "ranks" / f"state_{rank:05d}.pt"
    scan(checkpoint_files(load_dir / STATE_TAG), DEEPSPEED_TYPES)
    rng_state_ = load_plain(rng, LEGACY_RNG_TYPES) if rng.is_file() else None
    if own.is_file() and state["world_size"] == world:  # per-rank shares do not carry over to another world
        state["rank_state"] = load_plain(own)
    adapters_only = "lora_base" in state  # LoRA: the frozen base is the freshly loaded base model's
    with weights_only_loads(DEEPSPEED_TYPES, where=load_dir / STATE_TAG):
        strict = {"load_module_strict": False} if adapters_only else {}
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=STATE_TAG, **strict)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {load_dir}/{STATE_TAG}")
    if rng_state_ is not None:
        set_rng_state(rng_state_)
    return state


def resolve_resume(
    resume: Optional[str],
    output_dir: str,
    *,
    shared: bool = False,
    ctx: Optional[DistContext] = None,
    hashes: bool | tuple[str, ...] = True,
) -> Optional[Path]:
    """--resume auto | <path> | None -> a verified checkpoint directory or None (fresh start).
    shared=True: every rank calls it and verifies a share of the files (see verify_checkpoint).
    CheckpointError (exit 2) for a path that is not a complete checkpoint, or for `auto` when
    checkpoints exist and none is complete; UnsafeCheckpointError for a file that could run code."""
    if resume is None:
        return None
    if resume == "auto":
        path = find_checkpoint(output_dir, shared=shared, ctx=ctx, hashes=hashes)
    else:
        path = Path(resume)
        problem = (
            verify_checkpoint(path, shared=shared, ctx=ctx, hashes=hashes) if path.is_dir() else "no such directory"
        )
        if problem:
            raise CheckpointError(
                f"--resume {resume}: {problem}. Fix: pass --resume auto or a complete checkpoints/step_* directory"
            )
    if path is not None:  # refused here, before the model is built, rather than at load time
        scan_checkpoint(path)
    return path


def scan_checkpoint(path: Path) -> None:
    """UnsafeCheckpointError if a file of the checkpoint names a type its kind may not hold."""
    allowed = {"rng": LEGACY_RNG_TYPES, "ranks": ()}
    for f in checkpoint_files(path):
        scan([f], allowed.get(f.relative_to(path).parts[0], DEEPSPEED_TYPES))
