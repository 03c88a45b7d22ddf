"""Asynchronous off-policy training (docs/async.md): real runs of one learner and one rollout process.

- the version stamps keep every batch within trainer.max_off_policy_steps of its step;
- k = 0 trains exactly the synchronous loop's updates (same metrics, same weights);
- SIGTERM writes a checkpoint holding the batches sampled ahead; the resumed run trains the same
  prompts in the same order as an uninterrupted one (samples.jsonl holds every completion);
- a rollout process that dies makes the run fail at once, naming it;
- the rollout process's weights equal the learner's after every transfer (ZeRO-3 learners).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import resume_helpers as h
import torch

from drpo_trainer.config import ConfigError, load_config
from drpo_trainer.runtime.async_rollouts import source_of, version_for
from drpo_trainer.runtime.run import kept_batches
from drpo_trainer.runtime.stop import EXIT_PREEMPTED
from drpo_trainer.runtime.wire import batch_from_plain

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent
K = 2
STEPS = 6
ASYNC = {
    "distributed.nproc_per_node": 2,
    "distributed.rollout_processes": 1,
    "algorithm.mismatch_correction": "tis",
    "tracking.samples_per_step": 1000,  # every completion of every step: the prompts each step trained
}


def _config(tmp: Path, name: str, **overrides) -> tuple[Path, Path]:
    out = tmp / name
    return h.write_config(tmp / f"{name}.yaml", h.workspace(), out, **{**ASYNC, **overrides}), out


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(l)["step"] for l in path.read_text().splitlines() if l.endswith("}")), default=0)


def comparable(row: dict) -> dict:
    """A metrics row without wall-clock values and transfer sizes (a stopping step sends no weights)."""
    return {k: v for k, v in h.without_timings(row).items() if not k.startswith("sync/")}


def _prompts_by_step(out: Path) -> dict[int, list[int]]:
    """The training-set indices of the prompts each step trained (samples.jsonl holds every completion)."""
    steps: dict[int, list[int]] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train" and row["index"] % 4 == 0:  # one row per prompt (G = 4)
            steps.setdefault(row["step"], []).append(row["train_index"])
    return steps


# -- pure rules ----------------------------------------------------------------------------------
def test_version_rule_and_rollout_assignment():
    assert [version_for(t, 0) for t in range(1, 5)] == [0, 1, 2, 3]  # the synchronous loop
    assert [version_for(t, 2) for t in range(1, 7)] == [0, 0, 0, 1, 2, 3]
    assert [version_for(t, 2, start=4) for t in range(7, 10)] == [4, 5, 6]  # resumed at 4, steps 5, 6 kept
    assert version_for(2, 3, start=5) == 5  # never older than the weights it was given
    assert [source_of(t, 3, 2, 3) for t in range(3, 9)] == [2, 3, 4, 2, 3, 4]


def test_config_refuses_async_settings_that_cannot_work():
    with pytest.raises(ConfigError, match="distributed.rollout_processes=1"):
        load_config(None, ["trainer.max_off_policy_steps=1"])
    with pytest.raises(ConfigError, match="algorithm.mismatch_correction=tis"):
        load_config(None, ["trainer.max_off_policy_steps=1", "distributed.rollout_processes=1"])
    cfg = load_config(
        None,
        ["trainer.max_off_policy_steps=1", "distributed.rollout_processes=1"]
        + ["algorithm.behaviour_logprobs=rollout"],
    )
    assert cfg.learner_processes(3) == 2
    with pytest.raises(ConfigError, match="distributed.nproc_per_node=2"):
        cfg.learner_processes(1)
    with pytest.raises(ConfigError, match="rollout.vllm.tensor_parallel_size=1"):
        load_config(
            None, ["distributed.rollout_processes=1", "rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=2"]
        )
    # the CLI counts only the learners against the batch: 2 processes, 1 learner, prompts_per_step=3 is fine
    res = subprocess.run(
        [sys.executable, "-m", "drpo_trainer.cli", "--config", "configs/tiny_cpu.yaml", "--print-config"]
        + ["distributed.nproc_per_node=2", "distributed.rollout_processes=2"],
        cwd=h.REPO,
        env=h.env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0  # --print-config does not launch
    res = subprocess.run(
        [sys.executable, "-m", "drpo_trainer.cli", "--config", "configs/tiny_cpu.yaml"]
        + ["distributed.nproc_per_node=2", "distributed.rollout_processes=2"],
        cwd=h.REPO,
        env=h.env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "leaves no learner among 2 process(es)" in res.stderr


# -- runs ----------------------------------------------------------------------------------------
def test_rollout_worker_counts_idle_and_busy_time_over_every_header(monkeypatch):
    """Between two batches a rollout process may receive several headers: its idle time (waiting for
    a header) and busy time (loading weights) add up over all of them, on a clock the test drives."""
    import types

    from drpo_trainer.rollout import weight_sync
    from drpo_trainer.runtime import async_rollouts

    clock = [100.0]

    class Bridge:
        waits = iter([2.0, 0.5])  # seconds until each header arrives

        def broadcast_object(self):
            clock[0] += next(self.waits)
            return {"weights": True, "version": 1, "parity": False, "evaluate": False, "stop": False}

        def receive_buckets(self):
            return []

    def load_buckets(engine, buckets):
        clock[0] += 3.0  # loading one version of the weights takes 3 s

    monkeypatch.setattr(async_rollouts, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(weight_sync, "load_buckets", load_buckets)
    worker = object.__new__(async_rollouts.RolloutWorker)
    worker.bridge, worker.engine, worker.version, worker.idle, worker.busy = Bridge(), None, -1, 0.0, 0.0
    worker.receive()
    worker.receive()
    assert (worker.idle, worker.busy, worker.version) == (2.5, 6.0, 1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """k = 2, 6 steps, a checkpoint every step."""
    cfg, out = _config(tmp_path_factory.mktemp("async"), "base", **{"trainer.max_off_policy_steps": K})
    h.train(cfg)
    return out


def test_version_stamps_stay_within_k(uninterrupted):
    rows = h.metrics_rows(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        # the stamped version of step t's batch is max(0, t-1-k): lag min(t-1, k), never above k
        assert r["async/version_lag_max"] == r["async/version_lag_mean"] == min(r["step"] - 1, K)
        assert 0 <= r["async/queue_depth"] <= K + 1
        assert 0 <= r["async/learner_idle_fraction"] <= 1 and 0 <= r["async/rollout_idle_fraction"] <= 1
        assert r["sync/bytes"] > 0 if r["step"] + 1 + K <= STEPS else r["sync/bytes"] == 0  # no unused transfer
    prompts = [p for _, step in sorted(_prompts_by_step(uninterrupted).items()) for p in step]
    assert len(prompts) == 4 * STEPS and len(set(prompts)) == len(prompts)  # 24 of 32 problems: no repeat


def test_plot_draws_the_lag_and_idle_panels(uninterrupted, tmp_path):
    import io

    from drpo_trainer.io.plot import make_report

    fig = make_report([uninterrupted], tmp_path / "report.png", log=io.StringIO())
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    rows = h.metrics_rows(uninterrupted)
    for title, keys in [
        ("policy version lag (asynchronous)", ["version_lag_mean", "version_lag_max", "queue_depth"]),
        ("idle fraction (asynchronous)", ["learner_idle_fraction", "rollout_idle_fraction"]),
    ]:
        lines = {line.get_gid(): line for line in axes[title].lines}
        assert set(lines) == {f"base|async/{k}" for k in keys}
        for k in keys:
            assert list(lines[f"base|async/{k}"].get_ydata()) == [r[f"async/{k}"] for r in rows]


def test_sigterm_keeps_the_batches_sampled_ahead_and_resumes_exactly(uninterrupted, tmp_path):
    cfg, out = _config(tmp_path, "run", **{"trainer.max_off_policy_steps": K, "checkpoint.every_steps": 0})
    proc = h.start(cfg, log=tmp_path / "first.log")
    assert h.wait_for(lambda: _steps_logged(out) >= 2, timeout=240), (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)  # to the CLI, as a scheduler would; torchrun forwards it to both processes
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    stopped = int((out / "PREEMPTED").read_text())
    assert 2 <= stopped < STEPS
    ckpt = out / "checkpoints" / f"step_{stopped:06d}"
    # plain data (runtime/wire.py): a weights-only load reads it
    assert kept_batches(ckpt)  # what decides the console line of a resume that cannot use them
    kept = torch.load(ckpt / "ranks" / "state_00000.pt", weights_only=True)["batches_ahead"]
    kept = [batch_from_plain(b) for b in kept]
    assert [b.step for b in kept] == list(range(stopped + 1, min(stopped + K, STEPS) + 1))
    assert [b.version for b in kept] == [version_for(b.step, K) for b in kept]
    base_prompts = _prompts_by_step(uninterrupted)
    assert [b.indices for b in kept] == [base_prompts[b.step] for b in kept]  # the prompts those steps train

    h.train(cfg, "--resume", "auto")
    rows, base = h.metrics_rows(out), h.metrics_rows(uninterrupted)
    assert [comparable(r) for r in rows] == [comparable(r) for r in base]
    assert _prompts_by_step(out) == _prompts_by_step(uninterrupted)  # no prompt lost, none repeated
    assert (out / "samples.jsonl").read_bytes() == (uninterrupted / "samples.jsonl").read_bytes()
    want = h.consolidated_weights(uninterrupted / "checkpoints" / f"step_{STEPS:06d}")
    got = h.consolidated_weights(out / "checkpoints" / f"step_{STEPS:06d}")
    assert all(torch.equal(want[n], got[n]) for n in want)


@pytest.mark.slow
def test_synchronous_resume_of_an_async_checkpoint_keeps_the_data_order(uninterrupted, tmp_path):
    """The batches kept for steps 5 and 6 are dropped (said once); the same prompts are sampled again."""
    import shutil

    cfg, out = _config(tmp_path, "sync", **{"distributed.nproc_per_node": 1, "distributed.rollout_processes": 0})
    shutil.copytree(uninterrupted / "checkpoints" / "step_000004", out / "checkpoints" / "step_000004")
    res = h.train(cfg, "--resume", "auto", "--allow-config-change", "distributed,trainer.max_off_policy_steps")
    assert "batches sampled ahead of step 4 are not used (this run has no rollout processes)" in res.stderr
    assert [r["step"] for r in h.metrics_rows(out)] == [5, 6]
    base = _prompts_by_step(uninterrupted)
    assert _prompts_by_step(out) == {5: base[5], 6: base[6]}


@pytest.mark.slow
def test_two_rollout_processes_train_exactly_what_one_does(uninterrupted, tmp_path):
    """Steps alternate between the two rollout processes; every share keeps its seed and version."""
    cfg, out = _config(tmp_path, "two", **{"trainer.max_off_policy_steps": K, "distributed.nproc_per_node": 3})
    h.train(cfg, "distributed.rollout_processes=2")
    assert [comparable(r) for r in h.metrics_rows(out)] == [comparable(r) for r in h.metrics_rows(uninterrupted)]
    assert _prompts_by_step(out) == _prompts_by_step(uninterrupted)


def test_k0_reproduces_the_synchronous_update(tmp_path):
    sync_out, _ = h.baseline(1)  # the synchronous loop, one process, 6 steps
    same = {"algorithm.mismatch_correction": None}  # the synchronous run's loss, exactly
    cfg, out = _config(tmp_path, "k0", **{"trainer.max_off_policy_steps": 0, "checkpoint.keep_last": 6, **same})
    h.train(cfg)
    rows = h.metrics_rows(out)
    assert all(r["async/version_lag_max"] == 0 for r in rows)

    def synchronous_keys(row):
        return {k: v for k, v in comparable(row).items() if not k.startswith("async/")}

    assert [synchronous_keys(r) for r in rows] == [synchronous_keys(r) for r in h.metrics_rows(sync_out)]
    for step in (1, STEPS):
        want = h.consolidated_weights(sync_out / "checkpoints" / f"step_{step:06d}")
        got = h.consolidated_weights(out / "checkpoints" / f"step_{step:06d}")
        assert all(torch.equal(want[n], got[n]) for n in want), step


def test_a_rollout_process_that_dies_fails_the_run_at_once(tmp_path):
    import psutil

    cfg, out = _config(tmp_path, "dead", **{"trainer.max_off_policy_steps": 1, "trainer.max_steps": 200})
    log = tmp_path / "log"
    proc = h.start(cfg, log=log)
    try:
        assert h.wait_for(lambda: _steps_logged(out) >= 1, timeout=240), log.read_text()[-3000:]
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "TORCHELASTIC_RUN_ID" in p.environ()]
        (rollout,) = [p for p in workers if p.environ().get("RANK") == "1"]  # the launcher's global rank 1
        rollout.kill()
        killed = time.monotonic()
        rc = proc.wait(timeout=120)  # no hang: the learner learns of it from the bridge
        print(f"\nrollout killed -> run exited {rc} after {time.monotonic() - killed:.1f} s")
    finally:
        h.kill_group(proc)
    text = log.read_text()
    assert rc not in (0, EXIT_PREEMPTED), text[-3000:]
    assert "rollout process 0 (global rank 1) stopped" in text, text[-3000:]
    assert _steps_logged(out) < 200


@pytest.mark.slow  # k = 0 bitwise equality covers the transfer
def test_rollout_weights_equal_the_learners_after_every_transfer(tmp_path):
    """2 ZeRO-3 learners + 1 rollout process through the real publish path (tests/async_weights_worker.py)."""
    env = {k: v for k, v in h.env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["DRPO_TEST_MODEL"] = h.workspace()["model"]
    env["DRPO_TEST_DATA"] = h.workspace()["train"]
    env["DRPO_TEST_OUT"] = str(tmp_path)
    from drpo_trainer.runtime.distributed import free_port

    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", f"--master_port={free_port()}"]
        + [str(HERE / "async_weights_worker.py")],
        cwd=h.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["versions"] == [0, 1, 2]
    assert all(n > 0 for n in report["params_compared"]) and report["changed"] == [True, True]
    assert report["mismatched"] == [[], [], []]
    assert os.path.getsize(tmp_path / "report.json") > 0
