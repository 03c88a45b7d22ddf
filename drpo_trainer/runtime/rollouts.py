"""Where the loop's batches come from: the `Rollouts` interface, and its synchronous implementation.

The loop asks a `Rollouts` for the batch of each step and hands it the new weights afterwards. Two
implementations: `LocalRollouts` (here: this rank's own engine samples its share with the newest
weights) and `RemoteRollouts` (drpo_trainer/runtime/async_rollouts.py: rollout processes sample
ahead of the learner, docs/async.md). Both make their batches with drpo_trainer.rollout.producer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import torch

from drpo_trainer.metrics import all_reduce_max, all_reduce_sum
from drpo_trainer.rollout.evaluation import eval_counts, eval_metrics, flat_counts
from drpo_trainer.rollout.producer import RolloutBatch, parity_probe, parity_threshold, sample_step

if TYPE_CHECKING:
    from drpo_trainer.runtime.run import Run


class Rollouts(Protocol):
    """What the training loop needs from the side that samples."""

    def start(self) -> dict[str, float]:
        """Before the first step: the engines take the learner's weights (also after a resume)."""
        ...

    def batch(self, step: int) -> RolloutBatch:
        """This learner rank's batch of `step`, sampled by a policy version within the staleness bound."""
        ...

    def publish(self, step: int, *, evaluate: bool, last: bool) -> dict[str, float]:
        """The weights after `step` go to the engines that sample later steps (or evaluate)."""
        ...

    def evaluate(self, step: int) -> dict[str, float]:
        """avg@n, pass@j, maj@n on every eval set with the weights after `step` (metrics on learner rank 0 at
        least)."""
        ...

    def step_metrics(self, batch: RolloutBatch, step_seconds: float) -> dict[str, float]:
        """Metrics of the sampling side for the step just trained."""
        ...

    def hold_inflight(self, step: int) -> None:
        """Before a checkpoint of `step`: take every batch already sampled for later steps."""
        ...

    def checkpoint_state(self) -> Optional[dict]:
        """This rank's state for the checkpoint (batches sampled ahead), or None."""
        ...

    def unused_batches_reason(self) -> Optional[str]:
        """Why the batches a resumed checkpoint kept are not used by this run, or None if they are."""
        ...

    def close(self) -> None: ...


class LocalRollouts:
    """The synchronous loop's rollouts: this rank's own engine samples its share of every step with
    the newest weights, and sleeps while the learner updates."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def start(self) -> dict[str, float]:
        run = self.run
        metrics = sync_engine(run)  # the engine starts from the learner's weights (also after a resume)
        if run.cfg.rollout.parity_check_at_start and not run.cfg.rollout.parity_check:
            metrics.update(check_engine_parity(run))  # a broken sync stops the run before any step
        return metrics

    def batch(self, step: int) -> RolloutBatch:
        run, ctx = self.run, self.run.ctx
        # every rank draws the same prompts and the same number of sampling rounds (an all-reduce decides)
        (batch,) = sample_step(
            run.cfg,
            run.engine,
            run.scorer,
            run.train_set,
            step,
            run.sampler,
            [ctx.rank],
            ctx.world_size,
            step - 1,
            any_missing=lambda missing: all_reduce_max([missing], ctx)[0] > 0,
        )
        run.engine.sleep()  # the learner has the accelerator until `publish`
        return batch

    def publish(self, step: int, *, evaluate: bool, last: bool) -> dict[str, float]:
        metrics = sync_engine(self.run)  # the engine samples the next step with the new weights
        self.run.engine.wake_up()
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        return evaluate(self.run, step)

    def step_metrics(self, batch: RolloutBatch, step_seconds: float) -> dict[str, float]:
        return {}

    def hold_inflight(self, step: int) -> None:
        """Nothing is generated ahead of the learner."""

    def checkpoint_state(self) -> Optional[dict]:
        return None

    def unused_batches_reason(self) -> Optional[str]:
        return "this run has no rollout processes"

    def close(self) -> None:
        self.run.scorer.close()


def sync_engine(run: Run) -> dict[str, float]:
    """Push the learner's weights into the engine; with rollout.parity_check, prove it worked."""
    from drpo_trainer.rollout.weight_sync import sync_weights

    metrics = sync_weights(run.learner.module, run.engine, run.cfg.rollout.sync_bucket_mb * 2**20)
    if run.cfg.rollout.parity_check:
        metrics.update(check_engine_parity(run))
    return metrics


def check_engine_parity(run: Run) -> dict[str, float]:
    """Score the probe with engine and learner; abort on a gap above the run's threshold."""
    from drpo_trainer.rollout.parity import check_parity, parity_metrics

    probe = parity_probe(run.train_set)
    routes = None
    if run.learner.routing is not None:  # MoE: the engine's experts too
        engine_lps, routes = run.engine.score_routed(probe)
    else:
        engine_lps = run.engine.score(probe)
    metrics = parity_metrics(engine_lps, run.learner.score(probe, routes))
    if routes is not None:  # replayed or not, how often the learner's own routers agreed with the engine's
        agree, total = run.learner.routing.last_agreement()
        metrics["parity/route_agreement"] = agree / max(total, 1)
    check_parity(metrics, parity_threshold(run.cfg))
    return metrics


@torch.no_grad()
def evaluate(run: Run, step: int) -> dict[str, float]:
    """Every eval set's metrics (drpo_trainer/rollout/evaluation.py): problems sharded over ranks, whose
    sums are added up over the ranks before anything is divided."""
    cfg, ctx = run.cfg, run.ctx
    counts = eval_counts(cfg, run.engine, run.scorer, run.eval_sets, step, ctx.rank, ctx.world_size, run.samples)
    keys, values = flat_counts(counts)
    totals: dict[str, dict[str, float]] = {}
    for (name, key), total in zip(keys, all_reduce_sum(values, ctx)):
        totals.setdefault(name, {})[key] = total
    return eval_metrics(cfg, totals)
