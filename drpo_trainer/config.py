"""The one source of truth for run configuration.

Every field is typed, bounded and documented in its section (drpo_trainer/config_sections.py,
the rollout sections in drpo_trainer/config_rollout.py);
`Config` here assembles the sections and checks the rules between them. YAML files in ``configs/`` only
override these defaults, and ``key=value`` command-line arguments (dotted paths such
as ``trainer.max_steps=20``) override the YAML. Unknown keys and bad values fail
before any heavy import, naming the key and the fix. Imports only the standard
library, pydantic and yaml (no torch: loss parameters are checked against
drpo_trainer/algorithms/loss_params.py) so that ``drpo-train --help`` / ``--print-config`` are instant.

Where checks live:
  this module     rules about the values themselves: bounds on every number (finite, no NaN),
                  rules between keys, loss parameters, and the rules that need the launch's
                  process count (`learner_processes`, `check_world`: called by the CLI before
                  any process starts and again by the trainer, for library callers);
  runtime/preflight.py  facts about this machine and its files, checked before anything heavy
                  loads: installed backend, model weights, data and DeepSpeed files, GPUs,
                  the reward function and its worker memory (the output directory: io/run_dir.py).
Keys of one rollout backend live under rollout.hf / rollout.vllm; an old name is refused with
"renamed to" (drpo_trainer/config_input.py).

Batch-size vocabulary (see the README glossary):
  prompts_per_step      prompts drawn per step, over all ranks
  samples_per_prompt    G, completions per prompt (the group)
  minibatches_per_step  optimizer steps per rollout batch (stale mini-batches)
  micro_batch_tokens_per_gpu  token budget of one forward/backward on one rank
"""

from __future__ import annotations

import os
from typing import Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from drpo_trainer.config_input import (
    RENAMED_KEYS,
    ConfigError,
    check_renamed,
    drop_params_of_a_switched_loss,
    format_errors,
    merge_dicts,
    parse_overrides,
    read_config_file,
)
from drpo_trainer.config_rollout import HFRolloutConfig, RolloutConfig, VLLMRolloutConfig
from drpo_trainer.config_sections import (
    MAX_PROCESSES,
    MAX_REWARD_MEMORY_MB,
    MAX_REWARD_TIMEOUT_S,
    MAX_REWARD_WORKERS,
    MAX_SEED,
    MAX_STEPS,
    MAX_TOKENS,
    AlgorithmConfig,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    Section,
    Seed,
    Temperature,
    TrackingConfig,
    TrainerConfig,
    WandbConfig,
)

# Callers import the sections, the bounds and RENAMED_KEYS from here (config_sections.py and config_rollout.py
# hold them).
__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "HFRolloutConfig",
    "LoraConfig",
    "MAX_PROCESSES",
    "MAX_REWARD_MEMORY_MB",
    "MAX_REWARD_TIMEOUT_S",
    "MAX_REWARD_WORKERS",
    "MAX_SEED",
    "MAX_STEPS",
    "MAX_TOKENS",
    "ModelConfig",
    "OptimConfig",
    "RENAMED_KEYS",
    "RewardConfig",
    "RolloutConfig",
    "Section",
    "Seed",
    "Temperature",
    "TrackingConfig",
    "TrainerConfig",
    "VLLMRolloutConfig",
    "WandbConfig",
    "Config",
    "ConfigError",
    "config_from_dict",
    "dump_config",
    "learner_count",
    "load_config",
    "merge_dicts",
]


class Config(Section):
    output_dir: str = Field("runs/default", description="Run directory: metrics, config, checkpoints, exports.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> "Config":
        if self.algorithm.mis_lower >= self.algorithm.mis_upper:
            raise ValueError(
                f"algorithm.mis_lower ({self.algorithm.mis_lower}) must be below algorithm.mis_upper "
                f"({self.algorithm.mis_upper}). Fix: set algorithm.mis_lower below algorithm.mis_upper "
                "(defaults 0.5, 2.0)"
            )
        self._check_async()
        self._check_dynamic_sampling()
        self._check_reward_bounds()
        self._check_overlong()
        need = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if self.trainer.micro_batch_tokens_per_gpu < need:
            raise ValueError(
                f"trainer.micro_batch_tokens_per_gpu={self.trainer.micro_batch_tokens_per_gpu} cannot hold one sample "
                f"of data.max_prompt_tokens + rollout.max_new_tokens = {need} tokens. "
                f"Fix: set trainer.micro_batch_tokens_per_gpu >= {need}"
            )
        return self

    def _check_async(self) -> None:
        k, rollout = self.trainer.max_off_policy_steps, self.distributed.rollout_processes
        if k and not rollout:
            raise ValueError(
                f"trainer.max_off_policy_steps={k} needs processes that generate while the learner trains. "
                "Fix: set distributed.rollout_processes=1 (or more) and count them in distributed.nproc_per_node"
            )
        if not rollout:
            return
        a = self.algorithm
        if k and a.behaviour_logprobs == "recompute" and a.mismatch_correction is None:
            raise ValueError(
                f"trainer.max_off_policy_steps={k} with algorithm.behaviour_logprobs=recompute: the recomputed "
                "log-probs are a proximal anchor, not the policy that sampled (up to k versions older), so the "
                "update needs an importance correction toward the sampling policy. Fix: set "
                "algorithm.mismatch_correction=tis (decoupled PPO with a truncated weight, docs/async.md), or "
                "algorithm.behaviour_logprobs=rollout (mu = the sampling policy itself)"
            )
        tp = self.rollout.vllm.tensor_parallel_size
        if self.rollout.backend == "vllm" and tp > 1:
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size={tp}: with distributed.rollout_processes each rollout process "
                "hosts a whole engine (tensor parallelism across rollout processes is not supported yet). "
                "Fix: set rollout.vllm.tensor_parallel_size=1"
            )

    def _check_dynamic_sampling(self) -> None:
        if not self.algorithm.dynamic_sampling:
            return
        if self.rollout.samples_per_prompt < 2:
            raise ValueError(
                "algorithm.dynamic_sampling keeps the groups whose rewards differ, and a group of "
                "rollout.samples_per_prompt=1 completion never has two rewards to differ. "
                "Fix: set rollout.samples_per_prompt >= 2, or algorithm.dynamic_sampling=false"
            )
        if self.distributed.rollout_processes > 1:
            raise ValueError(
                f"algorithm.dynamic_sampling with distributed.rollout_processes={self.distributed.rollout_processes}: "
                "how many prompts a step draws is known only to the process that samples it, and every rollout "
                "process must follow the same data order. Fix: set distributed.rollout_processes=1 (or 0)"
            )

    def _check_reward_bounds(self) -> None:
        # here, not in RewardConfig: the reward section's own rules live with the rewards
        r = self.reward
        if r.num_workers > MAX_REWARD_WORKERS:
            raise ValueError(
                f"reward.num_workers={r.num_workers} is more than {MAX_REWARD_WORKERS} verifier processes per rank. "
                f"Fix: set reward.num_workers to at most the CPU cores per rank (<= {MAX_REWARD_WORKERS})"
            )
        for key, value, default in (
            ("memory_limit_mb", r.memory_limit_mb, 2048),
            ("worker_memory_growth_mb", r.worker_memory_growth_mb, 256),
        ):
            if value > MAX_REWARD_MEMORY_MB:
                raise ValueError(
                    f"reward.{key}={value} is more than {MAX_REWARD_MEMORY_MB} MB (4 TiB). "
                    f"Fix: set reward.{key} to what a verifier worker may use (default {default})"
                )
        if r.timeout_s > MAX_REWARD_TIMEOUT_S:
            raise ValueError(
                f"reward.timeout_s={r.timeout_s} is more than {MAX_REWARD_TIMEOUT_S:g} s for one verification. "
                f"Fix: set reward.timeout_s <= {MAX_REWARD_TIMEOUT_S:g} (default 5)"
            )

    def _check_overlong(self) -> None:
        r, limit = self.reward, self.rollout.max_new_tokens
        if r.overlong_penalty and r.overlong_buffer is None:
            raise ValueError(
                f"reward.overlong_penalty={r.overlong_penalty} needs reward.overlong_buffer, the tokens before "
                f"rollout.max_new_tokens over which the penalty grows. Fix: set reward.overlong_buffer to at most "
                f"{limit} (DAPO: a fifth of the limit, {max(1, limit // 5)})"
            )
        if r.overlong_buffer is not None and r.overlong_buffer > limit:
            raise ValueError(
                f"reward.overlong_buffer={r.overlong_buffer} does not fit inside rollout.max_new_tokens={limit}. "
                f"Fix: set reward.overlong_buffer <= {limit}, or raise rollout.max_new_tokens"
            )

    def learner_processes(self, world_size: int) -> int:
        """How many of the launch's `world_size` processes train (the rest generate, docs/async.md)."""
        return learner_count(world_size, self.distributed.rollout_processes)

    def effective_zero_stage(self, world_size: int) -> int:
        d = self.distributed
        if world_size == 1 and not d.offload_optimizer and d.single_process_zero_stage is not None:
            return d.single_process_zero_stage
        return d.zero_stage

    @property
    def horizon(self) -> int:
        return self.algorithm.horizon or self.rollout.max_new_tokens

    def check_world(self, world_size: int) -> None:
        """Batch sizes must divide evenly over the `world_size` learners and the mini-batches (whole
        groups per mini-batch): the CLI checks it before starting processes, the trainer again."""
        t = self.trainer
        need = world_size * t.minibatches_per_step
        if t.prompts_per_step % need:
            lo = (t.prompts_per_step // need) * need or need
            raise ConfigError(
                f"trainer.prompts_per_step={t.prompts_per_step} must be divisible by world size ({world_size}) x "
                f"trainer.minibatches_per_step ({t.minibatches_per_step}) = {need}, so that every rank's mini-batch "
                f"holds whole prompt groups. Fix: set trainer.prompts_per_step={lo} or {lo + need}."
            )


def learner_count(world_size: int, rollout_processes: int) -> int:
    """The learners among a launch of `world_size` processes whose last `rollout_processes` only
    generate; ConfigError when none is left (the config check and the bridge's both call this)."""
    learners = world_size - rollout_processes
    if learners < 1:
        raise ConfigError(
            f"distributed.rollout_processes={rollout_processes} leaves no learner among {world_size} process(es). "
            f"Fix: set distributed.nproc_per_node={rollout_processes + 1} (or more): the learners are the "
            "processes that are not rollout processes"
        )
    return learners


# ---------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> validated Config, with errors that name the key and the fix.


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated."""
    raw = read_config_file(path) if path is not None else {}
    over = parse_overrides(overrides or [])
    drop_params_of_a_switched_loss(raw, over)
    return config_from_dict(merge_dicts(raw, over, replace=("files",)))


def config_from_dict(raw: dict) -> Config:
    check_renamed(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, Config)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
