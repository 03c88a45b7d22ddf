"""Verification throughput: the RewardScorer worker pool with 1 and 2 workers vs plain serial math-verify, same run.

    python benchmarks/bench_reward.py [--samples 800] [--group 8]

Prints verifications per second of:
  plain math-verify   ``verify(parse(gold), parse(completion))`` serially in this process
                      (the baseline: no worker, no wall-clock limit, no last-box rule)
  math_reward         this project's extraction + math-verify, serially in this process
  pool 1 / 2          the killable worker pool with 1 and 2 workers (started and warm before timing)
and each one's ratio to the baseline. Every method gets its own freshly generated samples of the
same distribution, so no method profits from math-verify's parse caches warmed by another.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from drpo_trainer.rewards import RewardScorer, math_reward  # noqa: E402

FILLER = "We expand the expression and collect the terms carefully, checking each step. "


def make_samples(n: int, group: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` completions of ~1,000 characters in groups of `group` sharing a gold answer; ~half correct."""
    rng = random.Random(seed)
    completions, answers = [], []
    while len(completions) < n:
        num, den = rng.randint(1, 999), rng.randint(2, 97)
        gold = rng.choice([str(num), f"\\frac{{{num}}}{{{den}}}", f"{num}/{den}", f"\\sqrt{{{num}}}"])
        for _ in range(group):
            kind = rng.random()
            if kind < 0.5:
                final = gold  # correct
            elif kind < 0.9:
                final = str(rng.randint(1, 10_000))  # wrong number
            else:
                final = None  # no box
            draft = f"\\boxed{{{rng.randint(1, 99)}}} is a first guess. "  # an earlier box the last one overrides
            body = draft + FILLER * 12
            completions.append(body + (f"So the answer is $\\boxed{{{final}}}$." if final else "I give up."))
            answers.append(gold)
    return completions[:n], answers[:n]


def time_serial(fn, completions: list[str], answers: list[str]) -> float:
    start = time.perf_counter()
    for c, a in zip(completions, answers):
        fn(c, a)
    return len(completions) / (time.perf_counter() - start)


def plain_math_verify(completion: str, answer: str) -> float:
    from math_verify import parse, verify

    return float(verify(parse(answer), parse(completion)))


def time_pool(num_workers: int, completions: list[str], answers: list[str]) -> float:
    with RewardScorer("math", num_workers=num_workers, timeout_s=5.0) as scorer:
        scorer.score([r"\boxed{1}"] * num_workers * 2, ["1"] * num_workers * 2)  # start-up and warm-up, untimed
        start = time.perf_counter()
        scorer.score(completions, answers)
        return len(completions) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--group", type=int, default=8, help="completions per gold answer (samples_per_prompt)")
    args = parser.parse_args()
    n, g = args.samples, args.group
    plain_math_verify(r"\boxed{1}", "1")  # import and warm math-verify outside the timings
    math_reward(r"\boxed{1}", "1")

    rows = [
        ("plain math-verify (serial)", time_serial(plain_math_verify, *make_samples(n, g, seed=1))),
        ("math_reward (serial)", time_serial(math_reward, *make_samples(n, g, seed=2))),
        ("worker pool, 1 worker", time_pool(1, *make_samples(n, g, seed=3))),
        ("worker pool, 2 workers", time_pool(2, *make_samples(n, g, seed=4))),
    ]
    base = rows[0][1]
    print(f"{n} samples, groups of {g}, {os.cpu_count()} CPU cores")
    print(f"{'method':<28} {'verifications/s':>16} {'vs plain':>9}")
    for name, rate in rows:
        print(f"{name:<28} {rate:>16.0f} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
