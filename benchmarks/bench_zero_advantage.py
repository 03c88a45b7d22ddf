"""What the learner's exact shortcuts buy on the default job (configs/tiny_cpu.yaml), end to end.

    python benchmarks/bench_zero_advantage.py [--steps 60] [--rounds 1]

Runs `drpo-train --config configs/tiny_cpu.yaml` (60 steps, the README's main command) under
three settings, one after the other in fresh processes:

    full work     trainer.skip_zero_advantage=false, reuse_first_minibatch_logprobs=false,
                  packed_row_tokens=512 (the learner before these levers)
    no skipping   only trainer.skip_zero_advantage=false (every other lever on)
    default       all levers on

The shortcuts are exact, so all three learn the same curve (eval avg@4 at every eval step is
printed: it must agree up to float reassociation); only time differs. Reported per setting: the
median `time/step`, the mean fraction of samples skipped, and the wall time until eval avg@4 first
reaches --target (0.2), counted as the sum of `time/step` up to that step (evaluation and
checkpoint time, equal in all three, are left out), and the median seconds of each phase of a
step (generate, score, recompute, update, sync). Ratio: default / no skipping (skipping's gain).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "full work": [
        "trainer.skip_zero_advantage=false",
        "trainer.reuse_first_minibatch_logprobs=false",
        "trainer.packed_row_tokens=512",
    ],
    "no skipping": ["trainer.skip_zero_advantage=false"],
    "default": [],
}


def summarize(rows: list[dict], target: float) -> dict:
    """Median step time, mean skipped fraction, eval curve, and step time summed until eval >= target."""
    from benchmarks.common import eval_curve, median

    steps = [r for r in rows if "time/step" in r]
    evals = eval_curve(rows)
    reached = next((s for s, v in sorted(evals.items()) if v >= target), None)
    until = None if reached is None else sum(r["time/step"] for r in steps if r["step"] <= reached)
    phases = ("generate", "score", "recompute", "update", "sync")
    return {
        "phases": {p: median([r.get(f"time/{p}", 0.0) for r in steps]) for p in phases},
        "step_s": median([r["time/step"] for r in steps]),
        "skipped": sum(r.get("perf/skipped_sample_fraction", 0.0) for r in steps) / len(steps),
        "evals": evals,
        "reached_step": reached,
        "seconds_to_target": until,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="rollout steps per run (the default job: 60)")
    parser.add_argument("--target", type=float, default=0.2, help="eval avg@4 whose first crossing is timed")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, alternating")
    args = parser.parse_args()
    from benchmarks.common import default_job_runs, median, print_table, ratio_line

    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for name, rows, _ in default_job_runs(SETTINGS, steps=args.steps, rounds=args.rounds):
        results[name].append(summarize(rows, args.target))
    rows = []
    for name, runs in results.items():
        reached = [x["seconds_to_target"] for x in runs if x["seconds_to_target"] is not None]
        rows.append(
            [
                name,
                median([x["step_s"] for x in runs]),
                sum(x["skipped"] for x in runs) / len(runs),
                runs[0]["reached_step"] if runs[0]["reached_step"] is not None else "never",
                median(reached) if reached else "never",
            ]
        )
    print_table(
        f"default job, {args.steps} steps, {args.rounds} round(s)",
        ["setting", "median step s", "skipped fraction", f"first step eval >= {args.target}", "step time until then s"],
        rows,
    )
    phases = list(results["default"][0]["phases"])
    print_table(
        "where a step's time goes (median seconds per phase over the run's steps)",
        ["setting", *phases],
        [[name, *(median([x["phases"][p] for x in runs]) for p in phases)] for name, runs in results.items()],
    )
    for name, runs in results.items():  # the curves must agree: the shortcuts are exact
        print(f"{name} eval: " + " ".join(f"{s}:{v:.3f}" for s, v in sorted(runs[0]["evals"].items())))
    ratio = rows[2][1] / rows[1][1]
    print(ratio_line(ratio, "<= 1.0 (default / no skipping, median step time)"))


if __name__ == "__main__":
    main()
