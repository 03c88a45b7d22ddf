"""Per-backend config sections (rollout.hf, rollout.vllm): old names are refused with "renamed to",
a checkpoint saved with the old names resumes unchanged, make_engine names the known engines, and
validating a config imports no torch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from job_helpers import refused_in_one_line

from drpo_trainer.config import RENAMED_KEYS, ConfigError, RolloutConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]

# The rollout section of configs/tiny_cpu.yaml as `dump_config` wrote it into a checkpoint's
# config.yaml before the backend keys moved (every key, in the old layout).
OLD_ROLLOUT_SECTION = """
backend: hf
samples_per_prompt: 8
temperature: 1.0
top_p: 1.0
top_k: 0
max_new_tokens: 24
generation_batch_size: 64
tensor_parallel_size: 1
gpu_memory_utilization: 0.5
enable_sleep_mode: true
quantization: null
max_model_len: null
kv_cache_gib: null
sync_bucket_mb: 512
dtype: null
parity_check_at_start: true
parity_check: false
parity_max_abs_logprob_diff: null
"""


@pytest.mark.parametrize("old, new", sorted(RENAMED_KEYS.items()))
def test_an_old_key_on_the_command_line_says_renamed(old, new):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_cpu.yaml", [f"{old}=3"])
    assert str(e.value).startswith(f"{old} was renamed to {new} ")
    assert f"Fix: use the new name, e.g. {new}=3" in str(e.value) and "\n" not in str(e.value)


def test_old_keys_in_a_file_are_all_named_in_one_line(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("rollout:\n  backend: vllm\n  tensor_parallel_size: 4\n  max_model_len: 10240\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "\n" not in msg
    assert "rollout.tensor_parallel_size was renamed to rollout.vllm.tensor_parallel_size" in msg
    assert "rollout.max_model_len was renamed to rollout.vllm.max_model_len" in msg
    assert "Fix: use the new names, e.g. rollout.vllm.tensor_parallel_size=4" in msg


def test_an_old_key_through_the_cli_is_one_line_and_exit_2(tmp_path):
    line = refused_in_one_line("rollout.enable_sleep_mode=false", f"output_dir={tmp_path / 'run'}")
    assert line == (
        "drpo-train: rollout.enable_sleep_mode was renamed to rollout.vllm.enable_sleep_mode (the keys of one "
        "rollout backend live under rollout.hf / rollout.vllm). Fix: use the new name, e.g. "
        "rollout.vllm.enable_sleep_mode=False"
    )
    assert not (tmp_path / "run").exists()


def test_the_new_sections_hold_the_values():
    cfg = load_config(
        "configs/qwen3_30b_a3b_base_drpo.yaml", ["rollout.hf.generation_batch_size=16", "rollout.vllm.kv_cache_gib=2"]
    )
    assert cfg.rollout.vllm.tensor_parallel_size == 4 and cfg.rollout.vllm.gpu_memory_utilization == 0.55
    assert cfg.rollout.vllm.max_model_len == 10240 and cfg.rollout.vllm.kv_cache_gib == 2.0
    assert cfg.rollout.hf.generation_batch_size == 16
    dumped = yaml.safe_load(dump_config(cfg))["rollout"]
    assert dumped["vllm"]["tensor_parallel_size"] == 4 and "tensor_parallel_size" not in dumped


def _old_checkpoint(tmp_path: Path, cfg, rollout_section: str) -> Path:
    tree = yaml.safe_load(dump_config(cfg))
    tree["rollout"] = yaml.safe_load(rollout_section)
    ckpt = tmp_path / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    (ckpt / "loop_state.json").write_text("{}")
    small = ("config.yaml", "loop_state.json")  # resume reads only a checkpoint its manifest verifies
    files = {n: [(ckpt / n).stat().st_size, hashlib.sha256((ckpt / n).read_bytes()).hexdigest()] for n in small}
    (ckpt / "MANIFEST.json").write_text(json.dumps({"files": files}))
    return ckpt


def test_a_checkpoint_saved_with_the_old_names_resumes_unchanged(tmp_path):
    from drpo_trainer.runtime.run_identity import check_resume, config_changes

    cfg = load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path}"])
    ckpt = _old_checkpoint(tmp_path, cfg, OLD_ROLLOUT_SECTION)
    assert config_changes((ckpt / "config.yaml").read_text(), cfg) == {}
    assert check_resume(cfg, "auto", []) == []  # nothing to allow, nothing reported


def test_a_changed_value_under_an_old_name_is_reported_under_the_new_one(tmp_path):
    from drpo_trainer.runtime.run_identity import check_resume, config_changes

    cfg = load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path}"])
    old = OLD_ROLLOUT_SECTION.replace("generation_batch_size: 64", "generation_batch_size: 32")
    ckpt = _old_checkpoint(tmp_path, cfg, old)
    assert config_changes((ckpt / "config.yaml").read_text(), cfg) == {"rollout.hf.generation_batch_size": (32, 64)}
    with pytest.raises(ConfigError, match="--allow-config-change rollout.hf.generation_batch_size"):
        check_resume(cfg, "auto", [])
    assert check_resume(cfg, "auto", ["rollout.hf"]) == ["rollout.hf.generation_batch_size: 32 -> 64"]


def test_make_engine_names_the_known_engines_for_an_unknown_backend():
    from drpo_trainer.rollout import ENGINE_NAMES, make_engine

    assert ENGINE_NAMES == typing.get_args(RolloutConfig.model_fields["backend"].annotation)  # the config's names
    cfg = SimpleNamespace(rollout=SimpleNamespace(backend="sglang", dtype=None), model=SimpleNamespace(dtype="float32"))
    with pytest.raises(ValueError, match="unknown rollout backend 'sglang'; known engines: hf, vllm"):
        make_engine(cfg, "m", tokenizer=None, device="cpu", seed=0)


def test_validating_a_config_imports_no_torch():
    code = (
        "import sys\n"
        "import drpo_trainer.config as c\n"
        "c.load_config('configs/qwen3_4b_base_grpo.yaml', ['algorithm.loss_params.clip_high=0.3'])\n"
        "c.load_config('configs/tiny_cpu.yaml', ['algorithm.loss=dppo_kl'])\n"
        "try:\n"
        "    c.load_config(None, ['algorithm.loss_params.delta=-1'])\n"
        "except c.ConfigError as e:\n"
        "    print('refused:', 'delta=-1' in str(e))\n"
        "print('torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items()}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["refused: True", "False"]


def test_the_loss_schema_is_the_functions_parameters():
    import inspect

    from drpo_trainer.algorithms import loss_params
    from drpo_trainer.algorithms.losses import POLICY_LOSSES

    assert set(loss_params.BUILTIN_DEFAULTS) <= set(POLICY_LOSSES)
    for name, defaults in loss_params.BUILTIN_DEFAULTS.items():
        sig = inspect.signature(POLICY_LOSSES[name]).parameters.values()
        assert {p.name: p.default for p in sig if p.kind is inspect.Parameter.KEYWORD_ONLY} == defaults, name
    with pytest.raises(ValueError, match="differ from its declared schema"):
        loss_params.declare_loss_params("drpo", {"delta": 1.0})


def test_a_loss_registered_at_runtime_validates_at_load():
    from drpo_trainer.algorithms import loss_params
    from drpo_trainer.algorithms.losses import POLICY_LOSSES, register_policy_loss

    @register_policy_loss("_cfg_scaled_pg", bounds={"scale": (0.0, 10.0)})
    def scaled(logprobs, old_logprobs, advantages, mask, *, scale: float = 2.0):
        return -scale * advantages, {}

    try:
        cfg = load_config(None, ["algorithm.loss=_cfg_scaled_pg"])
        assert cfg.algorithm.loss_params == {"scale": 2.0}
        assert load_config(
            None, ["algorithm.loss=_cfg_scaled_pg", "algorithm.loss_params.scale=3"]
        ).algorithm.loss_params == {"scale": 3.0}
        with pytest.raises(
            ConfigError,
            match=r"scale=12.0 must be a number in the open interval \(0.0, 10.0\).*"
            r"Fix: set algorithm.loss_params.scale",
        ):
            load_config(None, ["algorithm.loss=_cfg_scaled_pg", "algorithm.loss_params.scale=12"])
    finally:
        POLICY_LOSSES.pop("_cfg_scaled_pg")
        loss_params._DEFAULTS.pop("_cfg_scaled_pg")
        loss_params._BOUNDS.pop("_cfg_scaled_pg")
