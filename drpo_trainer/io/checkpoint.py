"""Checkpoint files that never lose a run: atomic publish, manifest, verified resume.

What a trainer run puts in a checkpoint and takes back out is drpo_trainer.runtime.run (`save_run`,
`restore_run`); the HF export is drpo_trainer.io.export. Functions that every rank calls take the
run's `DistContext` (default: `DistContext.current()`).

Layout of `<output_dir>/checkpoints/`:

    step_000010/
        ds/state/...          DeepSpeed ZeRO shards: model, optimizer, LR scheduler (every rank)
        rng/rank_00000.pt     python / numpy / torch RNG states of each rank
        ranks/state_00000.pt  a rank's own loop state, if it has any (asynchronous layout: the
                              batches sampled ahead of the learner, docs/async.md)
        loop_state.json       step, data position, W&B run id, world size, ...
        config.yaml           the resolved config of the run
        hf/                   model config + tokenizer (what `drpo-train export` needs besides weights)
        MANIFEST.json         size and sha256 of every file above, written last
    latest                    name of the newest published checkpoint, replaced last

A checkpoint is written under `.tmp-step_N`, hashed (files split over ranks), then renamed
into place in one `os.rename`; the `latest` pointer moves after that, and old ones are
pruned last. A crash at any point leaves either a `.tmp-step_N` (ignored, removed by the
next save) or a complete `step_N`. Resume walks every `step_*` newest first and takes the
first whose manifest matches the files, warning about each one it skips.
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

from drpo_trainer.runtime.distributed import DistContext

STATE_TAG = "state"
MANIFEST = "MANIFEST.json"


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
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
) -> Path:
    """Every rank calls this. Returns the published directory. `rank_state`: this rank's own
    state (torch.save-able), given back by `load_checkpoint` to the same rank of the same world size."""
    ctx = ctx or DistContext.current()
    rank, world = ctx.rank, ctx.world_size
    root = checkpoints_dir(output_dir)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for debris in root.glob(".tmp-step_*"):  # of a crash during an earlier write
            shutil.rmtree(debris, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        (tmp / "ranks").mkdir()
    ctx.barrier()
    engine.save_checkpoint(str(tmp / "ds"), tag=STATE_TAG, save_latest=False)
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
        _drop_newer(root, step)
        if final.exists():  # the same step written again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        pointer = root / "latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")
        _fsync_dir(root)
        _prune(root, keep_last)
    ctx.barrier()
    return final


def _step_dirs(root: Path) -> list[Path]:
    """Published checkpoints, newest first (`.tmp-step_*` debris of an unfinished write excluded)."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=_step_of, reverse=True)


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def _drop_newer(root: Path, step: int) -> None:
    """Checkpoints past `step` belong to a future this run abandoned (it resumed from an older
    one); left in place they would outrank the new ones and be resumed from."""
    for newer in [p for p in _step_dirs(root) if _step_of(p) > step]:
        warnings.warn(f"removing {newer}: this run continues from an older checkpoint (step {step})", stacklevel=3)
        shutil.rmtree(newer, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    for old in _step_dirs(root)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(
    path: Path, *, hashes: bool = True, shared: bool = False, ctx: Optional[DistContext] = None
) -> Optional[str]:
    """None when every file of the manifest is there with its size (and hash); else the problem.

    shared=True is a collective of the ranks of `ctx`: each checks every size but hashes only its
    round-robin share of the files, and all return the same answer (at 30B scale one rank alone
    would hash for minutes while the others wait)."""
    ctx = ctx or DistContext.current()
    rank, world = (ctx.rank, ctx.world_size) if shared else (0, 1)
    problem = _verify_share(path, hashes, rank, world)
    if world == 1:
        return problem
    problems: list = [None] * world
    torch.distributed.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def _verify_share(path: Path, hashes: bool, rank: int, world: int) -> Optional[str]:
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
        if hashes and i % world == rank and _sha256(p) != digest:
            return f"{rel} does not match its sha256"
    return None


def find_checkpoint(output_dir: str, *, shared: bool = False, ctx: Optional[DistContext] = None) -> Optional[Path]:
    """The newest valid checkpoint, warning about each newer one skipped.

    Ranked by step, not by the `latest` pointer: a crash between the publishing rename and the
    pointer move leaves a complete checkpoint newer than the pointer, and it is the one to use
    (newer checkpoints of an abandoned future are removed by the next save, see `_drop_newer`)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    ctx = ctx or DistContext.current()
    for cand in _step_dirs(root):
        problem = verify_checkpoint(cand, shared=shared, ctx=ctx)
        if problem is None:
            return cand
        if not shared or ctx.is_main:
            warnings.warn(f"skipping checkpoint {cand}: {problem}; falling back to an older one", stacklevel=2)
    return None


def load_checkpoint(
    engine, path: Path, *, universal_dir: Optional[Path] = None, ctx: Optional[DistContext] = None
) -> dict:
    """Every rank calls this; restores engine (model, optimizer, scheduler) and this rank's RNG.

    `universal_dir`: load the engine state from DeepSpeed's universal conversion of the checkpoint
    (another world size, see drpo_trainer.io.reshard); ranks the checkpoint had no RNG state for
    keep their freshly seeded streams."""
    ctx = ctx or DistContext.current()
    rank, world = ctx.rank, ctx.world_size
    state = json.loads((path / "loop_state.json").read_text())
    if state["world_size"] != world and universal_dir is None:
        raise RuntimeError(
            f"checkpoint {path} was written by {state['world_size']} processes, this run has {world}: "
            "resume through drpo_trainer.io.reshard (drpo-train does this when the world size changes)"
        )
    load_dir = universal_dir if universal_dir is not None else path / "ds"
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=STATE_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {load_dir}/{STATE_TAG}")
    rng = path / "rng" / f"rank_{rank:05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    own = path / "ranks" / f"state_{rank:05d}.pt"
    if own.is_file() and state["world_size"] == world:  # per-rank shares do not carry over to another world
        state["rank_state"] = torch.load(own, weights_only=False)
    return state


def resolve_resume(
    resume: Optional[str], output_dir: str, *, shared: bool = False, ctx: Optional[DistContext] = None
) -> Optional[Path]:
    """--resume auto | <path> | None -> a verified checkpoint directory or None (fresh start).
    shared=True: every rank calls it and verifies a share of the files (see verify_checkpoint)."""
    if resume is None:
        return None
    if resume == "auto":
        return find_checkpoint(output_dir, shared=shared, ctx=ctx)
    path = Path(resume)
    problem = verify_checkpoint(path, shared=shared, ctx=ctx) if path.is_dir() else "no such directory"
    if problem:
        raise FileNotFoundError(f"--resume {resume}: {problem}. Fix: pass --resume auto or a step_* directory")
    return path
