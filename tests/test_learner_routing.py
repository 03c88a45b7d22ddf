"""Routes travel with the samples through the learner (DeepSpeed ZeRO-3, one process) on a tiny random
Qwen3-MoE: packing into bounded rows, micro-batching, zero-advantage skipping, the recompute of mu,
mini-batch-1 reuse and the parity probe all send each token through ITS sample's replayed experts.

The reference is a forward of each sample alone through its routes (packing and micro-batches change
the reduction order only: fp32 reassociation)."""

from __future__ import annotations

import copy

import pytest
import torch

from drpo_trainer.config import load_config
from drpo_trainer.learner.learner import Learner, TrainSample
from drpo_trainer.learner.routing import RouterTap, own_routes
from drpo_trainer.rollout import SamplingSpec
from drpo_trainer.rollout.hf_engine import HFEngine

G = 4


@pytest.fixture(scope="module")
def moe_dir(moe_model_dir):
    return moe_model_dir


@pytest.fixture(scope="module")
def ctx(one_process_ctx):
    return one_process_ctx


def make_cfg(moe_dir, *overrides):
    return load_config(
        None,
        [
            f"model.path={moe_dir}",
            "optim.lr=1e-3",
            "trainer.prompts_per_step=4",
            "trainer.minibatches_per_step=2",
            f"rollout.samples_per_prompt={G}",
            "rollout.max_new_tokens=10",
            "data.max_prompt_tokens=8",
            "rollout.routing_replay=true",
            "trainer.micro_batch_tokens_per_gpu=48",  # several micro-batches per mini-batch
            "trainer.packed_row_tokens=24",  # and several rows per micro-batch
            "distributed.single_process_zero_stage=null",  # really shard: ZeRO-3 hooks in one process
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def samples(moe_dir):
    """16 completions; odd ones carry FORCED routes (the engine's experts shifted by 3), so replay matters;
    every third has advantage 0 (skipped)."""
    engine = HFEngine(moe_dir)
    prompts = [[1, 40 + a, 41, 42 + a] for a in range(4)]
    comps = engine.generate(prompts, SamplingSpec(n=G, max_new_tokens=10, seed=5))
    out = []
    for i, c in enumerate(comps):
        routes = c.routes if i % 2 == 0 else ((c.routes.long() + 3) % 8).byte()
        out.append(
            TrainSample(
                input_ids=c.prompt_ids + c.completion_ids,
                prompt_len=len(c.prompt_ids),
                advantage=0.0 if i % 3 == 0 else (-1.0) ** i * (1 + i / 10),
                rollout_logprobs=torch.tensor(c.rollout_logprobs),
                routes=routes,
            )
        )
    return out


def alone_through_routes(moe_dir, samples) -> list[torch.Tensor]:
    """Each sample's completion log-probs from a forward of that sample alone through its routes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    tap = RouterTap(model)
    out = []
    with torch.no_grad():
        for s in samples:
            n = s.routes.shape[0]
            mask = torch.arange(len(s.input_ids)) < n
            routes = torch.zeros(len(s.input_ids), *s.routes.shape[1:], dtype=torch.long)
            routes[:n] = s.routes.long()
            tap.set_replay(routes, mask)
            logp = torch.log_softmax(model(input_ids=torch.tensor([s.input_ids])).logits[0].float(), -1)
            out.append(logp[s.prompt_len - 1 : -1].gather(-1, torch.tensor(s.input_ids[s.prompt_len :])[:, None])[:, 0])
    return out


def test_recompute_reuse_skip_and_probe_replay_each_samples_routes(moe_dir, ctx, samples):
    expected = alone_through_routes(moe_dir, samples)
    learner = Learner(make_cfg(moe_dir), moe_dir, total_optimizer_steps=2)
    batch = copy.deepcopy(samples[:8])  # mini-batch 1 of the step
    learner.recompute_logprobs(batch)
    for i, s in enumerate(batch):
        if s.advantage == 0.0:  # skipped: no forward at all
            assert s.old_logprobs is None
        else:
            torch.testing.assert_close(s.old_logprobs, expected[i], rtol=0, atol=1e-5)
    reused = copy.deepcopy(samples[:8])
    learner.update(reused, behaviour_from_forward=True)  # mu from the update forward, before the step
    for a, b in zip(batch, reused):
        assert (a.old_logprobs is None) == (b.old_logprobs is None)
        if a.old_logprobs is not None:
            assert torch.equal(a.old_logprobs, b.old_logprobs)  # same routes, same packing: bitwise


def test_routes_matter_and_the_probe_replays_them(moe_dir, ctx, samples):
    learner = Learner(make_cfg(moe_dir), moe_dir, total_optimizer_steps=2)
    seqs = [s.input_ids for s in samples[:4]]
    routes = [s.routes for s in samples[:4]]
    replayed = learner.score(seqs, routes)
    plain = learner.score(seqs)  # no routes: the learner's own routing
    agree, total = learner.routing.last_agreement()
    assert total == 0  # nothing to compare against without engine routes
    expected = alone_through_routes(
        moe_dir, [TrainSample(s, 1, 0.0, torch.zeros(0), routes=r) for s, r in zip(seqs, routes)]
    )
    for i in range(4):
        torch.testing.assert_close(torch.tensor(replayed[i]), expected[i], rtol=0, atol=1e-5)
    diff = [max(abs(a - b) for a, b in zip(r, p)) for r, p in zip(replayed, plain)]
    assert max(diff[0], diff[2]) < 1e-5 and min(diff[1], diff[3]) > 1e-3  # engine routes agree; forced ones do not
    learner.score(seqs, routes)
    agree, total = learner.routing.last_agreement()
    own = own_routes(learner.routing)
    assert total == sum(r.shape[0] for r in routes) * 2 and agree < total and own.shape[1:] == (2, 2)
