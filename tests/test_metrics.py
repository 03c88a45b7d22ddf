"""MetricAccumulator: each metric combines as its producer declares (mean, max, min), never by its name."""

import math
import os

import pytest
import torch

from drpo_trainer.algorithms.losses import compute_policy_loss, metric_reductions, policy_loss_names
from drpo_trainer.metrics import MetricAccumulator, all_reduce_max, all_reduce_sum
from drpo_trainer.runtime.distributed import DistContext


def test_means_are_weighted_and_extrema_ignore_weights():
    acc = MetricAccumulator()
    acc.add({"a": 1.0, "hi": 5.0, "lo": 5.0}, weight=1.0, reduce={"hi": "max", "lo": "min"})
    acc.add({"a": 3.0, "hi": 7.0, "lo": 2.0}, weight=3.0, reduce={"hi": "max", "lo": "min"})
    acc.add({"t": 4.0}, reduce="max")
    acc.add({"t": 9.0}, reduce="max")
    # a: (1 * 1 + 3 * 3) / (1 + 3) = 2.5
    assert acc.result() == {"a": 2.5, "hi": 7.0, "lo": 2.0, "t": 9.0}


def test_the_name_does_not_choose_the_reduction():
    acc = MetricAccumulator()
    acc.add({"response/length_max": 10.0, "x_min": 2.0}, weight=1.0)
    acc.add({"response/length_max": 30.0, "x_min": 4.0}, weight=1.0)
    assert acc.result() == {"response/length_max": 20.0, "x_min": 3.0}  # means, as added


def test_weight_zero_registers_a_mean_and_an_empty_mean_or_extremum_is_nan():
    acc = MetricAccumulator()
    acc.add({"policy/entropy": 0.0}, weight=0.0)
    acc.add({"policy/ratio_max": float("-inf"), "policy/ratio_min": float("inf")}, reduce=metric_reductions("drpo"))
    out = acc.result()
    assert math.isnan(out["policy/entropy"])  # a mean over nothing
    assert math.isnan(out["policy/ratio_max"]) and math.isnan(out["policy/ratio_min"])


def test_a_key_keeps_its_reduction_and_unknown_reductions_fail():
    acc = MetricAccumulator()
    acc.add({"k": 1.0}, reduce="max")
    with pytest.raises(ValueError, match="'k' was added with reduce='max', now with reduce='mean'"):
        acc.add({"k": 1.0})
    with pytest.raises(ValueError, match="reduce='median' is not one of mean, max, min"):
        acc.add({"m": 1.0}, reduce="median")


@pytest.mark.parametrize("loss", policy_loss_names())
def test_every_extremum_a_loss_reports_is_declared(loss):
    """Two micro-batches: the loss's declared extrema combine to the extremum over both, the rest
    to the token-weighted mean; an undeclared extremum would be averaged (and caught here)."""
    g = torch.Generator().manual_seed(0)
    lp, old = -torch.rand(2, 5, generator=g), -torch.rand(2, 5, generator=g)
    adv, mask = torch.tensor([1.0, -0.5]), torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0]])
    whole = compute_policy_loss(loss, lp, old, adv, mask)[1]
    acc = MetricAccumulator()
    for rows in ([0], [1]):
        part = compute_policy_loss(loss, lp[rows], old[rows], adv[rows], mask[rows])[1]
        acc.add(part, weight=float(mask[rows].sum()), reduce=metric_reductions(loss))
    assert acc.result() == pytest.approx({k: float(v) for k, v in whole.items()}, rel=1e-6)


def _two_rank_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ctx = DistContext.current()
        assert (ctx.rank, ctx.world_size, ctx.backend, str(ctx.comm_device)) == (rank, 2, "gloo", "cpu")
        acc = MetricAccumulator()
        # rank 0: mean 1 over 1 token, max 2; rank 1: mean 4 over 3 tokens, max 8, and nothing for "e"
        acc.add({"m": [1.0, 4.0][rank], "x": [2.0, 8.0][rank], "n": [5.0, 3.0][rank]}, [1.0, 3.0][rank],
                reduce={"x": "max", "n": "min"})  # fmt: skip
        acc.add({"e": 7.0}, weight=[0.0, 0.0][rank])
        out[rank] = {
            **acc.result(all_reduce=True, ctx=ctx),
            "sum": all_reduce_sum([rank + 1.0], ctx)[0],
            "max": all_reduce_max([10.0 - rank], ctx)[0],
            "alone": acc.result()["m"],  # without all_reduce: this rank's own mean
        }
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_reductions_over_two_ranks():
    import torch.multiprocessing as mp

    from drpo_trainer.runtime.distributed import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_rank_worker, args=(free_port(), out), nprocs=2)
        results = dict(out)
    # m: (1 * 1 + 4 * 3) / (1 + 3) = 3.25; x: max(2, 8); n: min(5, 3); e: weight 0 on both ranks
    shared = {"m": 3.25, "x": 8.0, "n": 3.0, "sum": 3.0, "max": 10.0}
    for r in (0, 1):
        assert math.isnan(results[r].pop("e"))
    assert results[0] == {**shared, "alone": 1.0} and results[1] == {**shared, "alone": 4.0}
    # outside any process group a context is one lone process, and reductions are the identity
    alone = DistContext.current()
    assert (alone.rank, alone.world_size, alone.is_main) == (0, 1, True) and all_reduce_sum([2.5], alone) == [2.5]


def test_declared_means_are_reported_when_nothing_was_added():
    acc = MetricAccumulator(means=["policy/entropy"])
    assert math.isnan(acc.result()["policy/entropy"])
    acc.add({"policy/entropy": 0.5}, weight=4.0)
    assert acc.result() == {"policy/entropy": 0.5}
