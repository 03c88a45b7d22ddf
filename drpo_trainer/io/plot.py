"""`drpo-train plot`: one figure of one or more runs' `metrics.jsonl`, curves against step.

Pure steps, each usable alone:

    runs = [load_run(d) for d in run_dirs]      # rows by step; a cut last line is tolerated
    chosen, gaps = choose_panels(runs)          # panels some run has data for; who lacks what
    fig = draw(runs, chosen, smooth=5)          # a matplotlib Figure (no pyplot, no global state)
    make_report(run_dirs, "report.png")         # all of the above, saved, gaps said on stderr

Each run is one colour (its label: the run directory's name, or `labels`); within a panel the
metrics are told apart by line style. `smooth=N` is a trailing moving average over the last N
logged steps of the training metrics; eval points (`eval/*`) are drawn as logged, with markers.
The panels follow the metric names written by trainer.py, losses.py, learner.py and
advantages.py and async_rollouts.py: a loss's own trust-region metrics (`drpo/*`, `spo/*`, `dppo/*`, `grpo/*`) are
drawn for whichever runs emit them.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TextIO

METRICS_FILE = "metrics.jsonl"
WHAT_A_RUN_DIR_IS = (
    "a run directory is the output_dir of a `drpo-train` run: it holds config.yaml and metrics.jsonl "
    "(one JSON object per logged step)"
)


class PlotError(ValueError):
    """A run directory that cannot be plotted, or bad plot options; the message says why and what to pass."""


@dataclass(frozen=True)
class Panel:
    title: str
    patterns: tuple[str, ...]  # regular expressions matched against whole metric names, in drawing order
    ylabel: str = ""
    log_y: bool = False  # for quantities that span decades (a fp32 engine's k3 is ~1e-13, a bf16 one's ~1e-4)
    # of one process layout (asynchronous) or model kind (mixture of experts): not named as missing when no run has it
    layout_only: bool = False


PANELS: tuple[Panel, ...] = (
    Panel("reward", (r"reward/mean", r"reward/accuracy"), "fraction"),
    Panel("eval avg@k", (r"eval/.+/avg@\d+",), "accuracy"),
    Panel("response length", (r"response/length_mean", r"response/length_max"), "tokens"),
    Panel("truncated responses", (r"response/truncated_fraction",), "fraction"),
    Panel("entropy", (r"policy/entropy",), "nats/token"),
    Panel(
        "gradient weight (DRPO, SPO)", (r"(drpo|spo)/weight_mean", r"(drpo|spo)/weight_min", r"(drpo|spo)/weight_max")
    ),
    Panel(
        "trust-region fractions",
        (
            r"drpo/negative_weight_fraction",
            r"dppo/masked_fraction",
            r"dppo/truncated_fraction",
            r"grpo/clip_fraction",
            r"mismatch/mis_masked_fraction",
        ),
        "fraction of tokens",
    ),
    Panel("mismatch correction weight", (r"mismatch/tis_weight_mean",)),
    Panel("train-inference mismatch: k3 KL", (r"mismatch/k3_kl", r"parity/k3_kl"), "nats", log_y=True),
    Panel(
        "train-inference mismatch: |p_engine - p_learner|",
        (r"mismatch/abs_prob_diff_mean", r"mismatch/abs_prob_diff_max"),
        log_y=True,
    ),
    Panel("policy drift: k3 KL(mu || pi)", (r"policy/approx_kl_k3",), "nats", log_y=True),
    Panel("policy drift: |pi - mu|", (r"policy/abs_pi_minus_mu_mean", r"policy/abs_pi_minus_mu_max"), log_y=True),
    Panel("ratio pi / mu", (r"policy/ratio_min", r"policy/ratio_mean", r"policy/ratio_max")),
    Panel("grad norm", (r"optim/grad_norm",)),
    Panel("learning rate", (r"optim/lr",)),
    Panel(
        "policy version lag (asynchronous)",
        (r"async/version_lag_mean", r"async/version_lag_max", r"async/queue_depth"),
        "versions / batches",
        layout_only=True,
    ),
    Panel(
        "idle fraction (asynchronous)",
        (r"async/learner_idle_fraction", r"async/rollout_idle_fraction"),
        "fraction",
        layout_only=True,
    ),
    Panel(
        "MoE route agreement (engine vs learner top-k sets)",
        (r"moe/route_agreement", r"parity/route_agreement"),
        "fraction of (token, layer)",
        layout_only=True,
    ),
    Panel(
        "MoE mismatch k3 KL: without / with routing replay",
        (r"moe/k3_kl_without_replay", r"moe/k3_kl_with_replay"),
        "nats",
        log_y=True,
        layout_only=True,
    ),
    Panel(
        "MoE load balance (busiest expert's share / mean share)",
        (r"moe/load_balance/layer_\d+",),
        layout_only=True,
    ),
    Panel(
        "time per phase",
        (
            r"time/step",
            r"time/generate",
            r"time/score",
            r"time/recompute",
            r"time/update",
            r"time/sync",
            r"time/(?!elapsed$).+",
        ),
        "seconds",
    ),
)


@dataclass
class PlottedRun:
    label: str
    path: Path  # the metrics.jsonl file
    rows: dict[int, dict] = field(default_factory=dict)  # step -> metrics (rows of one step merged)

    @property
    def keys(self) -> set[str]:
        return {k for row in self.rows.values() for k in row}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, by step; null (a non-finite value) becomes NaN."""
        steps = sorted(s for s, row in self.rows.items() if key in row)
        return steps, [math.nan if self.rows[s][key] is None else float(self.rows[s][key]) for s in steps]


# ------------------------------------------------------------------------------------------------
def _metrics_file(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    if p.is_file() and p.suffix == ".jsonl":
        return p
    if not p.exists():
        raise PlotError(f"{p}: no such directory; {WHAT_A_RUN_DIR_IS}")
    if not p.is_dir():
        raise PlotError(f"{p} is not a directory; {WHAT_A_RUN_DIR_IS}")
    f = p / METRICS_FILE
    if not f.is_file():
        raise PlotError(f"{f} not found: {p} is not a run directory; {WHAT_A_RUN_DIR_IS}")
    return f


def load_run(run_dir: str | Path, label: Optional[str] = None, *, warn: Optional[TextIO] = None) -> PlottedRun:
    """Read `run_dir/metrics.jsonl` (or a .jsonl file given directly).

    A run that is still going may have written half of its last line: that line is left out
    silently. Any other undecodable line is left out with a warning naming it. Rows of the same
    step are merged (the step-0 eval row, or a step logged twice), the later value winning."""
    f = _metrics_file(run_dir)
    warn = warn or sys.stderr
    lines = f.read_text(encoding="utf-8", errors="replace").split("\n")
    run = PlottedRun(label or (f.parent.name if f.name == METRICS_FILE else f.stem), f)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            if i != last:
                print(f"drpo-train plot: {f}:{i + 1} is not a metrics row (JSON with a step); left out", file=warn)
            continue
        run.rows.setdefault(step, {}).update(row)
    if not run.rows:
        raise PlotError(f"{f} has no complete metrics row yet; {WHAT_A_RUN_DIR_IS}. Plot it after its first step")
    return run


def load_runs(
    run_dirs: Sequence[str | Path], labels: Optional[Sequence[str]] = None, *, warn: Optional[TextIO] = None
) -> list[PlottedRun]:
    """Every run, labelled by `labels` or by directory name (with its parent's name when two names clash)."""
    if not run_dirs:
        raise PlotError("no run directory given; pass at least one RUN_DIR")
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(
            f"{len(labels)} labels for {len(run_dirs)} run directories; pass one label per RUN_DIR, comma-separated"
        )
    runs = [load_run(d, labels[i] if labels else None, warn=warn) for i, d in enumerate(run_dirs)]
    if labels is None:
        names = [r.label for r in runs]
        for r in runs:
            if names.count(r.label) > 1:
                r.label = f"{r.path.parent.parent.name}/{r.label}"
    return runs


# ------------------------------------------------------------------------------------------------
def panel_keys(panel: Panel, keys: set[str]) -> list[str]:
    """The metric names a panel draws, in its patterns' order (each name once)."""
    out: list[str] = []
    for pattern in panel.patterns:
        out += sorted(k for k in keys if re.fullmatch(pattern, k) and k not in out)
    return out


def choose_panels(runs: Sequence[PlottedRun]) -> tuple[list[tuple[Panel, list[str]]], dict[str, list[str]]]:
    """(panels to draw with their metric names, {panel title: labels of the runs that lack it}).

    A panel is drawn when at least one run has one of its metrics; a run that lacks them all is
    simply not in that panel. A panel no run has is not drawn (its entry lists every run), except
    that the panels of the asynchronous layout are not named when no run has them."""
    all_keys = set().union(*(r.keys for r in runs))
    chosen, gaps = [], {}
    for panel in PANELS:
        lacking = [r.label for r in runs if not panel_keys(panel, r.keys)]
        if lacking and not (panel.layout_only and len(lacking) == len(runs)):
            gaps[panel.title] = lacking
        if len(lacking) < len(runs):
            chosen.append((panel, panel_keys(panel, all_keys)))
    return chosen, gaps


def describe_gaps(gaps: dict[str, list[str]], n_runs: int) -> str:
    """One line: which panels are missing, and for which runs."""
    parts = [
        f"{title} ({'all runs' if len(who) == n_runs and n_runs > 1 else ', '.join(who)})"
        for title, who in gaps.items()
    ]
    return "drpo-train plot: no data for: " + "; ".join(parts)


def moving_average(values: Sequence[float], n: int) -> list[float]:
    """Trailing mean over the last n values (fewer at the start), NaNs left out of each window."""
    if n <= 1:
        return list(values)
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - n + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


# ------------------------------------------------------------------------------------------------
_STYLES = (("-", None), ("--", None), (":", None), ("-.", None), ("-", "o"), ("-", "s"), ("-", "^"), ("-", "x"))
NCOLS = 4


def draw(runs: Sequence[PlottedRun], chosen: Sequence[tuple[Panel, list[str]]], *, smooth: int = 1):
    """The figure: one axes per chosen panel, titled with the panel's title; one line per
    (run, metric) the run has, with `line.get_label()` = the run's label and `line.get_gid()` =
    "<label>|<metric>". The runs' colours are explained once, above the panels; a panel with
    several metrics explains its line styles in its own legend."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(chosen)
    rows = max(1, math.ceil(n / NCOLS))
    cols = min(NCOLS, max(1, n))
    fig = Figure(figsize=(4.4 * cols, 3.1 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (panel, keys) in zip(axes, chosen):
        styles = {key: _STYLES[i % len(_STYLES)] for i, key in enumerate(keys)}
        positive = False
        for run, colour in zip(runs, colours):
            for key in keys:
                steps, values = run.series(key)
                if not steps:
                    continue
                is_eval = key.startswith("eval/")
                ys = values if is_eval else moving_average(values, smooth)
                positive |= any(v > 0 for v in ys)
                ls, marker = styles[key]
                ax.plot(
                    steps,
                    ys,
                    color=colour,
                    linestyle=ls,
                    marker="o" if is_eval else marker,
                    markersize=3,
                    markevery=1 if is_eval else max(1, len(steps) // 10),
                    linewidth=1.3,
                    label=run.label,
                    gid=f"{run.label}|{key}",
                )
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel.log_y and positive:
            ax.set_yscale("log")
        if len(keys) > 1:
            handles = [
                Line2D([], [], color="0.3", linestyle=styles[k][0], marker=styles[k][1], markersize=3) for k in keys
            ]
            ax.legend(handles, [_short(k, keys) for k in keys], fontsize=6, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=c, linewidth=2) for c in colours]
    fig.legend(handles, [r.label for r in runs], loc="outside upper center", ncols=min(len(runs), 6), fontsize=9)
    if smooth > 1:
        fig.supxlabel(f"training metrics: trailing mean over {smooth} logged steps; eval points as logged", fontsize=8)
    return fig


def _short(key: str, keys: Sequence[str]) -> str:
    """A metric's name within its panel: without the namespace when all share one."""
    spaces = {k.split("/", 1)[0] for k in keys}
    return key.split("/", 1)[1] if len(spaces) == 1 and "/" in key else key


# ------------------------------------------------------------------------------------------------
def check_image_format(out: str | Path) -> None:
    """The file name's extension is an image format matplotlib writes; checked before any run is read."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    ext = Path(out).suffix.lower().lstrip(".")
    if ext not in formats:
        raise PlotError(
            f"-o {out}: {f'.{ext} is not a supported image format' if ext else 'the name has no image extension'}; "
            "supported: "
            f"{', '.join(formats)}. Fix: name the file with one of them, e.g. -o {Path(out).stem or 'report'}.png"
        )


def make_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Optional[Sequence[str]] = None,
    smooth: int = 1,
    log: Optional[TextIO] = None,
):
    """Load, choose, draw and save; the panels some run lacks are named in one line on `log`.
    Returns the Figure. A PNG carries the runs and the panel titles in its metadata
    (`Description`: JSON with keys "runs" and "panels")."""
    if smooth < 1:
        raise PlotError(f"--smooth {smooth}: the window must be >= 1 step (1 = no smoothing)")
    check_image_format(out)
    runs = load_runs(run_dirs, labels, warn=log)
    chosen, gaps = choose_panels(runs)
    if gaps:
        print(describe_gaps(gaps, len(runs)), file=log or sys.stderr)
    if not chosen:
        raise PlotError(
            f"none of the runs has any plotted metric (e.g. reward/mean, eval/<set>/avg@k); {WHAT_A_RUN_DIR_IS}"
        )
    fig = draw(runs, chosen, smooth=smooth)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = None
    if out.suffix.lower() == ".png":
        description = {"runs": [r.label for r in runs], "panels": [p.title for p, _ in chosen]}
        metadata = {"Title": "drpo-train plot", "Description": json.dumps(description), "Software": "drpo-trainer"}
    fig.savefig(out, dpi=100, metadata=metadata)
    return fig
