"""Padded fraction of learner micro-batch tokens: fixed-size padded micro-batches vs the learner's packing.

Run:  python benchmarks/bench_padding.py [--seed 0] [--world-size 8] [--budget 16384] [--row-tokens 0]

Setting (the paper's Qwen3-4B recipe, one mini-batch): 32 prompts x 8 samples = 256
sequences over 8 ranks; prompt lengths uniform in [50, 500]; response lengths lognormal
(median ~1,100 tokens, sigma 0.9) capped at 8,192 (truncated responses), the long tail
that real math rollouts show. Sequence = prompt + response. Rank r holds the r-th contiguous
slice of the rollouts (whole prompt groups), as in training.

- padded baseline: each rank runs micro-batches of ``--padded-micro-batch`` samples of its
  slice, right-padded to the longest sequence of the micro-batch (the usual (B, T) learner batch);
- packed: what ``Learner._micro_batches`` and ``Learner._forward`` compute. Each rank plans its
  own slice (``plan_micro_batches``: token budget, first-fit decreasing); ranks with fewer
  micro-batches than the busiest run padding micro-batches (one of their own samples again, at
  loss weight 0) so that ZeRO-3 collectives match; each micro-batch is packed by
  ``pack_sequences``: with sdpa or eager attention in rows of at most
  max(``--row-tokens``, its longest sequence) tokens (``trainer.packed_row_tokens``; 0 = as wide
  as the longest sequence) padded to the widest row; with flash_attention_2 in one row (no row
  padding). Both are printed.

Padded fraction = tokens the forward passes compute beyond the real ones / all computed tokens,
split into row padding and padding micro-batches. Prints both fractions, their ratio, and the
target (packed <= 5%). Pure Python with small tensors, a second or so.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ratio_line  # noqa: E402
from drpo_trainer.learner.packing import pack_sequences, plan_micro_batches  # noqa: E402

TARGET_FRACTION = 0.05


def skewed_lengths(rng: random.Random, prompts: int, samples_per_prompt: int) -> list[int]:
    lengths = []
    for _ in range(prompts):
        prompt = rng.randint(50, 500)
        for _ in range(samples_per_prompt):
            response = min(8192, max(1, int(rng.lognormvariate(7.0, 0.9))))  # e^7 ~ 1,100
            lengths.append(prompt + response)
    return lengths


def rank_slices(lengths: list[int], world_size: int) -> list[list[int]]:
    per = len(lengths) // world_size
    return [lengths[r * per : (r + 1) * per] for r in range(world_size)]


def padded_fraction_fixed(lengths: list[int], world_size: int, micro_batch: int) -> tuple[float, int]:
    computed = real = steps = 0
    for mine in rank_slices(lengths, world_size):
        for start in range(0, len(mine), micro_batch):
            mb = mine[start : start + micro_batch]
            computed += len(mb) * max(mb)
            real += sum(mb)
        steps = max(steps, -(-len(mine) // micro_batch))
    return (computed - real) / computed, steps


def computed_tokens(lengths: list[int], row_tokens: int | None) -> int:
    """Tokens of the packed rows one learner forward computes (real + row padding)."""
    return pack_sequences([[1] * n for n in lengths], row_tokens=row_tokens).num_tokens


def learner_padding(lengths: list[int], world_size: int, budget: int, row_tokens: int | None) -> dict[str, float]:
    slices = rank_slices(lengths, world_size)
    plans = [plan_micro_batches(mine, budget) for mine in slices]
    steps = max(len(plan) for plan in plans)
    real = row_pad = extra = 0
    loads = []
    for mine, plan in zip(slices, plans):
        load = 0
        for mb in plan:
            seqs = [mine[i] for i in mb]
            computed = computed_tokens(seqs, row_tokens)
            real += sum(seqs)
            row_pad += computed - sum(seqs)
            load += computed
        padding = (steps - len(plan)) * computed_tokens(mine[:1], row_tokens)  # the rank's first sample again
        extra += padding
        loads.append(load + padding)
    total = real + row_pad + extra
    return {
        "fraction": (row_pad + extra) / total,
        "row_padding": row_pad / total,
        "padding_micro_batches": extra / total,
        "steps": steps,
        "imbalance": max(loads) / (sum(loads) / len(loads)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--budget", type=int, default=16384, help="trainer.micro_batch_tokens_per_gpu")
    parser.add_argument(
        "--row-tokens",
        type=int,
        default=0,
        help="trainer.packed_row_tokens (sdpa/eager rows); 0 = as wide as the longest sequence",
    )
    parser.add_argument("--padded-micro-batch", type=int, default=4, help="samples per padded micro-batch")
    args = parser.parse_args()

    lengths = skewed_lengths(random.Random(args.seed), args.prompts, args.samples_per_prompt)
    fixed, fixed_steps = padded_fraction_fixed(lengths, args.world_size, args.padded_micro_batch)
    print(
        f"{len(lengths)} sequences, {sum(lengths)} tokens, length min/median/max = "
        f"{min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}, {args.world_size} ranks"
    )
    print(f"padded micro-batches of {args.padded_micro_batch}: padded fraction {fixed:.1%}, {fixed_steps} micro-steps")
    width = f"max({args.row_tokens}, longest)" if args.row_tokens else "the longest sequence"
    rows = {f"sdpa, rows of {width}": args.row_tokens, "one row (flash_attention_2)": None}
    results = {}
    for name, row_tokens in rows.items():
        r = results[name] = learner_padding(lengths, args.world_size, args.budget, row_tokens)
        print(
            f"packed, budget {args.budget}, {name}: padded fraction {r['fraction']:.2%} "
            f"(row padding {r['row_padding']:.2%}, padding micro-batches {r['padding_micro_batches']:.2%}), "
            f"{r['steps']} micro-steps, max/mean rank load {r['imbalance']:.3f}"
        )
    packed = next(iter(results.values()))["fraction"]  # the configured attention's path
    print(
        f"packed/padded = {packed / fixed:.4f}; "
        + ratio_line(packed, f"<= {TARGET_FRACTION} padded fraction of the learner's own micro-batches")
    )


if __name__ == "__main__":
    main()
