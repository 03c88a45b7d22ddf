"""A training run's state between steps (`Run`): how it is built, and what of it a checkpoint keeps.

`build_run` loads what every process reads (`load_run_inputs`: model path, tokenizer, prompts),
builds the learner (and, synchronous layout, this rank's engine and verifier), restores the
resumed checkpoint and connects the run to its `Rollouts`.

`save_run` writes a Run through drpo_trainer.io.checkpoint (which owns the files: atomic publish,
manifest, verification); `restore_run` puts a checkpoint's state back into a freshly built Run:
the DeepSpeed state (weights, optimizer, lr schedule), each rank's RNG, the step, the data
position, the loop's extra state (W&B run id, ...) and each rank's own state (in the
asynchronous layout: the batches the rollout processes had sampled ahead of the learner).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

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
    from drpo_trainer.runtime.rollouts import Rollouts


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
    rollouts: Rollouts = field(init=False)  # where batches come from; set by build_run
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
        rank_state=run.rollouts.checkpoint_state(),
        adapters_only=run.cfg.model.lora is not None,  # the base model is named by run.extra["lora_base"]
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
    keep = ("step", "sampler", "world_size", "data_fingerprint", "rank_state", "lora_base")
    run.extra.update({k: v for k, v in state.items() if k not in keep})
    return Path(path)


@dataclass
class RunInputs:
    """What every process of a run reads: the model's path, its tokenizer and the prompts."""

    model_path: str
    tokenizer: object
    train_set: list
    eval_sets: dict
    dropped_too_long: int


def load_run_inputs(cfg: Config) -> RunInputs:
    from transformers import AutoTokenizer

    from drpo_trainer.io.data import load_problems

    model_path = cfg.model.path
    if model_path.startswith("builtin:"):  # the embedded tiny model, built and cached on first use
        from drpo_trainer.builtin.resolve import resolve_model_path

        model_path = resolve_model_path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train_set, stats = load_problems(cfg.data.train_files, tokenizer, **problem_options(cfg))
    return RunInputs(model_path, tokenizer, train_set, load_eval_sets(cfg, tokenizer), stats.dropped_too_long)


def problem_options(cfg: Config) -> dict:
    """How the data section turns rows into prompts (training and eval sets alike)."""
    d = cfg.data
    return dict(
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        system_prompt=d.system_prompt,
        apply_chat_template=d.apply_chat_template,
        max_prompt_tokens=d.max_prompt_tokens,
    )


def load_eval_sets(cfg: Config, tokenizer) -> dict[str, list[Problem]]:
    from drpo_trainer.io.data import load_problems

    return {name: load_problems([path], tokenizer, **problem_options(cfg))[0] for name, path in cfg.eval.files.items()}


def resume_layout(ckpt: Optional[Path], ctx: DistContext) -> tuple[Optional[Path], bool]:
    """(universal dir to load or None, whether the learner must run ZeRO-3) for resuming `ckpt`.
    A ZeRO-3 checkpoint loads only into ZeRO-3 (also with one process); one of another world size
    loads through DeepSpeed's universal conversion (drpo_trainer.io.reshard)."""
    from drpo_trainer.io import reshard

    if ckpt is None:
        return None, False
    zero3 = reshard.saved_at_zero3(ckpt)
    if reshard.saved_world_size(ckpt) == ctx.world_size:
        return None, zero3
    reshard.check_convertible(ckpt, ctx.world_size)
    if ctx.is_main:
        print(
            f"drpo-train: {ckpt} was written by {reshard.saved_world_size(ckpt)} process(es); resuming with "
            f"{ctx.world_size} through DeepSpeed's universal checkpoint (ZeRO-3)",
            file=sys.stderr,
            flush=True,
        )
    return reshard.prepare(ckpt, ctx), True


def build_run(
    cfg: Config,
    ctx: DistContext,
    *,
    resumed: Optional[Path] = None,
    rollouts: Optional[Callable[[Run], Rollouts]] = None,
) -> Run:
    """The learner's Run, restored from `resumed` if given. `rollouts(run)` makes its Rollouts (default:
    this rank's own engine samples, `LocalRollouts`); the engine and verifier are built here only then."""
    from drpo_trainer.learner.learner import Learner
    from drpo_trainer.rollout.producer import make_engine_and_scorer, make_prompt_sampler, sampling_spec
    from drpo_trainer.runtime.rollouts import LocalRollouts
    from drpo_trainer.runtime.run_identity import data_fingerprint

    cfg.check_world(ctx.world_size)
    universal_dir, zero3 = resume_layout(resumed, ctx)
    inputs = load_run_inputs(cfg)
    sampler = make_prompt_sampler(cfg, len(inputs.train_set))
    learner = Learner(
        cfg,
        inputs.model_path,
        ctx=ctx,
        sampling=sampling_spec(cfg),
        total_optimizer_steps=cfg.trainer.max_steps * cfg.trainer.minibatches_per_step,
        load_universal=universal_dir is not None,
        zero3=zero3,
    )
    engine = scorer = None
    if rollouts is None:
        engine, scorer = make_engine_and_scorer(cfg, inputs.model_path, tokenizer=inputs.tokenizer, device=ctx.device)
    run = Run(cfg, ctx, inputs.tokenizer, inputs.train_set, inputs.eval_sets, sampler, learner, engine, scorer)
    run.extra["data/prompts_dropped_too_long"] = inputs.dropped_too_long
    run.extra["data_fingerprint"] = data_fingerprint(cfg.data.train_files)  # a resume checks it (run_identity)
    if cfg.model.lora is not None and ctx.is_main:  # the base model the adapters belong to (run_identity checks it)
        from drpo_trainer.learner.lora import base_reference

        run.extra["lora_base"] = base_reference(inputs.model_path)
    restore_run(run, resumed, universal_dir=universal_dir)
    run.rollouts = (rollouts or LocalRollouts)(run)
    return run


def kept_batches(ckpt: Path) -> bool:
    """Did the checkpoint keep batches sampled ahead of its step (asynchronous layout)?"""
    return any((Path(ckpt) / "ranks").glob("state_*"))
