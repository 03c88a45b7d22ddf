"""What a run or an export may write over: drpo_trainer.io.run_dir's rules, one case each, on
directories made here (no model needed). The same rules through the CLI on real runs:
tests/test_safety_checkpoints.py."""

from __future__ import annotations

import os

import pytest

from drpo_trainer.config import ConfigError
from drpo_trainer.io.run_dir import EXPORT_MARKER, check_export_target, check_output_dir, publish_export, staging_dir


@pytest.fixture
def used(tmp_path):
    """A run directory with a checkpoint."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    (out / "config.yaml").write_text("output_dir: run\n")
    (out / "metrics.jsonl").write_text("")
    return out


@pytest.mark.parametrize("marker", ["config.yaml", "metrics.jsonl", "checkpoints"])
def test_a_new_run_refuses_a_directory_holding_any_part_of_a_run(tmp_path, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).mkdir() if marker == "checkpoints" else (out / marker).write_text("")
    with pytest.raises(
        ConfigError, match=rf"output_dir {out} holds a run \({marker}\): a new run would .*--resume auto"
    ):
        check_output_dir(out, None)


def test_a_run_continues_only_its_own_checkpoints(used, tmp_path):
    check_output_dir(used, "auto")
    check_output_dir(used, str(used / "checkpoints" / "step_000001"))
    elsewhere = tmp_path / "other" / "checkpoints" / "step_000003"
    with pytest.raises(ConfigError, match=f"a run resumed from {elsewhere}, outside it, would overwrite it"):
        check_output_dir(used, str(elsewhere))
    check_output_dir(tmp_path / "fresh", str(elsewhere))  # into a new directory: fine


def test_an_empty_or_unrelated_directory_takes_a_new_run(tmp_path):
    check_output_dir(tmp_path / "does" / "not" / "exist", None)
    (tmp_path / "notes.txt").write_text("")
    check_output_dir(tmp_path, None)


def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="output_dir .*file is a file. Fix: set output_dir to a directory"):
        check_output_dir(tmp_path / "file", None)
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the read-only case cannot be made here")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=f"{ro} is not writable"):
        check_output_dir(ro / "run", None)


def test_export_targets(used, tmp_path, monkeypatch):
    ckpt = used / "checkpoints" / "step_000001"
    monkeypatch.chdir(tmp_path)
    for forbidden in (tmp_path, tmp_path.parent, used, ckpt, ckpt / "hf", used / "checkpoints"):
        with pytest.raises(ConfigError, match="never replaced"):
            check_export_target(forbidden, ckpt, overwrite=True)
    check_export_target(tmp_path / "new", ckpt, overwrite=False)
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", ckpt, overwrite=False)
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / EXPORT_MARKER).write_text("{}")
    (tmp_path / "earlier" / "model.safetensors").write_text("")
    check_export_target(tmp_path / "earlier", ckpt, overwrite=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("")
    with pytest.raises(ConfigError, match="not empty and is not an earlier export .* --overwrite"):
        check_export_target(tmp_path / "mine", ckpt, overwrite=False)
    check_export_target(tmp_path / "mine", ckpt, overwrite=True)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_export_target(tmp_path / "afile", ckpt, overwrite=True)


def test_publish_moves_the_new_export_in_and_only_then_removes_the_old(tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "old.bin").write_text("old")
    staged = staging_dir(out)
    assert staged.parent == tmp_path and staged.name.startswith(".exported.tmp-")
    (staged / "new.bin").write_text("new")
    publish_export(staged, out, source="ckpt")
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_MARKER, "new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # neither the staging nor the old copy is left
