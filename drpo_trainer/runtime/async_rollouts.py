"""Asynchronous off-policy training: rollout processes sample ahead of the learner (docs/async.md).

With `distributed.rollout_processes: R` and `trainer.max_off_policy_steps: k`, the rollout
processes (drpo_trainer/runtime/bridge.py) host the engine and the reward verifier; the learners train.

    policy version v   the learner's weights after v steps (0 = the initial model)
    batch of step t    sampled with version max(start, t - 1 - k): a rollout process takes the
                       versions the learner publishes in order and takes the next one only when
                       the batch it is about to sample needs it. The version is therefore a
                       function of t and k alone, which makes an asynchronous run reproducible
                       and its checkpoints exact; it is stamped on the batch and checked.
    k = 0              every batch is sampled by the previous step's weights: the synchronous
                       loop's batches, in other processes.

Rollout process j samples the steps t with (t - first) % R == j, every learner rank's share
with that rank's seed (drpo_trainer.rollout.producer.sample_step), and sends each learner its share. After every
step learner 0 publishes a header (version, evaluate?, parity?, stop?) and, when a rollout
will still sample with that version, the weights. An evaluation runs on the rollout processes
with the version it names; its counts come back to learner 0.

A checkpoint at step s holds the batches already sampled for steps s+1 .. s+k (each learner
its shares): resuming takes them first and the rollout processes continue at s+k+1 with
version s, exactly as without the interruption.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Optional

from drpo_trainer.config import Config
from drpo_trainer.io.data import SamplerState
from drpo_trainer.metrics import MetricAccumulator
from drpo_trainer.rollout.evaluation import combine_counts, eval_counts, eval_metrics, eval_problems
from drpo_trainer.rollout.producer import (
    RolloutBatch,
    make_engine_and_scorer,
    make_prompt_sampler,
    parity_probe,
    parity_threshold,
    sample_step,
)
from drpo_trainer.runtime.bridge import Bridge, PeerLost
from drpo_trainer.runtime.distributed import DistContext, broadcast_plain
from drpo_trainer.runtime.run import Run, load_run_inputs
from drpo_trainer.runtime.wire import batch_from_plain, batch_to_plain, completions_from_plain, completions_to_plain

BATCHES_DONE = "batches_done"  # store counter: steps whose batches the rollout processes have sent


# -- versions and staleness: the only places that do this arithmetic --------------------------------
def version_for(step: int, max_lag: int, start: int = 0) -> int:
    """The policy version that samples the batch of `step` (at most max_lag versions behind step - 1)."""
    return max(start, step - 1 - max_lag)


def version_lag(step: int, version: int) -> int:
    """How many versions the weights that sampled a batch trail the weights that train it (0 = on-policy)."""
    return step - 1 - version


def within_bound(step: int, version: int, max_lag: int) -> bool:
    """May the learner train `step` on a batch sampled by `version`? (lag in [0, max_lag])"""
    return 0 <= version_lag(step, version) <= max_lag


def first_step_sampled_by(version: int, max_lag: int) -> int:
    """The step whose batch is the first sampled with `version`, after the start (version_for's inverse)."""
    return version + 1 + max_lag


def steps_sampled_ahead(step: int, max_lag: int, max_steps: int) -> range:
    """The steps whose batches exist once step `step` is trained (sampled by versions <= step - 1)."""
    return range(step + 1, min(step + max_lag, max_steps) + 1)


def source_of(step: int, first_step: int, n_learners: int, n_rollouts: int) -> int:
    """Global rank of the rollout process that samples `step`."""
    return n_learners + (step - first_step) % n_rollouts


def _weights_needed(version: int, cfg: Config) -> bool:
    """Will a rollout process still sample with `version`?"""
    return first_step_sampled_by(version, cfg.trainer.max_off_policy_steps) <= cfg.trainer.max_steps


class RemoteRollouts:
    """The learner's side: batches come from the rollout processes; weights go to them."""

    def __init__(self, run: Run, bridge: Bridge) -> None:
        self.run, self.bridge, self.cfg = run, bridge, run.cfg
        self.max_lag = run.cfg.trainer.max_off_policy_steps
        self.ahead: dict[int, RolloutBatch] = {}
        for b in map(batch_from_plain, (run.rank_state or {}).get("batches_ahead", [])):  # in step order
            if b.step != run.step + 1 + len(self.ahead) or not within_bound(b.step, b.version, self.max_lag):
                break  # a run resumed with a smaller max_off_policy_steps samples these steps again
            self.ahead[b.step] = b
        # how many kept batches are not used; None: the checkpoint's (if any) were not loaded (another world size)
        self.dropped = None if run.rank_state is None else len(run.rank_state["batches_ahead"]) - len(self.ahead)
        self.pending: dict[int, list] = defaultdict(list)  # messages received before they were asked for
        self.first_step = run.step + 1 + len(self.ahead)  # the first step the rollout processes sample
        self.finished = False  # the rollout processes were told to stop
        self.broken = False  # a peer was lost: nothing more goes over the bridge
        self.publish_wait = 0.0  # seconds learner 0 waited for the rollout processes to take the last header
        self._stamp: dict[str, float] = {}  # version lag, queue depth and wait of the batch just taken

    # -- messages ---------------------------------------------------------------------------------
    def _take(self, src: int, kind: str, step: int) -> Any:
        queue = self.pending[src]
        for i, (got_kind, got_step, _) in enumerate(queue):
            if (got_kind, got_step) == (kind, step):
                return queue.pop(i)[2]
        while True:
            try:
                got_kind, got_step, payload = self.bridge.recv(src)
            except PeerLost:
                self.broken = True
                raise
            if (got_kind, got_step) == (kind, step):
                return payload
            if got_kind == "done":
                raise RuntimeError(f"{self.bridge.describe(src)} finished without sending the {kind} of step {step}")
            queue.append((got_kind, got_step, payload))

    def _publish(
        self, version: int, *, weights: bool, evaluate: bool, parity: bool, stop: bool, first: bool = False
    ) -> dict[str, float]:
        """Learner 0 broadcasts the header; every learner takes part in gathering the weights."""
        from drpo_trainer.rollout.weight_sync import iter_gathered_buckets

        b, run = self.bridge, self.run
        header = {"version": version, "weights": weights, "evaluate": evaluate, "parity": parity, "stop": stop}
        if first:  # where the rollout processes start: after the batches the checkpoint kept
            header["next_step"] = self.first_step
            last = self.ahead[max(self.ahead)].sampler_after if self.ahead else None
            header["sampler"] = last or (run.sampler.state.epoch, run.sampler.state.index)
        start = time.perf_counter()
        try:
            if b.rank == 0:
                b.broadcast_object(header)  # returns once every rollout process is listening
            waited = time.perf_counter() - start
            n_buckets = n_bytes = 0
            if weights:
                buckets = iter_gathered_buckets(run.learner.module, self.cfg.rollout.sync_bucket_mb * 2**20)
                n_buckets, n_bytes = b.broadcast_buckets(buckets)
        except PeerLost:
            self.broken = True
            raise
        self.finished = self.finished or stop
        metrics = {
            "sync/seconds": time.perf_counter() - start - waited,
            "sync/bytes": float(n_bytes),
            "sync/buckets": float(n_buckets),
        }
        self.publish_wait = waited
        if parity:
            metrics.update(self._check_parity(version))
        return metrics

    def _check_parity(self, version: int) -> dict[str, float]:
        """Every rollout process scored the probe with the weights just sent; compare with the learner."""
        from drpo_trainer.rollout.parity import check_parity, parity_metrics

        run = self.run
        learner_scores = run.learner.score(parity_probe(run.train_set))  # every learner: a ZeRO-3 collective
        worst: list[Optional[dict]] = [None]
        if self.bridge.rank == 0:
            for src in self.bridge.rollout_ranks:
                m = parity_metrics(self._take(src, "parity", version), learner_scores)
                if worst[0] is None or m["parity/mean_abs_logprob_diff"] > worst[0]["parity/mean_abs_logprob_diff"]:
                    worst[0] = m
        if run.ctx.world_size > 1:
            worst[0] = broadcast_plain(worst[0], run.ctx)
        check_parity(worst[0], parity_threshold(self.cfg))
        return worst[0]

    # -- the Rollouts interface (drpo_trainer/runtime/rollouts.py) -----------------------------------
    def start(self) -> dict[str, float]:
        run = self.run
        r = self.cfg.rollout
        evaluate = self.cfg.eval.at_start and run.step == 0 and bool(self.cfg.eval.files)
        parity = r.parity_check_at_start or r.parity_check
        return self._publish(run.step, weights=True, evaluate=evaluate, parity=parity, stop=False, first=True)

    def batch(self, step: int) -> RolloutBatch:
        b = self.bridge
        (done,) = [float(b.store.add(BATCHES_DONE, 0))]
        depth = max(0.0, self.first_step - 1 + done - (step - 1)) if step >= self.first_step else float(len(self.ahead))
        start = time.perf_counter()
        if step in self.ahead:
            batch = self.ahead.pop(step)
        else:
            src = source_of(step, self.first_step, b.n_learners, b.n_rollouts)
            batch = batch_from_plain(self._take(src, "batch", step))
        waited = time.perf_counter() - start
        if batch.step != step or not within_bound(step, batch.version, self.max_lag):
            raise RuntimeError(
                f"batch of step {batch.step} sampled by policy version {batch.version} arrived for step {step} "
                f"(trainer.max_off_policy_steps={self.max_lag}): the rollout processes broke the staleness bound"
            )
        self.run.sampler.state = SamplerState(*batch.sampler_after)  # the data position a checkpoint saves
        batch.seconds["wait_rollout"] = waited
        self._stamp = {"lag": float(version_lag(step, batch.version)), "depth": depth, "waited": waited}
        return batch

    def step_metrics(self, batch: RolloutBatch, step_seconds: float) -> dict[str, float]:
        """Version lag, idle fractions and queue depth of the step just trained (over learner ranks)."""
        s = self._stamp
        idle = s["waited"] + self.publish_wait
        roll_idle, roll_busy = batch.seconds.get("rollout_idle", 0.0), batch.seconds.get("rollout_busy", 0.0)
        acc = MetricAccumulator()
        acc.add({"async/version_lag_max": s["lag"]}, reduce="max")
        acc.add(
            {
                "async/version_lag_mean": s["lag"],
                "async/queue_depth": s["depth"],
                "async/learner_idle_fraction": min(1.0, idle / max(step_seconds, 1e-9)),
                "async/rollout_idle_fraction": roll_idle / max(roll_idle + roll_busy, 1e-9),
            }
        )
        return acc.result(all_reduce=True, ctx=self.run.ctx)

    def publish(self, step: int, *, evaluate: bool, last: bool) -> dict[str, float]:
        parity = self.cfg.rollout.parity_check
        weights = evaluate or parity or (not last and _weights_needed(step, self.cfg))
        return self._publish(step, weights=weights, evaluate=evaluate, parity=parity, stop=last)

    def evaluate(self, step: int) -> dict[str, float]:
        """Learner 0 adds up the rollout processes' counts (they evaluated version `step`)."""
        run, b = self.run, self.bridge
        if b.rank != 0:
            return {}
        shards = []
        for j, src in enumerate(b.rollout_ranks):
            counts, rows = self._take(src, "eval", step)
            shards.append(counts)
            if j == 0 and run.samples is not None:  # rollout process 0's shard, as rank 0's in the synchronous loop
                for name, (completions, scores) in rows.items():
                    problems = eval_problems(self.cfg, run.eval_sets[name], 0, b.n_rollouts)
                    run.samples.eval(step, name, problems, completions_from_plain(completions), scores)
        return eval_metrics(self.cfg, combine_counts(shards))

    def hold_inflight(self, step: int) -> None:
        """Take the batches already sampled for steps step+1 .. step+k: the checkpoint keeps them."""
        for t in steps_sampled_ahead(step, self.max_lag, self.cfg.trainer.max_steps):
            if t not in self.ahead:
                b = self.bridge
                plain = self._take(source_of(t, self.first_step, b.n_learners, b.n_rollouts), "batch", t)
                self.ahead[t] = batch_from_plain(plain)

    def checkpoint_state(self) -> Optional[dict]:
        return {"batches_ahead": [batch_to_plain(self.ahead[t]) for t in sorted(self.ahead)]} if self.ahead else None

    def unused_batches_reason(self) -> Optional[str]:
        if self.dropped is None:
            return "this run has another number of learners"
        if self.dropped:
            return "this run has a smaller trainer.max_off_policy_steps"
        return None

    def close(self) -> None:
        """Tell the rollout processes to stop (if not yet) and take what they still send."""
        if self.broken:
            return
        if not self.finished:
            self._publish(self.run.step, weights=False, evaluate=False, parity=False, stop=True)
        for src in self.bridge.rollout_ranks:
            while True:
                try:
                    kind, _, _ = self.bridge.recv(src)
                except PeerLost:
                    break  # it stopped already: nothing is left to take
                if kind == "done":
                    break


# ------------------------------------------------------------------------------------------------
class _EvalRows:
    """Keeps the completions an evaluation scored (sent to learner 0 for samples.jsonl)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[list, list]] = {}

    def eval(self, step, name, problems, completions, scores) -> None:
        self.rows[name] = (completions_to_plain(completions), list(scores))


class RolloutWorker:
    """A rollout process: samples, scores and sends batches; loads the versions it needs."""

    def __init__(self, cfg: Config, ctx: DistContext, bridge: Bridge) -> None:
        self.cfg, self.ctx, self.bridge = cfg, ctx, bridge
        self.data = load_run_inputs(cfg)
        self.engine, self.scorer = make_engine_and_scorer(
            cfg, self.data.model_path, tokenizer=self.data.tokenizer, device=ctx.device
        )
        self.index = bridge.rank - bridge.n_learners  # which rollout process
        self.version = -1
        self.idle = 0.0  # waiting for the learner since the last batch
        self.busy = 0.0  # loading weights, evaluating since the last batch

    def receive(self) -> dict:
        """The next header from learner 0 and what it asks for."""
        start = time.perf_counter()
        header = self.bridge.broadcast_object()
        self.idle += time.perf_counter() - start
        start = time.perf_counter()
        if header["weights"]:
            from drpo_trainer.rollout.weight_sync import load_buckets

            load_buckets(self.engine, self.bridge.receive_buckets())
            self.version = header["version"]
        if header["parity"]:
            self.bridge.send(0, ("parity", header["version"], self.engine.score(parity_probe(self.data.train_set))))
        if header["evaluate"]:
            rows = _EvalRows()
            counts = eval_counts(
                self.cfg,
                self.engine,
                self.scorer,
                self.data.eval_sets,
                header["version"],
                self.index,
                self.bridge.n_rollouts,
                rows if self.index == 0 else None,
            )
            self.bridge.send(0, ("eval", header["version"], (counts, rows.rows)))
        self.busy += time.perf_counter() - start
        return header

    def serve(self) -> None:
        cfg, b = self.cfg, self.bridge
        max_lag, max_steps = cfg.trainer.max_off_policy_steps, cfg.trainer.max_steps
        header = self.receive()
        if header["stop"]:
            return self.finish()
        first, start_version = header["next_step"], header["version"]
        sampler = make_prompt_sampler(cfg, len(self.data.train_set))
        sampler.state = SamplerState(*header["sampler"])
        for step in range(first, max_steps + 1):
            if (step - first) % b.n_rollouts != self.index:
                sampler.next_indices()  # every process draws every step: the same data order (one round each:
                continue  # dynamic sampling, which may draw more, runs with one rollout process)
            while self.version < version_for(step, max_lag, start_version):
                if self.receive()["stop"]:
                    return self.finish()
            start = time.perf_counter()
            learners = range(b.n_learners)  # this process samples every share: it sees whether any is missing
            shares = sample_step(
                cfg, self.engine, self.scorer, self.data.train_set, step, sampler, learners, b.n_learners, self.version
            )
            busy = self.busy + time.perf_counter() - start
            spent = {key: sum(s.seconds[key] for s in shares) for key in ("generate", "score")}  # this process's
            for r, share in enumerate(shares):
                share.seconds.update(spent, rollout_idle=self.idle, rollout_busy=busy)
                b.send(r, ("batch", step, batch_to_plain(share)))
            b.store.add(BATCHES_DONE, 1)
            self.idle = self.busy = 0.0
        while not self.receive()["stop"]:  # evaluations and the final header
            pass
        self.finish()

    def finish(self) -> None:
        for r in range(self.bridge.n_learners):
            self.bridge.send(r, ("done", None, None))
        self.bridge.flush(peer=0)

    def close(self) -> None:
        self.scorer.close()


def serve_rollouts(cfg: Config, ctx: DistContext, bridge: Bridge) -> None:
    """The whole life of a rollout process."""
    worker = RolloutWorker(cfg, ctx, bridge)
    try:
        worker.serve()
    finally:
        worker.close()
