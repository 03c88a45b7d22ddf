"""Before any model or data is loaded, a run that cannot start says why in one line and exits 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI's result and its wall time (printed by -s runs; the closing note quotes it)."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "drpo_trainer.cli", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120
    )
    return res, time.monotonic() - start


def one_line_refusal(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("drpo-train:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_paper_recipe_without_vllm_names_the_install_within_seconds(tmp_path):
    res, _ = cli("--config", "configs/qwen3_30b_a3b_base_drpo.yaml", f"output_dir={tmp_path}")
    line = one_line_refusal(res)
    assert "rollout.backend=vllm needs vLLM, which is not installed" in line and "pip install" in line
    assert not (tmp_path / "config.yaml").exists()  # refused before the run started (no tokenizer, no model)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_only_processes_that_sample_need_the_rollout_backend(tmp_path):
    """Asynchronous layout on separate nodes: a learner node needs no vLLM (docs/async.md)."""
    from drpo_trainer.config import ConfigError, load_config
    from drpo_trainer.runtime.preflight import preflight

    cfg = load_config("configs/tiny_cpu.yaml", ["rollout.backend=vllm", "distributed.rollout_processes=1"])
    preflight(cfg, 1, samples=False)  # the learner: passes without vllm
    with pytest.raises(ConfigError, match="rollout.backend=vllm needs vLLM"):
        preflight(cfg, 1, samples=True)
    # the CLI as global rank 1 of 2 under a launcher: the rollout process refuses, naming the install
    launched = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    args = ("--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", "rollout.backend=vllm")
    res, _ = cli(*args, "distributed.rollout_processes=1", "distributed.nproc_per_node=2", **launched)
    assert "rollout.backend=vllm needs vLLM" in one_line_refusal(res)


def test_hub_model_missing_offline_says_how_to_download(tmp_path):
    res, _ = cli(
        "--config",
        "configs/tiny_cpu.yaml",
        "model.path=Qwen/Qwen3-4B-Base",
        f"output_dir={tmp_path}",
        HF_HOME=str(tmp_path / "hf"),
    )
    line = one_line_refusal(res)
    assert "model.path=Qwen/Qwen3-4B-Base is not a local directory and not in the local Hugging Face cache" in line
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in line and "huggingface-cli download Qwen/Qwen3-4B-Base" in line


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.train_files=[no/such.jsonl]", "data.train_files: no/such.jsonl does not exist"),
        ("eval.files={e: no/eval.jsonl}", "eval.files.e: no/eval.jsonl does not exist"),
        ("model.path=/no/such/dir", "model.path=/no/such/dir is not a model directory"),
        ("trainer.micro_batch_tokens_per_gpu=64", "trainer.micro_batch_tokens_per_gpu=64 cannot hold one sample"),
    ],
)
def test_bad_paths_and_budgets_fail_before_loading(tmp_path, override, expected):
    res, _ = cli("--config", "configs/tiny_cpu.yaml", override, f"output_dir={tmp_path}")
    assert expected in one_line_refusal(res)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing started


def test_print_config_loads_nothing_even_for_a_gpu_recipe():
    res, _ = cli("--config", "configs/qwen3_30b_a3b_base_drpo.yaml", "--print-config")
    assert res.returncode == 0 and "backend: vllm" in res.stdout
    assert "Loading" not in res.stderr  # nothing loaded: no model, data or engine
