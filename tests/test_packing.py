"""Packing layout, attention isolation of packed sequences, and micro-batch planning."""

from __future__ import annotations

import random

import pytest
import torch

from drpo_trainer.learner.logprobs import IGNORE_INDEX, naive_token_logprobs, token_logprobs
from drpo_trainer.learner.packing import pack_sequences, plan_micro_batches


# -- layout --------------------------------------------------------------------------------------
def test_pack_layout_by_hand():
    batch = pack_sequences([[11, 12, 13], [21], [31, 32]], prompt_lengths=[2, 1, 1])
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 31, 32]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    # seq 0, prompt 2: position 0 ignored (predicts prompt token 12), 1 -> 13, 2 is its last token;
    # seq 1 has no next token; seq 2, prompt 1: position 0 -> 32, 1 is last
    assert batch.targets.tolist() == [[IGNORE_INDEX, 13, IGNORE_INDEX, IGNORE_INDEX, 32, IGNORE_INDEX]]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 6] and batch.cu_seqlens.dtype == torch.int32
    assert batch.seq_slices == [slice(0, 3), slice(3, 4), slice(4, 6)]
    assert batch.target_slices == [slice(1, 2), slice(3, 3), slice(4, 5)]
    values = torch.arange(6.0).unsqueeze(0)
    assert [v.tolist() for v in batch.split(values)] == [[0.0, 1.0, 2.0], [3.0], [4.0, 5.0]]
    assert [v.tolist() for v in batch.split_targets(values)] == [[1.0], [], [4.0]]


def test_rows_as_wide_as_the_longest_sequence_by_hand():
    # row_tokens=0: capacity = longest (4): [a a] + [b b] fill row 0, [c c c c] row 1, [d] + [e e] row 2
    p = pack_sequences([[1, 2], [3, 4], [5, 6, 7, 8], [9], [10, 11]], row_tokens=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]]
    assert p.position_ids.tolist() == [[0, 1, 0, 1], [0, 1, 2, 3], [0, 0, 1, 0]]


def test_pack_into_bounded_rows_by_hand():
    # capacity max(5, longest 4) = 5: [a a a] + [b b] fills row 0 (5), [c c c c] row 1 (4, +1 pad)
    p = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], prompt_lengths=[1, 1, 2], row_tokens=5)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert p.targets.tolist() == [[2, 3, -100, 5, -100], [-100, 8, 9, -100, -100]]
    assert p.seq_slices == [slice(0, 3), slice(3, 5), slice(5, 9)]
    assert p.target_slices == [slice(0, 2), slice(3, 4), slice(6, 8)]
    assert p.cu_seqlens.tolist() == [0, 3, 5, 9, 10]  # the pad is a segment of its own
    assert [t.tolist() for t in p.split_targets(p.targets)] == [[2, 3], [5], [8, 9]]


def test_pack_without_prompt_lengths_targets_every_next_token():
    batch = pack_sequences([[1, 2, 3], [4, 5]])
    assert batch.targets.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch.target_slices == [slice(0, 2), slice(3, 4)]


def test_pack_rejects_empty_input():
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack_sequences([[1], []])
    with pytest.raises(ValueError, match="at least one sequence"):
        pack_sequences([])
    with pytest.raises(ValueError, match="prompt_lengths has 1 entries for 2"):
        pack_sequences([[1], [2]], prompt_lengths=[1])


# -- attention isolation: packed log-probs == each sequence alone -------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("row_tokens", [None, 12])
def test_packed_logprobs_equal_unpacked(attn, row_tokens):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    config._attn_implementation = attn
    model = transformers.Qwen3ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 1, 17, 4)]
    packed = pack_sequences(seqs, prompt_lengths=[3, 1, 5, 1], row_tokens=row_tokens)
    # rows of 12 (17 is the longest, so capacity 17): [9, 1] [17] [4] padded to 17 -> (3, 17)
    assert packed.input_ids.shape == ((1, 31) if row_tokens is None else (3, 17))
    with torch.no_grad():
        lp_packed, ent_packed = token_logprobs(
            model, packed.input_ids, packed.position_ids, packed.targets, chunk_tokens=8, with_entropy=True
        )
        for i, seq in enumerate(seqs):
            alone = pack_sequences([seq], prompt_lengths=[[3, 1, 5, 1][i]])
            lp_alone, ent_alone = naive_token_logprobs(
                model, alone.input_ids, alone.position_ids, alone.targets, with_entropy=True
            )
            torch.testing.assert_close(packed.split(lp_packed)[i], lp_alone[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(packed.split(ent_packed)[i], ent_alone[0], rtol=0, atol=1e-5)

        # Control: the same row with positions 0..N-1 lets later sequences attend to earlier ones,
        # so the isolation above is really due to the restarting position ids.
        if row_tokens is not None:
            return
        leaky_positions = torch.arange(packed.num_tokens).unsqueeze(0)
        lp_leaky, _ = token_logprobs(model, packed.input_ids, leaky_positions, packed.targets)
    third = packed.target_slices[2]
    assert (lp_leaky[0, third] - lp_packed[0, third]).abs().max() > 1e-3


# -- micro-batch planning ------------------------------------------------------------------------
def check_plan(plan, lengths, budget):
    flat = [i for mb in plan for i in mb]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(mb and sum(lengths[i] for i in mb) <= budget for mb in plan)  # no empty, none over budget


def test_plan_by_hand():
    # lengths 5,4,3,3,1, budget 6, longest first into the first micro-batch with room:
    # 5 -> A (room 1); 4 -> B (room 2); 3 -> C (3); 3 -> C (0); 1 -> A (0)
    assert plan_micro_batches([5, 4, 3, 3, 1], token_budget=6) == [[0, 4], [1], [2, 3]]
    # a sample at the budget fills a micro-batch: [6], then [5, 1]
    assert plan_micro_batches([6, 5, 1], token_budget=6) == [[0], [1, 2]]
    assert plan_micro_batches([2, 2, 2], token_budget=100) == [[0, 1, 2]]  # one forward when it all fits


@pytest.mark.parametrize("seed", range(20))
def test_plan_properties_on_random_lengths(seed):
    rng = random.Random(seed)
    budget = rng.choice([64, 256, 1000])
    lengths = [min(budget, max(1, int(rng.lognormvariate(3.5, 1.0)))) for _ in range(rng.randint(1, 120))]
    plan = plan_micro_batches(lengths, budget)
    check_plan(plan, lengths, budget)
    # first-fit: any two micro-batches hold > budget tokens together, so the count is at most
    # 2 * total / budget + 1; it can never beat ceil(total / budget)
    lower_bound = -(-sum(lengths) // budget)
    assert lower_bound <= len(plan) <= 2 * lower_bound + 1


def test_plan_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"sample 1 has 9 tokens.*micro_batch_tokens_per_gpu=8.*at least 9"):
        plan_micro_batches([3, 9], token_budget=8)
    with pytest.raises(ValueError, match="token_budget"):
        plan_micro_batches([3], token_budget=0)
    with pytest.raises(ValueError, match="no samples"):
        plan_micro_batches([], token_budget=8)
    with pytest.raises(ValueError, match="sample 0 has length 0"):
        plan_micro_batches([0], token_budget=8)
