"""algorithm.mask_truncated: a truncated completion is left out of the loss entirely (no gradient,
not counted in the normalisers), checked on the parameter update of the real learner (DeepSpeed,
one gloo process) with a tiny random Qwen3.

- One mini-batch against a hand-written reference: a plain transformers model, the policy-gradient
  loss written out here over the completions that ended, divided by THEIR count, and Adam's first
  step (with eps = 1 it is -lr g / (|g| + 1)): equal. The same reference with the truncated
  completions counted in the normaliser (the other option of the issue), and the unmasked update:
  both different.
- Two mini-batches (stale second), every aggregation mode, with and without the zero-advantage skip:
  the update equals that of the same batch with the truncated samples removed.
- A mini-batch whose samples are all truncated still steps the optimizer, as one whose advantages are
  all zero does.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from drpo_trainer.algorithms.aggregation import AGG_MODES

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import exact_update_worker as w  # noqa: E402
from test_exact_shortcuts import assert_same_update  # noqa: E402

G = w.G
# (group, sample) pairs flagged truncated: two in group 0 and one in group 3 (non-zero advantages),
# one in group 1 (advantages exactly 0)
TRUNCATED = {(0, 1), (0, 2), (3, 3), (1, 0)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from drpo_trainer.builtin.tiny_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("mask_model"), hidden_size=64, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def batch(model_dir):
    """16 samples, groups of 4; groups 1 and 2 have advantage 0 (tests/exact_update_worker.py)."""
    from transformers import AutoConfig

    samples = w.make_batch(AutoConfig.from_pretrained(model_dir).vocab_size)
    for i, s in enumerate(samples):
        s.truncated = (i // G, i % G) in TRUNCATED
    return samples


@pytest.fixture(scope="module")
def ctx(one_process_ctx):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield one_process_ctx
    torch.set_num_threads(threads)


def run(model_dir, minibatches, *overrides):
    """(parameter change, metrics per update) of one step on explicit mini-batches (lists of samples)."""
    from drpo_trainer.learner.learner import Learner

    cfg = w.step_config(
        model_dir,
        "distributed.single_process_zero_stage=0",
        f"trainer.minibatches_per_step={len(minibatches)}",
        *overrides,
    )
    learner = Learner(cfg, model_dir, total_optimizer_steps=len(minibatches))
    minibatches = [copy.deepcopy(mb) for mb in minibatches]
    before = w.full_params(learner.module)
    for mb in minibatches[1:]:
        learner.recompute_logprobs(mb)
    metrics = [learner.update(mb, behaviour_from_forward=k == 0) for k, mb in enumerate(minibatches)]
    after = w.full_params(learner.module)
    return {n: after[n] - before[n] for n in after}, metrics


def groups(samples, *gs):
    return [s for g in gs for s in samples[g * G : (g + 1) * G]]


def ended(samples):
    return [s for s in samples if not s.truncated]


# -- one mini-batch against a reference written here ----------------------------------------------
def reference_delta(model_dir, samples, counted: int, horizon: int) -> dict[str, torch.Tensor]:
    """Adam's first step (lr 1, eps 1, no weight decay, no clipping) on the gradient of
    L = -1/counted * sum over the completions that ended of A_i * sum_t log pi(y_it) / horizon,
    the seq-mean-token-sum-norm policy gradient at r = 1 (DRPO's gradient weight is 1 there)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loss = torch.zeros(())
    for s in ended(samples):
        ids = torch.tensor([s.input_ids])
        logits = model(ids).logits[0, s.prompt_len - 1 : -1]  # predicts the completion tokens
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, s.prompt_len :, None])[:, 0]
        loss = loss - s.advantage * logp.sum() / horizon
    (loss / counted).backward()
    params = model.named_parameters(remove_duplicate=False)  # a tied lm_head under its own name too
    return {n: -p.grad / (p.grad.abs() + 1.0) for n, p in params}


def test_one_minibatch_equals_the_hand_written_update_over_the_completions_that_ended(model_dir, batch, ctx):
    mb = groups(batch, 0, 1, 2, 3)
    masked, m_masked = run(model_dir, [mb], "algorithm.mask_truncated=true")
    horizon = 10  # rollout.max_new_tokens of the step config: seq-mean-token-sum-norm's horizon
    left_out = reference_delta(model_dir, mb, counted=len(ended(mb)), horizon=horizon)  # 12 sequences
    counted_in = reference_delta(model_dir, mb, counted=len(mb), horizon=horizon)  # 16: the other option
    name = next(iter(masked))
    assert name in left_out  # the learner's parameter names are the model's
    for n in masked:
        scale = float(left_out[n].abs().max())
        torch.testing.assert_close(masked[n], left_out[n], rtol=1e-4, atol=1e-7 + 1e-5 * scale, msg=n)
    # teeth: counting the 4 truncated completions in the normaliser changes the update, ...
    assert max(float((counted_in[n] - masked[n]).abs().max()) for n in masked) > 1e-3
    # ... and so does training on them
    unmasked, _ = run(model_dir, [mb])
    assert max(float((unmasked[n] - masked[n]).abs().max()) for n in masked) > 1e-3
    # no forward for the truncated ones nor (skip_zero_advantage) the zero-advantage ones: 5 of 16 trained
    # (groups 0 and 3 hold the 8 non-zero advantages, 3 of them truncated)
    assert m_masked[0]["perf/skipped_sample_fraction"] == 1 - 5 / 16


# -- two mini-batches: the same update as the batch without the truncated samples -------------------
@pytest.mark.parametrize("mode", AGG_MODES)
def test_masked_update_equals_the_update_without_the_truncated_samples(model_dir, batch, ctx, mode):
    mbs = [groups(batch, 0, 2), groups(batch, 1, 3)]  # each: one non-zero and one zero-advantage group
    common = (f"algorithm.loss_agg_mode={mode}",)
    masked, m_masked = run(model_dir, mbs, *common, "algorithm.mask_truncated=true")
    removed, m_removed = run(model_dir, [ended(mb) for mb in mbs], *common)
    assert_same_update(masked, removed)
    for a, b in zip(m_masked, m_removed):
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-5, abs=1e-9)
    unmasked, _ = run(model_dir, mbs, *common)
    assert max(float((unmasked[n] - masked[n]).abs().max()) for n in masked) > 1e-3


@pytest.mark.parametrize("loss", ["grpo", "pg"])
def test_without_skipping_and_with_other_losses_the_update_is_the_same(model_dir, batch, ctx, loss):
    mbs = [groups(batch, 0, 2), groups(batch, 1, 3)]
    common = (f"algorithm.loss={loss}", "algorithm.loss_agg_mode=token-mean", "trainer.skip_zero_advantage=false")
    masked, m_masked = run(model_dir, mbs, *common, "algorithm.mask_truncated=true")
    removed, _ = run(model_dir, [ended(mb) for mb in mbs], *common)
    assert_same_update(masked, removed)
    # without the skip only the truncated samples go without a forward: 2 of 8, then 2 of 8
    assert [m["perf/skipped_sample_fraction"] for m in m_masked] == [0.25, 0.25]


def test_a_minibatch_of_truncated_samples_only_still_steps_the_optimizer(model_dir, batch, ctx):
    """Mini-batch 1 all truncated gives no gradient, but Adam still counts the step, so mini-batch 2's
    update is that of a step after one with zero gradient (here: mini-batch 1 with all A = 0)."""
    mb1 = [copy.copy(s) for s in groups(batch, 0, 2)]
    for s in mb1:
        s.truncated = True
    mb2 = groups(batch, 1, 3)
    masked, m_masked = run(model_dir, [mb1, mb2], "algorithm.mask_truncated=true")
    assert m_masked[0]["loss/policy"] == 0.0 and m_masked[0]["perf/skipped_sample_fraction"] == 1.0
    zero = [copy.copy(s) for s in groups(batch, 0, 2)]
    for s in zero:
        s.advantage, s.truncated = 0.0, False
    reference, _ = run(model_dir, [zero, ended(mb2)])
    assert_same_update(masked, reference)


def test_off_by_default():
    from drpo_trainer.config import load_config

    assert load_config(None, []).algorithm.mask_truncated is False
    assert load_config(None, ["algorithm.mask_truncated=true"]).algorithm.mask_truncated is True
