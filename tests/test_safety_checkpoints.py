"""A hostile or careless user against real checkpoints of the tiny model (one process, unpartitioned:
DeepSpeed's mp_rank_00_model_states.pt holds the module and its optimizer state).

Each probe asserts its outcome: the exit code and the one line that says why; the marker that a
payload would create is absent; and where a command is refused, every file of the tree is unchanged
(hashed before and after). Payloads: tests/test_checkpoint.py's `Payload` (os.system or
subprocess.call creating a marker file), stored with torch.save, the manifest rewritten so that the
checkpoint verifies, as whoever ships a tampered checkpoint would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import resume_helpers as h
import torch
from test_checkpoint import Payload

from drpo_trainer.cli import main as cli_main

STEPS = {"trainer.max_steps": 2}
MP_RANK = "ds/state/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step run checkpointed at steps 1 and 2 (made once for the module; tests work on copies)."""
    root = tmp_path_factory.mktemp("safety")
    cfg = h.write_config(root / "run.yaml", h.workspace(), root / "run", **STEPS)
    h.train(cfg)
    return root / "run"


@pytest.fixture
def run(finished, tmp_path):
    """(config, output_dir) of a private copy of the finished run."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return h.write_config(tmp_path / "run.yaml", h.workspace(), out, **STEPS), out


def tree(root) -> dict:
    """Every file (its bytes' hash) and directory under `root`: equal before and after, nothing changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in root.rglob("*")
    }


def rehash(ckpt, rel) -> None:
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    data = (ckpt / rel).read_bytes()
    manifest["files"][rel] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


def plant(ckpt, rel, marker, via="os.system") -> None:
    """Put a payload into the checkpoint file `rel` (beside the real contents where there are some)."""
    from drpo_trainer.io.safe_load import DEEPSPEED_TYPES, LEGACY_RNG_TYPES, resolve

    path = ckpt / rel
    path.parent.mkdir(exist_ok=True)
    state = {}
    if path.is_file():
        with torch.serialization.safe_globals(resolve(DEEPSPEED_TYPES + LEGACY_RNG_TYPES)):
            state = torch.load(path, weights_only=True)
    state["payload"] = Payload(marker, via)
    torch.save(state, path)
    rehash(ckpt, rel)


def one_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("drpo-train")]
    assert len(lines) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- loading never runs code ----------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["rng/rank_00000.pt", "ranks/state_00000.pt", MP_RANK])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(run, tmp_path, rel):
    cfg, out = run
    plant(out / "checkpoints" / "step_000002", rel, tmp_path / "marker")
    before = tree(tmp_path)
    res = h.run_cli(cfg, "--resume", "auto")
    assert res.returncode == 2
    one_error_line(res.stderr, f"step_000002/{rel} needs posix.system", "refused", "Fix:")
    assert not (tmp_path / "marker").exists()
    assert tree(tmp_path) == before


@pytest.mark.parametrize("via", ["os.system", "subprocess.call"])
def test_export_refuses_a_checkpoint_file_that_would_run_code(run, tmp_path, capsys, via):
    _, out = run
    ckpt = out / "checkpoints" / "step_000002"
    plant(ckpt, MP_RANK, tmp_path / "marker", via)
    before = tree(tmp_path)
    assert cli_main(["export", str(ckpt), str(tmp_path / "exported")]) == 2
    name = "posix.system" if via == "os.system" else "commands.call"  # subprocess.call's protocol-2 name
    one_error_line(capsys.readouterr().err, f"{MP_RANK} needs {name}", "refused")
    assert not (tmp_path / "marker").exists() and not (tmp_path / "exported").exists()
    assert tree(tmp_path) == before


def test_deepspeed_own_loads_run_weights_only_even_past_the_scan(run, tmp_path):
    """DeepSpeed calls torch.load(weights_only=False); inside weights_only_loads it is restricted anyway
    (the second defence, if a file ever escaped the scan): its checkpoint engine's load, and the export's
    read of the weights, which here skips the scan."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from drpo_trainer.io.export import checkpoint_weights
    from drpo_trainer.io.safe_load import DEEPSPEED_TYPES, UnsafeCheckpointError, weights_only_loads

    _, out = run
    ckpt = out / "checkpoints" / "step_000002"
    plant(ckpt, MP_RANK, tmp_path / "marker", "subprocess.call")  # a module torch does not block by name
    with pytest.raises(UnsafeCheckpointError, match="needs commands.call"):
        with weights_only_loads(DEEPSPEED_TYPES, where=ckpt / MP_RANK):
            TorchCheckpointEngine().load(str(ckpt / MP_RANK), map_location="cpu")
    with pytest.raises(UnsafeCheckpointError, match="needs commands.call"):
        checkpoint_weights(ckpt)
    assert not (tmp_path / "marker").exists()
    with weights_only_loads(DEEPSPEED_TYPES):  # the clean checkpoint of step 1 loads the same way
        assert "module" in TorchCheckpointEngine().load(str(out / "checkpoints" / "step_000001" / MP_RANK))


def test_a_checkpoint_of_the_previous_release_resumes(run):
    """Its RNG file pickled numpy's state (an ndarray) and python's state tuple."""
    import random

    import numpy as np

    cfg, out = run
    ckpt = out / "checkpoints" / "step_000001"
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, ckpt / "rng" / "rank_00000.pt")
    rehash(ckpt, "rng/rank_00000.pt")
    res = h.train(cfg, "--resume", str(ckpt))
    assert f"resumed from {ckpt} at step 1" in res.stderr
    assert [r["step"] for r in h.metrics_rows(out)] == [1, 2]
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"


# -- resume: fall back, refuse, never start over --------------------------------------------------
def test_a_garbled_config_in_the_newest_checkpoint_resumes_from_the_older_one(run):
    cfg, out = run
    newest = out / "checkpoints" / "step_000002" / "config.yaml"
    newest.write_bytes(b"\x00{[" * (newest.stat().st_size // 3))  # about its size: only the hash can tell
    res = h.train(cfg, "--resume", "auto")
    assert "skipping checkpoint" in res.stderr and "step_000002: config.yaml" in res.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_000001'} at step 1" in res.stderr
    assert [r["step"] for r in h.metrics_rows(out)] == [1, 2]


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: (c / "loop_state.json").write_text((c / "loop_state.json").read_text()[:20]),
        lambda c: (c / "config.yaml").write_text("x" * (c / "config.yaml").stat().st_size),
        lambda c: (c / "rng" / "rank_00000.pt").unlink(),
    ],
    ids=["truncated-loop-state", "garbled-config", "missing-file"],
)
def test_the_checks_before_a_resume_read_the_newest_valid_checkpoint(run, damage):
    from drpo_trainer.runtime.run_identity import newest_checkpoint_files

    _, out = run
    damage(out / "checkpoints" / "step_000002")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_000002"):
        assert newest_checkpoint_files("auto", str(out)) == out / "checkpoints" / "step_000001"


def test_resume_with_every_checkpoint_invalid_refuses_and_changes_nothing(run, tmp_path):
    cfg, out = run
    (out / "checkpoints" / "step_000002" / "loop_state.json").write_text("{")
    (out / "checkpoints" / "step_000001" / MP_RANK).unlink()
    before = tree(tmp_path)
    res = h.run_cli(cfg, "--resume", "auto")
    assert res.returncode == 2
    line = one_error_line(res.stderr, "no checkpoint in", "is complete", "Fix:")
    assert "step_000002: loop_state.json has 1 bytes" in line and f"step_000001: missing file {MP_RANK}" in line
    assert tree(tmp_path) == before


def test_resume_of_a_path_that_does_not_exist_is_one_line(run, tmp_path):
    cfg, _ = run
    res = h.run_cli(cfg, "--resume", str(tmp_path / "nonexistent"))
    assert res.returncode == 2
    one_error_line(res.stderr, "nonexistent: no such directory", "Fix: pass --resume auto")


def test_a_new_run_in_a_used_output_dir_refuses_and_changes_nothing(run, tmp_path):
    cfg, out = run
    before = tree(tmp_path)
    res = h.run_cli(cfg)
    assert res.returncode == 2
    one_error_line(res.stderr, f"output_dir {out} holds a run (config.yaml, metrics.jsonl, checkpoints)", "resume auto")
    assert tree(tmp_path) == before


def test_a_full_disk_during_a_checkpoint_exits_1_and_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    cfg = h.write_config(tmp_path / "run.yaml", h.workspace(), out, **STEPS)
    full_at_step_2 = (
        "import errno, sys, torch\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if 'step_000002' in str(f):\n"
        f"        raise OSError({errno.ENOSPC}, 'No space left on device', str(f))\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "from drpo_trainer.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", full_at_step_2, "--config", str(cfg)],
        env=h.env(),
        cwd=h.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1
    one_error_line(res.stderr, f"could not write checkpoint {out / 'checkpoints' / '.tmp-step_000002'}", "GiB free on")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert (out / "checkpoints" / "latest").read_text() == "step_000001"
    from drpo_trainer.io.checkpoint import verify_checkpoint

    assert verify_checkpoint(out / "checkpoints" / "step_000001") is None


# -- export: no silent deletion -------------------------------------------------------------------
@pytest.mark.parametrize(
    "target", ["cwd", "own-run", "other-run", "checkpoint", "inside-checkpoint", "checkpoints-dir", "foreign"]
)
def test_export_refuses_a_target_it_must_not_replace_and_changes_nothing(run, tmp_path, monkeypatch, capsys, target):
    _, out = run
    ckpt = out / "checkpoints" / "step_000002"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's work")
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("someone's work")
    monkeypatch.chdir(work)
    other = tmp_path / "other"  # another run (crashed before its first checkpoint)
    other.mkdir()
    (other / "config.yaml").write_text("output_dir: other\n")
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    dest = {
        "cwd": ".",
        "own-run": out,
        "other-run": other,
        "checkpoint": ckpt,
        "inside-checkpoint": ckpt / "hf",
        "checkpoints-dir": out / "checkpoints",
        "foreign": foreign,
    }[target]
    before = tree(tmp_path)
    assert cli_main(["export", str(ckpt), str(dest)]) == 2
    why = {
        "cwd": "is the current directory or holds it",
        "other-run": "holds a run or a checkpoint (config.yaml, metrics.jsonl)",
        "foreign": "is not empty and is not an earlier export (no .drpo-export). Fix: export to a new directory, "
        "or pass --overwrite",
    }.get(target, f"is the checkpoint {ckpt}, inside it or holds it")
    one_error_line(capsys.readouterr().err, f"drpo-train export: export: {dest} {why}")
    if target != "foreign":  # never, whatever the options
        assert cli_main(["export", str(ckpt), str(dest), "--overwrite"]) == 2
    assert tree(tmp_path) == before


def test_export_replaces_an_earlier_export_or_with_overwrite_a_foreign_directory(run, tmp_path, capsys):
    _, out = run
    ckpt = out / "checkpoints" / "step_000002"
    dest = tmp_path / "exported"
    assert cli_main(["export", str(ckpt), str(dest)]) == 0
    weights = (dest / "model.safetensors").read_bytes()
    assert json.loads((dest / ".drpo-export").read_text()) == {"source": str(ckpt)}
    assert cli_main(["export", str(ckpt), str(dest), "--dtype", "bfloat16"]) == 0  # an earlier export: replaced
    assert len((dest / "model.safetensors").read_bytes()) < len(weights)  # 2 bytes a weight instead of 4
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's work")
    assert cli_main(["export", str(ckpt), str(foreign), "--overwrite"]) == 0  # asked for
    assert not (foreign / "notes.txt").exists() and (foreign / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "mine", "run", "run.yaml"]  # no temp dirs left
