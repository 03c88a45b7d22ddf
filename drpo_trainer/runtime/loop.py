"""The DRPO training loop. Read `run_step` top to bottom: it is the algorithm.

    1-3. prompts -> G rollouts each (engine, behaviour policy mu) -> rewards (math verifier)
         -> group-relative advantages: the step's batch, from the run's `Rollouts`
    4.   log mu recomputed by the learner with the pre-update weights (frozen for the step)
    5.   minibatches_per_step optimizer steps; mini-batch i sees a policy that has already
         moved i-1 times (stale), against the same mu
    6.   updated weights pushed to the engine(s)
    then metrics, eval, checkpoint (`train`).

Set-up is drpo_trainer/runtime/run.py (`build_run`); where batches come from is
drpo_trainer/runtime/rollouts.py; which process trains and which samples is
drpo_trainer/runtime/process.py.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from drpo_trainer.algorithms.advantages import ADVANTAGE_METRIC_REDUCTIONS
from drpo_trainer.algorithms.losses import MISMATCH_METRIC_REDUCTIONS, metric_reductions, mismatch_metrics
from drpo_trainer.config import Config
from drpo_trainer.io.checkpoint import resolve_resume
from drpo_trainer.io.run_dir import check_output_dir
from drpo_trainer.io.samples import open_sample_log
from drpo_trainer.io.tracking import Tracker, write_resolved_config
from drpo_trainer.learner.learner import NonFiniteUpdate, TrainSample
from drpo_trainer.learner.moe_metrics import MoePass, has_routes
from drpo_trainer.learner.packing import pad_rows
from drpo_trainer.metrics import MetricAccumulator, all_reduce_sum
from drpo_trainer.rollout.producer import SAMPLING_COUNTS, RolloutBatch
from drpo_trainer.runtime.distributed import DistContext, setup_distributed
from drpo_trainer.runtime.run import Run, build_run, kept_batches, save_run
from drpo_trainer.runtime.stop import EXIT_PREEMPTED, PREEMPTED_MARKER, StopFlag

if TYPE_CHECKING:
    from drpo_trainer.runtime.rollouts import Rollouts


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def split_minibatches(samples: list[TrainSample], n_minibatches: int, group_size: int) -> list[list[TrainSample]]:
    """`n_minibatches` disjoint mini-batches of whole prompt groups, in rollout order."""
    groups = [samples[i : i + group_size] for i in range(0, len(samples), group_size)]
    per = len(groups) // n_minibatches
    return [[s for g in groups[j * per : (j + 1) * per] for s in g] for j in range(n_minibatches)]


def eval_due(cfg: Config, step: int) -> bool:
    every = cfg.eval.every_steps
    return bool(cfg.eval.files) and (step == cfg.trainer.max_steps or bool(every and step % every == 0))


# ------------------------------------------------------------------------------------------------
def run_step(run: Run, step: int, stop: Optional[StopFlag] = None) -> dict[str, float]:
    """One step of the algorithm on this rank; returns the step's metrics (reduced over ranks)."""
    cfg, ctx, timer = run.cfg, run.ctx, Timer()
    G = cfg.rollout.samples_per_prompt
    with timer("step"):
        # 1-3. this rank's prompts -> G rollouts each from the behaviour policy -> rewards -> group-relative
        #      advantages: sampled here (synchronous) or ahead of time by a rollout process (asynchronous)
        batch = run.rollouts.batch(step)
        prompts = [run.train_set[i] for i in batch.indices]
        completions, rewards, advantages = batch.completions, batch.rewards, batch.advantages
        samples = [
            TrainSample(
                input_ids=c.prompt_ids + c.completion_ids,
                prompt_len=len(c.prompt_ids),
                advantage=a,
                rollout_logprobs=torch.tensor(c.rollout_logprobs, dtype=torch.float32),
                truncated=c.finish_reason == "length",
                routes=c.routes,  # MoE: the engine's experts, replayed under rollout.routing_replay
            )
            for c, a in zip(completions, advantages)
        ]

        # 4. behaviour log-probs mu: the learner's pre-update weights, frozen for the step
        #    (computed per mini-batch, so the packing matches the update's: r = 1 exactly in mini-batch 1).
        #    Mini-batch 1 can take mu from its own update forward, before the weights move.
        minibatches = split_minibatches(samples, cfg.trainer.minibatches_per_step, G)
        mu_from_update = cfg.trainer.reuse_first_minibatch_logprobs and run.learner.can_reuse_logprobs
        entropy = MetricAccumulator(means=["policy/entropy"])  # over the trained tokens, pre-update weights
        with timer("recompute"):
            for minibatch in minibatches[1:] if mu_from_update else minibatches:
                run.learner.recompute_logprobs(minibatch, entropy)
        moe = None  # MoE: the other routing mode's mu and the learner's routes, for the moe/* metrics
        if has_routes(run.learner, samples):
            with timer("moe_metrics"):
                moe = MoePass(run.learner, samples)

        # 5. minibatches_per_step optimizer steps; mini-batches after the first are stale
        updates = MetricAccumulator()
        with timer("update"):
            for i, minibatch in enumerate(minibatches):
                first = i == 0 and mu_from_update
                update = run.learner.update(minibatch, behaviour_from_forward=first, entropy=entropy)
                updates.add(update, reduce=metric_reductions(cfg.algorithm.loss))  # extrema over mini-batches

        # 6. the new weights go to the engine(s) that sample the next steps
        run.stopping = stop is not None and stop.any_rank(ctx)
        last = run.stopping or step == cfg.trainer.max_steps
        with timer("sync"):
            sync_metrics = run.rollouts.publish(step, evaluate=eval_due(cfg, step), last=last)

    metrics = {**updates.result(), **entropy.result(), **sync_metrics}
    if moe is not None:
        metrics.update(moe.metrics(ctx))
    metrics.update(_rollout_metrics(batch, samples, cfg, ctx))
    if batch.sampling:  # algorithm.dynamic_sampling (on every rank alike)
        metrics.update(_sampling_metrics(batch, ctx))
    times = MetricAccumulator()
    # generate and score where the batch was made (and the wait for it, asynchronous)
    timer.seconds.update({k: v for k, v in batch.seconds.items() if not k.startswith("rollout_")})
    times.add(timer.metrics(), reduce="max")  # the slowest rank's
    metrics.update(times.result(all_reduce=True, ctx=ctx))
    (total_tokens,) = all_reduce_sum([sum(len(s.input_ids) for s in samples)], ctx)
    metrics["perf/tokens_per_s"] = total_tokens / max(metrics["time/step"], 1e-9)
    metrics.update(run.rollouts.step_metrics(batch, timer.seconds["step"]))  # asynchronous: lag, idle, queue
    if run.samples is not None:  # a few completions with the rewards and advantages this step used
        run.samples.train(step, prompts, completions, rewards, advantages, batch.indices)
    return metrics


def _rollout_metrics(batch: RolloutBatch, samples, cfg, ctx) -> dict[str, float]:
    acc = MetricAccumulator()
    completions, reward_metrics, adv_metrics = batch.completions, batch.reward_metrics, batch.adv_metrics
    n = len(completions)
    counts = {k: v for k, v in reward_metrics.items() if k in ("reward/timeouts", "reward/errors")}
    acc.add({k: v for k, v in reward_metrics.items() if k not in counts}, weight=n)
    acc.add(adv_metrics, weight=n, reduce=ADVANTAGE_METRIC_REDUCTIONS)
    lengths = [len(c.completion_ids) for c in completions]
    acc.add(
        {
            "response/length_mean": sum(lengths) / n,
            "response/length_max": max(lengths),
            "response/truncated_fraction": sum(c.finish_reason == "length" for c in completions) / n,
        },
        weight=n,
        reduce={"response/length_max": "max"},
    )
    # the trained samples (skipped ones have no learner log-probs); an empty rank reports weight 0
    scored = [s for s in samples if s.old_logprobs is not None]
    width = max(1, max(lengths))
    o, m = pad_rows([s.old_logprobs for s in scored], width=width)
    r, _ = pad_rows([s.rollout_logprobs for s in scored], width=width)
    acc.add(mismatch_metrics(o, r, m), weight=float(m.sum()), reduce=MISMATCH_METRIC_REDUCTIONS)
    out = acc.result(all_reduce=True, ctx=ctx)
    out.update(dict(zip(counts, all_reduce_sum(list(counts.values()), ctx))))
    return out


def _sampling_metrics(batch: RolloutBatch, ctx) -> dict[str, float]:
    """Dynamic sampling's counts over every learner's share; the rounds and the data position after the step
    (epoch, index into its prompt order) are the same on every rank."""
    out = dict(zip(SAMPLING_COUNTS, all_reduce_sum([batch.sampling[k] for k in SAMPLING_COUNTS], ctx)))
    acc = MetricAccumulator()
    epoch, index = batch.sampler_after
    acc.add(
        {
            "sampling/rounds": batch.sampling["sampling/rounds"],
            "sampling/data_epoch": epoch,
            "sampling/data_index": index,
        },
        reduce="max",
    )
    out.update(acc.result(all_reduce=True, ctx=ctx))
    return out


# ------------------------------------------------------------------------------------------------
def train(
    cfg: Config,
    *,
    resume: Optional[str] = None,
    stop: Optional[StopFlag] = None,
    ctx: Optional[DistContext] = None,
    rollouts: Optional[Callable[[Run], Rollouts]] = None,
) -> dict[str, float]:
    """Run (or continue) training in this learner process; returns the last step's metrics on learner rank 0.
    `ctx` and `rollouts` come from drpo_trainer.runtime.process in the asynchronous layout; by default every
    process of the launch trains and samples its own share (`LocalRollouts`)."""
    stop = stop or StopFlag()
    check_output_dir(cfg.output_dir, resume)  # nothing is written in output_dir before every check passed
    ctx = ctx or setup_distributed(cfg.distributed.backend)
    run, tracker = open_run(cfg, resume, ctx, rollouts)
    try:
        return _train_steps(run, tracker, stop)
    finally:
        run.rollouts.close()
        if run.samples is not None:
            run.samples.close()
        tracker.close()


def open_run(
    cfg: Config, resume: Optional[str], ctx: DistContext, rollouts: Optional[Callable[[Run], Rollouts]]
) -> tuple[Run, Tracker]:
    """Build (or resume) the run and open its metrics, W&B and samples logs."""
    torch.manual_seed(cfg.trainer.seed + ctx.rank)
    resumed = resolve_resume(resume, cfg.output_dir, shared=True, ctx=ctx)  # every rank verifies a share
    run = build_run(cfg, ctx, resumed=resumed, rollouts=rollouts)
    if ctx.is_main:  # written once the run has loaded and resumed: a failed start leaves the old run as it was
        write_resolved_config(cfg)
        (Path(cfg.output_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
    tracker = Tracker(cfg, enabled=ctx.is_main, run_id=run.extra.get("wandb_run_id"), start_step=run.step)
    run.extra["wandb_run_id"] = tracker.run_id
    run.samples = open_sample_log(cfg, is_main=ctx.is_main, start_step=run.step, tracker=tracker)
    if resumed is not None:
        tracker.message(f"resumed from {resumed} at step {run.step}")
        why = run.rollouts.unused_batches_reason() if kept_batches(resumed) else None
        if why:  # docs/async.md
            tracker.message(
                f"the checkpoint's batches sampled ahead of step {run.step} are not used ({why}): those steps are "
                "sampled again from the saved data position, with the newest weights (same prompts, other samples)"
            )
    if run.extra.get("data/prompts_dropped_too_long"):
        tracker.message(f"dropped {run.extra['data/prompts_dropped_too_long']} prompts over data.max_prompt_tokens")
    return run, tracker


def _train_steps(run: Run, tracker: Tracker, stop: StopFlag) -> dict[str, float]:
    """From the run's step to trainer.max_steps: step, evaluate, log, checkpoint; then export."""
    cfg, ck = run.cfg, run.cfg.checkpoint
    last: dict[str, float] = {}
    _stop_if_requested(run, tracker, stop, "while loading")
    start = run.rollouts.start()  # the engines start from the learner's weights (also after a resume)
    if "parity/mean_abs_logprob_diff" in start:
        tracker.message(
            "engine/learner parity before the first step: mean |log-prob diff| "
            f"{start['parity/mean_abs_logprob_diff']:.2e}, max {start['parity/max_abs_logprob_diff']:.2e}"
        )
    if cfg.eval.at_start and run.step == 0 and cfg.eval.files:
        tracker.log(0, run.rollouts.evaluate(0))
        _stop_if_requested(run, tracker, stop, "during the step-0 evaluation")
    started = time.perf_counter()  # time/elapsed counts from here: start-up and the step-0 eval are left out
    for step in range(run.step + 1, cfg.trainer.max_steps + 1):
        try:
            last = run_step(run, step, stop)
        except NonFiniteUpdate as err:
            raise TrainingDiverged(_diverged_message(run, step, err)) from None
        run.step = step
        if last.get("sampling/groups_missing"):
            tracker.message(
                f"step {step}: dynamic sampling stopped at algorithm.max_sampling_rounds="
                f"{cfg.algorithm.max_sampling_rounds} with {last['sampling/groups_missing']:.0f} of "
                f"{cfg.trainer.prompts_per_step} groups without reward variance; trained on what there is "
                "(those groups carry zero advantage)"
            )
        if eval_due(cfg, step):
            last.update(run.rollouts.evaluate(step))
        last["time/elapsed"] = time.perf_counter() - started  # this process's steps, evals and checkpoints so far
        tracker.log(step, last)
        if step == cfg.trainer.max_steps or run.stopping or (ck.every_steps and step % ck.every_steps == 0):
            run.rollouts.hold_inflight(step)  # batches sampled ahead go into the checkpoint
            save_run(run)
        if run.stopping:
            _exit_preempted(run, tracker, f"stop requested: checkpoint of step {step} written")
    _stop_if_requested(run, tracker, stop, "before the final export")  # a resumed run at the last step exports again
    if ck.export_final:
        from drpo_trainer.io.export import export_live

        out = Path(cfg.output_dir)
        hf_dir = out / "checkpoints" / f"step_{run.step:06d}" / "hf"
        export_live(run.learner.module, hf_dir, out / "final", dtype=cfg.model.dtype, ctx=run.ctx)
    return last


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was not finite; the message names the step and the last good checkpoint."""


def _diverged_message(run: Run, step: int, err: NonFiniteUpdate) -> str:
    saved = sorted((Path(run.cfg.output_dir) / "checkpoints").glob("step_*"))
    good = str(saved[-1]) if saved else "none (no checkpoint was written)"
    return (
        f"step {step}: {err}. Last good checkpoint: {good}. Fix: resume it with --resume auto and a lower optim.lr "
        "or a tighter optim.grad_clip, or check the reward and the data of this step (samples.jsonl)"
    )


def _stop_if_requested(run: Run, tracker: Tracker, stop: StopFlag, phase: str) -> None:
    """Between phases nothing is lost: the newest checkpoint (if any) is the run's state."""
    if stop.any_rank(run.ctx):
        _exit_preempted(run, tracker, f"stop requested {phase}: newest checkpoint is step {run.step}")


def _exit_preempted(run: Run, tracker: Tracker, what: str) -> None:
    tracker.message(f"{what}, exiting with {EXIT_PREEMPTED}")
    if run.ctx.is_main:
        (Path(run.cfg.output_dir) / PREEMPTED_MARKER).write_text(str(run.step))
    raise SystemExit(EXIT_PREEMPTED)
