"""Preemption and crashes: SIGTERM / SIGUSR1 stop with a checkpoint and exit 75; SIGKILL of the
whole run at random moments (some during a checkpoint write) never loses more than the steps
since the last complete checkpoint and never loads a partial one; W&B keeps its run id.

Every interrupted run is driven to step 6 and its final weights compared BITWISE with the
uninterrupted baseline: a resume from a partial or wrong checkpoint could not match. Two-process
runs checkpoint ZeRO-3 shards; one-process runs are unpartitioned (ZeRO stage 0, the default
`distributed.single_process_zero_stage`) and checkpoint the whole module.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import resume_helpers as h
import torch

from drpo_trainer.io.checkpoint import find_checkpoint, verify_checkpoint
from drpo_trainer.runtime.stop import EXIT_PREEMPTED

RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(l)["step"] for l in path.read_text().splitlines() if l.endswith("}")]
    return max(steps, default=0)


def _assert_final_weights_match_baseline(out: Path, nproc: int) -> None:
    from drpo_trainer.io.reshard import saved_at_zero3

    base, _ = h.baseline(nproc)
    assert saved_at_zero3(out / "checkpoints" / "step_000006") == (nproc > 1)
    want = h.consolidated_weights(base / "checkpoints" / "step_000006")
    got = h.consolidated_weights(out / "checkpoints" / "step_000006")
    for name in want:
        assert torch.equal(want[name], got[name]), name


def _stop_and_resume(tmp_path, *, nproc: int, sig: int) -> None:
    out = tmp_path / "run"
    cfg = h.write_config(
        tmp_path / "c.yaml",
        h.workspace(),
        out,
        **{"distributed.nproc_per_node": nproc, "checkpoint.every_steps": 0, "tracking.wandb.mode": "offline"},
    )
    proc = h.start(cfg, log=tmp_path / "first.log")
    assert h.wait_for(lambda: _steps_logged(out) >= 1, timeout=240), (tmp_path / "first.log").read_text()[-3000:]
    sent = time.monotonic()
    proc.send_signal(sig)  # to the CLI only, as SLURM / a scheduler would
    rc = proc.wait(timeout=120)  # the bound: one step plus a checkpoint write
    seconds = time.monotonic() - sent
    print(f"\nsignal {sig} -> exit {rc} after {seconds:.2f} s ({nproc} process(es))")
    assert rc == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    stopped = int((out / "PREEMPTED").read_text())
    assert 1 <= stopped < 6 and stopped == _steps_logged(out)
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped:06d}"
    assert verify_checkpoint(out / "checkpoints" / f"step_{stopped:06d}") is None
    # every_steps=0: the stop request wrote the only checkpoint
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [f"step_{stopped:06d}"]

    resumed = h.train(cfg, "--resume", "auto")
    assert f"at step {stopped}" in resumed.stderr
    assert not (out / "PREEMPTED").exists()
    assert [r["step"] for r in h.metrics_rows(out)] == [1, 2, 3, 4, 5, 6]
    _assert_final_weights_match_baseline(out, nproc)

    # W&B offline: both parts logged to one run id (the checkpoint's), steps continue
    run_id = json.loads((out / "checkpoints" / "step_000006" / "loop_state.json").read_text())["wandb_run_id"]
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    first, second = (h.wandb_offline_records(f) for f in files)
    assert first["run_ids"] == second["run_ids"] == [run_id]
    assert first["steps"] == list(range(1, stopped + 1))
    assert second["steps"] == list(range(stopped + 1, 7))


def test_sigterm_checkpoints_exits_75_and_resumes_exactly_with_the_same_wandb_run(tmp_path):
    _stop_and_resume(tmp_path, nproc=1, sig=signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.distributed
def test_sigusr1_to_the_local_launcher_stops_both_ranks(tmp_path):
    _stop_and_resume(tmp_path, nproc=2, sig=signal.SIGUSR1)


def _fresh_tmp(ckpts: Path, since: float) -> bool:
    """A `.tmp-step_*` (a checkpoint being written) created after `since` (not earlier debris)."""
    for p in ckpts.glob(".tmp-step_*"):
        try:
            if p.stat().st_mtime >= since:
                return True
        except FileNotFoundError:  # published or removed between glob and stat
            pass
    return False


def _kill_trial(cfg: Path, out: Path, log: Path, rng: random.Random, during_write: bool) -> dict:
    """Start with --resume auto, SIGKILL the whole process group; what the trial saw."""
    ckpts = out / "checkpoints"
    expected = find_checkpoint(str(out)) if ckpts.is_dir() else None
    before = _steps_logged(out)
    started = time.time()
    proc = h.start(cfg, "--resume", "auto", log=log)
    if during_write:  # the moment a new checkpoint directory appears, plus 0-20 ms
        saw = h.wait_for(lambda: _fresh_tmp(ckpts, started), timeout=240, poll=0.002)
        time.sleep(rng.uniform(0.0, 0.02))
    else:  # a random moment of the first step after the resume point
        saw = h.wait_for(lambda: _steps_logged(out) > before, timeout=240)
        time.sleep(rng.uniform(0.0, 0.5))
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
    h.kill_group(proc)
    proc.wait(timeout=60)
    text = log.read_text()
    m = RESUMED.search(text)
    return {
        "saw": saw,
        "expected": expected,
        "resumed_from": Path(m.group(1)) if m else None,
        "mid_write": _fresh_tmp(ckpts, started),
        "reached": _steps_logged(out),
        "log": text,
    }


def _crash_trials(tmp_path, *, nproc: int, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    out = tmp_path / "run"
    cfg = h.write_config(tmp_path / "c.yaml", h.workspace(), out, **{"distributed.nproc_per_node": nproc})
    seen = []
    for i in range(trials):
        t0 = time.monotonic()
        done = find_checkpoint(str(out)) if (out / "checkpoints").is_dir() else None
        if done is not None and done.name == "step_000006":  # an earlier kill came after the last step:
            shutil.rmtree(out)  # nothing left to interrupt, so this trial starts the run afresh
        trial = _kill_trial(cfg, out, tmp_path / f"trial{i}.log", rng, during_write=i % 2 == 0)
        assert trial["saw"], trial["log"][-3000:]
        # the restart took the newest complete checkpoint that existed before it (or none)
        assert trial["resumed_from"] == trial["expected"], trial["log"][-3000:]
        for p in (out / "checkpoints").glob("step_*"):
            assert not p.name.startswith(".tmp")
        seen.append((round(time.monotonic() - t0, 1), trial["mid_write"], trial["reached"]))
    print(f"\n{nproc} process(es), (seconds, killed mid-write, steps logged) per trial: {seen}")
    assert sum(mid for _, mid, _ in seen) >= 1  # at least one kill landed inside a checkpoint write
    expected = find_checkpoint(str(out))
    final = h.train(cfg, "--resume", "auto")
    m = RESUMED.search(final.stderr)
    if expected is None:  # every kill came before the first checkpoint was published: a fresh start
        assert m is None, final.stderr[-3000:]
    else:
        assert m and Path(m.group(1)) == expected, final.stderr[-3000:]
    assert [r["step"] for r in h.metrics_rows(out)] == [1, 2, 3, 4, 5, 6]
    _assert_final_weights_match_baseline(out, nproc)


@pytest.mark.slow  # kills at random moments: 55 s; the two-process trials are slow too
def test_sigkill_at_random_moments_one_process(tmp_path):
    _crash_trials(tmp_path, nproc=1, trials=5, seed=1)


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_at_random_moments_two_processes(tmp_path):
    _crash_trials(tmp_path, nproc=2, trials=6, seed=2)


def _catches(pid: int, sig: int) -> bool:
    """True once the process has a handler for `sig` (the SigCgt mask of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (sig - 1)))


def test_sigterm_while_loading_stops_before_any_step(tmp_path):
    """A stop request during start-up (imports, model, data) is honoured at the first safe point,
    before step 1, not after a whole step; nothing is lost (there is no step to lose)."""
    out = tmp_path / "run"
    cfg = h.write_config(tmp_path / "c.yaml", h.workspace(), out)
    log = tmp_path / "log"
    proc = h.start(cfg, log=log)
    assert h.wait_for(lambda: _catches(proc.pid, signal.SIGTERM), timeout=60), log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)  # the CLI has its handler: the run is still loading
    rc = proc.wait(timeout=120)
    assert rc == EXIT_PREEMPTED, log.read_text()[-3000:]
    assert "stop requested while loading: newest checkpoint is step 0" in log.read_text()
    assert (out / "PREEMPTED").read_text() == "0" and _steps_logged(out) == 0
