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


# ------------------------------------------------------------------ files and machine: one line, exit 2


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"trainer:\n  max_steps: 3  # caf\xe9\n")  # latin-1 e-acute
    res, _ = cli("--config", str(bad), f"output_dir={tmp_path / 'run'}")
    assert one_line_refusal(res) == (
        # offset: 9 bytes of "trainer:\n" + 21 of "  max_steps: 3  # caf"
        f"drpo-train: {bad} is not UTF-8 text (byte 0xe9 at offset 30). Fix: save the file as UTF-8"
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "distributed.deepspeed_config: {path} does not exist. Fix: check the path"),
        ('{"zero_optimization": {"stage": 3,}', "distributed.deepspeed_config: {path} is not valid JSON (Expecting"),
        ("[1, 2]", "distributed.deepspeed_config: {path} holds a JSON list, not an object of DeepSpeed settings"),
    ],
)
def test_a_missing_or_invalid_deepspeed_json_is_one_line(tmp_path, content, expected):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    res, _ = cli(
        "--config", "configs/tiny_cpu.yaml", f"distributed.deepspeed_config={path}", f"output_dir={tmp_path}/r"
    )
    line = one_line_refusal(res)
    assert expected.format(path=path) in line and "Fix:" in line
    assert not (tmp_path / "r").exists()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("keep me\n")
    res, _ = cli("--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path / 'taken'}")
    assert f"output_dir {tmp_path / 'taken'} is a file. Fix:" in one_line_refusal(res)
    res, _ = cli("--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path / 'taken' / 'run'}")
    assert f"output_dir {tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is not writable. Fix:" in one_line_refusal(
        res
    )
    assert (tmp_path / "taken").read_text() == "keep me\n"


@pytest.mark.skipif(not os.path.isdir("/proc/sys") or os.access("/proc/sys", os.W_OK), reason="needs /proc/sys")
@pytest.mark.parametrize("out", ["/proc/sys", "/proc/sys/drpo_run"])
def test_a_read_only_output_dir_is_one_line(out):
    # /proc/sys is read-only even for root, who may write into a chmod-555 directory
    res, _ = cli("--config", "configs/tiny_cpu.yaml", f"output_dir={out}")
    assert f"output_dir {out}: /proc/sys is not writable. Fix:" in one_line_refusal(res)


def test_a_verifier_memory_limit_too_small_to_start_a_worker_is_one_line(tmp_path):
    res, wall = cli("--config", "configs/tiny_cpu.yaml", "reward.memory_limit_mb=1", f"output_dir={tmp_path}")
    assert one_line_refusal(res) == (
        "drpo-train: reward.memory_limit_mb=1 is too small to start a verifier worker (its imports need 256 MB of "
        "address space). Fix: set reward.memory_limit_mb >= 256 (default 2048)"
    )
    assert not (tmp_path / "config.yaml").exists()  # before the model or the data loaded


def test_a_model_directory_without_weights_is_one_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen3"}')
    res, _ = cli("--config", "configs/tiny_cpu.yaml", f"model.path={model}", f"output_dir={tmp_path / 'r'}")
    assert f"model.path={model} has config.json but no weights (*.safetensors or *.bin). Fix:" in one_line_refusal(res)
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}'
    )
    res, _ = cli("--config", "configs/tiny_cpu.yaml", f"model.path={model}", f"output_dir={tmp_path / 'r'}")
    line = one_line_refusal(res)
    assert "model.safetensors.index.json names missing shards model-00001-of-00002.safetensors" in line


def test_plot_to_an_unknown_image_format_names_the_supported_ones(tmp_path):
    res, _ = cli("plot", str(tmp_path), "-o", str(tmp_path / "x.xyz"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(
        f"drpo-train plot: -o {tmp_path / 'x.xyz'}: .xyz is not a supported image format; supported:"
    )
    assert "pdf, " in line and "png, " in line and "svg, " in line and line.endswith("e.g. -o x.png")
    assert not (tmp_path / "x.xyz").exists()


def test_routing_replay_on_vllm_cpu_is_refused_in_one_line():
    from drpo_trainer.config import ConfigError, load_config
    from drpo_trainer.runtime.preflight import check_vllm_routing

    cfg = load_config("configs/tiny_cpu_moe.yaml", ["rollout.backend=vllm", "rollout.routing_replay=true"])
    with pytest.raises(
        ConfigError, match="needs CUDA.*AuxOutput Connector requires Model Runner V2.*rollout.backend=hf"
    ):
        check_vllm_routing(cfg, cpu_build=True)
    check_vllm_routing(load_config("configs/tiny_cpu_moe.yaml", ["rollout.backend=vllm"]), cpu_build=True)  # off: fine
