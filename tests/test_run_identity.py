"""Resume refuses a silently changed config or training data, and allows what is asked for."""

from __future__ import annotations

import hashlib
import json

import pytest

from drpo_trainer.config import ConfigError, dump_config, load_config
from drpo_trainer.runtime.run_identity import check_resume, config_changes, data_fingerprint

SMALL = ("config.yaml", "loop_state.json")


@pytest.fixture
def run(tmp_path):
    """A run directory with one checkpoint of `base` (config + data fingerprint), as save_run writes it."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    out = tmp_path / "run"
    base = ["output_dir=" + str(out), f"data.train_files=[{data}]", "optim.lr=1e-4", "trainer.max_steps=10"]
    cfg = load_config(None, base)
    ckpt = out / "checkpoints" / "step_000005"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    state = {"step": 5, "world_size": 1, "data_fingerprint": data_fingerprint([str(data)])}
    (ckpt / "loop_state.json").write_text(json.dumps(state))
    files = {n: [(ckpt / n).stat().st_size, hashlib.sha256((ckpt / n).read_bytes()).hexdigest()] for n in SMALL}
    (ckpt / "MANIFEST.json").write_text(json.dumps({"files": files}))  # resume reads only a verified checkpoint
    return base, data


def test_same_config_and_data_resume_silently(run):
    base, _ = run
    assert check_resume(load_config(None, base), "auto", []) == []


def test_a_changed_key_is_refused_with_the_diff_and_the_fix(run):
    base, _ = run
    cfg = load_config(None, [*base, "optim.lr=2e-4", "trainer.max_steps=20"])
    with pytest.raises(ConfigError) as err:
        check_resume(cfg, "auto", [])
    msg = str(err.value)
    assert "optim.lr: 0.0001 -> 0.0002" in msg and "trainer.max_steps: 10 -> 20" in msg
    assert "--allow-config-change optim.lr,trainer.max_steps" in msg
    # allowed by key or by section, the changes are reported as taking effect
    assert check_resume(cfg, "auto", ["optim", "trainer.max_steps"]) == [
        "optim.lr: 0.0001 -> 0.0002",
        "trainer.max_steps: 10 -> 20",
    ]
    with pytest.raises(ConfigError, match="--allow-config-change optim.lr"):
        check_resume(cfg, "auto", ["trainer.max_steps", "optim.lr_typo"])


def test_changed_training_data_is_refused_unless_allowed(run):
    base, data = run
    data.write_text('{"prompt": "1+2", "answer": "3"}\n')  # same file name, other contents
    cfg = load_config(None, base)
    with pytest.raises(ConfigError, match="data.contents.*--allow-config-change data.contents"):
        check_resume(cfg, "auto", [])
    assert check_resume(cfg, "auto", ["data.contents"]) == [
        "data.contents: \"the checkpoint's training data\" -> 'other contents'"
    ]


def test_settings_that_do_not_change_training_are_allowed_and_reported(run):
    base, _ = run
    cfg = load_config(None, [*base, "tracking.wandb.mode=offline", "eval.every_steps=5"])
    assert check_resume(cfg, "auto", []) == ["eval.every_steps: 0 -> 5", "tracking.wandb.mode: 'disabled' -> 'offline'"]


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'empty'}"])
    assert check_resume(cfg, "auto", []) == [] and check_resume(cfg, None, []) == []


def test_config_changes_flattens_nested_sections():
    a = load_config(None, [])
    b = load_config(None, ["tracking.wandb.tags=[x]", "algorithm.loss_params.delta=5"])
    assert config_changes(dump_config(a), b) == {
        "algorithm.loss_params.delta": (12.5, 5.0),
        "tracking.wandb.tags": ([], ["x"]),
    }
