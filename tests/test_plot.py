"""`drpo-train plot` on two short real runs (DRPO and GRPO, 3 steps each): the figure's panels,
one line per run holding the run's own numbers, the panels a run lacks said on stderr, a run
that is still being written, and directories that are not runs."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from job_helpers import run_tiny_job

from drpo_trainer import cli
from drpo_trainer.io.plot import PANELS, PlotError, load_run, load_runs, make_report, moving_average, panel_keys

REPO = Path(__file__).resolve().parents[1]

# What the DRPO and GRPO runs of the tiny job log, panel by panel (losses.py, learner.py, trainer.py)
EXPECTED_TITLES = [
    "reward",
    "eval avg@k",
    "response length",
    "truncated responses",
    "entropy",
    "gradient weight (DRPO, SPO)",
    "trust-region fractions",
    "train-inference mismatch: k3 KL",
    "train-inference mismatch: |p_engine - p_learner|",
    "policy drift: k3 KL(mu || pi)",
    "policy drift: |pi - mu|",
    "ratio pi / mu",
    "grad norm",
    "learning rate",
    "time per phase",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, warm_model_dir) -> dict[str, Path]:
    """Two 3-step runs of the default job: DRPO and GRPO, eval of 8 problems at steps 0, 2 and 3."""
    root = tmp_path_factory.mktemp("plot_runs")
    out = {loss: root / loss for loss in ("drpo", "grpo")}
    for loss, run_dir in out.items():
        run_tiny_job(run_dir, warm_model_dir, f"algorithm.loss={loss}", "tracking.wandb.mode=disabled")
    return out


def _rows(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl read independently of plot.py: step -> merged row."""
    merged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row.pop("step"), {}).update(row)
    return merged


def _lines(ax) -> dict[str, object]:
    return {line.get_gid(): line for line in ax.lines}


def test_two_runs_one_line_each_with_their_own_numbers(runs, tmp_path):
    err = io.StringIO()
    out = tmp_path / "report.png"
    fig = make_report([runs["drpo"], runs["grpo"]], out, log=err)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(axes) == EXPECTED_TITLES
    rows = {loss: _rows(d) for loss, d in runs.items()}

    # single-metric panels: exactly one line per run, holding that run's values by step
    for title, key in [("entropy", "policy/entropy"), ("grad norm", "optim/grad_norm"), ("learning rate", "optim/lr")]:
        lines = axes[title].lines
        assert sorted(line.get_label() for line in lines) == ["drpo", "grpo"], title
        for line in lines:
            r = rows[line.get_label()]
            assert list(line.get_xdata()) == [1, 2, 3]
            assert list(line.get_ydata()) == [r[s][key] for s in (1, 2, 3)], (title, line.get_label())
    # the two runs really differ (else "one line per run" could be the same line twice)
    lr = {line.get_label(): list(line.get_ydata()) for line in axes["learning rate"].lines}
    assert lr["drpo"] == lr["grpo"]  # same schedule...
    ent = {line.get_label(): list(line.get_ydata()) for line in axes["entropy"].lines}
    assert ent["drpo"][0] == ent["grpo"][0] and ent["drpo"][1:] != ent["grpo"][1:]  # ...different updates

    # eval: the logged points (steps 0, 2, 3), not smoothed
    ev = _lines(axes["eval avg@k"])
    assert set(ev) == {"drpo|eval/synthetic/avg@4", "grpo|eval/synthetic/avg@4"}
    line = ev["grpo|eval/synthetic/avg@4"]
    assert list(line.get_xdata()) == [0, 2, 3]
    assert list(line.get_ydata()) == [rows["grpo"][s]["eval/synthetic/avg@4"] for s in (0, 2, 3)]

    # multi-metric panels: one line per (run, metric); the loss's own metrics only for the run that has them
    assert set(_lines(axes["reward"])) == {f"{r}|reward/{m}" for r in ("drpo", "grpo") for m in ("mean", "accuracy")}
    assert set(_lines(axes["gradient weight (DRPO, SPO)"])) == {f"drpo|drpo/weight_{m}" for m in ("mean", "min", "max")}
    assert set(_lines(axes["trust-region fractions"])) == {
        "drpo|drpo/negative_weight_fraction",
        "grpo|grpo/clip_fraction",
    }
    assert len(_lines(axes["time per phase"])) == 2 * 6  # step, generate, score, recompute, update, sync

    # the panels a run lacks: one line on stderr
    said = err.getvalue().splitlines()
    assert said == [
        "drpo-train plot: no data for: gradient weight (DRPO, SPO) (grpo); mismatch correction weight (all runs)"
    ]

    # the saved PNG says what it shows
    from PIL import Image

    with Image.open(out) as img:
        meta = json.loads(img.text["Description"])
        assert img.size[0] > 1000 and img.size[1] > 800
    assert meta == {"runs": ["drpo", "grpo"], "panels": EXPECTED_TITLES}


def test_cli_labels_and_smoothing(runs, tmp_path, capsys):
    out = tmp_path / "smoothed.png"
    rc = cli.main(["plot", str(runs["drpo"]), str(runs["grpo"]), "-o", str(out), "--labels", "a, b", "--smooth", "2"])
    assert rc == 0
    captured = capsys.readouterr()
    assert f"wrote {out} (15 panels)" in captured.out
    assert captured.err.count("\n") == 1 and "gradient weight (DRPO, SPO) (b)" in captured.err
    from PIL import Image

    with Image.open(out) as img:
        assert json.loads(img.text["Description"])["runs"] == ["a", "b"]

    fig = make_report([runs["drpo"]], tmp_path / "s.png", smooth=2, log=io.StringIO())
    axes = {ax.get_title(): ax for ax in fig.axes}
    raw = _rows(runs["drpo"])
    g = [raw[s]["optim/grad_norm"] for s in (1, 2, 3)]
    (line,) = axes["grad norm"].lines
    assert list(line.get_ydata()) == pytest.approx([g[0], (g[0] + g[1]) / 2, (g[1] + g[2]) / 2], rel=1e-12)
    (ev,) = axes["eval avg@k"].lines  # eval is never smoothed
    assert list(ev.get_ydata()) == [raw[s]["eval/synthetic/avg@4"] for s in (0, 2, 3)]


def test_a_run_still_being_written(runs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    text = (runs["drpo"] / "metrics.jsonl").read_text()
    (live / "metrics.jsonl").write_text(text + '{"step": 4, "reward/mean": 0.1, "optim/gr')  # half of step 4's line
    err = io.StringIO()
    fig = make_report([live], tmp_path / "live.png", log=err)
    (line,) = {ax.get_title(): ax for ax in fig.axes}["reward"].lines[:1]
    assert list(line.get_xdata()) == [1, 2, 3]
    assert "not a metrics row" not in err.getvalue()  # a cut last line is normal while a run writes

    lines = text.splitlines()
    (live / "metrics.jsonl").write_text("\n".join(lines[:2] + ['{"step": 2, "rew'] + lines[2:]) + "\n")
    err = io.StringIO()
    run = load_run(live, warn=err)
    assert sorted(run.rows) == [0, 1, 2, 3]
    assert (
        err.getvalue()
        == f"drpo-train plot: {live / 'metrics.jsonl'}:3 is not a metrics row (JSON with a step); left out\n"
    )


def test_what_is_not_a_run_is_refused_clearly(runs, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert cli.main(["plot", str(runs["drpo"]), str(empty), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"{empty / 'metrics.jsonl'} not found" in err and "a run directory is the output_dir" in err
    assert not (tmp_path / "x.png").exists()

    with pytest.raises(PlotError, match=re.escape(f"{tmp_path / 'nope'}: no such directory")):
        make_report([tmp_path / "nope"], tmp_path / "x.png")
    (empty / "metrics.jsonl").write_text('{"step": 1, "rew')  # a run that has not finished its first line
    with pytest.raises(PlotError, match="no complete metrics row yet"):
        make_report([empty], tmp_path / "x.png")
    with pytest.raises(PlotError, match="1 labels for 2 run directories"):
        make_report([runs["drpo"], runs["grpo"]], tmp_path / "x.png", labels=["only"])


def test_moving_average_is_trailing_and_skips_nan():
    nan = float("nan")
    # windows of 2: [1], [1, 3], [3, nan] -> 3, [nan, 5] -> 5
    assert moving_average([1.0, 3.0, nan, 5.0], 2) == [1.0, 2.0, 3.0, 5.0]
    assert moving_average([1.0, 3.0], 1) == [1.0, 3.0]


def test_every_trust_region_and_mismatch_metric_has_a_panel():
    """A metric name a loss or the mismatch code emits (losses.py) is drawn somewhere."""
    source = (REPO / "drpo_trainer" / "algorithms" / "losses.py").read_text()
    names = set(re.findall(r'"((?:drpo|spo|dppo|grpo|policy|mismatch)/[a-z_0-9]+)"', source))
    assert len(names) >= 20  # the regex still finds them
    undrawn = [n for n in sorted(names) if not any(panel_keys(p, {n}) for p in PANELS)]
    assert undrawn == []


def test_runs_of_the_same_name_are_told_apart(runs, tmp_path):
    """Two run directories with the same name are told apart by their parents' names."""
    for parent in ("x", "y"):
        shutil.copytree(runs["drpo"], tmp_path / parent / "tiny_cpu", ignore=shutil.ignore_patterns("checkpoints"))
    both = load_runs([tmp_path / "x" / "tiny_cpu", tmp_path / "y" / "tiny_cpu"])
    assert [r.label for r in both] == ["x/tiny_cpu", "y/tiny_cpu"]
    assert [r.label for r in load_runs([tmp_path / "x" / "tiny_cpu", runs["grpo"]])] == ["tiny_cpu", "grpo"]


def test_every_moe_metric_has_a_panel_that_dense_runs_do_not_miss():
    """The moe/* metrics (learner/moe_metrics.py) and the probe's route agreement are drawn; a dense run
    (no moe/* metric) is not told it lacks those panels."""
    source = (REPO / "drpo_trainer" / "learner" / "moe_metrics.py").read_text()
    names = set(re.findall(r'"(moe/[a-z_0-9]+)"', source)) | {"moe/load_balance/layer_0", "parity/route_agreement"}
    assert len(names) >= 5
    assert [n for n in sorted(names) if not any(panel_keys(p, {n}) for p in PANELS)] == []
    moe_panels = [p for p in PANELS if p.title.startswith("MoE")]
    assert len(moe_panels) == 3 and all(p.layout_only for p in moe_panels)
