"""A training run's state between steps (`Run`), and what of it a checkpoint keeps.

`save_run` writes a Run through drpo_trainer.io.checkpoint (which owns the files: atomic publish,
manifest, verification); `restore_run` puts a checkpoint's state back into a freshly built Run:
the DeepSpeed state (weights, optimizer, lr schedule), each rank's RNG, the step, the data
position, the loop's extra state (W&B run id, ...) and each rank's own state (in the
asynchronous layout: the batches the rollout processes had sampled ahead of the learner).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from drpo_trainer.config import Config, dump_config
from drpo_trainer.io.checkpoint import load_checkpoint, save_checkpoint
from drpo_trainer.io.data import Problem, PromptSampler, SamplerState
from drpo_trainer.runtime.distributed import DistContext

if TYPE_CHECKING:  # heavy or circular at import time; annotations only
    from transformers import PreTrainedTokenizerBase

    from drpo_trainer.io.samples import SampleLog
    from drpo_trainer.learner.learner import Learner
    from drpo_trainer.rewards.pool import RewardScorer
    from drpo_trainer.rollout.base import RolloutEngine


@dataclass
class Run:
    """Everything a run holds between steps."""

    cfg: Config
    ctx: DistContext
    tokenizer: PreTrainedTokenizerBase
    train_set: list[Problem]
    eval_sets: dict[str, list[Problem]]
    sampler: PromptSampler
    learner: Learner
    engine: Optional[RolloutEngine]  # None when rollout processes sample (asynchronous layout)
    scorer: Optional[RewardScorer]
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # loop state saved in checkpoints (wandb id, ...)
    samples: Optional[SampleLog] = None  # samples.jsonl writer (rank 0)
    rollouts: Any = None  # where batches come from: trainer.LocalRollouts or async_rollouts.RemoteRollouts
    stopping: bool = False  # a stop was requested: the step just run is the last before exiting
    rank_state: Optional[dict] = None  # this rank's own state from the resumed checkpoint (batches sampled ahead)


def save_run(run: Run) -> Path:
    """Checkpoint a Run at its current step (every rank); returns the published directory."""

    def hf_save(path: Path) -> None:
        run.learner.module.config.save_pretrained(path)
        run.tokenizer.save_pretrained(path)

    sampler = {"epoch": run.sampler.state.epoch, "index": run.sampler.state.index, "seed": run.sampler.seed}
    return save_checkpoint(
        run.learner.engine,
        run.cfg.output_dir,
        run.step,
        {"sampler": sampler, **run.extra},
        config_yaml=dump_config(run.cfg),
        hf_save=hf_save,
        keep_last=run.cfg.checkpoint.keep_last,
        ctx=run.ctx,
        rank_state=run.rollouts.checkpoint_state() if run.rollouts is not None else None,
    )


def restore_run(run: Run, path: Optional[Path], *, universal_dir: Optional[Path] = None) -> Optional[Path]:
    """Every rank loads the chosen checkpoint (resolve_resume(..., shared=True) picked it)."""
    if path is None:
        return None
    state = load_checkpoint(run.learner.engine, Path(path), universal_dir=universal_dir, ctx=run.ctx)
    run.step = state["step"]
    run.rank_state = state.get("rank_state")
    pos = dict(state["sampler"])
    run.sampler.seed = pos.pop("seed", run.sampler.seed)  # the permutation the saved position indexes
    run.sampler.state = SamplerState(**pos)
    # this run's own data fingerprint stays: a change was allowed (or refused) before the run began
    keep = ("step", "sampler", "world_size", "data_fingerprint", "rank_state")
    run.extra.update({k: v for k, v in state.items() if k not in keep})
    return Path(path)
