"""The transformers rollout engine itself: EOS truncation and finish reasons, grouping and order over
several generation batches, seeding, and rollout log-probs equal to the model's own log-softmax of
each sampled token computed without padding or batching."""

from __future__ import annotations

import pytest
import torch

from drpo_trainer.rollout import SamplingSpec
from drpo_trainer.rollout.hf_engine import HFEngine

N, MAX_NEW = 3, 8


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # a batch of 4 rows: the 3 prompts x 3 samples run as 3 batches, the last one partial
    eng = HFEngine(tiny_model_dir, generation_batch_size=4)
    # a quarter of the vocabulary ends a completion: some stop after a few tokens, some run to the limit
    eng.eos_ids = set(range(0, len(eng.tokenizer), 4))
    yield eng
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(engine):
    texts = ["Compute 3 + 4.", "Compute 12 * 7. Put the final answer in a box.", "Hi"]  # three lengths: left padding
    return [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def completions(engine, prompts):
    return engine.generate(prompts, SamplingSpec(n=N, temperature=0.8, max_new_tokens=MAX_NEW, seed=11))


def test_completions_come_grouped_by_prompt_in_order(completions, prompts):
    assert [c.prompt_index for c in completions] == [i for i in range(len(prompts)) for _ in range(N)]
    assert [c.prompt_ids for c in completions] == [p for p in prompts for _ in range(N)]


def test_eos_ends_a_completion_and_sets_its_finish_reason(engine, completions):
    reasons = [c.finish_reason for c in completions]
    assert "stop" in reasons and "length" in reasons  # both cases below are exercised
    for c in completions:
        ids = c.completion_ids
        assert len(c.rollout_logprobs) == len(ids) >= 1
        if c.finish_reason == "stop":  # cut right after the first EOS, which is kept
            assert ids[-1] in engine.eos_ids and not any(t in engine.eos_ids for t in ids[:-1])
            assert len(ids) <= MAX_NEW
        else:  # ran to the limit without an EOS
            assert len(ids) == MAX_NEW and not any(t in engine.eos_ids for t in ids)
        assert c.text == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_rollout_logprobs_are_the_models_own_without_padding(engine, completions):
    """Each sampled token's log-prob under log_softmax(logits / T), recomputed one sequence at a
    time (no left padding, no batch): the batched, padded generation changes nothing."""
    for c in completions:
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0, len(c.prompt_ids) - 1 : -1].float()
        want = torch.log_softmax(logits / 0.8, dim=-1).gather(-1, ids[0, len(c.prompt_ids) :, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.rollout_logprobs), want, rtol=0, atol=1e-5)


def test_the_seed_fixes_the_samples(engine, prompts, completions):
    spec = SamplingSpec(n=N, temperature=0.8, max_new_tokens=MAX_NEW, seed=11)
    again = engine.generate(prompts, spec)
    assert [c.completion_ids for c in again] == [c.completion_ids for c in completions]
    other = engine.generate(prompts, SamplingSpec(n=N, temperature=0.8, max_new_tokens=MAX_NEW, seed=12))
    assert [c.completion_ids for c in other] != [c.completion_ids for c in completions]
    # the engine's sampling leaves the caller's random stream alone
    torch.manual_seed(0)
    engine.generate(prompts[:1], spec)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))
