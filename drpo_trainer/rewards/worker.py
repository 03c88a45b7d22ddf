"""The verifier worker: a fresh interpreter that scores one sample at a time for the parent pool.

Started by :mod:`drpo_trainer.rewards.pool` as ``python -m drpo_trainer.rewards.worker READ_FD WRITE_FD``
(never forked from the trainer, so it inherits no torch threads, CUDA context or process group,
and never re-imports the launching script). It imports only this package's light modules, the
reward's own module and, for the math reward, math-verify; torch is never imported here.

Protocol on the two pipes (pickled messages, ``multiprocessing.connection`` framing):
  parent -> worker: an init dict, then lists of ``(index, completion, answer)``, ``None`` to stop.
  worker -> parent: ``("ready",)`` or ``("init_error", text)``, then
  ``("result", index, score, status, has_answer, detail)`` per sample.

Limits applied here: an address-space cap (RLIMIT_AS) so an exploding computation raises
MemoryError instead of eating the machine, and a per-sample real-time timer whose signal
handler raises a BaseException (so no ``except Exception`` in sympy or math-verify can swallow it),
re-firing every 50 ms until the sample ends. A computation stuck inside one C call never sees
the signal; the parent then kills this process at its own wall-clock deadline.
"""

from __future__ import annotations

import importlib
import logging
import math
import signal
import sys
import traceback
from typing import Any

_REFIRE_S = 0.05


class SampleDeadline(BaseException):
    """Raised by the timer inside the reward call; a BaseException so library code cannot catch it."""


_deadline_active = False


def _on_alarm(signum: int, frame: Any) -> None:
    if _deadline_active:
        raise SampleDeadline()


def _disarm() -> None:
    global _deadline_active
    _deadline_active = False  # first: a signal arriving from here on is ignored
    signal.setitimer(signal.ITIMER_REAL, 0)


def _score_one(fn: Any, completion: str, answer: str, kwargs: dict, timeout_s: float) -> tuple[float, str, str]:
    """(score, status, detail) for one sample; status is 'ok', 'timeout' or 'error'."""
    global _deadline_active
    try:
        try:
            _deadline_active = True
            signal.setitimer(signal.ITIMER_REAL, timeout_s, _REFIRE_S)
            value = fn(completion, answer, **kwargs)
        finally:
            _disarm()
        score = float(value)
        if not math.isfinite(score):
            return 0.0, "error", f"reward returned {value!r}, not a finite number"
        return score, "ok", ""
    except SampleDeadline:
        _disarm()
        return 0.0, "timeout", f"exceeded {timeout_s} s"
    except MemoryError:
        _disarm()
        return 0.0, "error", "MemoryError (memory_limit_mb reached)"
    except Exception as exc:  # untrusted input: any failure of the reward is a 0 and a counted error
        _disarm()
        return 0.0, "error", f"{type(exc).__name__}: {str(exc)[:300]}"


def _set_memory_limit(limit_mb: int) -> None:
    import resource

    limit = int(limit_mb) * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _import_attr(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def serve(conn_in: Any, conn_out: Any) -> None:
    """Answer samples until the parent sends None or goes away."""
    from drpo_trainer.rewards.extract import extract_final_answer

    init = conn_in.recv()
    try:
        _set_memory_limit(init["memory_limit_mb"])
        # The parent's sys.path first, so user reward modules import here exactly as they do there.
        sys.path[:] = list(init["sys_path"]) + [p for p in sys.path if p not in init["sys_path"]]
        fn = _import_attr(*init["reward"])
        if init.get("warm_up"):  # e.g. import math-verify now, not inside the first sample's deadline
            _import_attr(*init["warm_up"])()
    except BaseException:
        conn_out.send(("init_error", traceback.format_exc(limit=8)))
        return
    conn_out.send(("ready",))
    kwargs, timeout_s, extraction = init["kwargs"], float(init["timeout_s"]), init["extraction"]
    while True:
        try:
            message = conn_in.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        if message is None:
            return
        for index, completion, answer in message:
            try:
                score, status, detail = _score_one(fn, completion, answer, kwargs, timeout_s)
            except SampleDeadline:  # the timer fired in the few bytecodes between catching and disarming
                _disarm()
                score, status, detail = 0.0, "timeout", f"exceeded {timeout_s} s"
            # the extraction mode is None for a reward that does not look for a final answer
            has_answer = extraction is not None and extract_final_answer(completion, extraction) is not None
            conn_out.send(("result", index, score, status, has_answer, detail))


def main(argv: list[str]) -> None:
    from multiprocessing.connection import Connection

    # The parent owns our lifetime (we run in our own session, and stop at the pipe's EOF): a
    # SIGINT or SIGTERM that still reaches us (e.g. sent to every process of a job) is ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    logging.basicConfig(level=logging.ERROR)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    conn_in = Connection(int(argv[0]), writable=False)
    conn_out = Connection(int(argv[1]), readable=False)
    serve(conn_in, conn_out)


if __name__ == "__main__":
    main(sys.argv[1:])
