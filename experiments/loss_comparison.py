"""The DRPO paper's loss comparison in miniature: every policy loss on the tiny CPU job, several
seeds, three settings, one figure and one table.

    python experiments/loss_comparison.py --quick    # 2 losses, 1 seed, 1 setting, 4 steps
    python experiments/loss_comparison.py            # 6 losses x 3 settings x 3 seeds x 30 steps (docs/experiments.md)

Runs: losses (drpo, dppo_tv, dppo_kl, spo, grpo, pg) x settings x seeds, each one `drpo-train`
subprocess on configs/tiny_cpu.yaml (`builtin:tiny-math`) with its own output directory
RESULTS/runs/<setting>/<loss>/seed<k>. Settings:

  none    the default job: fp32 engine and learner, 2 mini-batches per step (no mismatch)
  fp8     rollout.quantization=fp8: the engine's weights rounded to float8_e4m3fn with vLLM's
          per-tensor scales, the learner in fp32 (FP8-style train/inference mismatch)
  stale   trainer.minibatches_per_step=8: mini-batch k of 8 is k-1 updates stale (heavy staleness)

A seed sets trainer.seed (sampling) and data.seed (prompt order); the warm-started model is the
same for every run. Finished runs (RESULTS/runs/.../result.json) are skipped, so an interrupted
sweep continues where it stopped; an unfinished run starts again from scratch.

Outputs: RESULTS/loss_comparison.png (per setting, eval avg@k against step and the 10-step mean
training reward, mean over seeds with the min-max band) and RESULTS/loss_comparison.md, a table
per (setting, loss) of final eval, best eval, steps to reach the target eval, and collapses.

Collapse rule: with m_t the mean training reward (reward/mean) over the w = min(10, steps) steps
ending at step t, a run collapsed when its final m (the last w steps) is below 20% of its peak
max_t m_t > 0: the reward fell to near zero and stayed there to the end, not a passing dip.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("drpo", "dppo_tv", "dppo_kl", "spo", "grpo", "pg")
SETTINGS = {
    "none": ("no mismatch", []),
    "fp8": ("FP8-style rollout", ["rollout.quantization=fp8"]),
    "stale": ("heavy staleness (8 mini-batches)", ["trainer.minibatches_per_step=8"]),
}
QUICK = {
    "losses": ["drpo", "grpo"],
    "seeds": [0],
    "settings": ["fp8"],
    "steps": 4,
    "eval_every": 2,
    "eval_problems": 32,
}
COLLAPSE_FRACTION = 0.2
REWARD_WINDOW = 10


@dataclass(frozen=True)
class RunSpec:
    setting: str
    loss: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.loss}/seed{self.seed}"

    def directory(self, results: Path) -> Path:
        return results / "runs" / self.setting / self.loss / f"seed{self.seed}"


def run_overrides(spec: RunSpec, args: argparse.Namespace, out: Path) -> list[str]:
    """The `drpo-train` overrides of one run (also stored with its result, to refuse mixing sweeps)."""
    return [
        f"output_dir={out}",
        f"algorithm.loss={spec.loss}",
        f"trainer.seed={spec.seed}",
        f"data.seed={spec.seed}",
        f"trainer.max_steps={args.steps}",
        f"eval.every_steps={args.eval_every}",
        f"eval.max_problems={args.eval_problems}",
        "checkpoint.every_steps=0",
        "checkpoint.export_final=false",
        "reward.num_workers=1",
        "tracking.progress_bar=false",
        "tracking.wandb.mode=disabled",
        *SETTINGS[spec.setting][1],
    ]


# ---------------------------------------------------------------------------------------------
# One run's numbers, from its metrics.jsonl


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, eval avg@k) of every row that has an eval score (the first eval set's)."""
    steps, values = [], []
    for r in rows:
        key = next((k for k in sorted(r) if k.startswith("eval/") and "/avg@" in k), None)
        if key is not None:
            steps.append(int(r["step"]))
            values.append(float(r[key]))
    return steps, values


def reward_window_means(rewards: list[float], window: int) -> list[float]:
    """m_t = mean of rewards[t-w+1 .. t], for t = w-1 .. end (only full windows)."""
    return [sum(rewards[t - window + 1 : t + 1]) / window for t in range(window - 1, len(rewards))]


def collapsed(rewards: list[float], window: Optional[int] = None) -> bool:
    """The collapse rule of the module docstring."""
    means = reward_window_means(rewards, window or min(REWARD_WINDOW, len(rewards)))
    return bool(means) and max(means) > 0 and means[-1] < COLLAPSE_FRACTION * max(means)


def summarize(rows: list[dict], target: float) -> dict:
    steps, evals = eval_curve(rows)
    rewards = [float(r["reward/mean"]) for r in rows if "reward/mean" in r]
    reached = next((s for s, v in zip(steps, evals) if v >= target), None)
    w = min(REWARD_WINDOW, len(rewards))
    return {
        "eval_steps": steps,
        "eval": evals,
        "rewards": rewards,
        "final_eval": evals[-1] if evals else None,
        "best_eval": max(evals) if evals else None,
        "steps_to_target": reached,
        "collapsed": collapsed(rewards),
        "final_reward_mean": sum(rewards[-w:]) / w if w else None,
    }


# ---------------------------------------------------------------------------------------------
# Running


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


def finished_result(spec: RunSpec, args: argparse.Namespace) -> Optional[dict]:
    """The stored result of a finished run, or None; refuses a result made with other settings."""
    out = spec.directory(args.results_dir)
    path = out / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result["overrides"] != run_overrides(spec, args, out):
        raise SystemExit(
            f"loss_comparison: {path} was made with other settings ({' '.join(result['overrides'])}); "
            "use another --results-dir, or delete that directory to rerun it"
        )
    return result


def run_one(spec: RunSpec, args: argparse.Namespace) -> dict:
    """Train one run in a `drpo-train` subprocess and store its result.json; raises on failure."""
    out = spec.directory(args.results_dir)
    if out.exists():  # an unfinished run: start it again
        shutil.rmtree(out)
    out.mkdir(parents=True)
    overrides = run_overrides(spec, args, out)
    cmd = [sys.executable, "-m", "drpo_trainer.cli", "--config", args.config, *overrides]
    start = time.perf_counter()
    with open(out / "run.log", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, env=_env(args.threads), stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{spec.name} failed with exit code {code}; see {out / 'run.log'}")
    if not args.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    result = {"overrides": overrides, "seconds": seconds, **summarize(read_metrics(out / "metrics.jsonl"), args.target)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_sweep(specs: list[RunSpec], args: argparse.Namespace) -> dict[RunSpec, dict]:
    """Every run, `args.jobs` at a time; finished ones are read back, not rerun."""
    from tqdm.auto import tqdm

    results: dict[RunSpec, dict] = {}
    todo = []
    for spec in specs:
        found = finished_result(spec, args)
        if found is None:
            todo.append(spec)
        else:
            results[spec] = found
    bar = tqdm(total=len(specs), initial=len(results), desc="loss comparison", unit="run")
    if results:
        bar.write(f"loss_comparison: {len(results)} finished run(s) skipped, {len(todo)} to run")
    running: dict = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        queue = list(todo)
        while queue or running:
            while queue and len(running) < args.jobs:
                spec = queue.pop(0)
                running[pool.submit(run_one, spec, args)] = spec
            bar.set_postfix_str("running " + ", ".join(s.name for s in running.values()))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                spec = running.pop(future)
                results[spec] = future.result()  # a failed run stops the sweep with its log's path
                bar.update(1)
    bar.close()
    return results


# ---------------------------------------------------------------------------------------------
# Table and figure


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def table_rows(results: dict[RunSpec, dict], args: argparse.Namespace) -> list[dict]:
    """One row per (setting, loss), over its seeds."""
    rows = []
    for setting in args.settings:
        for loss in args.losses:
            runs = [results[RunSpec(setting, loss, s)] for s in args.seeds]
            finals = [r["final_eval"] for r in runs]
            rows.append(
                {
                    "setting": setting,
                    "loss": loss,
                    "final": sum(finals) / len(finals),
                    "final_min": min(finals),
                    "final_max": max(finals),
                    "best": sum(r["best_eval"] for r in runs) / len(runs),
                    "steps_to_target": [r["steps_to_target"] for r in runs],
                    "collapsed": sum(r["collapsed"] for r in runs),
                    "reward": sum(r["final_reward_mean"] for r in runs) / len(runs),
                    "seeds": len(runs),
                }
            )
    return rows


def write_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| setting | loss | final eval, mean [min, max] | best eval (mean of seeds) | "
        f"first step with eval >= {args.target} (per seed) | collapsed | final reward (10-step mean) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    body = "".join(
        f"| {SETTINGS[r['setting']][0]} | {r['loss']} | {_fmt(r['final'])} [{_fmt(r['final_min'])}, "
        f"{_fmt(r['final_max'])}] | {_fmt(r['best'])} | "
        f"{', '.join('-' if s is None else str(s) for s in r['steps_to_target'])} | "
        f"{r['collapsed']}/{r['seeds']} | {_fmt(r['reward'])} |\n"
        for r in rows
    )
    text = head + body
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    return text


def plot(results: dict[RunSpec, dict], args: argparse.Namespace):
    """Per setting (columns): eval avg@k and the 10-step mean training reward against step,
    mean over seeds with the min-max band, one colour per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(args.settings)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 7), sharey="row", squeeze=False)
    for col, setting in enumerate(args.settings):
        for i, loss in enumerate(args.losses):
            runs = [results[RunSpec(setting, loss, s)] for s in args.seeds]
            colour = f"C{i}"
            for row, (xs, curves) in enumerate(
                [
                    (runs[0]["eval_steps"], [r["eval"] for r in runs]),
                    _reward_curves(runs),
                ]
            ):
                ax = axes[row][col]
                mean = [sum(v) / len(v) for v in zip(*curves)]
                ax.plot(xs, mean, color=colour, label=loss, marker="o" if row == 0 else None, markersize=3)
                if len(curves) > 1:
                    ax.fill_between(
                        xs, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)], color=colour, alpha=0.15
                    )
        axes[0][col].set_title(SETTINGS[setting][0])
        axes[1][col].set_xlabel("step")
    axes[0][0].set_ylabel(f"eval avg@4 (mean, min-max over {len(args.seeds)} seed(s))")
    axes[1][0].set_ylabel(f"training reward ({REWARD_WINDOW}-step mean)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"tiny-math, {args.steps} steps per run: losses under mismatch and staleness")
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    return fig


def _reward_curves(runs: list[dict]) -> tuple[list[int], list[list[float]]]:
    w = min(REWARD_WINDOW, len(runs[0]["rewards"]))
    curves = [reward_window_means(r["rewards"], w) for r in runs]
    return list(range(w, w + len(curves[0]))), curves


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    p.add_argument("--results-dir", type=Path, default=None, help="default runs/loss_comparison(_quick)")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30, help="trainer.max_steps of every run")
    p.add_argument("--eval-every", type=int, default=5, help="eval.every_steps")
    p.add_argument("--eval-problems", type=int, default=128, help="eval.max_problems")
    p.add_argument("--target", type=float, default=0.2, help="eval avg@4 whose first step is reported")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run. On 2 shared cores, 2 runs of 1 thread each finished 2 runs in 1.5 min;\n"
        "one run at a time with 2 threads took 7.4 min per run (threads contend with other processes)",
    )
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--figure", type=Path, default=None, help="default RESULTS/loss_comparison.png")
    p.add_argument("--table", type=Path, default=None, help="default RESULTS/loss_comparison.md")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    args = p.parse_args(argv)
    explicit = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
    if args.quick:  # quick values, unless given explicitly
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    if args.results_dir is None:
        args.results_dir = REPO / "runs" / ("loss_comparison_quick" if args.quick else "loss_comparison")
    args.results_dir = args.results_dir.resolve()
    args.figure = args.figure or args.results_dir / "loss_comparison.png"
    args.table = args.table or args.results_dir / "loss_comparison.md"
    for key in ("steps", "eval_every", "eval_problems", "jobs", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def sweep(args: argparse.Namespace):
    """Run (or read back) every run; write the table and the figure. Returns (results, table text, figure)."""
    specs = [RunSpec(st, loss, seed) for st in args.settings for loss in args.losses for seed in args.seeds]
    results = run_sweep(specs, args)
    return results, write_table(table_rows(results, args), args), plot(results, args)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    results, table, _ = sweep(args)
    print(table)
    print(
        f"loss_comparison: {len(results)} runs ({sum(r['seconds'] for r in results.values()) / 60:.1f} min of run "
        f"time), this invocation {(time.perf_counter() - start) / 60:.1f} min; table {args.table}, figure {args.figure}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
