"""The learner's shortcuts change no update (issue: faster than TRL on the same work).

- `trainer.skip_zero_advantage`: samples with advantage exactly 0 get no forward or backward;
- `trainer.reuse_first_minibatch_logprobs`: mini-batch 1's mu is its update forward's log-probs.

Each is compared with the full computation on a step whose batch mixes zero and non-zero
advantage groups (tests/exact_update_worker.py), for every registry loss and aggregation mode,
and across 1 vs 2 ZeRO-3 processes. The optimizer is set so that a parameter's change is a
monotone function of its gradient (Adam, eps = 1), so equal changes mean equal gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drpo_trainer.algorithms.aggregation import AGG_MODES
from drpo_trainer.algorithms.losses import policy_loss_names
from drpo_trainer.learner.learner import _has_dropout

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import exact_update_worker as w  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from drpo_trainer.builtin.tiny_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("exact_model"), hidden_size=64, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def batch(model_dir):
    from transformers import AutoConfig

    return w.make_batch(AutoConfig.from_pretrained(model_dir).vocab_size)


@pytest.fixture(scope="module")
def ctx(one_process_ctx):
    """The module's one-process gloo group, and one torch thread: these tiny steps are op-overhead
    bound (ten times faster than with two threads on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield one_process_ctx
    torch.set_num_threads(threads)


def assert_same_update(a: dict, b: dict) -> None:
    """Equal within fp32 reassociation (the packing of the micro-batches differs), and not trivially."""
    moved = sum(int((d != 0).sum()) for d in a.values())
    assert moved > 0.5 * sum(d.numel() for d in a.values()), "the step should move most parameters"
    for name in a:
        # reassociation error scales with the tensor's largest change (measured: <= 7e-7 at changes of 0.5)
        scale = float(a[name].abs().max())
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7 + 1e-5 * scale, msg=name)


def step(model_dir, batch, order, *overrides):
    cfg = w.step_config(model_dir, "distributed.single_process_zero_stage=0", "distributed.zero_stage=3", *overrides)
    return w.step_delta(cfg, model_dir, w.reorder(batch, order))


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss", policy_loss_names())
def test_skipping_zero_advantage_samples_changes_no_update(model_dir, batch, ctx, loss, mode):
    common = (f"algorithm.loss={loss}", f"algorithm.loss_agg_mode={mode}", "trainer.reuse_first_minibatch_logprobs=0")
    full, m_full = step(model_dir, batch, [0, 2, 1, 3], *common, "trainer.skip_zero_advantage=false")
    skip, m_skip = step(model_dir, batch, [0, 2, 1, 3], *common, "trainer.skip_zero_advantage=true")
    assert_same_update(full, skip)
    # each mini-batch holds one zero and one non-zero group
    assert [m["perf/skipped_sample_fraction"] for m in m_skip] == [0.5, 0.5]
    assert [m["perf/skipped_sample_fraction"] for m in m_full] == [0.0, 0.0]
    for a, b in zip(m_full, m_skip):
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_minibatch_with_only_zero_advantages_still_steps_the_optimizer(model_dir, batch, ctx, stage):
    """Mini-batch 1 = groups 1, 2 (all A = 0): no sample is trained, yet Adam must step exactly as
    with the full computation, so that mini-batch 2 starts from the same optimizer state."""
    common = (f"distributed.single_process_zero_stage={stage}", "trainer.reuse_first_minibatch_logprobs=0")
    full, _ = step(model_dir, batch, [1, 2, 0, 3], *common, "trainer.skip_zero_advantage=false")
    skip, m_skip = step(model_dir, batch, [1, 2, 0, 3], *common, "trainer.skip_zero_advantage=true")
    assert m_skip[0]["perf/skipped_sample_fraction"] == 1.0
    assert m_skip[0]["loss/policy"] == 0.0
    assert_same_update(full, skip)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss", policy_loss_names())
def test_first_minibatch_mu_from_the_update_forward_changes_no_update(model_dir, batch, ctx, loss, mode):
    common = (f"algorithm.loss={loss}", f"algorithm.loss_agg_mode={mode}", "trainer.skip_zero_advantage=false")
    recomputed, m_rec = step(model_dir, batch, [0, 2, 1, 3], *common, "trainer.reuse_first_minibatch_logprobs=0")
    reused, m_reu = step(model_dir, batch, [0, 2, 1, 3], *common, "trainer.reuse_first_minibatch_logprobs=1")
    # bitwise: the no-grad recomputation and the update forward are the same computation
    for name in recomputed:
        assert torch.equal(recomputed[name], reused[name]), name
    assert m_reu[0]["policy/ratio_max"] == m_reu[0]["policy/ratio_min"] == 1.0
    assert m_rec[0]["policy/entropy"] == m_reu[0]["policy/entropy"]


def test_both_shortcuts_together_reproduce_the_full_step(model_dir, batch, ctx):
    full, m_full = step(
        model_dir, batch, [0, 2, 1, 3], "trainer.skip_zero_advantage=0", "trainer.reuse_first_minibatch_logprobs=0"
    )
    fast, m_fast = step(model_dir, batch, [0, 2, 1, 3])  # the defaults: both on
    assert_same_update(full, fast)
    # entropy now covers the trained tokens only: it differs from the all-token figure
    assert m_fast[0]["policy/entropy"] != pytest.approx(m_full[0]["policy/entropy"], rel=1e-6)


def test_dropout_disables_the_reuse():
    assert _has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    assert not _has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0)))


@pytest.mark.distributed
def test_two_processes_with_shortcuts_equal_one_process_without(model_dir, tmp_path):
    """ZeRO-3, 2 ranks holding groups {0, 1} and {2, 3}: in mini-batch 1 rank 1 has nothing to
    train, in mini-batch 2 rank 0 (it runs a zero-weight forward to keep the collectives in step).
    One process without shortcuts, fed the same mini-batches, makes the same update."""
    from drpo_trainer.runtime.distributed import free_port

    def run(nproc: int, skip: str, reuse: str, order: str) -> dict:
        out = tmp_path / f"delta_{nproc}.pt"
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd += ["--master_port", str(free_port()), str(HERE / "exact_update_worker.py")]
        cmd += [model_dir, str(out), skip, reuse, order]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return torch.load(out)

    one = run(1, "false", "false", "0,2,1,3")
    two = run(2, "true", "true", "0,1,2,3")
    assert_same_update(one["delta"], two["delta"])
    assert [m["perf/skipped_sample_fraction"] for m in two["metrics"]] == [0.5, 0.5]
    for a, b in zip(one["metrics"], two["metrics"]):
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-5, abs=1e-9)
