"""The evaluation: n completions per problem of every eval set, scored by the run's verifier, and the
metrics avg@n, pass@j and maj@n (docs/evaluation.md). Used by both layouts and by `drpo-train eval`.

Each process evaluates its shard of the problems and returns *sums* per set (`eval_counts`): the
reward summed over samples, the sample and problem counts, and for every j the per-problem pass@j
summed over problems, the correct votes. Sums add up over shards exactly; `eval_metrics` divides
once, over the whole set, so a result never averages averages.

    avg@n   = sum of rewards / (problems * n)                      (the run's reward, full or partial)
    pass@j  = mean over problems of 1 - C(n - c, j) / C(n, j)      c = completions with full reward
    maj@n   = fraction of problems whose majority answer has full reward (drpo_trainer.rewards.vote)

j runs over the powers of two below n, and n itself (n = 4: pass@1, pass@2, pass@4).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from drpo_trainer.rollout.base import SamplingSpec
from drpo_trainer.rollout.producer import sampling_seed

if TYPE_CHECKING:  # heavy at import time; annotations only
    from drpo_trainer.config import Config
    from drpo_trainer.io.data import Problem

EVAL_SEED_SALT = 7  # eval samples never share a seed with the training step of the same number
EvalCounts = dict[str, dict[str, float]]  # eval set -> named sums over this shard's problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021), eq. 1: the probability that at least one of k completions drawn without
    replacement from n, c of them correct, is correct; 1 - C(n - c, k) / C(n, k), computed on exact
    integers (one rounding, in the division)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The j of the reported pass@j: powers of two below n, and n."""
    return [2**i for i in range(n.bit_length()) if 2**i < n] + [n]


def eval_spec(cfg: Config, n: int, seed: int) -> SamplingSpec:
    """The eval's sampling distribution: eval.* keys where set, else the training run's (top_k always)."""
    e, r = cfg.eval, cfg.rollout
    return SamplingSpec(
        n=n,
        temperature=e.temperature or r.temperature,
        top_p=e.top_p if e.top_p is not None else r.top_p,
        top_k=r.top_k,
        max_new_tokens=e.max_new_tokens or r.max_new_tokens,
        seed=seed,
    )


def eval_problems(cfg: Config, problems: list[Problem], shard: int, shards: int) -> list[Problem]:
    """The problems of one eval set that process `shard` of `shards` evaluates."""
    return problems[: cfg.eval.max_problems or None][shard::shards]


def empty_counts(n: int, *, vote: bool) -> dict[str, float]:
    """The sums of a shard with no problems: the same keys on every shard, so they add up."""
    counts = {"correct": 0.0, "attempts": 0.0, "problems": 0.0, **{f"pass@{j}": 0.0 for j in pass_ks(n)}}
    if vote:
        counts.update({f"maj@{n}": 0.0, "vote_failures": 0.0})
    return counts


def eval_counts(cfg: Config, engine, scorer, eval_sets, step: int, shard: int, shards: int, samples=None) -> EvalCounts:
    """Sums per eval set over this shard's problems (see the module doc); `samples` logs completions.
    The sampling seed depends on (seed, step, shard) only, as the training batches' does."""
    out = {}
    for name, problems in eval_sets.items():
        n = cfg.eval.samples_per_prompt_of(name)
        vote = scorer.extraction is not None  # a reward that reads a final answer; maj@n votes on those
        counts = empty_counts(n, vote=vote)
        mine = eval_problems(cfg, problems, shard, shards)
        if mine:
            spec = eval_spec(cfg, n, sampling_seed(cfg.trainer.seed, step, shard, salt=EVAL_SEED_SALT))
            comps = engine.generate([p.prompt_ids for p in mine], spec)
            scores, _ = scorer.score([c.text for c in comps], [mine[c.prompt_index].answer for c in comps])
            counts.update(correct=float(sum(scores)), attempts=float(len(mine) * n), problems=float(len(mine)))
            full = [sum(s >= 1.0 for s in scores[i * n : (i + 1) * n]) for i in range(len(mine))]
            for j in pass_ks(n):
                counts[f"pass@{j}"] = sum(pass_at_k(n, c, j) for c in full)
            if vote:
                counts.update(_vote_counts([c.text for c in comps], scores, n, scorer))
            if samples is not None:
                samples.eval(step, name, mine, comps, scores)
        out[name] = counts
    return out


def _vote_counts(texts: list[str], scores: list[float], n: int, scorer) -> dict[str, float]:
    """maj@n over problems of n completions each: correct votes, and comparisons that failed."""
    from drpo_trainer.rewards.extract import extract_final_answer
    from drpo_trainer.rewards.vote import pool_judge, vote_buckets, winner

    answers = [extract_final_answer(t, scorer.extraction) for t in texts]
    judge, failures = pool_judge(scorer)
    buckets = vote_buckets([answers[i : i + n] for i in range(0, len(answers), n)], judge)
    won = [winner(b) for b in buckets]
    correct = sum(w is not None and scores[p * n + w] >= 1.0 for p, w in enumerate(won))
    return {f"maj@{n}": float(correct), "vote_failures": float(failures[0])}


def combine_counts(shards: list[EvalCounts]) -> EvalCounts:
    """The sums of several shards (rollout processes), added key by key in shard order."""
    total: EvalCounts = {}
    for counts in shards:
        for name, sums in counts.items():
            into = total.setdefault(name, dict.fromkeys(sums, 0.0))
            for key, value in sums.items():
                into[key] += value
    return total


def flat_counts(counts: EvalCounts) -> tuple[list[tuple[str, str]], list[float]]:
    """(keys, values) in a fixed order, for an all-reduce of every sum at once."""
    keys = [(name, key) for name in sorted(counts) for key in sorted(counts[name])]
    return keys, [counts[name][key] for name, key in keys]


def eval_metrics(cfg: Config, counts: EvalCounts) -> dict[str, float]:
    """avg@n, pass@j and maj@n per eval set from the sums over every shard."""
    metrics = {}
    for name, c in counts.items():
        n = cfg.eval.samples_per_prompt_of(name)
        problems = max(c["problems"], 1.0)
        metrics[f"eval/{name}/avg@{n}"] = c["correct"] / max(c["attempts"], 1)
        metrics.update({f"eval/{name}/pass@{j}": c[f"pass@{j}"] / problems for j in pass_ks(n)})
        if f"maj@{n}" in c:
            metrics[f"eval/{name}/maj@{n}"] = c[f"maj@{n}"] / problems
            metrics[f"eval/{name}/vote_failures"] = c["vote_failures"]
    return metrics


def per_set(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """eval/<set>/<metric> keys as {set: {metric: value}} (the eval command's JSON and table)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, metric = key.removeprefix("eval/").rsplit("/", 1)
        out.setdefault(name, {})[metric] = value
    return out
