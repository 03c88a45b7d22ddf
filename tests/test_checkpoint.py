"""Checkpoint mechanics in one process, with a stand-in for the DeepSpeed engine: atomic
publish, manifest, pruning, fallback past truncated / corrupt / unfinished checkpoints with a
warning, refusal when none is valid, explicit paths, RNG states (plain data, and the previous
release's pickled numpy state), a full disk during a write, and the stop flag."""

from __future__ import annotations

import json
import os
import random
import signal
import warnings

import numpy as np
import pytest
import torch

from drpo_trainer.io.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointWriteError,
    find_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from drpo_trainer.runtime.stop import StopFlag


class FakeEngine:
    """Writes and reads one shard file the way DeepSpeed's engine does (dir/tag/file)."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"w": torch.full((1000,), self.value)}, os.path.join(save_dir, tag, "shard.pt"))

    def load_checkpoint(self, load_dir, tag):
        path = os.path.join(load_dir, tag, "shard.pt")
        self.value = float(torch.load(path)["w"][0])
        return path, {}


def _save(out, step, value=None, keep_last=3):
    return save_checkpoint(
        FakeEngine(float(step if value is None else value)),
        str(out),
        step,
        {"sampler": {"epoch": 0, "index": step}},
        config_yaml="trainer: {}\n",
        keep_last=keep_last,
    )


def _steps(out):
    return sorted(p.name for p in (out / "checkpoints").glob("*step_*"))


def test_save_publishes_with_a_manifest_of_every_file(tmp_path):
    path = _save(tmp_path, 1)
    assert path == tmp_path / "checkpoints" / "step_000001"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001"
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert sorted(files) == ["config.yaml", "ds/state/shard.pt", "loop_state.json", "rng/rank_00000.pt"]
    size, _ = files["ds/state/shard.pt"]
    assert size == (path / "ds/state/shard.pt").stat().st_size
    assert json.loads((path / "loop_state.json").read_text()) == {
        "sampler": {"epoch": 0, "index": 1},
        "step": 1,
        "world_size": 1,
    }
    assert verify_checkpoint(path) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keeps_the_newest_k_and_moves_the_pointer(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep_last=2)
    assert _steps(tmp_path) == ["step_000006", "step_000008"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000008"


def test_step_10_ranks_above_step_9(tmp_path):
    for step in (9, 10):
        _save(tmp_path, step)
    assert find_checkpoint(str(tmp_path)).name == "step_000010"


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            lambda p: (p / "ds/state/shard.pt").write_bytes((p / "ds/state/shard.pt").read_bytes()[:-10]),
            "bytes, the manifest says",
        ),
        (lambda p: _flip_last_byte(p / "ds/state/shard.pt"), "does not match its sha256"),
        (lambda p: (p / MANIFEST).unlink(), "no MANIFEST.json"),
        (lambda p: (p / "rng/rank_00000.pt").unlink(), "missing file rng/rank_00000.pt"),
        (lambda p: (p / MANIFEST).write_text('{"files": {'), "unreadable manifest"),
    ],
    ids=["truncated", "corrupt", "no-manifest", "missing-file", "cut-manifest"],
)
def test_resume_falls_back_past_a_damaged_checkpoint_with_a_warning(tmp_path, damage, problem):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    damage(newest)
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*step_000002: .*{problem}"):
        found = find_checkpoint(str(tmp_path))
    assert found == tmp_path / "checkpoints" / "step_000001"
    engine = FakeEngine()
    state = load_checkpoint(engine, found)
    assert engine.value == 1.0 and state["step"] == 1 and state["sampler"]["index"] == 1


def test_ranks_share_the_hashing_of_a_resume_and_together_catch_corruption(tmp_path):
    from drpo_trainer.io.checkpoint import _verify_share

    path = _save(tmp_path, 1)
    names = sorted(json.loads((path / MANIFEST).read_text())["files"])
    assert len(names) >= 4  # config, loop state, shard, rng: something to split
    _flip_last_byte(path / "ds/state/shard.pt")
    found = [_verify_share(path, True, rank, 2) for rank in (0, 1)]
    owner = names.index("ds/state/shard.pt") % 2
    assert found[owner] == "ds/state/shard.pt does not match its sha256"  # the rank that hashes it
    assert found[1 - owner] is None  # the other rank only checked its size
    assert _verify_share(path, False, 0, 1) is None  # sizes alone cannot see a flipped byte


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_unfinished_write_is_ignored_and_cleared_by_the_next_save(tmp_path):
    _save(tmp_path, 1)
    debris = tmp_path / "checkpoints" / ".tmp-step_000002"
    (debris / "ds/state").mkdir(parents=True)
    (debris / "ds/state/shard.pt").write_bytes(b"half")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # debris is not a candidate: no warning either
        assert find_checkpoint(str(tmp_path)).name == "step_000001"
    _save(tmp_path, 2)
    assert _steps(tmp_path) == ["step_000001", "step_000002"]


def test_a_crash_before_the_pointer_moved_still_resumes_from_the_newest(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step_000001")  # renamed, pointer not yet moved
    assert find_checkpoint(str(tmp_path)).name == "step_000002"


def test_continuing_from_an_older_checkpoint_drops_the_abandoned_newer_ones(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    with pytest.warns(UserWarning, match="removing .*step_000003"):
        _save(tmp_path, 2, value=20.0)  # a run resumed from step 1 reaches step 2 again
    assert _steps(tmp_path) == ["step_000001", "step_000002"]
    engine = FakeEngine()
    load_checkpoint(engine, find_checkpoint(str(tmp_path)))
    assert engine.value == 20.0


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert find_checkpoint(str(tmp_path)) is None
    assert resolve_resume("auto", str(tmp_path)) is None
    assert resolve_resume(None, str(tmp_path)) is None


def test_explicit_resume_path_must_be_complete(tmp_path):
    path = _save(tmp_path, 1)
    assert resolve_resume(str(path), "elsewhere") == path
    (path / "config.yaml").write_text("changed")
    with pytest.raises(CheckpointError, match="config.yaml .*Fix: pass --resume auto"):
        resolve_resume(str(path), "elsewhere")
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_resume(str(tmp_path / "nope"), "elsewhere")


def test_rng_states_are_restored(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = _save(tmp_path, 1)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_checkpoint(FakeEngine(), path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_stop_flag_is_set_by_sigterm_and_sigusr1():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for sig in old:
            flag = StopFlag()
            assert not flag.requested and not flag.any_rank()
            os.kill(os.getpid(), sig)  # handled synchronously in the main thread
            assert flag.requested and flag.any_rank()
            flag.restore()
            assert signal.getsignal(sig) == old[sig]  # the handlers it replaced are back
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _tree(root) -> dict:
    """Every file under `root` with its bytes' hash: equal before and after means nothing changed."""
    import hashlib

    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _rehash(ckpt, rel) -> None:
    """Rewrite the manifest entry of `rel`, as whoever ships a tampered checkpoint would."""
    import hashlib

    manifest = json.loads((ckpt / MANIFEST).read_text())
    data = (ckpt / rel).read_bytes()
    manifest["files"][rel] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def test_every_checkpoint_invalid_refuses_to_start_and_changes_nothing(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    newest = tmp_path / "checkpoints" / "step_000002"
    (newest / "loop_state.json").write_text('{"step": 2, "wor')  # truncated
    (tmp_path / "checkpoints" / "step_000001" / "rng" / "rank_00000.pt").unlink()
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_resume("auto", str(tmp_path))
    msg = str(err.value)
    assert "step_000002: loop_state.json has 16 bytes, the manifest says" in msg
    assert "step_000001: missing file rng/rank_00000.pt" in msg
    assert "Fix:" in msg and "\n" not in msg
    assert _tree(tmp_path) == before


def test_rng_file_is_plain_data(tmp_path):
    path = _save(tmp_path, 1)
    state = torch.load(path / "rng" / "rank_00000.pt", weights_only=True)  # no allow-list needed
    assert sorted(state) == ["numpy", "python", "torch"]
    assert state["python"][0] == 3 and len(state["python"][1]) == 625
    assert state["numpy"]["kind"] == "MT19937" and state["numpy"]["keys"].shape == (624,)


def test_rng_state_of_the_previous_release_still_resumes(tmp_path):
    """The previous release pickled numpy's state tuple (with an ndarray) and python's tuple."""
    path = _save(tmp_path, 1)
    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, path / "rng" / "rank_00000.pt")
    _rehash(path, "rng/rank_00000.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert resolve_resume("auto", str(tmp_path)) == path
    load_checkpoint(FakeEngine(), path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


class Payload:
    """Unpickling it creates `marker` through a shell command (os.system, pickled as posix.system), or
    through subprocess.call (pickled under its Python 2 name, commands.call, by torch's protocol 2)."""

    def __init__(self, marker, via: str = "os.system") -> None:
        self.marker, self.via = str(marker), via

    def __reduce__(self):
        import subprocess

        if self.via == "os.system":
            return os.system, (f"touch {self.marker}",)
        return subprocess.call, (["touch", self.marker],)


@pytest.mark.parametrize("via", ["os.system", "subprocess.call"])
def test_the_payload_runs_when_unpickled_unsafely(tmp_path, via):
    """The probe works: without the restricted loader the marker appears (so its absence below means something)."""
    torch.save({"x": Payload(tmp_path / "marker", via)}, tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("rel", ["rng/rank_00000.pt", "ranks/state_00000.pt", "ds/state/shard.pt"])
def test_a_file_that_would_run_code_is_refused_before_loading(tmp_path, rel):
    from drpo_trainer.io.safe_load import UnsafeCheckpointError

    path = _save(tmp_path, 1)
    (path / rel).parent.mkdir(exist_ok=True)
    torch.save({"python": Payload(tmp_path / "marker")}, path / rel)
    _rehash(path, rel)
    assert verify_checkpoint(path) is None  # the manifest does not help: it was rewritten too
    before = _tree(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=f"{rel} needs posix.system, .*refused"):
        resolve_resume("auto", str(tmp_path))
    with pytest.raises(UnsafeCheckpointError, match=f"{rel} needs posix.system"):
        load_checkpoint(FakeEngine(), path)
    assert not (tmp_path / "marker").exists()
    assert _tree(tmp_path) == before


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    _save(tmp_path, 1)
    real_save = torch.save

    def full(obj, f, *a, **k):
        if "step_000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError) as err:
        _save(tmp_path, 2)
    msg = str(err.value)
    assert f"could not write checkpoint {tmp_path / 'checkpoints' / '.tmp-step_000002'}" in msg
    assert "GiB free on" in msg and "No space left on device" in msg and "step_000001 is intact" in msg
    assert _steps(tmp_path) == ["step_000001"]  # the half-written one is gone, the old one untouched
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001"
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_000001") is None
