"""Short real runs of the default job (configs/tiny_cpu.yaml) in a subprocess, for the tests that
read what a run leaves behind (metrics.jsonl, samples.jsonl, plots)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a child run: no inherited process-group variables, offline, one torch
    thread (on a busy 2-core machine torch's spinning thread pool turns a 10 s run into a minute)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_tiny_job(out: Path, model_dir: str, *overrides: str, env: dict[str, str] | None = None) -> None:
    """`drpo-train --config configs/tiny_cpu.yaml` for 3 steps (eval at 0, 2 and 3 on 8 problems) into
    `out`; later `overrides` win. Fails the test with the run's stderr if it fails."""
    cmd = [sys.executable, "-m", "drpo_trainer.cli", "--config", "configs/tiny_cpu.yaml"]
    cmd += [f"model.path={model_dir}", f"output_dir={out}", "trainer.max_steps=3", "eval.every_steps=2"]
    cmd += ["eval.max_problems=8", "checkpoint.export_final=false", "tracking.progress_bar=false", *overrides]
    res = subprocess.run(cmd, cwd=REPO, env=env or job_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def refused_in_one_line(*overrides: str) -> str:
    """`drpo-train --config configs/tiny_cpu.yaml OVERRIDES` must refuse with exit 2 and one line on
    stderr; returns that line."""
    cmd = [sys.executable, "-m", "drpo_trainer.cli", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=job_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]
