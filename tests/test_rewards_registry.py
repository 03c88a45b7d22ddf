"""reward.name selects only functions registered with @register_reward by the user's own modules
(reward.import_modules): an arbitrary importable callable such as pydoc:pipepager, which ran the
gold answer as a shell command, is refused in one line before its module is even imported."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from job_helpers import refused_in_one_line

from drpo_trainer.rewards import RewardScorer, get_reward

REPO = Path(__file__).resolve().parents[1]
ARBITRARY = ["pydoc:pipepager", "os:system", "subprocess:getoutput", "builtins:eval", "shutil:rmtree"]


@pytest.mark.parametrize("name", ARBITRARY)
def test_arbitrary_callables_are_refused_before_import(name):
    module = name.split(":")[0]
    with pytest.raises(ValueError) as e:
        get_reward(name)
    message = str(e.value)
    assert "\n" not in message
    assert f"module '{module}' is not in reward.import_modules" in message
    assert "Fix: decorate your function with @register_reward" in message
    # even when the user lists the module, its unregistered functions are refused
    with pytest.raises(ValueError, match=rf"{module}\.{name.split(':')[1]} is not a registered reward\. Fix: "):
        get_reward(name, [module])


def test_refusal_imports_and_runs_nothing(tmp_path):
    """In a fresh interpreter: pydoc is never imported, no worker starts, the marker never appears."""
    marker = tmp_path / "pwned"
    script = textwrap.dedent(
        f"""
        import sys
        from drpo_trainer.rewards import RewardScorer
        assert "pydoc" not in sys.modules
        try:
            RewardScorer("pydoc:pipepager", num_workers=1).score(["x"], ["touch {marker}"])
        except ValueError as err:
            print("refused:", err)
        print("pydoc imported:", "pydoc" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused: reward 'pydoc:pipepager': module 'pydoc' is not in reward.import_modules" in proc.stdout
    assert "pydoc imported: False" in proc.stdout
    assert not marker.exists()


def _user_module(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_registered_rewards_are_found_through_import_modules(tmp_path, monkeypatch):
    module = _user_module(
        tmp_path,
        monkeypatch,
        "user_rewards_a1",
        """
        from drpo_trainer.rewards import register_reward

        @register_reward("user_len")
        def user_len(completion, answer):
            return len(completion) / 10

        def helper(completion, answer):
            return 1.0
        """,
    )
    with pytest.raises(ValueError, match="unknown reward 'user_len'.*Fix: .*reward.import_modules"):
        get_reward("user_len")  # not imported yet: nothing is imported by name alone
    fn = get_reward("user_len", [module])
    assert get_reward(f"{module}:user_len", [module]) is fn
    with pytest.raises(ValueError, match=f"{module}.helper is not a registered reward"):
        get_reward(f"{module}:helper", [module])
    # the verifier workers import the function's module and score with it: len('abcd') / 10 = 0.4
    with RewardScorer("user_len", num_workers=1, import_modules=[module]) as scorer:
        assert scorer.score(["abcd", "x"], ["", ""])[0] == [pytest.approx(0.4), pytest.approx(0.1)]


def test_bad_import_modules_are_one_line(tmp_path, monkeypatch):
    broken = _user_module(tmp_path, monkeypatch, "user_rewards_broken", "raise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ValueError) as e:
        get_reward("math", [broken])
    assert str(e.value) == (
        "reward.import_modules: cannot import 'user_rewards_broken' (RuntimeError: boom). Fix: make it importable "
        "(install the package or add its folder to PYTHONPATH)"
    )
    with pytest.raises(ValueError, match="'os; import x' is not a module path"):
        get_reward("math", ["os; import x"])


@pytest.mark.parametrize(
    "overrides", [["reward.name=pydoc:pipepager"], ["reward.name=pydoc:pipepager", "reward.import_modules=[pydoc]"]]
)
def test_cli_refuses_pipepager_in_one_line_and_runs_nothing(tmp_path, overrides):
    marker = tmp_path / "pwned"
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "answer": f"touch {marker}"}) + "\n")
    out = tmp_path / "run"
    line = refused_in_one_line(f"output_dir={out}", f"data.train_files=[{data}]", "eval.files={}", *overrides)
    assert line.startswith("drpo-train: reward.name: reward 'pydoc:pipepager': ") and "Fix: " in line
    assert not marker.exists() and not out.exists()


def test_checkpoint_config_from_before_import_modules_resumes_unchanged():
    """A run saved before reward.import_modules and reward.worker_memory_growth_mb existed held their
    defaults in effect: resuming it with the defaults is no config change; naming a module is one."""
    import yaml

    from drpo_trainer.config import dump_config, load_config
    from drpo_trainer.runtime.run_identity import config_changes

    saved = yaml.safe_load(dump_config(load_config(None, [])))
    del saved["reward"]["import_modules"], saved["reward"]["worker_memory_growth_mb"]
    assert config_changes(yaml.safe_dump(saved), load_config(None, [])) == {}
    changed = load_config(None, ["reward.import_modules=[resume_helpers]"])
    assert config_changes(yaml.safe_dump(saved), changed) == {"reward.import_modules": ([], ["resume_helpers"])}
