"""Combining metrics over micro-batches, mini-batches and ranks.

Each metric is combined the way its producer says when it is added: a weighted mean (the
default; weights = the token or sample counts it was measured over), or a max or a min
(``add(..., reduce="max")``, or a mapping key -> reduction for a dict that mixes them, such as
``losses.metric_reductions(loss)``). A mean or an extremum over nothing is NaN (logged as null).
Reductions across ranks are one all-reduce per kind, not one per key.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Literal, Mapping, Optional, Union

import torch

from drpo_trainer.runtime.distributed import DistContext

Reduction = Literal["mean", "max", "min"]
REDUCTIONS: tuple[Reduction, ...] = ("mean", "max", "min")


class MetricAccumulator:
    def __init__(self, means: Iterable[str] = ()) -> None:
        """`means`: mean keys reported even if nothing is added (NaN then), so that a rank that
        measured nothing still reduces the same keys as its peers."""
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.extrema: dict[str, float] = {}
        self.reductions: dict[str, Reduction] = {}
        for key in means:
            self.add({key: 0.0}, weight=0.0)

    def add(
        self,
        metrics: Mapping[str, float | torch.Tensor],
        weight: float = 1.0,
        *,
        reduce: Union[Reduction, Mapping[str, Reduction]] = "mean",
    ) -> None:
        """Add one measurement of each metric. `reduce`: how every key combines (over calls and
        ranks), or a mapping key -> reduction (keys it does not name are means). `weight` weighs
        the means; a key keeps the reduction it was first added with."""
        for key, value in metrics.items():
            kind = reduce if isinstance(reduce, str) else reduce.get(key, "mean")
            if kind not in REDUCTIONS:
                raise ValueError(f"metric {key!r}: reduce={kind!r} is not one of {', '.join(REDUCTIONS)}")
            known = self.reductions.setdefault(key, kind)
            if known != kind:
                raise ValueError(f"metric {key!r} was added with reduce={known!r}, now with reduce={kind!r}")
            v = float(value)
            if kind == "mean":  # weight 0 still registers the key: every rank reduces the same keys
                self.sums[key] += v * weight if weight > 0 else 0.0
                self.weights[key] += max(weight, 0.0)
            elif key not in self.extrema:
                self.extrema[key] = v
            else:
                self.extrema[key] = max(self.extrema[key], v) if kind == "max" else min(self.extrema[key], v)

    def result(self, all_reduce: bool = False, *, ctx: Optional[DistContext] = None) -> dict[str, float]:
        """Means and extrema; with all_reduce=True, over every rank of `ctx` (default: the
        initialised process group, `DistContext.current()`).

        Every rank must hold the same keys (the trainer guarantees this: same code path)."""
        mean_keys = sorted(self.sums)
        max_keys = sorted(k for k in self.extrema if self.reductions[k] == "max")
        min_keys = sorted(k for k in self.extrema if self.reductions[k] == "min")
        sums = torch.tensor(
            [self.sums[k] for k in mean_keys] + [self.weights[k] for k in mean_keys], dtype=torch.float64
        )
        maxs = torch.tensor(
            [self.extrema[k] for k in max_keys] + [-self.extrema[k] for k in min_keys], dtype=torch.float64
        )
        if all_reduce:
            sums = _all_reduce(sums, "sum", ctx)
            maxs = _all_reduce(maxs, "max", ctx) if maxs.numel() else maxs
        n = len(mean_keys)
        # a mean over nothing (e.g. mismatch when every sample was skipped) is not a number, not 0
        out = {k: (sums[i] / sums[n + i]).item() if sums[n + i] > 0 else float("nan") for i, k in enumerate(mean_keys)}
        out.update({k: _measured(maxs[i].item()) for i, k in enumerate(max_keys)})
        out.update({k: _measured(-maxs[len(max_keys) + i].item()) for i, k in enumerate(min_keys)})
        return out


def _measured(extremum: float) -> float:
    """An extremum over nothing (masked_max of an empty mask is -inf) is not a number."""
    return extremum if math.isfinite(extremum) else float("nan")


def _all_reduce(t: torch.Tensor, op: str, ctx: Optional[DistContext]) -> torch.Tensor:
    ctx = ctx or DistContext.current()
    if ctx.world_size == 1:
        return t
    t = t.to(ctx.comm_device)
    torch.distributed.all_reduce(
        t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    )
    return t.cpu()


def all_reduce_sum(values: list[float], ctx: Optional[DistContext] = None) -> list[float]:
    """Sum a few numbers over the ranks of `ctx` (default: the initialised process group, if any)."""
    return _all_reduce(torch.tensor(values, dtype=torch.float64), "sum", ctx).tolist()


def all_reduce_max(values: list[float], ctx: Optional[DistContext] = None) -> list[float]:
    """Max of a few numbers over the ranks of `ctx` (default: the initialised process group, if any)."""
    return _all_reduce(torch.tensor(values, dtype=torch.float64), "max", ctx).tolist()
