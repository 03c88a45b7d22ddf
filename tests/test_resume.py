"""Exact resume: 6 steps uninterrupted == 3 steps, stop, `--resume auto` to 6.

Compared: every non-timing metric of steps 4-6 (rewards, advantages, losses, ratios, grad
norms, learning rate, ... as written to metrics.jsonl) and the final fp32 weights consolidated
from the ZeRO-3 shards. Both must be BITWISE equal: the same CPU kernels run on the same
inputs in the same order once model, optimizer, scheduler, RNG states of every rank and the
data position are restored.
"""

from __future__ import annotations

import json
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
    # the run learns (non-zero advantages move the weights), else equality would prove little
    assert all(r["advantage/abs_mean"] > 0 for r in rows_full)
    assert len({r["loss/policy"] for r in rows_full}) == 6

    # data position: 4 prompts per step from 32 -> index 4 * 6 = 24 of epoch 0, data.seed 0
    state = json.loads((resumed / "checkpoints" / "step_000006" / "loop_state.json").read_text())
    assert state["sampler"] == {"epoch": 0, "index": 24, "seed": 0} and state["world_size"] == nproc

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


@pytest.mark.distributed
def test_exact_resume_two_processes(tmp_path):
    """Resume from the step-3 checkpoint of the 2-process baseline, in a directory that holds
    only that checkpoint and the baseline's metrics of steps 1-6 (4-6 must be dropped and redone)."""
    full, _ = h.baseline(2)
    out = tmp_path / "split"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_000003", out / "checkpoints" / "step_000003")
    (out / "checkpoints" / "latest").write_text("step_000003")
    shutil.copy(full / "metrics.jsonl", out / "metrics.jsonl")
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
def test_resume_with_another_world_size_says_how_to_convert():
    from drpo_trainer.checkpoint import load_checkpoint

    full, _ = h.baseline(2)
    ckpt = full / "checkpoints" / "step_000003"
    # this test process has no process group: world size 1 against the checkpoint's 2
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(engine=None, path=ckpt)
    msg = str(err.value)
    assert "written by 2 processes, this run has 1" in msg
    assert f"ds_to_universal --input_folder {ckpt}/ds/state" in msg and "drpo-train export" in msg
