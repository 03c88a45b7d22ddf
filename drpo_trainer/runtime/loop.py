"""The DRPO training loop. Read `run_step` top to bottom: it is the algorithm.

    prompts -> G rollouts each (engine, behaviour policy mu)
            -> rewards (math verifier) -> group-relative advantages
            -> log mu recomputed by the learner with the pre-update weights (frozen)
            -> minibatches_per_step optimizer steps; mini-batch k sees a policy that has
               already moved k-1 times (stale), against the same mu
            -> updated weights pushed into the engine
            -> metrics, checkpoint, eval

Everything else here is set-up (`build_run`), evaluation and bookkeeping.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from drpo_trainer.algorithms.advantages import ADVANTAGE_METRIC_REDUCTIONS, group_advantages
from drpo_trainer.algorithms.losses import MISMATCH_METRIC_REDUCTIONS, metric_reductions, mismatch_metrics
from drpo_trainer.config import Config
from drpo_trainer.io.checkpoint import resolve_resume
from drpo_trainer.io.data import PromptSampler, load_problems
from drpo_trainer.io.run_dir import check_output_dir
from drpo_trainer.io.samples import open_sample_log
from drpo_trainer.io.tracking import Tracker, write_resolved_config
from drpo_trainer.learner.learner import Learner, TrainSample
from drpo_trainer.metrics import MetricAccumulator, all_reduce_sum
from drpo_trainer.rollout import Completion, SamplingSpec
from drpo_trainer.runtime.distributed import DistContext, setup_distributed
from drpo_trainer.runtime.run import Run, restore_run, save_run
from drpo_trainer.runtime.stop import EXIT_PREEMPTED, PREEMPTED_MARKER, StopFlag


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


def sampling_seed(base: int, step: int, rank: int, salt: int = 0) -> int:
    """Distinct, reproducible per (seed, step, rank): a resume samples exactly as before."""
    return (base * 1_000_003 + step * 10_007 + rank * 101 + salt) % (2**31 - 1)


def split_minibatches(samples: list[TrainSample], k: int, group_size: int) -> list[list[TrainSample]]:
    """k disjoint mini-batches of whole prompt groups, in rollout order."""
    groups = [samples[i : i + group_size] for i in range(0, len(samples), group_size)]
    per = len(groups) // k
    return [[s for g in groups[j * per : (j + 1) * per] for s in g] for j in range(k)]


@dataclass
class RolloutBatch:
    """One learner rank's share of a step's rollouts (steps 1-3 of the algorithm), stamped with the
    policy version that sampled it. Made by this rank's own engine (synchronous loop) or by a
    rollout process (asynchronous, drpo_trainer/runtime/async_rollouts.py)."""

    step: int
    version: int  # sampled by the learner's weights after `version` steps (0 = the initial model)
    share: int  # which learner rank's slice of the step's prompts
    indices: list[int]  # the prompts' positions in the training set
    completions: list[Completion]  # G per prompt, grouped by prompt
    rewards: list[float]
    reward_metrics: dict[str, float]
    advantages: list[float]
    adv_metrics: dict[str, float]
    sampler_after: tuple[int, int]  # (epoch, index) of the prompt sampler once this step was drawn
    seconds: dict[str, float] = field(default_factory=dict)  # generate, score (and rollout idle/busy)


def rollout_share(
    cfg: Config, engine, scorer, train_set, step: int, indices: list[int], share: int, version: int, sampler_after
) -> RolloutBatch:
    """Prompts -> G completions each from the engine's policy -> rewards -> group-relative advantages.
    The sampling seed depends on (seed, step, share) only: whichever process samples a share, it
    draws the same completions from the same weights."""
    G = cfg.rollout.samples_per_prompt
    prompts = [train_set[i] for i in indices]
    start = time.perf_counter()
    spec = _spec(cfg, n=G, seed=sampling_seed(cfg.trainer.seed, step, share))
    completions = engine.generate([p.prompt_ids for p in prompts], spec)
    generated = time.perf_counter()
    rewards, reward_metrics = scorer.score(
        [c.text for c in completions], [prompts[c.prompt_index].answer for c in completions]
    )
    scored = time.perf_counter()
    advantages, adv_metrics = group_advantages(
        torch.tensor(rewards, dtype=torch.float32), G, normalize_by_std=cfg.algorithm.normalize_by_std
    )
    return RolloutBatch(
        step=step,
        version=version,
        share=share,
        indices=list(indices),
        completions=completions,
        rewards=list(rewards),
        reward_metrics=reward_metrics,
        advantages=advantages.tolist(),
        adv_metrics=adv_metrics,
        sampler_after=(sampler_after.epoch, sampler_after.index),
        seconds={"generate": generated - start, "score": scored - generated},
    )


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
        indices = PromptSampler.rank_slice(run.sampler.next_indices(), ctx.rank, ctx.world_size)
        batch = rollout_share(
            run.cfg, run.engine, run.scorer, run.train_set, step, indices, ctx.rank, step - 1, run.sampler.state
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

    def close(self) -> None:
        self.run.scorer.close()


def eval_due(cfg: Config, step: int) -> bool:
    every = cfg.eval.every_steps
    return bool(cfg.eval.files) and (step == cfg.trainer.max_steps or bool(every and step % every == 0))


# ------------------------------------------------------------------------------------------------
def run_step(run: Run, step: int, stop: Optional[StopFlag] = None) -> dict[str, float]:
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

        # 5. minibatches_per_step optimizer steps; mini-batch k > 1 is stale
        updates = MetricAccumulator()
        with timer("update"):
            for k, minibatch in enumerate(minibatches):
                first = k == 0 and mu_from_update
                update = run.learner.update(minibatch, behaviour_from_forward=first, entropy=entropy)
                updates.add(update, reduce=metric_reductions(cfg.algorithm.loss))  # extrema over mini-batches

        # 6. the new weights go to the engine(s) that sample the next steps
        run.stopping = stop is not None and stop.any_rank(ctx)
        last = run.stopping or step == cfg.trainer.max_steps
        with timer("sync"):
            sync_metrics = run.rollouts.publish(step, evaluate=eval_due(cfg, step), last=last)

    metrics = {**updates.result(), **entropy.result(), **sync_metrics}
    metrics.update(_rollout_metrics(batch, samples, cfg, ctx))
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


def _spec(cfg: Config, *, n: int, seed: int, temperature: Optional[float] = None) -> SamplingSpec:
    r = cfg.rollout
    return SamplingSpec(
        n=n,
        temperature=temperature or r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        seed=seed,
    )


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
    old = [s.old_logprobs for s in scored]
    roll = [s.rollout_logprobs for s in scored]
    width = max(1, max(lengths))
    o = torch.zeros(max(1, len(scored)), width)
    r = torch.zeros_like(o)
    m = torch.zeros_like(o)
    for i, (a, b) in enumerate(zip(old, roll)):
        o[i, : a.numel()], r[i, : b.numel()], m[i, : a.numel()] = a, b, 1.0
    acc.add(mismatch_metrics(o, r, m), weight=float(m.sum()), reduce=MISMATCH_METRIC_REDUCTIONS)
    out = acc.result(all_reduce=True, ctx=ctx)
    out.update(dict(zip(counts, all_reduce_sum(list(counts.values()), ctx))))
    return out


def sync_engine(run: Run) -> dict[str, float]:
    """Push the learner's weights into the engine; with rollout.parity_check, prove it worked."""
    from drpo_trainer.rollout.weight_sync import sync_weights

    metrics = sync_weights(run.learner.module, run.engine, run.cfg.rollout.sync_bucket_mb * 2**20)
    if run.cfg.rollout.parity_check:
        metrics.update(check_engine_parity(run))
    return metrics


PARITY_PROBE_PROMPTS = 8


def check_engine_parity(run: Run) -> dict[str, float]:
    """Score a fixed probe (the first training prompts) with engine and learner; abort on a gap."""
    from drpo_trainer.rollout.parity import check_parity, default_threshold, parity_metrics

    r = run.cfg.rollout
    threshold = r.parity_max_abs_logprob_diff or default_threshold(
        run.cfg.model.dtype, r.dtype or run.cfg.model.dtype, r.quantization
    )
    probe = [p.prompt_ids for p in run.train_set[:PARITY_PROBE_PROMPTS]]
    metrics = parity_metrics(run.engine.score(probe), run.learner.score(probe))
    check_parity(metrics, threshold)
    return metrics


# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(run: Run, step: int) -> dict[str, float]:
    """avg@k accuracy on every eval set: k samples per problem, problems sharded over ranks."""
    cfg, ctx = run.cfg, run.ctx
    counts = eval_counts(cfg, run.engine, run.scorer, run.eval_sets, step, ctx.rank, ctx.world_size, run.samples)
    names = sorted(counts)
    totals = all_reduce_sum([v for name in names for v in counts[name]], ctx)
    return eval_metrics(cfg, {name: (totals[2 * i], totals[2 * i + 1]) for i, name in enumerate(names)})


def eval_counts(
    cfg: Config, engine, scorer, eval_sets, step: int, shard: int, shards: int, samples=None
) -> dict[str, tuple[float, float]]:
    """(correct, attempts) per eval set on problems shard::shards; `samples` logs a few of them."""
    out = {}
    for name, problems in eval_sets.items():
        problems = problems[: cfg.eval.max_problems] if cfg.eval.max_problems else problems
        mine = problems[shard::shards]
        correct = 0.0
        if mine:
            spec = _spec(
                cfg,
                n=cfg.eval.k,
                seed=sampling_seed(cfg.trainer.seed, step, shard, salt=7),
                temperature=cfg.eval.temperature,
            )
            comps = engine.generate([p.prompt_ids for p in mine], spec)
            scores, _ = scorer.score([c.text for c in comps], [mine[c.prompt_index].answer for c in comps])
            correct = float(sum(scores))
            if samples is not None:
                samples.eval(step, name, mine, comps, scores)
        out[name] = (correct, float(len(mine) * cfg.eval.k))
    return out


def eval_metrics(cfg: Config, counts: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {f"eval/{name}/avg@{cfg.eval.k}": correct / max(total, 1) for name, (correct, total) in counts.items()}


def _checkpoint_layout(ckpt: Optional[Path], ctx: DistContext) -> tuple[Optional[Path], bool]:
    """(universal dir to load or None, whether the learner must run ZeRO-3) for resuming `ckpt`.
    A ZeRO-3 checkpoint loads only into ZeRO-3 (also with one process); one of another world size
    loads through DeepSpeed's universal conversion."""
    from drpo_trainer.io import reshard as universal

    if ckpt is None:
        return None, False
    zero3 = universal.saved_at_zero3(ckpt)
    if universal.saved_world_size(ckpt) == ctx.world_size:
        return None, zero3
    universal.check_convertible(ckpt, ctx.world_size)
    if ctx.is_main:
        print(
            f"drpo-train: {ckpt} was written by {universal.saved_world_size(ckpt)} process(es); resuming with "
            f"{ctx.world_size} through DeepSpeed's universal checkpoint (ZeRO-3)",
            file=sys.stderr,
            flush=True,
        )
    return universal.prepare(ckpt, ctx), True


@dataclass
class RunData:
    """What every process of a run reads: the model's path, its tokenizer and the prompts."""

    model_path: str
    tokenizer: object
    train_set: list
    eval_sets: dict
    dropped_too_long: int


def load_run_data(cfg: Config) -> RunData:
    from transformers import AutoTokenizer

    model_path = cfg.model.path
    if model_path.startswith("builtin:"):  # the embedded tiny model, built and cached on first use
        from drpo_trainer.builtin.tiny_model import resolve_model_path

        model_path = resolve_model_path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    d = cfg.data
    load = dict(
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        system_prompt=d.system_prompt,
        apply_chat_template=d.apply_chat_template,
        max_prompt_tokens=d.max_prompt_tokens,
    )
    train_set, stats = load_problems(d.train_files, tokenizer, **load)
    eval_sets = {name: load_problems([path], tokenizer, **load)[0] for name, path in cfg.eval.files.items()}
    return RunData(model_path, tokenizer, train_set, eval_sets, stats.dropped_too_long)


def build_run(
    cfg: Config, ctx: DistContext, *, load_universal: bool = False, zero3: bool = False, with_engine: bool = True
) -> Run:
    """The learner's Run; `with_engine=False` when rollout processes sample (asynchronous layout)."""
    from drpo_trainer.rewards import make_reward_scorer
    from drpo_trainer.rollout import make_engine
    from drpo_trainer.runtime.run_identity import data_fingerprint

    cfg.check_world(ctx.world_size)
    data = load_run_data(cfg)
    d = cfg.data
    sampler = PromptSampler(len(data.train_set), cfg.trainer.prompts_per_step, seed=d.seed, shuffle=d.shuffle)
    learner = Learner(
        cfg,
        data.model_path,
        ctx=ctx,
        total_optimizer_steps=cfg.trainer.max_steps * cfg.trainer.minibatches_per_step,
        load_universal=load_universal,
        zero3=zero3,
    )
    engine = scorer = None
    if with_engine:  # the engines derive their per-rank seeds from the run's seed
        engine = make_engine(cfg, data.model_path, tokenizer=data.tokenizer, device=ctx.device, seed=cfg.trainer.seed)
        scorer = make_reward_scorer(cfg.reward)
    run = Run(cfg, ctx, data.tokenizer, data.train_set, data.eval_sets, sampler, learner, engine, scorer)
    run.rollouts = LocalRollouts(run) if with_engine else None  # train() connects the rollout processes' side
    run.extra["data/prompts_dropped_too_long"] = data.dropped_too_long
    run.extra["data_fingerprint"] = data_fingerprint(d.train_files)  # a resume checks it (run_identity)
    return run


def _say_dropped_batches(resumed: Path, run: Run, tracker: Tracker) -> None:
    """Batches the checkpoint kept from rollout processes and this run does not train (docs/async.md)."""
    if not any((Path(resumed) / "ranks").glob("state_*.pt")):  # written only when batches were kept
        return
    if isinstance(run.rollouts, LocalRollouts):
        why = "this run has no rollout processes"
    elif run.rollouts.dropped is None:
        why = "this run has another number of learners"
    elif run.rollouts.dropped:
        why = "this run has a smaller trainer.max_off_policy_steps"
    else:
        return
    tracker.message(
        f"the checkpoint's batches sampled ahead of step {run.step} are not used ({why}): those steps are sampled "
        "again from the saved data position, with the newest weights (same prompts, other samples)"
    )


def train(cfg: Config, *, resume: Optional[str] = None, stop: Optional[StopFlag] = None) -> dict[str, float]:
    """Run (or continue) training; returns the last step's metrics on rank 0 (of the learners)."""
    stop = stop or StopFlag()
    check_output_dir(cfg.output_dir, resume)  # nothing is written in output_dir before every check passed
    bridge = None
    if cfg.distributed.rollout_processes:  # asynchronous layout: learners and rollout processes
        from drpo_trainer.runtime.bridge import connect

        ctx, bridge = connect(cfg.distributed.backend, cfg.distributed.rollout_processes)
        if bridge.is_rollout:
            from drpo_trainer.runtime.async_rollouts import serve_rollouts

            serve_rollouts(cfg, ctx, bridge)
            return {}
    else:
        ctx = setup_distributed(cfg.distributed.backend)
    torch.manual_seed(cfg.trainer.seed + ctx.rank)
    resumed = resolve_resume(resume, cfg.output_dir, shared=True, ctx=ctx)  # every rank verifies a share
    universal_dir, zero3 = _checkpoint_layout(resumed, ctx)
    run = build_run(cfg, ctx, load_universal=universal_dir is not None, zero3=zero3, with_engine=bridge is None)
    restore_run(run, resumed, universal_dir=universal_dir)
    if ctx.is_main:
        write_resolved_config(cfg)
        (Path(cfg.output_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
    if bridge is not None:
        from drpo_trainer.runtime.async_rollouts import RemoteRollouts

        run.rollouts = RemoteRollouts(run, bridge)
    tracker = Tracker(cfg, enabled=ctx.is_main, run_id=run.extra.get("wandb_run_id"), start_step=run.step)
    run.extra["wandb_run_id"] = tracker.run_id
    run.samples = open_sample_log(cfg, is_main=ctx.is_main, start_step=run.step, tracker=tracker)
    if resumed is not None:
        tracker.message(f"resumed from {resumed} at step {run.step}")
        _say_dropped_batches(resumed, run, tracker)
    if run.extra.get("data/prompts_dropped_too_long"):
        tracker.message(f"dropped {run.extra['data/prompts_dropped_too_long']} prompts over data.max_prompt_tokens")
    last: dict[str, float] = {}
    ck = cfg.checkpoint

    def stop_if_requested(phase: str) -> None:
        """Between phases nothing is lost: the newest checkpoint (if any) is the run's state."""
        if stop.any_rank(ctx):
            tracker.message(
                f"stop requested {phase}: newest checkpoint is step {run.step}, exiting with {EXIT_PREEMPTED}"
            )
            if ctx.is_main:
                (Path(cfg.output_dir) / PREEMPTED_MARKER).write_text(str(run.step))
            raise SystemExit(EXIT_PREEMPTED)

    try:
        stop_if_requested("while loading")
        start = run.rollouts.start()  # the engines start from the learner's weights (also after a resume)
        if "parity/mean_abs_logprob_diff" in start:
            tracker.message(
                "engine/learner parity before the first step: mean |log-prob diff| "
                f"{start['parity/mean_abs_logprob_diff']:.2e}, max {start['parity/max_abs_logprob_diff']:.2e}"
            )
        if cfg.eval.at_start and run.step == 0 and cfg.eval.files:
            tracker.log(0, run.rollouts.evaluate(0))
            stop_if_requested("during the step-0 evaluation")
        for step in range(run.step + 1, cfg.trainer.max_steps + 1):
            last = run_step(run, step, stop)
            run.step = step
            final = step == cfg.trainer.max_steps
            if eval_due(cfg, step):
                last.update(run.rollouts.evaluate(step))
            tracker.log(step, last)
            if final or run.stopping or (ck.every_steps and step % ck.every_steps == 0):
                run.rollouts.hold_inflight(step)  # batches sampled ahead go into the checkpoint
                save_run(run)
            if run.stopping:
                tracker.message(f"stop requested: checkpoint of step {step} written, exiting with {EXIT_PREEMPTED}")
                if ctx.is_main:
                    (Path(cfg.output_dir) / PREEMPTED_MARKER).write_text(str(step))
                raise SystemExit(EXIT_PREEMPTED)
        stop_if_requested("before the final export")  # a resumed run at the last step exports again
        if ck.export_final:
            from drpo_trainer.io.export import export_live

            export_live(
                run.learner.module,
                Path(cfg.output_dir) / "checkpoints" / f"step_{run.step:06d}" / "hf",
                Path(cfg.output_dir) / "final",
                dtype=cfg.model.dtype,
                ctx=ctx,
            )
    finally:
        run.rollouts.close()
        if run.samples is not None:
            run.samples.close()
        tracker.close()
    return last
