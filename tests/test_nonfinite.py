"""A step whose loss turns NaN stops the run before its optimizer step, naming the step, the metric and
the last good checkpoint, and leaves that checkpoint as it was (the real train() on the tiny model)."""

from __future__ import annotations

import json
import math

import pytest

from drpo_trainer.config import load_config
from drpo_trainer.learner import learner as learner_module
from drpo_trainer.runtime.loop import TrainingDiverged, train

NAN_FROM_CALL = 5  # 2 mini-batches x 1 micro-batch per step: calls 1-4 are steps 1-2, call 5 is step 3


def test_a_nan_loss_stops_at_its_step_with_the_last_good_checkpoint(
    tmp_path, tiny_model_dir, one_process_ctx, monkeypatch
):
    from drpo_trainer.builtin.arithmetic import problem_row, train_problems

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(problem_row(p)) + "\n" for p in train_problems()[:8]))
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            f"model.path={tiny_model_dir}",
            f"data.train_files=[{tmp_path / 'train.jsonl'}]",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=6",
            "trainer.prompts_per_step=2",
            "trainer.minibatches_per_step=2",
            "trainer.max_steps=4",
            "trainer.skip_zero_advantage=false",  # every micro-batch reaches the loss, whatever the rewards
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=5",
            "checkpoint.export_final=false",
            "reward.num_workers=1",
            "tracking.progress_bar=false",
        ],
    )
    real = learner_module.compute_policy_loss
    calls = []

    def nan_from_step_3(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= NAN_FROM_CALL else loss), metrics

    monkeypatch.setattr(learner_module, "compute_policy_loss", nan_from_step_3)

    with pytest.raises(TrainingDiverged) as stopped:
        train(cfg, ctx=one_process_ctx)
    message = str(stopped.value)
    assert message.startswith("step 3: loss/policy is nan; the run stopped before the optimizer step")
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step_000002'}" in message
    assert message.endswith(
        "Fix: resume it with --resume auto and a lower optim.lr or a tighter optim.grad_clip, "
        "or check the reward and the data of this step (samples.jsonl)"
    )
    # nothing of step 3 was written: two checkpoints, two metric rows (steps 1 and 2)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000001", "step_000002"]
    assert len(calls) == NAN_FROM_CALL  # step 3 stopped at its first mini-batch, before any optimizer step
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/policy" in r] == [1, 2]
    assert all(math.isfinite(r["loss/policy"]) for r in rows if "loss/policy" in r)
