"""The killable verifier pool and the batch scorer the trainer uses (``RewardScorer``).

Design (why): math-verify bounds its own time with ``signal.alarm``, which only works in a main
thread, and a verification stuck inside one C call (a power tower, a huge factorial) ignores
signals altogether. So each sample runs in a worker process (:mod:`drpo_trainer.rewards.worker`),
each worker handed a small chunk of samples at a time and reporting each result as it finishes,
and this parent enforces a wall-clock deadline per sample:
``timeout_s`` inside the worker (a timer that interrupts Python code, leaving the worker alive),
then ``timeout_s + KILL_GRACE_S`` here, after which the worker is killed and replaced. The sample
scores 0 and is counted as a timeout. A worker that dies (killed from outside, segfault, memory)
is replaced and its sample scored again; a sample that takes down a worker twice scores 0 as an
error. The samples of its chunk not yet scored go back to the queue, and the other workers go on
meanwhile, so a hung sample delays the batch by at most its own deadline. Workers run in their
own session and ignore SIGINT/SIGTERM: a signal to the trainer's whole process group (a
scheduler's preemption, Ctrl-C) reaches the trainer, which stops them when it is done.

Workers are fresh interpreters started with ``subprocess`` (the equivalent of a 'spawn' start,
but without re-importing the launching script), so a trainer process holding torch threads and a
torch.distributed process group is never forked. They live as long as the scorer: started when
it is built, reused by every ``score`` call, stopped by ``close()`` (or leaving ``with``); a scorer
still open when the interpreter exits is closed then. There is no other owner: ``score_math`` opens
and closes its own scorer.

The reward's own knobs: ``reward.extraction`` is passed as ``extraction=`` only to a reward that
takes that keyword (by name or through ``**kwargs``), as the math reward does; for the others the
scorer neither passes it nor reports ``reward/no_answer_fraction`` (a final answer is the math
reward's notion, not every reward's).

Memory: a sample stopped by its deadline can leave memory behind in its worker. Before handing an
idle worker its next samples, the parent reads the worker's resident memory (``/proc/<pid>/statm``);
a worker that has grown more than ``memory_growth_mb`` (``reward.worker_memory_growth_mb``) over its
size at start-up is replaced (``recycled`` counts them).
"""

from __future__ import annotations

import atexit
import collections
import inspect
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Optional, Sequence

from drpo_trainer.rewards.extract import EXTRACTION_MODES, extract_final_answer
from drpo_trainer.rewards.registry import get_reward, importable_ref

logger = logging.getLogger(__name__)

KILL_GRACE_S = 0.5  # parent-side margin over timeout_s before a worker is killed
STARTUP_TIMEOUT_S = 120.0  # a worker that has not said 'ready' by then is broken (or the machine is)
_MAX_START_FAILURES = 3
MIN_MEMORY_LIMIT_MB = 256  # a worker's address space for its imports (sympy, math-verify); checked by preflight
MAX_ATTEMPTS = 2  # a sample whose worker dies is scored again once; a second death makes it an error
_MAX_CHUNK = 16  # samples per message to a worker (amortises the pipe round trip)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding drpo_trainer/
_LIVE_SCORERS: "weakref.WeakSet[RewardScorer]" = weakref.WeakSet()  # closed at interpreter exit if still open
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _Worker:
    """One verifier process and its two pipe ends."""

    def __init__(self, init: dict) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "drpo_trainer.rewards.worker", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # a print in a reward must not go anywhere surprising
                env=env,
                start_new_session=True,  # signals to the trainer's process group (SLURM, Ctrl-C) skip us
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.to_worker = Connection(to_child_w, readable=False)
        self.from_worker = Connection(from_child_r, writable=False)
        self.to_worker.send(init)
        self.started_at = time.monotonic()
        self.ready = False
        self.tasks: collections.deque[int] = collections.deque()  # sample indices sent, in order
        self.deadline = float("inf")
        self.ready_rss_mb: Optional[float] = None  # resident memory once started (warm-up included)

    def rss_mb(self) -> Optional[float]:
        """Resident memory of the worker process in MiB, or None where /proc cannot tell (not Linux)."""
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * _PAGE_BYTES / 2**20
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for conn in (self.to_worker, self.from_worker):
            conn.close()

    def stop(self) -> None:
        """Ask the worker to exit; kill() must still follow to reap it."""
        try:
            self.to_worker.send(None)
        except OSError:
            pass


class RewardScorer:
    """Scores batches with a registered reward in killable worker processes.

    ``score(completions, answers)`` returns the per-sample rewards and the batch metrics
    ``reward/mean``, ``reward/accuracy`` (fraction with full credit, reward >= 1),
    ``reward/no_answer_fraction`` (no final answer under ``extraction``; only for a reward that takes
    ``extraction``), ``reward/timeouts`` and ``reward/errors`` (counts). Not re-entrant: one scorer
    per training rank. Close it (``close()`` or ``with``) to stop its workers.
    """

    def __init__(
        self,
        name: str = "math",
        *,
        extraction: str = "boxed",
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_limit_mb: int = 2048,
        import_modules: Sequence[str] = (),
        memory_growth_mb: float = 256.0,
        function: Optional[Any] = None,
    ) -> None:
        if extraction not in EXTRACTION_MODES:
            raise ValueError(f"reward.extraction={extraction!r} is not one of {', '.join(EXTRACTION_MODES)}")
        if num_workers < 1:
            raise ValueError(f"reward.num_workers={num_workers} must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"reward.timeout_s={timeout_s} must be > 0 (seconds per sample)")
        if not memory_growth_mb > 0:
            raise ValueError(f"reward.worker_memory_growth_mb={memory_growth_mb} must be > 0")
        if memory_limit_mb < MIN_MEMORY_LIMIT_MB:
            raise ValueError(
                f"reward.memory_limit_mb={memory_limit_mb} is too small to import sympy; use >= {MIN_MEMORY_LIMIT_MB}"
            )
        # `function`: a top-level function to run instead of a registered reward (the vote's comparisons)
        fn = function if function is not None else get_reward(name, import_modules)
        self.name = name
        # None: the reward does not look for a final answer, so it gets no extraction mode
        self.extraction: Optional[str] = extraction if _takes_keyword(fn, "extraction") else None
        self.num_workers, self.timeout_s, self.memory_limit_mb = num_workers, float(timeout_s), memory_limit_mb
        self.memory_growth_mb = float(memory_growth_mb)
        warm_up = getattr(fn, "warm_up", None)
        self._init = {
            "sys_path": [p for p in sys.path if p],
            "reward": importable_ref(fn),
            "warm_up": importable_ref(warm_up) if callable(warm_up) else None,
            "kwargs": {} if self.extraction is None else {"extraction": self.extraction},
            "timeout_s": self.timeout_s,
            "memory_limit_mb": memory_limit_mb,
            "extraction": self.extraction,
        }
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._closed = False
        self.restarts = 0  # workers killed or lost and replaced, over the scorer's life
        self.recycled = 0  # idle workers replaced because their memory grew past memory_growth_mb
        self._equivalence: Optional[RewardScorer] = None
        self._workers = [_Worker(self._init) for _ in range(num_workers)]
        _LIVE_SCORERS.add(self)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (politely, then by force). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._equivalence is not None:
            self._equivalence.close()
        for w in self._workers:
            w.stop()
        end = time.monotonic() + 1.0
        for w in self._workers:
            try:
                w.proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []

    def equivalence(self) -> "RewardScorer":
        """A scorer of (answer, reference answer) pairs for the maj@k vote (drpo_trainer.rewards.vote), with
        this scorer's worker count and limits: its own workers start on the first call (an evaluation)
        and stop with this scorer."""
        if self._equivalence is None:
            from drpo_trainer.rewards.vote import same_answer

            self._equivalence = RewardScorer(
                "same_answer",
                function=same_answer,
                num_workers=self.num_workers,
                timeout_s=self.timeout_s,
                memory_limit_mb=self.memory_limit_mb,
                memory_growth_mb=self.memory_growth_mb,
            )
        return self._equivalence

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def worker_rss_mb(self) -> list[Optional[float]]:
        """Resident memory of each live worker in MiB (None where it cannot be read)."""
        return [w.rss_mb() for w in self._workers]

    def _grown(self, w: _Worker) -> bool:
        """Whether an idle worker holds `memory_growth_mb` more than when it started. A sample
        interrupted by its deadline can leave memory behind that Python never frees (observed:
        0.7-2 MB per timed-out math-verify call), so a long run's workers would only grow."""
        rss = w.rss_mb()
        return rss is not None and w.ready_rss_mb is not None and rss - w.ready_rss_mb > self.memory_growth_mb

    def _recycle(self, w: _Worker) -> None:
        logger.info(
            "reward worker %d grew past %.0f MiB over its start; replacing it", w.proc.pid, self.memory_growth_mb
        )
        w.stop()
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._init)
        self.recycled += 1

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._init)
        self.restarts += 1

    # -- scoring ---------------------------------------------------------------------------------

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> tuple[list[float], dict[str, float]]:
        """Rewards of `completions` against gold `answers` (same length) and the batch metrics."""
        if len(completions) != len(answers):
            raise ValueError(
                f"{len(completions)} completions but {len(answers)} answers; pass one answer per completion"
            )
        for i, (c, a) in enumerate(zip(completions, answers)):
            if not isinstance(c, str) or not isinstance(a, str):
                raise TypeError(
                    f"sample {i}: completion and answer must be str, got {type(c).__name__}, {type(a).__name__}"
                )
        with self._lock:
            if self._closed:
                raise RuntimeError("this RewardScorer is closed; build a new one with make_reward_scorer(cfg.reward)")
            outcomes = self._run(list(completions), list(answers))
        return [o[0] for o in outcomes], _metrics(outcomes, with_answers=self.extraction is not None)

    def _run(self, completions: list[str], answers: list[str]) -> list[tuple[float, str, bool]]:
        batch = _Batch(completions, answers)
        while batch.queue or any(w.tasks for w in self._workers):
            for w in list(self._workers):
                if w.ready and not w.tasks and batch.queue:
                    if self._grown(w):  # between samples only: nothing of this batch is lost
                        self._recycle(w)
                        continue
                    self._dispatch(w, batch)
            self._wait_and_collect(batch)
        return batch.outcomes  # type: ignore[return-value]

    def _dispatch(self, w: _Worker, batch: "_Batch") -> None:
        """Hand an idle worker a chunk of the queue: fewer round trips, still one deadline per sample.

        Chunks shrink as the queue empties so the workers finish together.
        """
        size = max(1, min(_MAX_CHUNK, len(batch.queue) // (4 * len(self._workers))))
        chunk = [batch.queue.popleft() for _ in range(min(size, len(batch.queue)))]
        try:
            w.to_worker.send([(i, batch.completions[i], batch.answers[i]) for i in chunk])
        except OSError:  # died while idle: not the samples' fault, retry them elsewhere
            batch.queue.extendleft(reversed(chunk))
            self._replace(w)
            return
        w.tasks.extend(chunk)
        w.deadline = time.monotonic() + self.timeout_s + KILL_GRACE_S

    def _settle(self, batch: "_Batch", index: int, status: str, detail: str) -> None:
        """Score a sample 0 without the worker's word (it was killed or died)."""
        answer = extract_final_answer(batch.completions[index], self.extraction) if self.extraction else None
        batch.outcomes[index] = (0.0, status, answer is not None)
        _log_failure(status, index, detail, batch.completions[index])

    def _give_back(self, w: _Worker, batch: "_Batch") -> None:
        """Samples queued behind the failed one in the worker's chunk go back to the queue, unscored."""
        batch.queue.extendleft(reversed(w.tasks))
        w.tasks.clear()

    def _wait_and_collect(self, batch: "_Batch") -> None:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.tasks]
        deadlines += [w.started_at + STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
        by_conn = {w.from_worker: w for w in self._workers if w.tasks or not w.ready}
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for conn in wait(list(by_conn), timeout):
            w = by_conn[conn]
            while w.from_worker is conn and conn.poll():  # drain every result already in the pipe
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._lost(w, batch)
                    break
                self._handle(w, message, batch)
        now = time.monotonic()
        for w in list(self._workers):
            if w.tasks and now >= w.deadline:
                self._settle(batch, w.tasks.popleft(), "timeout", f"killed after {self.timeout_s + KILL_GRACE_S:.1f} s")
                self._give_back(w, batch)
                self._replace(w)
            elif not w.ready and now >= w.started_at + STARTUP_TIMEOUT_S:
                self.close()
                raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def _handle(self, w: _Worker, message: tuple, batch: "_Batch") -> None:
        if message[0] == "ready":
            w.ready = True
            w.ready_rss_mb = w.rss_mb()
            self._start_failures = 0
        elif message[0] == "init_error":
            self.close()
            raise RuntimeError(f"reward worker could not start reward {self.name!r}:\n{message[1]}")
        else:
            _, index, score, status, has_answer, detail = message
            batch.outcomes[index] = (float(score), status, bool(has_answer))
            if status != "ok":
                _log_failure(status, index, detail, batch.completions[index])
            w.tasks.popleft()
            # The next sample of the chunk starts now and gets its own full deadline.
            w.deadline = time.monotonic() + self.timeout_s + KILL_GRACE_S if w.tasks else float("inf")

    def _lost(self, w: _Worker, batch: "_Batch") -> None:
        """A worker's pipe closed: it crashed (segfault, memory) or was killed from outside."""
        code = w.proc.wait()
        if w.tasks:
            index = w.tasks.popleft()
            batch.attempts[index] += 1
            if batch.attempts[index] < MAX_ATTEMPTS:  # killed from outside, most likely: score it again
                logger.warning("reward worker exited with code %s on sample %d; scoring it again", code, index)
                batch.queue.appendleft(index)
            else:  # it took down a worker every time: the sample itself is the problem
                self._settle(batch, index, "error", f"worker exited with code {code}, {MAX_ATTEMPTS} times")
            self._give_back(w, batch)
        elif not w.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self.close()
                raise RuntimeError(
                    f"reward workers keep exiting at start-up (exit code {code}). If memory_limit_mb="
                    f"{self.memory_limit_mb} is too small for the reward's imports, raise reward.memory_limit_mb."
                )
        self._replace(w)


class _Batch:
    """One score() call: the inputs, the queue of sample indices not yet handed out, the outcomes."""

    def __init__(self, completions: list[str], answers: list[str]) -> None:
        self.completions, self.answers = completions, answers
        self.queue: collections.deque[int] = collections.deque(range(len(completions)))
        self.outcomes: list[Optional[tuple[float, str, bool]]] = [None] * len(completions)
        self.attempts = [0] * len(completions)  # worker deaths while scoring each sample


def _log_failure(status: str, index: int, detail: str, completion: str) -> None:
    logger.warning("reward %s on sample %d (%s); completion starts %.120r", status, index, detail, completion[:120])


def _metrics(outcomes: list[tuple[float, str, bool]], *, with_answers: bool) -> dict[str, float]:
    n = len(outcomes)
    scores = [o[0] for o in outcomes]
    metrics = {
        "reward/mean": sum(scores) / n if n else 0.0,
        "reward/accuracy": sum(s >= 1.0 for s in scores) / n if n else 0.0,
    }
    if with_answers:
        metrics["reward/no_answer_fraction"] = sum(not o[2] for o in outcomes) / n if n else 0.0
    metrics["reward/timeouts"] = float(sum(o[1] == "timeout" for o in outcomes))
    metrics["reward/errors"] = float(sum(o[1] == "error" for o in outcomes))
    return metrics


def _takes_keyword(fn: Any, name: str) -> bool:
    """Whether `fn` accepts the keyword argument `name` (by name or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): pass nothing extra
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in params)


def make_reward_scorer(cfg_reward: Any) -> RewardScorer:
    """A scorer built from the ``reward`` config section."""
    return RewardScorer(
        cfg_reward.name,
        extraction=cfg_reward.extraction,
        num_workers=cfg_reward.num_workers,
        timeout_s=cfg_reward.timeout_s,
        memory_limit_mb=cfg_reward.memory_limit_mb,
        import_modules=cfg_reward.import_modules,
        memory_growth_mb=cfg_reward.worker_memory_growth_mb,
    )


def score_math(
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    num_workers: int = 2,
    timeout_s: float = 5.0,
    extraction: str = "boxed",
    memory_limit_mb: int = 2048,
) -> list[float]:
    """Math rewards of one batch, in killable workers started for this call and stopped after it.

    For many batches, keep one scorer open instead (``with make_reward_scorer(cfg.reward) as
    scorer:`` or ``RewardScorer("math", ...)``): its workers start once, and ``score`` also returns
    the batch metrics.
    """
    with RewardScorer(
        "math", extraction=extraction, num_workers=num_workers, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb
    ) as scorer:
        return scorer.score(completions, answers)[0]


@atexit.register
def _close_all() -> None:
    for scorer in list(_LIVE_SCORERS):
        scorer.close()
