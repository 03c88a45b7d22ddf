"""The eval section: its own sampling settings (defaulting to training's), a per-set n, the old name
eval.k refused with "renamed to" and read under its new name from an old checkpoint's config; the
training sampling spec does not move when the eval's settings do."""

from __future__ import annotations

import pytest
import yaml

from drpo_trainer.config import ConfigError, dump_config, load_config
from drpo_trainer.rollout.evaluation import eval_spec
from drpo_trainer.rollout.producer import sampling_spec


def test_eval_sampling_defaults_to_the_training_settings():
    cfg = load_config("configs/tiny_cpu.yaml")
    spec = eval_spec(cfg, 4, seed=3)
    # tiny_cpu: temperature 1.0, top_p 1.0 (default), top_k 0, max_new_tokens 24
    assert (spec.n, spec.temperature, spec.top_p, spec.top_k, spec.max_new_tokens, spec.seed) == (4, 1.0, 1.0, 0, 24, 3)


def test_eval_settings_change_the_eval_spec_only():
    over = ["eval.temperature=0.6", "eval.top_p=0.95", "eval.max_new_tokens=48", "eval.samples_per_prompt=8"]
    base, cfg = load_config("configs/tiny_cpu.yaml"), load_config("configs/tiny_cpu.yaml", over)
    spec = eval_spec(cfg, cfg.eval.samples_per_prompt_of("synthetic"), seed=0)
    assert (spec.n, spec.temperature, spec.top_p, spec.max_new_tokens) == (8, 0.6, 0.95, 48)
    assert sampling_spec(cfg, n=8, seed=5) == sampling_spec(base, n=8, seed=5)  # training's, as before


def test_each_eval_set_may_have_its_own_n():
    cfg = load_config(
        None,
        ["eval.files={a: a.jsonl, b: b.jsonl}", "eval.samples_per_prompt=4", "eval.samples_per_prompt_by_set.b=16"],
    )
    assert (cfg.eval.samples_per_prompt_of("a"), cfg.eval.samples_per_prompt_of("b")) == (4, 16)


def test_a_per_set_n_for_a_set_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.files={aime24: a.jsonl}", "eval.samples_per_prompt_by_set.aime42=16"])
    assert str(e.value) == (
        "invalid configuration: eval: eval.samples_per_prompt_by_set names aime42, not a set of eval.files "
        "(aime24). Fix: use the names of eval.files"
    )
    # with no eval set at all nothing is evaluated: a config that turns eval off still loads
    assert load_config(None, ["eval.files={}", "eval.samples_per_prompt_by_set.aime42=16"]).eval.files == {}


def test_the_old_name_eval_k_is_refused_with_its_new_name():
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_cpu.yaml", ["eval.k=8"])
    assert str(e.value) == (
        "eval.k was renamed to eval.samples_per_prompt (the name training uses for completions per prompt). "
        "Fix: use the new name, e.g. eval.samples_per_prompt=8"
    )


def test_an_old_checkpoint_with_eval_k_resumes_unchanged(tmp_path):
    from drpo_trainer.runtime.run_identity import config_changes

    cfg = load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path}"])
    tree = yaml.safe_load(dump_config(cfg))
    tree["eval"]["k"] = tree["eval"].pop("samples_per_prompt")
    for key in ("samples_per_prompt_by_set", "top_p", "max_new_tokens"):  # keys added since
        del tree["eval"][key]
    assert config_changes(yaml.safe_dump(tree), cfg) == {}
    tree["eval"]["k"] = 16
    assert config_changes(yaml.safe_dump(tree), cfg) == {"eval.samples_per_prompt": (16, 4)}
