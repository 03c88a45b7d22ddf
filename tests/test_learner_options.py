"""Learner options through `Learner.update`: the lr schedules, gradient clipping and the
train/inference mismatch correction (tis, mis), each checked against numbers derived by hand.

One process, ZeRO stage 0, the fixed batch of tests/exact_update_worker.py (groups 0 and 3 have
non-zero advantages), and Adam with eps = 1 so that one step moves a parameter by
-lr g / (|g| + 1): the gradient can be read back from the parameter change.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from drpo_trainer.learner.learner import Learner, lr_lambda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exact_update_worker as w  # noqa: E402

G = w.G


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from drpo_trainer.builtin.tiny_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("options_model"), hidden_size=64, num_layers=2, seed=4)


@pytest.fixture(scope="module")
def batch(model_dir):
    from transformers import AutoConfig

    return w.make_batch(AutoConfig.from_pretrained(model_dir).vocab_size, seed=1)


@pytest.fixture(scope="module")
def parameter_names(model_dir) -> list[str]:
    """Each parameter once (the tied lm_head is the embedding)."""
    from transformers import AutoModelForCausalLM

    return [n for n, _ in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()]


@pytest.fixture(scope="module")
def ctx(one_process_ctx):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a busy machine
    yield one_process_ctx
    torch.set_num_threads(threads)


def one_step(model_dir, ctx, samples, *overrides):
    """(parameter change, update metrics) of one optimizer step on `samples` (mu recomputed first)."""
    cfg = w.step_config(model_dir, "trainer.minibatches_per_step=1", *overrides)
    learner = Learner(cfg, model_dir, total_optimizer_steps=1, ctx=ctx)
    assert learner.zero_stage == 0
    before = w.full_params(learner.module)
    learner.recompute_logprobs(samples)
    metrics = learner.update(samples)
    after = w.full_params(learner.module)
    return {n: after[n] - before[n] for n in after}, metrics


def gradient_from_step(delta: torch.Tensor) -> torch.Tensor:
    """Adam's first step with lr 1, eps 1: d = -g / (|g| + 1), so g = -d / (1 - |d|)."""
    return -delta.double() / (1.0 - delta.double().abs())


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules


def test_lr_schedules_by_hand():
    constant = lr_lambda("constant", 4, 100)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # linear warm-up, then flat
    assert [lr_lambda("constant", 0, 10)(s) for s in (0, 9)] == [1.0, 1.0]
    cosine = lr_lambda("warmup_cosine", 2, 6)
    # warm-up 1/2, 2/2; then 0.5 (1 + cos(pi (s - 2) / 4)) for s = 2..6: 1, 0.854, 0.5, 0.146, 0
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert [cosine(s) for s in range(7)] == pytest.approx(want, abs=1e-12)
    assert cosine(9) == 0.0  # past the end: stays at 0


def test_update_reports_the_scheduled_lr(model_dir, ctx, batch):
    """Four optimizer steps of warm-up 2 then cosine over 4 steps: optim/lr of each update is the
    lr that update was taken with."""
    cfg = w.step_config(
        model_dir,
        "optim.lr=0.1",
        "optim.schedule=warmup_cosine",
        "optim.warmup_steps=2",
        "trainer.minibatches_per_step=1",
    )
    learner = Learner(cfg, model_dir, total_optimizer_steps=4, ctx=ctx)
    lrs = []
    for _ in range(4):
        samples = copy.deepcopy(batch)
        learner.recompute_logprobs(samples)
        lrs.append(learner.update(samples)["optim/lr"])
    # steps 0..3: 0.1 x [1/2, 2/2, 1 (cosine start), 0.5 (1 + cos(pi / 2)) = 0.5]; the schedule then ends at 0
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.05], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Gradient clipping


def test_gradient_clipping_scales_the_gradient_to_the_bound(model_dir, ctx, batch, parameter_names):
    free, m_free = one_step(model_dir, ctx, copy.deepcopy(batch), "optim.grad_clip=0")
    g = {n: gradient_from_step(free[n]) for n in parameter_names}
    norm = math.sqrt(sum(float((t * t).sum()) for t in g.values()))
    # the reported norm is the gradient's (before clipping), as recovered from the step
    assert m_free["optim/grad_norm"] == pytest.approx(norm, rel=1e-3)
    bound = norm / 4
    clipped, m_clipped = one_step(model_dir, ctx, copy.deepcopy(batch), f"optim.grad_clip={bound}")
    assert m_clipped["optim/grad_norm"] == pytest.approx(m_free["optim/grad_norm"], rel=1e-6)
    scale = bound / m_clipped["optim/grad_norm"]  # ~1/4
    for n in g:
        g_clipped = g[n] * scale
        want = -g_clipped / (g_clipped.abs() + 1.0)
        # float32 parameters: a change is exact to ~1 ulp of the weight (1.2e-7 for the norms at 1.0)
        torch.testing.assert_close(clipped[n].double(), want, rtol=1e-3, atol=3e-7)
    moved = sum(float(clipped[n].abs().sum()) for n in g)
    assert moved < 0.3 * sum(float(free[n].abs().sum()) for n in g)  # a quarter of the gradient, roughly


# ---------------------------------------------------------------------------------------------
# Train/inference mismatch correction


def with_rollout(samples, rho_of_group: dict[int, float]):
    """Rollout log-probs set so that rho = exp(old - rollout) is rho_of_group[g] on group g, 1 elsewhere."""
    out = []
    for i, s in enumerate(samples):
        s = copy.deepcopy(s)
        if s.old_logprobs is not None:  # None: advantage 0, not trained (trainer.skip_zero_advantage)
            s.rollout_logprobs = s.old_logprobs - math.log(rho_of_group.get(i // G, 1.0))
        out.append(s)
    return out


def corrected_step(model_dir, ctx, batch, rho_of_group, *overrides):
    cfg = w.step_config(model_dir, "trainer.minibatches_per_step=1", *overrides)
    learner = Learner(cfg, model_dir, total_optimizer_steps=1, ctx=ctx)
    samples = copy.deepcopy(batch)
    learner.recompute_logprobs(samples)
    samples = with_rollout(samples, rho_of_group)
    before = w.full_params(learner.module)
    metrics = learner.update(samples)
    after = w.full_params(learner.module)
    return {n: after[n] - before[n] for n in after}, metrics


def scaled_advantages(batch, scale_of_group: dict[int, float]):
    out = copy.deepcopy(batch)
    for i, s in enumerate(out):
        s.advantage *= scale_of_group.get(i // G, 1.0)
    return out


def tokens_of(batch, group: int) -> int:
    return sum(s.completion_len for s in batch[group * G : (group + 1) * G])


def test_tis_weights_each_token_by_its_capped_importance_ratio(model_dir, ctx, batch):
    """tis multiplies a token's loss by min(rho, tis_cap). Every registry loss is linear in the
    advantage, so rho = 0.5 on group 0 and rho = 4 (capped at 2) on group 3 is the same update as
    no correction with group 0's advantages halved and group 3's doubled."""
    got, metrics = corrected_step(
        model_dir, ctx, batch, {0: 0.5, 3: 4.0}, "algorithm.mismatch_correction=tis", "algorithm.tis_cap=2.0"
    )
    want, _ = one_step(model_dir, ctx, scaled_advantages(batch, {0: 0.5, 3: 2.0}))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)
    # over the trained tokens (groups 0 and 3; 1 and 2 have advantage 0): weights 0.5 and 2
    t0, t3 = tokens_of(batch, 0), tokens_of(batch, 3)
    assert metrics["mismatch/tis_weight_mean"] == pytest.approx((0.5 * t0 + 2.0 * t3) / (t0 + t3), rel=1e-5)


def test_mis_masks_tokens_outside_the_band_and_keeps_the_normalisers(model_dir, ctx, batch):
    """mis zeroes tokens with rho outside [mis_lower, mis_upper] but still counts them in the
    token and sequence normalisers: rho = 4 on group 3 is the update of group 3 at advantage 0
    (rho = 1.5 on group 0 is inside the band and changes nothing)."""
    got, metrics = corrected_step(
        model_dir,
        ctx,
        batch,
        {0: 1.5, 3: 4.0},
        "algorithm.mismatch_correction=mis",
        "algorithm.mis_lower=0.5",
        "algorithm.mis_upper=2.0",
        "algorithm.loss_agg_mode=token-mean",  # normalised by every token of the mini-batch
    )
    want, _ = one_step(model_dir, ctx, scaled_advantages(batch, {3: 0.0}), "algorithm.loss_agg_mode=token-mean")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)
    t0, t3 = tokens_of(batch, 0), tokens_of(batch, 3)
    assert metrics["mismatch/mis_masked_fraction"] == pytest.approx(t3 / (t0 + t3), rel=1e-6)
