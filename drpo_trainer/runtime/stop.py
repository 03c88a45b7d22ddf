"""Stop requests: SIGTERM / SIGUSR1 ask the run to checkpoint and exit 75 at the next safe point.

Safe points (drpo_trainer/runtime/loop.py): after loading (model, data, checkpoint), after the step-0
evaluation, after every step (which then writes a checkpoint) and before the final export. A
request is thus honoured within one step whatever the run is doing. Exit code 75 (EX_TEMPFAIL)
tells a scheduler script to requeue; `PREEMPTED` in output_dir holds the step of the newest
checkpoint. The handlers are installed as soon as the CLI has read its config, and `restore()`
puts the previous ones back.
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after writing a checkpoint
PREEMPTED_MARKER = "PREEMPTED"  # in output_dir: the step of the checkpoint a stop request left
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM / SIGUSR1; `any_rank()` agrees across ranks (a collective)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, _frame) -> None:
        self.requested = True

    def any_rank(self, ctx=None) -> bool:
        """Whether any rank of `ctx` (a DistContext; default: the initialised process group) was asked."""
        from drpo_trainer.metrics import all_reduce_max

        return all_reduce_max([float(self.requested)], ctx)[0] > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
