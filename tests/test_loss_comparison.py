"""experiments/loss_comparison.py: its quick mode for real (2 losses, 1 seed, 4 steps, FP8-style
setting), the table and figure checked against the runs' own metrics.jsonl, resumption, and the
collapse rule on hand-made reward curves."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("loss_comparison", ROOT / "experiments" / "loss_comparison.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lc = _load()


def test_collapse_rule():
    # w = 10; peak 10-step mean 0.5; the last 10 steps average 0.05 < 0.2 * 0.5 = 0.1 -> collapsed
    assert lc.collapsed([0.1] * 10 + [0.5] * 10 + [0.05] * 10)
    # the last 10 average (9 * 0.05 + 0.6) / 10 = 0.105 >= 0.1 -> a recovery, not a collapse
    assert not lc.collapsed([0.1] * 10 + [0.5] * 10 + [0.05] * 9 + [0.6])
    # a dip in the middle that recovers is no collapse
    assert not lc.collapsed([0.5] * 10 + [0.0] * 10 + [0.5] * 10)
    assert not lc.collapsed([0.0] * 30)  # never learned: no peak to fall from
    # fewer steps than the window: w = 4 steps, one window, nothing to fall from
    assert not lc.collapsed([0.3, 0.0, 0.0, 0.0])
    assert lc.reward_window_means([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]


def _table(text: str) -> list[list[str]]:
    lines = [l for l in text.splitlines() if l.startswith("|")][2:]  # header and rule out
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


@pytest.mark.slow  # docs/experiments.md's --quick command runs in the default suite
def test_quick_mode_table_figure_and_resume(tmp_path, warm_model_dir, monkeypatch):
    monkeypatch.setenv("DRPO_CACHE_DIR", str(Path(warm_model_dir).parent))
    argv = ["--quick", "--results-dir", str(tmp_path), "--target", "0.07"]
    results, table, fig = lc.sweep(lc.parse_args(argv))
    assert sorted(s.name for s in results) == ["fp8/drpo/seed0", "fp8/grpo/seed0"]

    # every table row is its run's metrics.jsonl, read here independently
    rows = _table((tmp_path / "loss_comparison.md").read_text())
    assert rows == _table(table) and [r[:2] for r in rows] == [
        ["FP8-style rollout", "drpo"],
        ["FP8-style rollout", "grpo"],
    ]
    curves = {}
    for setting, loss, final, best, first, collapsed, reward in rows:
        metrics = [json.loads(l) for l in (tmp_path / "runs" / "fp8" / loss / "seed0" / "metrics.jsonl").open()]
        assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
        assert metrics[1]["mismatch/k3_kl"] > 0  # the FP8-style engine is in use
        evals = [(m["step"], m["eval/synthetic/avg@4"]) for m in metrics if "eval/synthetic/avg@4" in m]
        assert [s for s, _ in evals] == [0, 2, 4]  # quick mode evaluates every 2 steps
        curves[loss] = [v for _, v in evals]
        assert final == f"{evals[-1][1]:.3f} [{evals[-1][1]:.3f}, {evals[-1][1]:.3f}]"
        assert best == f"{max(v for _, v in evals):.3f}"
        assert first == str(next((s for s, v in evals if v >= 0.07), "-"))
        rewards = [m["reward/mean"] for m in metrics[1:]]
        assert reward == f"{sum(rewards) / 4:.3f}"  # 4 steps: one window of 4
        assert collapsed == "0/1"

    # the figure: per setting an eval panel and a reward panel, one line per loss with its eval curve
    assert [ax.get_title() for ax in fig.axes] == ["FP8-style rollout", ""]
    eval_ax = fig.axes[0]
    assert [line.get_label() for line in eval_ax.get_lines()] == ["drpo", "grpo"]
    for line in eval_ax.get_lines():
        assert list(line.get_xdata()) == [0, 2, 4]
        assert list(line.get_ydata()) == pytest.approx(curves[line.get_label()])
    assert (tmp_path / "loss_comparison.png").stat().st_size > 10_000

    # a second invocation reads the finished runs back instead of training them again
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/*/*/metrics.jsonl")}
    again, table_again, _ = lc.sweep(lc.parse_args(argv))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(stamps) == 2
    assert table_again == table and again == results
    # ... and refuses to mix in runs made with other settings
    with pytest.raises(SystemExit, match="other settings"):
        lc.sweep(lc.parse_args([*argv, "--steps", "3"]))
