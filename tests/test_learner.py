"""The learner on a real DeepSpeed ZeRO-3 engine (one process, gloo) with a tiny random Qwen3.

Checks the promises of the training step: mu is the pre-update policy (ratio exactly 1 in
the first mini-batch, not in later stale ones), the update does not depend on how a
mini-batch is cut into micro-batches, every parameter trains, and a weight sync leaves
the rollout engine with exactly the learner's weights.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from drpo_trainer.config import load_config
from drpo_trainer.learner.learner import Learner, TrainSample
from drpo_trainer.rollout import SamplingSpec
from drpo_trainer.rollout.hf_engine import HFEngine
from drpo_trainer.rollout.weight_sync import iter_gathered_buckets, sync_weights
from drpo_trainer.runtime.loop import split_minibatches

G = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from drpo_trainer.builtin.tiny_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("learner_model"), hidden_size=64, num_layers=2, seed=1)


@pytest.fixture(scope="module")
def ctx(one_process_ctx):
    return one_process_ctx


def make_cfg(model_dir, *overrides):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "optim.lr=1e-3",
            "optim.weight_decay=0.0",
            "trainer.prompts_per_step=4",
            "trainer.minibatches_per_step=2",
            f"rollout.samples_per_prompt={G}",
            "rollout.max_new_tokens=12",
            "algorithm.loss_agg_mode=token-mean",
            "distributed.single_process_zero_stage=null",  # really shard: ZeRO-3 hooks even in one process
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def samples(model_dir, ctx):
    """16 real completions (4 prompts x G) with fixed non-zero advantages."""
    engine = HFEngine(model_dir)
    prompts = [engine.tokenizer(f"Compute {a} + {a}.")["input_ids"] for a in (3, 14, 25, 61)]
    comps = engine.generate(prompts, SamplingSpec(n=G, max_new_tokens=12, seed=5))
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(len(comps), generator=gen)
    return [
        TrainSample(
            input_ids=c.prompt_ids + c.completion_ids,
            prompt_len=len(c.prompt_ids),
            advantage=float(a),
            rollout_logprobs=torch.tensor(c.rollout_logprobs),
        )
        for c, a in zip(comps, adv)
    ]


def fresh(samples):
    return [copy.deepcopy(s) for s in samples]


def full_params(learner) -> dict[str, torch.Tensor]:
    out = {}
    for bucket in iter_gathered_buckets(learner.module, 1 << 20):
        out.update({n: t.detach().clone() for n, t in bucket})
    return out


def test_first_minibatch_ratio_is_exactly_one_and_later_ones_are_stale(model_dir, ctx, samples):
    cfg = make_cfg(model_dir)
    learner = Learner(cfg, model_dir, total_optimizer_steps=2)
    assert learner.zero_stage == 3
    batch = fresh(samples)
    mbs = split_minibatches(batch, 2, G)
    for mb in mbs:  # mu for the whole step, before any update
        learner.recompute_logprobs(mb)
    first = learner.update(mbs[0])
    second = learner.update(mbs[1])
    assert first["policy/ratio_max"] == 1.0 and first["policy/ratio_min"] == 1.0  # bitwise: pi == mu
    assert first["policy/approx_kl_k3"] == 0.0
    # mini-batch 2 is scored by a policy that has moved once, against the same mu
    assert second["policy/ratio_max"] > 1.0 + 1e-4 or second["policy/ratio_min"] < 1.0 - 1e-4
    assert second["policy/approx_kl_k3"] > 0.0


def test_rollout_mu_reports_engine_mismatch(model_dir, ctx, samples):
    cfg = make_cfg(model_dir, "algorithm.behaviour_logprobs=rollout")
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    mb = split_minibatches(fresh(samples), 2, G)[0]
    m = learner.update(mb)  # no recompute needed: mu = the engine's log-probs
    # the engine (fp32, batched generate with left padding) and the learner (packed) differ
    # only by float round-off here: ratio within 1e-4 of 1 but measured, not assumed
    assert abs(m["policy/ratio_mean"] - 1.0) < 1e-4
    assert m["policy/abs_pi_minus_mu_max"] < 1e-4


@pytest.mark.parametrize("stage", [3, 0])
def test_micro_batch_split_does_not_change_the_update(model_dir, ctx, samples, stage):
    results = []
    for budget in (4096, 40):  # one micro-batch vs one or two sequences per micro-batch
        cfg = make_cfg(
            model_dir,
            f"trainer.micro_batch_tokens_per_gpu={budget}",
            "data.max_prompt_tokens=20",  # prompt + 12 new tokens fit the 40-token budget
            "trainer.minibatches_per_step=1",
            f"distributed.zero_stage={stage}",
        )
        learner = Learner(cfg, model_dir, total_optimizer_steps=1)
        batch = fresh(samples)
        learner.recompute_logprobs(batch)
        before = full_params(learner)
        metrics = learner.update(batch)
        results.append((before, full_params(learner), metrics))
    (b1, a1, m1), (b2, a2, m2) = results
    lr = 1e-3
    close = total = 0
    for name in a1:
        assert torch.equal(b1[name], b2[name])
        d1, d2 = a1[name] - b1[name], a2[name] - b2[name]
        # Adam's first step moves a weight by ~lr * g / |g|: where g is at round-off level the
        # direction is noise, so bound every element by 1% of lr and nearly all by 1e-7
        torch.testing.assert_close(d1, d2, rtol=0, atol=0.01 * lr)
        close += int(((d1 - d2).abs() <= 1e-7).sum())
        total += d1.numel()
    assert close / total > 0.999
    assert m1["loss/policy"] == pytest.approx(m2["loss/policy"], rel=1e-5, abs=1e-7)
    assert m1["optim/grad_norm"] == pytest.approx(m2["optim/grad_norm"], rel=1e-4)


def test_every_parameter_trains_and_sync_copies_exact_weights(model_dir, ctx, samples):
    cfg = make_cfg(model_dir, "trainer.minibatches_per_step=1")
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    engine = HFEngine(model_dir)
    before = full_params(learner)
    batch = fresh(samples)
    learner.recompute_logprobs(batch)
    learner.update(batch)
    after = full_params(learner)
    unchanged = [n for n in after if torch.equal(after[n], before[n])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    stats = sync_weights(learner.module, engine, 1 << 16)
    assert stats["sync/buckets"] > 1  # several buckets at a 64 KiB budget
    engine_params = dict(engine.model.named_parameters(remove_duplicate=False))
    for name, value in after.items():
        assert torch.equal(engine_params[name], value), name


def test_parity_check_passes_after_sync_and_catches_stale_engine_weights(model_dir, ctx, samples):
    from types import SimpleNamespace

    from drpo_trainer.runtime.rollouts import check_engine_parity

    cfg = make_cfg(model_dir, "trainer.minibatches_per_step=1")  # the default fp32 threshold, 1e-4
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    engine = HFEngine(model_dir)
    probe = [SimpleNamespace(prompt_ids=s.input_ids) for s in samples[:4]]
    run = SimpleNamespace(cfg=cfg, engine=engine, learner=learner, train_set=probe)
    fresh_metrics = check_engine_parity(run)  # same weights: only float round-off between the two paths
    assert fresh_metrics["parity/mean_abs_logprob_diff"] < 1e-5
    batch = fresh(samples)
    learner.recompute_logprobs(batch)
    learner.update(batch)  # the learner moves, the engine does not
    with pytest.raises(RuntimeError, match="parity") as stale:
        check_engine_parity(run)
    assert "threshold rollout.parity_max_abs_logprob_diff=0.0001" in str(stale.value)
    sync_weights(learner.module, engine, 1 << 20)
    assert check_engine_parity(run)["parity/mean_abs_logprob_diff"] < 1e-5


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (0.7, 20, 0.9)])
def test_learner_mu_is_the_engines_sampling_logprob(model_dir, ctx, temperature, top_k, top_p):
    """log mu (learner, recompute) and the engine's rollout log-probs share one definition: the
    sampling distribution at temperature T, truncated by top-k / top-p and renormalised."""
    from drpo_trainer.learner.logprobs import OUT_OF_SUPPORT_LOGPROB

    cfg = make_cfg(model_dir, f"rollout.temperature={temperature}", f"rollout.top_k={top_k}", f"rollout.top_p={top_p}")
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    engine = HFEngine(model_dir)
    prompts = [engine.tokenizer(f"Compute {a} + {a}.")["input_ids"] for a in (3, 14)]
    spec = SamplingSpec(n=G, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, seed=2)
    comps = engine.generate(prompts, spec)
    batch = [
        TrainSample(
            input_ids=c.prompt_ids + c.completion_ids,
            prompt_len=len(c.prompt_ids),
            advantage=1.0,  # a sample with advantage 0 is not trained, so not scored
            rollout_logprobs=torch.tensor(c.rollout_logprobs),
        )
        for c in comps
    ]
    learner.recompute_logprobs(batch)
    rollout = torch.cat([s.rollout_logprobs for s in batch])
    mu = torch.cat([s.old_logprobs for s in batch])
    assert (rollout > OUT_OF_SUPPORT_LOGPROB).all()  # sampled tokens are always in the kept set
    assert (mu - rollout).abs().max() < 1e-5
    full = HFEngine(model_dir)  # the untruncated T-tempered log-probs of the same tokens
    untruncated = []
    for c in comps:
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        with torch.no_grad():
            logits = full.model(input_ids=ids).logits[0, len(c.prompt_ids) - 1 : -1]
        untruncated.append(
            torch.log_softmax(logits / temperature, -1).gather(-1, ids[0, len(c.prompt_ids) :, None])[:, 0]
        )
    gap = (rollout - torch.cat(untruncated)).min()
    if top_k or top_p < 1:
        assert gap > 1e-3  # renormalisation over the kept set raises every sampled token's log-prob
    else:
        assert gap.abs() < 1e-5


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("overrides", [["model.dtype=bfloat16"], ["optim.grad_clip=0"]], ids=["bf16", "clip0"])
def test_grad_norm_is_the_norm_of_the_gradients_at_every_stage_and_dtype(model_dir, ctx, samples, stage, overrides):
    """optim/grad_norm is the L2 norm of the step's full gradient, computed here from the gradients
    the engine holds right before its optimizer step (gathered from the ZeRO-3 partitions)."""
    from deepspeed.utils import safe_get_full_grad

    cfg = make_cfg(
        model_dir, "trainer.minibatches_per_step=1", f"distributed.single_process_zero_stage={stage}", *overrides
    )
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    assert learner.zero_stage == stage
    real_step, norms = learner.engine.step, []

    def step(*args, **kwargs):
        grads = [safe_get_full_grad(p) for p in learner.module.parameters()]
        assert all(g is not None for g in grads)
        norms.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
        return real_step(*args, **kwargs)

    learner.engine.step = step
    batch = fresh(samples)
    learner.recompute_logprobs(batch)
    norm = learner.update(batch)["optim/grad_norm"]
    assert len(norms) == 1 and norms[0] > 0
    assert norm == pytest.approx(norms[0], rel=1e-3 if "model.dtype=bfloat16" in overrides else 1e-5)
