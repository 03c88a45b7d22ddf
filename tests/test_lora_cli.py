"""LoRA (model.lora) through `drpo-train`: SIGTERM mid-run and `--resume auto` continue bitwise as the
uninterrupted run; the exports (merged, and `--adapter` for peft) give the learner's log-probs; `drpo-train
eval` loads either. In-process checkpoint tests: tests/test_lora_resume.py.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import resume_helpers as h
import torch

from drpo_trainer.runtime.stop import EXIT_PREEMPTED

LORA = {"rank": 4, "alpha": 8.0}


@pytest.mark.slow  # ~70 s: two CLI runs; the in-process exact-resume test above covers the same state
def test_sigterm_and_resume_with_lora_is_bitwise_the_uninterrupted_run(tmp_path):
    ws, lora = h.workspace(), {"model.lora": LORA, "checkpoint.every_steps": 0}
    full = tmp_path / "full"
    h.train(h.write_config(tmp_path / "full.yaml", ws, full, **lora))
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
