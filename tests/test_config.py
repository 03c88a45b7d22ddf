"""Config: defaults, YAML + dotted overrides, and errors that name the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest

from drpo_trainer.config import Config, ConfigError, load_config, parse_overrides
from drpo_trainer.runtime.distributed import resolve_nproc

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_valid_and_documented():
    cfg = Config()
    assert cfg.algorithm.loss == "drpo" and cfg.algorithm.behaviour_logprobs == "recompute"
    for section_name, section in Config.model_fields.items():
        sub = section.annotation
        if hasattr(sub, "model_fields"):
            for name, field in sub.model_fields.items():
                assert field.description or hasattr(field.annotation, "model_fields"), (
                    f"{section_name}.{name} has no doc"
                )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_divides(path):
    cfg = load_config(path)
    nproc = cfg.distributed.nproc_per_node
    world = (nproc if isinstance(nproc, int) else 8) * cfg.distributed.nnodes
    cfg.check_world(world)
    from drpo_trainer.algorithms.losses import validate_loss_params

    validate_loss_params(cfg.algorithm.loss, cfg.algorithm.loss_params)


def test_overrides_apply_on_top_of_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer: {max_steps: 5, prompts_per_step: 8}\nrollout: {samples_per_prompt: 4}\n")
    cfg = load_config(f, ["trainer.max_steps=7", "tracking.wandb.tags=[a, b]", "algorithm.loss_params={delta: 0.5}"])
    assert cfg.trainer.max_steps == 7  # override wins
    assert cfg.trainer.prompts_per_step == 8  # YAML kept
    assert cfg.rollout.samples_per_prompt == 4
    assert cfg.tracking.wandb.tags == ["a", "b"]
    assert cfg.algorithm.loss_params == {"delta": 0.5}


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.prompts_per_stp=8"])
    msg = str(e.value)
    assert "trainer.prompts_per_stp: unknown key" in msg
    assert "did you mean 'trainer.prompts_per_step'" in msg


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.samples_per_prompt=0"])
    assert "rollout.samples_per_prompt" in str(e.value) and "got 0" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algorithm.behaviour_logprobs=old"])
    assert "algorithm.behaviour_logprobs" in str(e.value) and "'recompute' or 'rollout'" in str(e.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["trainer.max_steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.yaml")


def test_world_divisibility_message():
    cfg = load_config(None, ["trainer.prompts_per_step=6", "trainer.minibatches_per_step=2"])
    cfg.check_world(1)  # 6 % 2 == 0
    with pytest.raises(ConfigError) as e:
        cfg.check_world(2)  # 6 % (2 * 2) != 0
    assert "trainer.prompts_per_step=6" in str(e.value) and "prompts_per_step=4 or 8" in str(e.value)


def test_mis_band_must_be_ordered():
    with pytest.raises(ConfigError, match="mis_lower"):
        load_config(None, ["algorithm.mis_lower=3", "algorithm.mis_upper=2"])


def test_cli_print_config_and_error_exit_code():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "drpo_trainer.cli",
            "--config",
            str(ROOT / "configs/tiny_cpu.yaml"),
            "--print-config",
            "trainer.max_steps=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "max_steps: 3" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "drpo_trainer.cli", "algorithm.loss_agg_mode=mean"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2
    assert "algorithm.loss_agg_mode" in bad.stderr


def test_cli_does_not_import_heavy_modules_for_print_config():
    code = (
        "import sys; from drpo_trainer.cli import main; main(['--print-config']);"
        "heavy=[m for m in ('transformers','deepspeed','vllm','datasets','wandb') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_resolve_nproc(monkeypatch):
    import torch

    assert resolve_nproc(3) == 3 and resolve_nproc("2") == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_nproc("auto") == 4  # one process per local GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_nproc("auto") == 1  # a CPU machine: one process


def test_cli_rejects_unknown_loss_param_and_reward_before_heavy_work():
    def run(*a):
        return subprocess.run([sys.executable, "-m", "drpo_trainer.cli", *a], capture_output=True, text=True, cwd=ROOT)

    bad_param = run("algorithm.loss=grpo", "algorithm.loss_params={delta: 0.2}")
    assert bad_param.returncode == 2
    assert "unknown parameter(s) delta for policy loss 'grpo'" in bad_param.stderr and "clip_low" in bad_param.stderr
    bad_loss = run("algorithm.loss=ppo")
    assert bad_loss.returncode == 2 and "unknown policy loss 'ppo'" in bad_loss.stderr and "drpo" in bad_loss.stderr
    bad_reward = run("reward.name=nope")
    assert bad_reward.returncode == 2 and "unknown reward 'nope'" in bad_reward.stderr


def test_one_process_runs_without_zero_partitioning_unless_asked():
    cfg = load_config(None, [])
    assert cfg.distributed.zero_stage == 3
    assert cfg.effective_zero_stage(1) == 0 and cfg.effective_zero_stage(2) == 3
    assert load_config(None, ["distributed.single_process_zero_stage=null"]).effective_zero_stage(1) == 3
    assert load_config(None, ["distributed.offload_optimizer=true"]).effective_zero_stage(1) == 3  # offload needs ZeRO


# ------------------------------------------------------------------ loss selection and parameters


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
)
def test_switching_the_loss_on_the_command_line_gives_that_losss_parameters(config):
    from drpo_trainer.algorithms.losses import loss_param_defaults, policy_loss_names

    path = Path(__file__).resolve().parents[1] / "configs" / config
    own = load_config(path).algorithm
    for name in policy_loss_names():
        a = load_config(path, [f"algorithm.loss={name}"]).algorithm
        assert a.loss == name
        # the file's parameters belong to the file's loss; another loss starts from its defaults
        assert a.loss_params == (own.loss_params if name == own.loss else loss_param_defaults(name)), (config, name)


def test_a_loss_parameter_override_merges_into_the_files():
    path = Path(__file__).resolve().parents[1] / "configs" / "qwen3_4b_base_grpo.yaml"
    a = load_config(path, ["algorithm.loss_params.clip_high=0.3"]).algorithm
    assert a.loss_params == {"clip_low": 0.2, "clip_high": 0.3}  # clip_low kept from the file


def test_bad_loss_settings_fail_at_config_load_whoever_calls():
    from drpo_trainer.config import config_from_dict

    with pytest.raises(ConfigError, match="unknown parameter\\(s\\) delta for policy loss 'grpo'"):
        config_from_dict({"algorithm": {"loss": "grpo", "loss_params": {"delta": 1.0}}})
    with pytest.raises(ConfigError, match="unknown policy loss 'drpoo'; valid losses: .*drpo"):
        config_from_dict({"algorithm": {"loss": "drpoo"}})
    with pytest.raises(ConfigError, match="delta=0.0 must be a number in the open interval"):
        config_from_dict({"algorithm": {"loss": "drpo", "loss_params": {"delta": 0.0}}})


def test_overrides_may_come_before_and_after_options():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "drpo_trainer.cli",
            "--config",
            "configs/tiny_cpu.yaml",
            "trainer.max_steps=2",
            "--print-config",
            "algorithm.loss=grpo",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert "max_steps: 2" in res.stdout and "loss: grpo" in res.stdout


def test_overrides_merge_per_key_except_eval_files_which_are_replaced(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "eval: {files: {a: a.jsonl, b: b.jsonl}, samples_per_prompt: 2}\ntracking: {wandb: {project: p, entity: e}}\n"
    )
    cfg = load_config(f, ["eval.files={c: c.jsonl}", "tracking.wandb.entity=x"])
    assert cfg.eval.files == {"c": "c.jsonl"}  # the override names every eval set
    assert cfg.eval.samples_per_prompt == 2
    assert (cfg.tracking.wandb.project, cfg.tracking.wandb.entity) == ("p", "x")  # merged key by key


def test_removed_schedule_name_says_what_replaces_it():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.schedule=warmup_constant"])
    msg = str(e.value)
    assert msg.startswith("invalid configuration: optim.schedule:") and "Fix: set optim.schedule=constant" in msg
    assert load_config(None, ["optim.schedule=constant", "optim.warmup_steps=5"]).optim.schedule == "constant"


# ------------------------------------------------------------------ bounds on every number


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=.inf", "optim.lr: Input should be a finite number (got inf)"),
        ("optim.lr=.nan", "optim.lr: Input should be a finite number (got nan)"),
        ("optim.lr=2", "optim.lr: Input should be less than or equal to 1 (got 2)"),
        ("optim.betas=[1.0,1.0]", "optim.betas.0: Input should be less than 1 (got 1.0)"),
        ("optim.betas=[1.0,1.0]", "optim.betas.1: Input should be less than 1 (got 1.0)"),
        ("optim.betas=[5,-3]", "optim.betas.0: Input should be less than 1 (got 5)"),
        ("optim.betas=[5,-3]", "optim.betas.1: Input should be greater than or equal to 0 (got -3)"),
        ("optim.eps=1e-300", "optim.eps: Input should be greater than or equal to 1e-12 (got '1e-300')"),
        ("optim.weight_decay=.inf", "optim.weight_decay: Input should be a finite number"),
        ("rollout.temperature=1e-300", "rollout.temperature: Input should be greater than or equal to 0.001"),
        ("rollout.temperature=.inf", "rollout.temperature: Input should be a finite number (got inf)"),
        ("eval.temperature=1000", "eval.temperature: Input should be less than or equal to 100"),
        ("rollout.top_p=0", "rollout.top_p: Input should be greater than 0 (got 0)"),
        (
            "rollout.samples_per_prompt=10000000",
            "rollout.samples_per_prompt: Input should be less than or equal to 1024",
        ),
        ("rollout.max_new_tokens=10000000", "rollout.max_new_tokens: Input should be less than or equal to 1048576"),
        (
            "trainer.prompts_per_step=10000000",
            "trainer.prompts_per_step: Input should be less than or equal to 1048576",
        ),
        ("reward.num_workers=100000", "reward.num_workers=100000 is more than 256 verifier processes per rank"),
        ("reward.timeout_s=.inf", "reward.timeout_s: Input should be a finite number (got inf)"),
        ("reward.timeout_s=86400", "reward.timeout_s=86400.0 is more than 3600 s"),
        ("tracking.wandb.init_timeout_s=.inf", "tracking.wandb.init_timeout_s: Input should be a finite number"),
        ("distributed.nproc_per_node=0", "distributed.nproc_per_node: Input should be greater than or equal to 1"),
        ("trainer.seed=-1", "trainer.seed: Input should be greater than or equal to 0 (got -1)"),
    ],
)
def test_out_of_range_numbers_are_refused_at_load_with_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_cpu.yaml", [override])
    assert expected.replace("1e-12", "0.000000000001") in str(e.value)
    assert "Fix:" in str(e.value)


def test_a_bound_error_names_the_default_as_the_fix():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr=.inf"])
    assert str(e.value) == (
        "invalid configuration: optim.lr: Input should be a finite number (got inf). "
        "Fix: set optim.lr within its range, e.g. its default 1e-06"
    )


def _numeric_keys(model=Config, prefix=""):
    """(dotted key, field) of every field holding an int or a float, nested sections included."""
    import re
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        optional = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if optional:  # an optional section (model.lora)
            ann = optional[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _numeric_keys(ann, f"{prefix}{name}.")
        elif re.search(r"\b(int|float)\b", str(ann)):  # not 'float32', a dtype name
            yield prefix + name, field


# checked by Config._check_reward_bounds (the reward section's fields are the rewards' own)
BOUNDED_BY_THE_CONFIG = {
    "reward.num_workers",
    "reward.timeout_s",
    "reward.memory_limit_mb",
    "reward.worker_memory_growth_mb",
}


def test_every_number_key_refuses_infinity_and_nan_and_has_an_upper_bound():
    keys = dict(_numeric_keys())
    assert len(keys) == 59 and "model.dtype" not in keys and "rollout.dtype" not in keys
    assert {
        "optim.lr",
        "optim.betas",
        "rollout.vllm.kv_cache_gib",
        "trainer.packed_row_tokens",
        "model.lora.rank",
    } <= set(keys)
    for key in keys:
        for value in (".inf", ".nan", "-.inf"):
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                load_config(None, [f"{key}={[value, value] if key == 'optim.betas' else value}".replace("'", "")])
        if key in BOUNDED_BY_THE_CONFIG:
            continue
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # a typo's worth of zeros too many
            load_config(None, [f"{key}={[10**12, 10**12] if key == 'optim.betas' else 10**12}"])
    for key in BOUNDED_BY_THE_CONFIG:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={10**12}"])
