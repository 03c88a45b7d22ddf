"""`drpo-train eval`: on builtin:tiny-math it reproduces a training run's step-0 eval (every metric and
every completion), on a checkpoint with `--step N` the run's eval at step N; what it refuses to write
over; `drpo-train --help` names every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drpo_trainer.cli import main

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = ["eval.max_problems=16", "tracking.progress_bar=false"]


def _drpo(args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "drpo_trainer.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def env(warm_model_dir):
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**keep, "DRPO_CACHE_DIR": str(Path(warm_model_dir).parent), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, env):
    """One step of the default job, evaluated at steps 0 and 1 on the first 16 problems."""
    out = tmp_path_factory.mktemp("eval_cmd") / "run"
    res = _drpo(["--config", "configs/tiny_cpu.yaml", "trainer.max_steps=1", f"output_dir={out}", *PROBLEMS], env)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _run_rows(run_dir: Path, step: int) -> tuple[dict, list[dict]]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (evals,) = [
        {k: v for k, v in r.items() if k.startswith("eval/")}
        for r in metrics
        if r["step"] == step and any(k.startswith("eval/") for k in r)
    ]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return evals, [s for s in samples if s["step"] == step and s["kind"] == "eval:synthetic"]


def _check_same_as_the_run(out: Path, run_dir: Path, step: int) -> dict:
    result = json.loads((out / "metrics.json").read_text())
    evals, run_samples = _run_rows(run_dir, step)
    assert result["metrics"] == evals  # every metric, bit for bit
    ours = {s["index"]: s for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    assert len(ours) == 16 * 4 and len(run_samples) == 4  # every completion here; the run kept 4
    for row in run_samples:
        assert ours[row["index"]] == row  # the same completions, in the same order
    return result


def test_eval_of_the_builtin_model_is_the_runs_step0_eval(run_dir, env, tmp_path):
    out = tmp_path / "eval"
    res = _drpo(["eval", "builtin:tiny-math", "--config", "configs/tiny_cpu.yaml", "--out", str(out), *PROBLEMS], env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = _check_same_as_the_run(out, run_dir, 0)
    rewards = [json.loads(line)["reward"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert result["metrics"]["eval/synthetic/avg@4"] == sum(rewards) / (16 * 4)  # avg@4: the mean reward
    assert set(result["sets"]["synthetic"]) == {
        "problems",
        "samples_per_prompt",
        "avg@4",
        "pass@1",
        "pass@2",
        "pass@4",
        "maj@4",
        "vote_failures",
    }
    assert result["sets"]["synthetic"]["problems"] == 16
    head, row = res.stdout.splitlines()[:2]
    assert head.split() == ["set", "problems", "n", "avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "vote_failures"]
    assert row.split()[:4] == ["synthetic", "16", "4", "0.0781"]
    assert (out / ".drpo-eval").is_file() and (out / "eval_config.yaml").is_file()


def test_eval_of_a_checkpoint_at_its_step_is_the_runs_eval_at_that_step(run_dir, env, tmp_path):
    (ckpt,) = sorted((run_dir / "checkpoints").glob("step_*"))
    out = tmp_path / "eval_ckpt"
    res = _drpo(
        ["eval", str(ckpt), "--config", "configs/tiny_cpu.yaml", "--out", str(out), "--step", "1", *PROBLEMS], env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    _check_same_as_the_run(out, run_dir, 1)
    assert not (out / ".checkpoint-model").exists()  # the weights exported for the engine are gone again
    # the run's final/ export holds the same weights
    final = tmp_path / "eval_final"
    res = _drpo(
        [
            "eval",
            str(run_dir / "final"),
            "--config",
            "configs/tiny_cpu.yaml",
            "--out",
            str(final),
            "--step",
            "1",
            *PROBLEMS,
        ],
        env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        json.loads((final / "metrics.json").read_text())["metrics"]
        == json.loads((out / "metrics.json").read_text())["metrics"]
    )


@pytest.mark.slow  # the eval sums over shards are tested in test_eval_metrics
@pytest.mark.distributed  # a learner and a rollout process
def test_the_asynchronous_layout_sums_the_same_eval(run_dir, env, tmp_path):
    """The rollout process evaluates (its shard is every problem, with shard 0's seed) and learner 0 adds
    up its sums: the step-0 eval equals the synchronous run's, metric for metric."""
    out = tmp_path / "async"
    layout = ["distributed.nproc_per_node=2", "distributed.rollout_processes=1", "checkpoint.export_final=false"]
    args = ["--config", "configs/tiny_cpu.yaml", "trainer.max_steps=1", f"output_dir={out}", *layout, *PROBLEMS]
    res = _drpo(args, env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _run_rows(out, 0)[0] == _run_rows(run_dir, 0)[0]


# -- refusals (before anything loads) --------------------------------------------------------------
def _refused(capsys, *args) -> str:
    assert main(["eval", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_non_empty_out_dir_that_is_not_an_earlier_eval_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    line = _refused(capsys, "builtin:tiny-math", "--config", "configs/tiny_cpu.yaml", "--out", str(tmp_path))
    assert line == (
        f"drpo-train eval: eval: --out {tmp_path} is not empty and holds no earlier evaluation (no .drpo-eval): its "
        "files are never replaced. Fix: pass --out with a new directory"
    )
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_a_run_directory_is_not_a_model(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    line = _refused(capsys, str(tmp_path / "run"), "--config", "configs/tiny_cpu.yaml", "--out", str(tmp_path / "o"))
    assert "is a run directory, not a model. Fix: give its final/ export" in line
    assert not (tmp_path / "o").exists()


def test_out_inside_the_model_and_no_eval_sets_are_refused(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    line = _refused(capsys, str(model), "--config", "configs/tiny_cpu.yaml", "--out", str(model / "eval"))
    assert line.endswith(f"is inside the model {model} it evaluates. Fix: pass --out with a new directory")
    line = _refused(capsys, "builtin:tiny-math", "--config", "configs/tiny_cpu.yaml", "eval.files={}")
    assert line.endswith("the config has no eval sets (eval.files is empty). Fix: set eval.files")


def test_help_lists_every_command_in_one_line_each(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("[train] --config X", "eval MODEL --config X", "export CHECKPOINT DIR", "plot RUN_DIR"):
        (line,) = [l for l in text.splitlines() if f"drpo-train {command}" in l]
        assert len(line.split("  ")[-1].strip()) > 10  # its one-line description
