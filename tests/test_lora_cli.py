"""LoRA (model.lora) through `drpo-train`: SIGTERM mid-run and `--resume auto` continue bitwise as the
uninterrupted run; the exports (merged, and `--adapter` for peft) give the learner's log-probs; `drpo-train
eval` loads either. In-process checkpoint tests: tests/test_lora_resume.py.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import resume_helpers as h
import torch

from drpo_trainer.runtime.stop import EXIT_PREEMPTED

LORA = {"rank": 4, "alpha": 8.0}


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "drpo_trainer.cli", *args]
    return subprocess.run(cmd, env=h.env(), cwd=h.REPO, capture_output=True, text=True, timeout=300)


@functools.lru_cache(maxsize=None)
def full_run() -> Path:
    """An uninterrupted 6-step LoRA run: its last checkpoint (step 6) and its merged final/ export."""
    out = h.scratch() / "lora_full"
    cfg = h.write_config(
        h.scratch() / "lora_full.yaml",
        h.workspace(),
        out,
        **{"model.lora": LORA, "checkpoint.every_steps": 0, "checkpoint.export_final": True},
    )
    h.train(cfg)
    return out


@pytest.mark.slow  # ~70 s: two CLI runs; the in-process exact-resume test above covers the same state
def test_sigterm_and_resume_with_lora_is_bitwise_the_uninterrupted_run(tmp_path):
    ws, lora = h.workspace(), {"model.lora": LORA, "checkpoint.every_steps": 0}
    full = full_run()
    out = tmp_path / "run"
    cfg = h.write_config(tmp_path / "c.yaml", ws, out, **lora)
    proc = h.start(cfg, log=tmp_path / "first.log")
    steps = lambda: len(h.metrics_rows(out)) if (out / "metrics.jsonl").exists() else 0  # noqa: E731
    assert h.wait_for(lambda: steps() >= 1, timeout=240), (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    stopped = int((out / "PREEMPTED").read_text())
    assert 1 <= stopped < 6
    resumed = h.train(cfg, "--resume", "auto")
    assert f"at step {stopped}" in resumed.stderr
    rows = [h.without_timings(r) for r in h.metrics_rows(out)]
    assert rows == [h.without_timings(r) for r in h.metrics_rows(full)]
    want = _state(full / "checkpoints" / "step_000006")
    got = _state(out / "checkpoints" / "step_000006")
    assert want.keys() == got.keys() and any(".lora_B." in k for k in want)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The adapters and Adam's moments of a one-process (ZeRO stage 0) checkpoint."""
    saved = torch.load(ckpt / "ds" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    opt = saved["optimizer"]["state"]
    moments = {f"adam.{i}.{k}": v for i, s in opt.items() for k, v in s.items() if torch.is_tensor(v)}
    return {**saved["module"], **moments}


@pytest.mark.slow  # a 6-step run and two evals through the CLI (~60 s); tests/test_lora_resume.py exports in-process
def test_final_export_is_the_merged_checkpoint_and_eval_loads_merged_and_adapter(tmp_path):
    from safetensors.torch import load_file

    from drpo_trainer.io.export import export_checkpoint

    out = full_run()
    ckpt = out / "checkpoints" / "step_000006"
    offline = export_checkpoint(ckpt, tmp_path / "merged")
    final, again = load_file(out / "final" / "model.safetensors"), load_file(offline / "model.safetensors")
    assert final.keys() == again.keys() and any("q_proj" in k for k in final)
    for name in final:  # the live export at the run's end and the offline merge: the same bits
        assert torch.equal(final[name], again[name]), name
    adapter = _cli("export", str(ckpt), str(tmp_path / "adapter"), "--adapter")
    assert adapter.returncode == 0, adapter.stderr[-3000:]
    scores = {}
    for name, model in (("merged", out / "final"), ("adapter", tmp_path / "adapter")):
        cfg = h.write_config(
            tmp_path / f"eval_{name}.yaml",
            h.workspace(),
            tmp_path / f"eval_run_{name}",
            **{"eval.files": {"tiny": h.workspace()["train"]}, "eval.max_problems": 4, "eval.samples_per_prompt": 2},
        )
        proc = _cli("eval", str(model), "--config", str(cfg), "--out", str(tmp_path / f"eval_{name}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        scores[name] = json.loads((tmp_path / f"eval_{name}" / "metrics.json").read_text())["sets"]["tiny"]
    assert scores["merged"] == scores["adapter"]  # the same policy, sampled with the same seeds


@pytest.mark.slow  # a two-process run (~2 min on a loaded machine); the sync itself: tests/test_lora.py
def test_asynchronous_layout_trains_lora_and_its_rollout_process_stays_exact(tmp_path):
    out = tmp_path / "run"
    cfg = h.write_config(
        tmp_path / "c.yaml",
        h.workspace(),
        out,
        **{
            "model.lora": LORA,
            "distributed.nproc_per_node": 2,
            "distributed.rollout_processes": 1,
            "rollout.parity_check": True,
            "trainer.max_steps": 3,
            "checkpoint.every_steps": 0,
        },
    )
    h.train(cfg)
    rows = h.metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the rollout process's engine after every broadcast: the learner's policy to fp32 round-off
    assert all(r["parity/mean_abs_logprob_diff"] < 1e-5 for r in rows)
    # 2 layers x 7 projections in fp32: q, o 64 x 64; k, v 32 x 64 (2 KV heads of 16); MLP 3 x 64 x 256
    assert all(r["sync/bytes"] == 2 * 4 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 256) == 491520 for r in rows)
    assert (out / "checkpoints" / "step_000003").is_dir()
