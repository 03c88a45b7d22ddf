"""Dynamic sampling (algorithm.dynamic_sampling, docs/algorithms.md) against the default job without it.

    python benchmarks/bench_dynamic_sampling.py [--steps 60] [--rounds 1] [--target 0.2] [--eval-problems N]

Runs `drpo-train --config configs/tiny_cpu.yaml` (the README's main job, one process) in fresh
processes under two settings:

    without    the default job (every sampled group is trained; zero-variance groups carry zero advantage)
    dynamic    algorithm.dynamic_sampling=true (default algorithm.max_sampling_rounds): each step samples
               more prompts until its 16 groups all have reward variance, or the round bound is reached

Reported per setting: the median `time/step` (generation of the extra rounds included), the mean
prompts sampled per step (`sampling/prompts_sampled`; 16 without), the mean sampling rounds and
informative groups missing per step, the wall time until eval avg@4 first reaches --target, counted as
the sum of `time/step` up to that step (evaluation and checkpoint time left out, as in
bench_zero_advantage.py), and the final eval. Ratio: dynamic / without, step time until the target
(target <= 1.0: the extra sampling pays for itself in wall time to a given accuracy).
`--eval-problems` caps eval.max_problems (the default job's 128) for a quick check of the script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"without": [], "dynamic": ["algorithm.dynamic_sampling=true"]}
PROMPTS_PER_STEP = 16  # configs/tiny_cpu.yaml


def summarize(rows: list[dict], target: float) -> dict:
    """Median step time, prompts and rounds per step, eval curve, step time summed until eval >= target."""
    from benchmarks.common import eval_curve, median

    steps = [r for r in rows if "time/step" in r]
    evals = eval_curve(rows)
    reached = next((s for s, v in sorted(evals.items()) if v >= target), None)

    def mean(key: str, default: float) -> float:
        return sum(r.get(key, default) for r in steps) / len(steps)

    return {
        "step_s": median([r["time/step"] for r in steps]),
        "prompts": mean("sampling/prompts_sampled", PROMPTS_PER_STEP),
        "rounds": mean("sampling/rounds", 1.0),
        "missing": mean("sampling/groups_missing", 0.0),
        "evals": evals,
        "reached_step": reached,
        "seconds_to_target": None if reached is None else sum(r["time/step"] for r in steps if r["step"] <= reached),
        "final_eval": evals[max(evals)] if evals else float("nan"),
    }


def _median_or_never(values: list[Optional[float]]) -> float | str:
    from benchmarks.common import median

    reached = [v for v in values if v is not None]
    return median(reached) if reached else "never"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="rollout steps per run (the default job: 60)")
    parser.add_argument("--target", type=float, default=0.2, help="eval avg@4 whose first crossing is timed")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, alternating")
    parser.add_argument("--eval-problems", type=int, default=None, help="eval.max_problems (default: the job's)")
    args = parser.parse_args()
    from benchmarks.common import default_job_runs, median, print_table, ratio_line

    extra = [f"eval.max_problems={args.eval_problems}"] if args.eval_problems else []
    settings = {name: overrides + extra for name, overrides in SETTINGS.items()}
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for name, rows, _ in default_job_runs(settings, steps=args.steps, rounds=args.rounds):
        results[name].append(summarize(rows, args.target))
    table = [
        [
            name,
            median([x["step_s"] for x in runs]),
            median([x["prompts"] for x in runs]),
            median([x["rounds"] for x in runs]),
            median([x["missing"] for x in runs]),
            runs[0]["reached_step"] if runs[0]["reached_step"] is not None else "never",
            _median_or_never([x["seconds_to_target"] for x in runs]),
            median([x["final_eval"] for x in runs]),
        ]
        for name, runs in results.items()
    ]
    print_table(
        f"default job, {args.steps} steps, {args.rounds} round(s)",
        [
            "setting",
            "median step s",
            "prompts/step",
            "rounds/step",
            "groups missing/step",
            f"first step eval >= {args.target}",
            "step time until then s",
            "final eval avg@4",
        ],
        table,
    )
    for name, runs in results.items():
        print(f"{name} eval avg@4: " + " ".join(f"{s}:{v:.3f}" for s, v in sorted(runs[0]["evals"].items())))
    without, dynamic = table[0][6], table[1][6]
    if isinstance(without, str) or isinstance(dynamic, str):
        print(f"ratio = n/a (eval avg@4 never reached {args.target}: without {without}, dynamic {dynamic})")
    else:
        print(ratio_line(dynamic / without, f"<= 1.0 (dynamic / without, step time until eval >= {args.target})"))


if __name__ == "__main__":
    main()
