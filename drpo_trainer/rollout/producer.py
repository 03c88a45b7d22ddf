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
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from drpo_trainer.rollout.base import Completion, SamplingSpec

if TYPE_CHECKING:  # heavy at import time; annotations only
    from drpo_trainer.config import Config
    from drpo_trainer.io.data import Problem, PromptSampler, SamplerState

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
    sampling: dict[str, float] = field(default_factory=dict)  # dynamic sampling's counts for this share (if on)


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
    sampling_round: int = 0,
) -> RolloutBatch:
    """Prompts -> G completions each from the engine's policy -> rewards (+ the overlong length penalty, when
    on) -> group-relative advantages. The sampling seed depends on (seed, step, learner rank, sampling
    round) only: whichever process samples a share, it draws the same completions from the same weights."""
    import torch

    from drpo_trainer.algorithms.advantages import group_advantages

    G = cfg.rollout.samples_per_prompt
    prompts = [train_set[i] for i in indices]
    start = time.perf_counter()
    spec = sampling_spec(cfg, n=G, seed=sampling_seed(cfg.trainer.seed, step, learner_rank, salt=sampling_round))
    completions = engine.generate([p.prompt_ids for p in prompts], spec)
    generated = time.perf_counter()
    rewards, reward_metrics = scorer.score(
        [c.text for c in completions], [prompts[c.prompt_index].answer for c in completions]
    )
    scored = time.perf_counter()
    shaped, penalty_metrics = shaped_rewards(cfg, completions, rewards)
    reward_metrics = {**reward_metrics, **penalty_metrics}
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


def shaped_rewards(cfg: Config, completions: list[Completion], rewards: list[float]) -> tuple[list[float], dict]:
    """(the rewards the advantages see, the penalty's metrics): the verifier's rewards plus DAPO's soft
    overlong punishment when reward.overlong_penalty is on (algorithms/overlong.py), else the rewards."""
    from drpo_trainer.algorithms.overlong import completion_penalties

    penalised = completion_penalties(cfg, completions)
    if penalised is None:
        return list(rewards), {}
    return [r + p for r, p in zip(rewards, penalised[0])], penalised[1]


# -- dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476) -----------------------------------------
REWARD_COUNTS = ("reward/timeouts", "reward/errors")  # the scorer's counts (the other reward metrics: means)
SAMPLING_COUNTS = (  # per share; summed over learner ranks
    "sampling/prompts_sampled",
    "sampling/groups_dropped_zero_variance",
    "sampling/groups_dropped_extra",
    "sampling/groups_missing",
)


def sample_step(
    cfg: Config,
    engine,
    scorer,
    train_set: list[Problem],
    step: int,
    sampler: PromptSampler,
    learner_ranks: Sequence[int],
    n_learners: int,
    version: int,
    any_missing: Callable[[int], bool] = lambda missing: missing > 0,
) -> list[RolloutBatch]:
    """The batches of `step` for `learner_ranks` (of `n_learners` learners), prompts drawn from `sampler`.

    Without algorithm.dynamic_sampling: one draw of prompts_per_step prompts; each share is its rank's
    slice. With it: round r = 0, 1, ... draws prompts_per_step more prompts, each share samples its slice
    with the round's seed (round 0: the seed without dynamic sampling) and keeps, in order, the groups
    whose rewards are not all equal, up to its size; the rest are dropped. The rounds end once no
    learner's share misses a group (`any_missing` gets this caller's missing count and answers for every
    learner: an all-reduce in the synchronous layout) or after algorithm.max_sampling_rounds; a share
    still short then fills its missing places with its first round's zero-variance groups, which carry
    zero advantage (no gradient). Every process that draws prompts draws the same rounds, so the data
    position after the step is the same everywhere: start + rounds x prompts_per_step."""
    from drpo_trainer.io.data import PromptSampler

    a, G = cfg.algorithm, cfg.rollout.samples_per_prompt
    fills = {r: _ShareFill(cfg, cfg.trainer.prompts_per_step // n_learners, G) for r in learner_ranks}
    for sampling_round in range(a.max_sampling_rounds if a.dynamic_sampling else 1):
        indices = sampler.next_indices()
        batches = {
            r: sample_batch(
                cfg,
                engine,
                scorer,
                train_set,
                step,
                PromptSampler.rank_slice(indices, r, n_learners),
                r,
                version,
                sampler.state,
                sampling_round,
            )
            for r in learner_ranks
        }
        if not a.dynamic_sampling:
            return [batches[r] for r in learner_ranks]
        for r, b in batches.items():
            fills[r].add(b)
        if not any_missing(sum(f.missing for f in fills.values())):
            break
    return [fills[r].batch(cfg, sampler.state) for r in learner_ranks]


class _ShareFill:
    """One learner's share under dynamic sampling: every round's batch, and which groups it keeps."""

    def __init__(self, cfg: Config, size: int, group_size: int) -> None:
        self.cfg, self.size, self.G = cfg, size, group_size
        self.rounds: list[RolloutBatch] = []
        self.kept: list[tuple[int, int]] = []  # (round, group) of the informative groups kept, in order
        self.zero_variance: list[tuple[int, int]] = []
        self.extra = 0  # informative groups beyond the share's size

    def add(self, batch: RolloutBatch) -> None:
        import torch

        rnd = len(self.rounds)
        self.rounds.append(batch)
        shaped, _ = shaped_rewards(self.cfg, batch.completions, batch.rewards)  # what the advantages see
        grouped = torch.tensor(shaped, dtype=torch.float32).view(-1, self.G)  # (groups, G)
        flat = (grouped.amax(dim=1) == grouped.amin(dim=1)).tolist()  # group_advantages' exact test: A = 0
        for g in range(len(batch.indices)):
            if flat[g]:
                self.zero_variance.append((rnd, g))
            elif len(self.kept) < self.size:
                self.kept.append((rnd, g))
            else:
                self.extra += 1

    @property
    def missing(self) -> int:
        return self.size - len(self.kept)

    def batch(self, cfg: Config, sampler_after: SamplerState) -> RolloutBatch:
        """The kept groups (then the first round's zero-variance groups for the missing places) as one batch.
        Rewards' metrics are over every completion sampled in the step; the rest describe the kept batch."""
        import dataclasses

        import torch

        from drpo_trainer.algorithms.advantages import group_advantages

        G, first = self.G, self.rounds[0]
        filled = [(rnd, g) for rnd, g in self.zero_variance if rnd == 0][: self.missing]
        indices, completions, rewards = [], [], []
        for position, (rnd, g) in enumerate(self.kept + filled):
            b = self.rounds[rnd]
            indices.append(b.indices[g])
            completions += [dataclasses.replace(c, prompt_index=position) for c in b.completions[g * G : (g + 1) * G]]
            rewards += b.rewards[g * G : (g + 1) * G]
        shaped, _ = shaped_rewards(cfg, completions, rewards)
        advantages, adv_metrics = group_advantages(
            torch.tensor(shaped, dtype=torch.float32), G, normalize_by_std=cfg.algorithm.normalize_by_std
        )
        total = sum(len(b.rewards) for b in self.rounds)
        reward_metrics = {  # counts add up over the rounds; the rest are means over every completion sampled
            k: sum(b.reward_metrics[k] * (1 if k in REWARD_COUNTS else len(b.rewards) / total) for b in self.rounds)
            for k in first.reward_metrics
        }
        return RolloutBatch(
            step=first.step,
            version=first.version,
            learner_rank=first.learner_rank,
            indices=indices,
            completions=completions,
            rewards=rewards,
            reward_metrics=reward_metrics,
            advantages=advantages.tolist(),
            adv_metrics=adv_metrics,
            sampler_after=(sampler_after.epoch, sampler_after.index),
            seconds={k: sum(b.seconds[k] for b in self.rounds) for k in first.seconds},
            sampling={
                "sampling/rounds": float(len(self.rounds)),
                "sampling/prompts_sampled": float(sum(len(b.indices) for b in self.rounds)),
                "sampling/groups_dropped_zero_variance": float(len(self.zero_variance) - len(filled)),
                "sampling/groups_dropped_extra": float(self.extra),
                "sampling/groups_missing": float(len(filled)),
            },
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
