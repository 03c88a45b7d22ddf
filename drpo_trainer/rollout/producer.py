"""The rollout producer: steps 1-3 of the algorithm for one learner rank's share of a step, in one
place that both layouts call (the synchronous loop on every rank, the rollout processes of the
asynchronous layout); the evaluation is drpo_trainer/rollout/evaluation.py.

    prompts -> G completions each from the engine's policy (behaviour policy mu)
            -> rewards (the reward scorer) -> group-relative advantages  =  a `RolloutBatch`

Also here, because every process that samples must agree on them: the sampling seeds, the
sampling spec, the eval sharding and the parity probe with its threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from drpo_trainer.rollout.base import Completion, SamplingSpec

if TYPE_CHECKING:  # heavy at import time; annotations only
    from drpo_trainer.config import Config
    from drpo_trainer.io.data import Problem, SamplerState

PARITY_PROBE_PROMPTS = 8  # the probe: the first training prompts, scored by engine and learner


def sampling_seed(base: int, step: int, rank: int, salt: int = 0) -> int:
    """Distinct, reproducible per (seed, step, rank): a resume samples exactly as before."""
    return (base * 1_000_003 + step * 10_007 + rank * 101 + salt) % (2**31 - 1)


def sampling_spec(cfg: Config, *, n: int = 1, seed: int = 0, temperature: Optional[float] = None) -> SamplingSpec:
    """The run's sampling distribution; the learner scores tokens under the same one."""
    r = cfg.rollout
    return SamplingSpec(
        n=n,
        temperature=temperature or r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        seed=seed,
    )


@dataclass
class RolloutBatch:
    """One learner rank's share of a step's rollouts (steps 1-3 of the algorithm), stamped with the
    policy version that sampled it."""

    step: int
    version: int  # sampled by the learner's weights after `version` steps (0 = the initial model)
    learner_rank: int  # which learner rank's slice of the step's prompts
    indices: list[int]  # the prompts' positions in the training set
    completions: list[Completion]  # G per prompt, grouped by prompt
    rewards: list[float]  # the verifier's; the advantages are of these plus reward.overlong_penalty's length penalty
    reward_metrics: dict[str, float]
    advantages: list[float]
    adv_metrics: dict[str, float]
    sampler_after: tuple[int, int]  # (epoch, index) of the prompt sampler once this step was drawn
    seconds: dict[str, float] = field(default_factory=dict)  # generate, score (and rollout idle/busy)


def sample_batch(
    cfg: Config,
    engine,
    scorer,
    train_set: list[Problem],
    step: int,
    indices: list[int],
    learner_rank: int,
    version: int,
    sampler_after: SamplerState,
) -> RolloutBatch:
    """Prompts -> G completions each from the engine's policy -> rewards (+ the overlong length penalty, when
    on) -> group-relative advantages. The sampling seed depends on (seed, step, learner rank) only: whichever
    process samples a share, it draws the same completions from the same weights."""
    import torch

    from drpo_trainer.algorithms.advantages import group_advantages
    from drpo_trainer.algorithms.overlong import completion_penalties

    G = cfg.rollout.samples_per_prompt
    prompts = [train_set[i] for i in indices]
    start = time.perf_counter()
    spec = sampling_spec(cfg, n=G, seed=sampling_seed(cfg.trainer.seed, step, learner_rank))
    completions = engine.generate([p.prompt_ids for p in prompts], spec)
    generated = time.perf_counter()
    rewards, reward_metrics = scorer.score(
        [c.text for c in completions], [prompts[c.prompt_index].answer for c in completions]
    )
    scored = time.perf_counter()
    shaped, penalised = list(rewards), completion_penalties(cfg, completions)
    if penalised is not None:  # DAPO's soft overlong punishment, before the advantages
        shaped = [r + p for r, p in zip(rewards, penalised[0])]
        reward_metrics = {**reward_metrics, **penalised[1]}
    advantages, adv_metrics = group_advantages(
        torch.tensor(shaped, dtype=torch.float32), G, normalize_by_std=cfg.algorithm.normalize_by_std
    )
    return RolloutBatch(
        step=step,
        version=version,
        learner_rank=learner_rank,
        indices=list(indices),
        completions=completions,
        rewards=list(rewards),
        reward_metrics=reward_metrics,
        advantages=advantages.tolist(),
        adv_metrics=adv_metrics,
        sampler_after=(sampler_after.epoch, sampler_after.index),
        seconds={"generate": generated - start, "score": scored - generated},
    )


# -- the parity probe -------------------------------------------------------------------------------
def parity_probe(train_set: list[Problem]) -> list[list[int]]:
    """The sequences engine and learner both score after a weight sync."""
    return [p.prompt_ids for p in train_set[:PARITY_PROBE_PROMPTS]]


def parity_threshold(cfg: Config) -> float:
    """The largest mean |log-prob difference| the parity gate accepts for this run's precisions."""
    from drpo_trainer.rollout.parity import default_threshold

    r = cfg.rollout
    return r.parity_max_abs_logprob_diff or default_threshold(
        cfg.model.dtype, r.dtype or cfg.model.dtype, r.quantization
    )


def make_engine_and_scorer(cfg: Config, model_path: str, *, tokenizer, device):
    """(engine, reward scorer) of a process that samples; the engines derive per-rank seeds from the run's seed."""
    from drpo_trainer.rewards import make_reward_scorer
    from drpo_trainer.rollout import make_engine

    engine = make_engine(cfg, model_path, tokenizer=tokenizer, device=device, seed=cfg.trainer.seed)
    return engine, make_reward_scorer(cfg.reward)


def make_prompt_sampler(cfg: Config, n_problems: int):
    """The run's prompt order: every process that draws prompts builds the same sampler."""
    from drpo_trainer.io.data import PromptSampler

    d = cfg.data
    return PromptSampler(n_problems, cfg.trainer.prompts_per_step, seed=d.seed, shuffle=d.shuffle)
