"""Exact resume: 6 steps uninterrupted == 3 steps, stop, `--resume auto` to 6.

Compared: every non-timing metric of steps 4-6 (rewards, advantages, losses, ratios, grad
norms, learning rate, ... as written to metrics.jsonl) and the final fp32 weights of the
checkpoint (consolidated from the ZeRO-3 shards of a two-process run; a one-process run is
unpartitioned, `distributed.single_process_zero_stage: 0`, and saves the whole module). Both must
be BITWISE equal: the same CPU kernels run on the same inputs in the same order once model,
optimizer, scheduler, RNG states of every rank and the data position are restored.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import resume_helpers as h
import torch


def _assert_same_run(full, resumed, *, nproc: int) -> None:
    rows_full, rows_resumed = h.metrics_rows(full), h.metrics_rows(resumed)
    # each step once, in order: nothing skipped or repeated, metrics.jsonl truncated on resume
    assert [r["step"] for r in rows_full] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows_full[3:], rows_resumed[3:]):
        assert h.without_timings(a) == h.without_timings(b), f"step {a['step']} differs"
    # samples.jsonl continues across the resume: the same completions, rewards and advantages, each step once
    samples = (resumed / "samples.jsonl").read_text()
    assert samples == (full / "samples.jsonl").read_text()
    assert [json.loads(l)["step"] for l in samples.splitlines()] == [s for s in range(1, 7) for _ in range(4)]
    # the run learns (non-zero advantages move the weights), else equality would prove little
    assert all(r["advantage/abs_mean"] > 0 for r in rows_full)
    assert len({r["loss/policy"] for r in rows_full}) == 6

    # data position: 4 prompts per step from 32 -> index 4 * 6 = 24 of epoch 0, data.seed 0
    state = json.loads((resumed / "checkpoints" / "step_000006" / "loop_state.json").read_text())
    assert state["sampler"] == {"epoch": 0, "index": 24, "seed": 0} and state["world_size"] == nproc
    from drpo_trainer.io.reshard import saved_at_zero3

    assert saved_at_zero3(resumed / "checkpoints" / "step_000006") == (nproc > 1)  # the stage the docstring names

    w_full = h.consolidated_weights(full / "checkpoints" / "step_000006")
    w_resumed = h.consolidated_weights(resumed / "checkpoints" / "step_000006")
    w_step4 = h.consolidated_weights(full / "checkpoints" / "step_000004")
    assert w_full.keys() == w_resumed.keys()
    for name in w_full:
        assert torch.equal(w_full[name], w_resumed[name]), name
    assert any(not torch.equal(w_full[n], w_step4[n]) for n in w_full)  # steps 5-6 did change them


def test_exact_resume_one_process(tmp_path):
    full, _ = h.baseline(1)
    split = tmp_path / "split"
    cfg = h.write_config(tmp_path / "split.yaml", h.workspace(), split)
    h.train(cfg, "trainer.max_steps=3")  # a run that stops after step 3
    assert (split / "checkpoints" / "latest").read_text() == "step_000003"
    refused = h.run_cli(cfg, "--resume", "auto")  # max_steps 3 -> 6 is a change: it must be asked for
    assert refused.returncode == 2 and "trainer.max_steps: 3 -> 6" in refused.stderr
    assert "--allow-config-change trainer.max_steps" in refused.stderr
    resumed = h.train(cfg, "--resume", "auto", "--allow-config-change", "trainer.max_steps")
    assert "resuming with changed settings: trainer.max_steps: 3 -> 6" in resumed.stderr
    assert f"resumed from {split / 'checkpoints' / 'step_000003'} at step 3" in resumed.stderr
    _assert_same_run(full, split, nproc=1)


@pytest.mark.slow  # one-process exact resume and test_resume_engine's ZeRO-3 case stay
@pytest.mark.distributed
def test_exact_resume_two_processes(tmp_path):
    """Resume from the step-3 checkpoint of the 2-process baseline, in a directory that holds
    only that checkpoint and the baseline's metrics and samples of steps 1-6 (4-6 must be dropped and redone)."""
    full, _ = h.baseline(2)
    out = tmp_path / "split"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_000003", out / "checkpoints" / "step_000003")
    (out / "checkpoints" / "latest").write_text("step_000003")
    shutil.copy(full / "metrics.jsonl", out / "metrics.jsonl")
    shutil.copy(full / "samples.jsonl", out / "samples.jsonl")
    cfg = h.write_config(tmp_path / "split.yaml", h.workspace(), out, **{"distributed.nproc_per_node": 2})
    resumed = h.train(cfg, "--resume", "auto")
    assert "at step 3" in resumed.stderr
    _assert_same_run(full, out, nproc=2)


def test_resume_auto_on_an_empty_directory_starts_fresh():
    out, stderr = h.baseline(1)
    assert "resumed from" not in stderr
    assert [r["step"] for r in h.metrics_rows(out)] == [1, 2, 3, 4, 5, 6]
    # keep_last=6 and a checkpoint every step: all six kept, the pointer on the last
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{i:06d}" for i in range(1, 7)]
    assert (out / "checkpoints" / "latest").read_text() == "step_000006"


@pytest.mark.distributed
def test_loading_another_world_size_needs_the_universal_conversion():
    from drpo_trainer.config import ConfigError
    from drpo_trainer.io.checkpoint import load_checkpoint
    from drpo_trainer.io.reshard import check_convertible, saved_at_zero3

    full, _ = h.baseline(2)
    ckpt = full / "checkpoints" / "step_000003"
    # this test process has no process group: world size 1 against the checkpoint's 2
    with pytest.raises(RuntimeError, match="written by 2 processes, this run has 1: resume through drpo_trainer"):
        load_checkpoint(engine=None, path=ckpt)
    assert saved_at_zero3(ckpt)
    check_convertible(ckpt, 1)  # ZeRO-3 shards: DeepSpeed can convert them
    one, _ = h.baseline(1)
    stage0 = one / "checkpoints" / "step_000003"
    assert not saved_at_zero3(stage0)
    with pytest.raises(ConfigError, match="single_process_zero_stage=null"):
        check_convertible(stage0, 2)


def _sampler_at(out, step):
    return json.loads((out / "checkpoints" / f"step_{step:06d}" / "loop_state.json").read_text())["sampler"]


def _lrs(out):
    return {r["step"]: r["optim/lr"] for r in h.metrics_rows(out) if "optim/lr" in r}


@pytest.mark.distributed
def test_resume_two_processes_checkpoint_with_one(tmp_path):
    """2 -> 1 through DeepSpeed's universal checkpoint: the data position and the lr schedule carry
    over, and the one-process run goes on at ZeRO-3 (its checkpoints stay resumable)."""
    full, _ = h.baseline(2)
    out = tmp_path / "one"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_000003", out / "checkpoints" / "step_000003")
    cfg = h.write_config(tmp_path / "one.yaml", h.workspace(), out, **{"checkpoint.keep_last": 6})
    refused = h.run_cli(cfg, "--resume", "auto")  # the process count is part of the config
    assert refused.returncode == 2 and "distributed.nproc_per_node: 2 -> 1" in refused.stderr
    resumed = h.train(cfg, "--resume", "auto", "--allow-config-change", "distributed.nproc_per_node")
    assert "resuming with 1 through DeepSpeed's universal checkpoint" in resumed.stderr
    assert "at step 3" in resumed.stderr
    assert (out / "checkpoints" / "step_000003" / "universal" / "state" / "zero" / "optimizer_state.pt").is_file()
    assert _sampler_at(out, 6) == _sampler_at(full, 6)  # same prompts drawn in steps 4-6
    lrs, base = _lrs(out), _lrs(full)
    assert [lrs[s] for s in (4, 5, 6)] == [base[s] for s in (4, 5, 6)]  # the schedule's state came back
    rows = [r for r in h.metrics_rows(out) if r["step"] > 3]
    assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["optim/grad_norm"]) for r in rows)
    assert (
        out / "checkpoints" / "step_000006" / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    ).is_file()


@pytest.mark.slow  # the doc command of docs/checkpoints.md resumes 1 -> 2 in the default suite
@pytest.mark.distributed
def test_resume_one_process_checkpoint_with_two(tmp_path):
    """1 -> 2: a one-process run that checkpoints at ZeRO-3 (single_process_zero_stage=null) grows to
    two processes; one at its default stage 0 is refused with the fix."""
    base, _ = h.baseline(1)
    out = tmp_path / "grow"
    one = h.write_config(
        tmp_path / "one.yaml",
        h.workspace(),
        out,
        **{"distributed.single_process_zero_stage": None, "checkpoint.keep_last": 6},
    )
    h.train(one, "trainer.max_steps=3")
    two = h.write_config(
        tmp_path / "two.yaml",
        h.workspace(),
        out,
        **{"distributed.single_process_zero_stage": None, "distributed.nproc_per_node": 2, "checkpoint.keep_last": 6},
    )
    allow = ("--allow-config-change", "distributed.nproc_per_node,trainer.max_steps")
    resumed = h.train(two, "--resume", "auto", *allow)
    assert "resuming with 2 through DeepSpeed's universal checkpoint" in resumed.stderr
    assert _sampler_at(out, 6) == _sampler_at(base, 6)
    lrs, ref = _lrs(out), _lrs(base)
    assert [lrs[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]

    stage0 = tmp_path / "stage0"
    (stage0 / "checkpoints").mkdir(parents=True)
    shutil.copytree(base / "checkpoints" / "step_000003", stage0 / "checkpoints" / "step_000003")
    cfg = h.write_config(tmp_path / "s0.yaml", h.workspace(), stage0, **{"distributed.nproc_per_node": 2})
    refused = h.run_cli(cfg, "--resume", "auto", "--allow-config-change", "distributed.nproc_per_node")
    assert refused.returncode == 2 and "single_process_zero_stage=null" in refused.stderr
