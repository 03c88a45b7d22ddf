"""A process's role in the launch, decided here and nowhere else.

Synchronous layout (`distributed.rollout_processes: 0`): every process is a learner rank that also
samples its own share of each step. Asynchronous layout: the first W - R processes train, the last R
only sample (drpo_trainer/runtime/bridge.py connects the two; docs/async.md).
"""

from __future__ import annotations

from typing import Optional

from drpo_trainer.config import Config
from drpo_trainer.runtime.stop import StopFlag


def run_process(cfg: Config, *, resume: Optional[str] = None, stop: Optional[StopFlag] = None) -> dict[str, float]:
    """Train, or serve rollouts, as this process's rank says; returns the learner's last metrics."""
    from drpo_trainer.runtime.loop import train

    if not cfg.distributed.rollout_processes:
        return train(cfg, resume=resume, stop=stop)
    from drpo_trainer.runtime.async_rollouts import RemoteRollouts, serve_rollouts
    from drpo_trainer.runtime.bridge import connect

    ctx, bridge = connect(cfg.distributed.backend, cfg.distributed.rollout_processes)
    if bridge.is_rollout:
        serve_rollouts(cfg, ctx, bridge)
        return {}
    return train(cfg, resume=resume, stop=stop, ctx=ctx, rollouts=lambda run: RemoteRollouts(run, bridge))
