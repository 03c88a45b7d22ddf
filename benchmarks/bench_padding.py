"""Padded fraction of learner micro-batch tokens: fixed-size padded micro-batches vs packing.

Run:  python benchmarks/bench_padding.py [--seed 0] [--world-size 8] [--budget 16384]

Setting (the paper's Qwen3-4B recipe, one mini-batch): 32 prompts x 8 samples = 256
sequences over 8 ranks; prompt lengths uniform in [50, 500]; response lengths lognormal
(median ~1,100 tokens, sigma 0.9) capped at 8,192 (truncated responses), the long tail
that real math rollouts show. Sequence = prompt + response.

- padded baseline: each rank takes a contiguous slice of the rollout order (32 samples)
  and runs micro-batches of ``--padded-micro-batch`` samples, right-padded to the longest
  sequence of the micro-batch (the usual (B, T) learner batch);
- packed: ``plan_micro_batches`` (token budget per micro-batch, balanced ranks, equal
  micro-step counts) with ``pack_sequences`` rows: no pad token; a rank's empty padding
  micro-batch computes one dummy token, counted as padding.

Padded fraction = pad (and dummy) tokens / all tokens the forward passes compute. Prints
both fractions, their ratio, and the target (packed <= 5%). Pure Python, a second or so.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from drpo_trainer.packing import plan_micro_batches  # noqa: E402

TARGET_FRACTION = 0.05


def skewed_lengths(rng: random.Random, prompts: int, samples_per_prompt: int) -> list[int]:
    lengths = []
    for _ in range(prompts):
        prompt = rng.randint(50, 500)
        for _ in range(samples_per_prompt):
            response = min(8192, max(1, int(rng.lognormvariate(7.0, 0.9))))  # e^7 ~ 1,100
            lengths.append(prompt + response)
    return lengths


def padded_fraction_fixed(lengths: list[int], world_size: int, micro_batch: int) -> tuple[float, int]:
    per_rank = -(-len(lengths) // world_size)
    computed = real = 0
    steps = 0
    for rank in range(world_size):
        mine = lengths[rank * per_rank : (rank + 1) * per_rank]
        for start in range(0, len(mine), micro_batch):
            mb = mine[start : start + micro_batch]
            computed += len(mb) * max(mb)
            real += sum(mb)
        steps = max(steps, -(-len(mine) // micro_batch))
    return (computed - real) / computed, steps


def padded_fraction_packed(lengths: list[int], world_size: int, budget: int) -> tuple[float, int, float, int]:
    plan = plan_micro_batches(lengths, budget, world_size)
    real = sum(lengths)
    dummies = sum(1 for micro_batches in plan for mb in micro_batches if not mb)
    loads = [sum(lengths[i] for mb in micro_batches for i in mb) for micro_batches in plan]
    imbalance = max(loads) / (sum(loads) / len(loads))
    return dummies / (real + dummies), len(plan[0]), imbalance, dummies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--budget", type=int, default=16384, help="micro_batch_tokens_per_gpu")
    parser.add_argument("--padded-micro-batch", type=int, default=4, help="samples per padded micro-batch")
    args = parser.parse_args()

    lengths = skewed_lengths(random.Random(args.seed), args.prompts, args.samples_per_prompt)
    fixed, fixed_steps = padded_fraction_fixed(lengths, args.world_size, args.padded_micro_batch)
    packed, packed_steps, imbalance, dummies = padded_fraction_packed(lengths, args.world_size, args.budget)
    print(
        f"{len(lengths)} sequences, {sum(lengths)} tokens, length min/median/max = "
        f"{min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}, {args.world_size} ranks"
    )
    print(f"padded micro-batches of {args.padded_micro_batch}: padded fraction {fixed:.1%}, {fixed_steps} micro-steps")
    print(
        f"packed, budget {args.budget} tokens: padded fraction {packed:.2%} ({dummies} dummy tokens), "
        f"{packed_steps} micro-steps, "
        f"max/mean rank load {imbalance:.3f}"
    )
    ratio = packed / fixed
    verdict = "meets" if packed <= TARGET_FRACTION else "MISSES"
    print(f"ratio packed/padded = {ratio:.4f}; target: packed padded fraction <= 5% -> {verdict}")


if __name__ == "__main__":
    main()
