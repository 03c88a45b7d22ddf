"""Asynchronous off-policy training against the synchronous loop on the default job, same two processes.

    python benchmarks/bench_async.py [--steps 60] [--rounds 1]

Runs `drpo-train --config configs/tiny_cpu.yaml` (the README's main job) twice in fresh processes,
both with distributed.nproc_per_node=2 on this machine:

    synchronous    both processes train (ZeRO-3 over 2 ranks) and each samples its half of every
                   step with its own engine, then waits for the update
    async k=1      distributed.rollout_processes=1: one learner process trains while one rollout
                   process samples the next step with the previous weights
                   (trainer.max_off_policy_steps=1, algorithm.mismatch_correction=tis, docs/async.md)

Reported per setting: the wall time of the whole `drpo-train` command (start-up and evaluations
included), the sum of `time/step` over the steps, the median step, eval avg@4 at every eval and its
gain from step 0 to the last step, and for the asynchronous run the mean version lag, learner and
rollout idle fractions and queue depth. Ratios: async / synchronous wall time (target <= 1) and
async / synchronous eval gain (target >= 0.7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "synchronous": ["distributed.nproc_per_node=2"],
    "async k=1": [
        "distributed.nproc_per_node=2",
        "distributed.rollout_processes=1",
        "trainer.max_off_policy_steps=1",
        "algorithm.mismatch_correction=tis",
    ],
}


def summarize(rows: list[dict], wall: float) -> dict:
    from benchmarks.common import eval_curve, median

    steps = [r for r in rows if "time/step" in r]
    evals = eval_curve(rows)
    first, last = min(evals), max(evals)

    def mean(key: str) -> float:
        values = [r[key] for r in steps if key in r]
        return sum(values) / len(values) if values else float("nan")

    return {
        "wall_s": wall,
        "steps_s": sum(r["time/step"] for r in steps),
        "step_s": median([r["time/step"] for r in steps]),
        "evals": evals,
        "gain": evals[last] - evals[first],
        "lag": mean("async/version_lag_mean"),
        "learner_idle": mean("async/learner_idle_fraction"),
        "rollout_idle": mean("async/rollout_idle_fraction"),
        "queue": mean("async/queue_depth"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="rollout steps per run (the default job: 60)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, alternating")
    args = parser.parse_args()
    from benchmarks.common import default_job_runs, median, print_table, ratio_line

    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for name, rows, wall in default_job_runs(SETTINGS, steps=args.steps, rounds=args.rounds):
        results[name].append(summarize(rows, wall))
    rows = [
        [
            name,
            median([x["wall_s"] for x in runs]),
            median([x["steps_s"] for x in runs]),
            median([x["step_s"] for x in runs]),
            median([x["gain"] for x in runs]),
            median([x["lag"] for x in runs]),
            median([x["learner_idle"] for x in runs]),
            median([x["rollout_idle"] for x in runs]),
            median([x["queue"] for x in runs]),
        ]
        for name, runs in results.items()
    ]
    print_table(
        f"default job, {args.steps} steps, 2 processes, {args.rounds} round(s)",
        [
            "setting",
            "wall s",
            "sum time/step s",
            "median step s",
            "eval gain",
            "version lag",
            "learner idle",
            "rollout idle",
            "queue depth",
        ],
        rows,
    )
    for name, runs in results.items():
        print(f"{name} eval avg@4: " + " ".join(f"{s}:{v:.3f}" for s, v in sorted(runs[0]["evals"].items())))
    sync, fast = rows[0], rows[1]
    print(ratio_line(fast[1] / sync[1], "<= 1.0 (async / synchronous wall time of the whole run)"))
    print(ratio_line(fast[4] / sync[4], ">= 0.7 (async / synchronous eval avg@4 gain, step 0 -> last step)"))


if __name__ == "__main__":
    main()
