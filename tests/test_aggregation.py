"""Aggregation modes: hand-computed values, and invariance to micro-batch and rank splits."""

import pytest
import torch

from drpo_trainer.algorithms.aggregation import (
    AGG_MODES,
    aggregate_loss,
    count_tokens_and_seqs,
    masked_max,
    masked_mean,
)
from drpo_trainer.algorithms.losses import compute_policy_loss, policy_loss_names

# Row 0: three tokens 1, 2, 3. Row 1: one token 4 (then padding holding 7s). Row 2: empty (all padding).
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 2.5),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq-mean-token-sum", 5.0),  # (6 + 4) / 2 non-empty rows
        ("seq-mean-token-sum-norm", 1.25),  # (6 / 4 + 4 / 4) / 2 with horizon 4
        ("seq-mean-token-mean", 3.0),  # (6 / 3 + 4 / 1) / 2
    ],
)
def test_hand_example_local_counts(mode, expected):
    assert aggregate_loss(LOSS, MASK, mode, horizon=4).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 1.25),  # 10 / global 8 tokens
        ("seq-mean-token-sum", 2.5),  # 10 / global 4 sequences
        ("seq-mean-token-sum-norm", 0.625),  # (6 / 4 + 4 / 4) / 4
        ("seq-mean-token-mean", 1.5),  # (2 + 4) / 4
    ],
)
def test_hand_example_global_counts(mode, expected):
    got = aggregate_loss(LOSS, MASK, mode, horizon=4, global_num_tokens=8, global_num_seqs=4)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_nan_in_padding_does_not_leak():
    loss = LOSS.clone()
    loss[2] = float("nan")
    loss[1, 1] = float("inf")
    for mode in AGG_MODES:
        assert torch.isfinite(aggregate_loss(loss, MASK, mode, horizon=4)), mode


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_empty_gives_zero(mode):
    assert aggregate_loss(LOSS, torch.zeros_like(MASK), mode, horizon=4).item() == 0.0


def test_count_tokens_and_seqs():
    assert count_tokens_and_seqs(MASK) == (4, 2)


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="'sum'.*token-mean, seq-mean-token-sum, seq-mean-token-sum-norm"):
        aggregate_loss(LOSS, MASK, "sum")


def test_masked_stats():
    x = torch.tensor([[1.0, 5.0], [3.0, -100.0]])
    m = torch.tensor([[1, 1], [1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(3.0)  # (1 + 5 + 3) / 3
    assert masked_max(x, m).item() == 5.0


# ---------------------------------------------------------------------------------------------
# Split invariance: the sum of micro-batch losses (normalised by the mini-batch's global counts)
# has the same value and gradient as the whole mini-batch with local counts.


def _minibatch(seed=0, B=8, T=10):
    g = torch.Generator().manual_seed(seed)
    old = (torch.rand(B, T, generator=g, dtype=torch.float64) * 0.98 + 0.01).log()
    lp = (old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([10, 3, 0, 7, 1, 10, 5, 2])  # one empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return lp, old, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", policy_loss_names())
def test_micro_batch_and_rank_splits_match_the_whole(name, mode):
    lp, old, adv, mask = _minibatch()
    extra = {"delta": 0.1} if name == "drpo" else {}  # small delta: negative weights exercised too

    whole_lp = lp.clone().requires_grad_(True)
    whole, _ = compute_policy_loss(name, whole_lp, old, adv, mask, loss_agg_mode=mode, horizon=10, **extra)
    whole.backward()

    n_tok, n_seq = count_tokens_and_seqs(mask)
    # (a) one rank, three micro-batches of unequal size
    micro_lp = lp.clone().requires_grad_(True)
    total = 0.0
    for rows in ([0, 1, 2], [3, 4], [5, 6, 7]):
        width = max(int(mask[rows].sum(dim=1).max()), 1)
        loss, _ = compute_policy_loss(
            name,
            micro_lp[rows, :width],
            old[rows, :width],
            adv[rows],
            mask[rows, :width],
            loss_agg_mode=mode,
            horizon=10,
            global_num_tokens=n_tok,
            global_num_seqs=n_seq,
            **extra,
        )
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.detach())
    torch.testing.assert_close(micro_lp.grad, whole_lp.grad)

    # (b) two simulated ranks, two micro-batches each. The learner scales each rank's loss by the world
    # size and DeepSpeed averages the ranks' gradients: mean_k(2 * g_k) = g_0 + g_1.
    world = 2
    rank_grads = []
    for rank_rows in ([[0, 5], [2]], [[1, 3, 4], [6, 7]]):
        rank_lp = lp.clone().requires_grad_(True)
        for rows in rank_rows:
            width = max(int(mask[rows].sum(dim=1).max()), 1)
            loss, _ = compute_policy_loss(
                name,
                rank_lp[rows, :width],
                old[rows, :width],
                adv[rows],
                mask[rows, :width],
                loss_agg_mode=mode,
                horizon=10,
                global_num_tokens=n_tok,
                global_num_seqs=n_seq,
                **extra,
            )
            (loss * world).backward()
        rank_grads.append(rank_lp.grad)
    torch.testing.assert_close(torch.stack(rank_grads).mean(dim=0), whole_lp.grad)


def test_local_counts_would_change_the_gradient():
    """The invariance above is not automatic: per-micro-batch means weight tokens unequally."""
    lp, old, adv, mask = _minibatch()
    whole_lp = lp.clone().requires_grad_(True)
    compute_policy_loss("pg", whole_lp, old, adv, mask)[0].backward()
    micro_lp = lp.clone().requires_grad_(True)
    for rows in ([0, 1, 2], [3, 4], [5, 6, 7]):
        # gradient accumulation that averages local token means: (1/3) sum_k mean_k
        (compute_policy_loss("pg", micro_lp[rows], old[rows], adv[rows], mask[rows])[0] / 3).backward()
    assert not torch.allclose(micro_lp.grad, whole_lp.grad)
