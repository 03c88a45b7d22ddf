"""Resume against the real DeepSpeed engine, in-process: what a checkpoint gives back is the state the
uninterrupted run had at that step, and the resumed run continues it bitwise.

The model has attention dropout, so the update draws from the global torch RNG (the rollouts fork
their own seeded stream): a resume that does not restore that RNG trains other dropout masks. The
trainer itself draws from neither python's `random` nor numpy's global RNG, but user code in the
run (a model's remote code) may: the test scrambles them before resuming and checks that the
checkpoint puts every stream back where it was.

Per ZeRO stage (0, and 3 in one process): run A trains 4 steps and checkpoints at 2 and 4; run B
resumes from A's step 2 into its own directory and trains steps 3-4. Tests compare B with A:
metrics and final weights bitwise, Adam's moments and step count and the lr schedule's position
right after the restore, and the RNG streams right after the restore.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_helpers import consolidated_weights, metrics_rows, without_timings

from drpo_trainer.config import load_config
from drpo_trainer.runtime import loop

STEPS, MINIBATCHES = 4, 2


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny random model with attention dropout 0.3 (active in the learner's update forward)."""
    d = tmp_path_factory.mktemp("dropout_model")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    config = json.loads((d / "config.json").read_text())
    config["attention_dropout"] = 0.3
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's wrappers (at ZeRO-3 it holds this rank's fp32 partitions)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    assert isinstance(opt, torch.optim.Optimizer), type(opt)
    return opt


def engine_state(run) -> dict:
    """Adam's moments and step counts in parameter order, the lr schedule's position, and the RNG states."""
    opt = torch_optimizer(run.learner.engine)
    # ZeRO-3 hands the torch optimizer its flat fp32 partitions only while it steps
    params = getattr(run.learner.engine.optimizer, "fp32_partitioned_groups_flat", None)
    params = params or [p for group in opt.param_groups for p in group["params"]]
    state = [opt.state.get(p, {}) for p in params]
    return {
        "exp_avg": [s["exp_avg"].clone() if "exp_avg" in s else None for s in state],
        "exp_avg_sq": [s["exp_avg_sq"].clone() if "exp_avg_sq" in s else None for s in state],
        "adam_step": [float(s["step"]) if "step" in s else None for s in state],
        "schedule_epoch": run.learner.scheduler.last_epoch,
        "lr": run.learner.engine.get_lr()[0],
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state().clone(),
    }


@pytest.fixture(scope="module", params=[0, 3], ids=["zero0", "zero3"])
def runs(request, tmp_path_factory, dropout_model_dir, one_process_ctx):
    """(A's output dir, B's output dir, A's state at each checkpoint, B's state right after the restore)."""
    from drpo_trainer.builtin.arithmetic import problem_row, train_problems

    stage = request.param
    d = tmp_path_factory.mktemp(f"resume_engine_zero{stage}")
    (d / "train.jsonl").write_text("".join(json.dumps(problem_row(p)) + "\n" for p in train_problems()[:16]))

    def config(out: Path):
        return load_config(
            None,
            [
                f"output_dir={out}",
                f"model.path={dropout_model_dir}",
                f"data.train_files=[{d / 'train.jsonl'}]",
                "data.max_prompt_tokens=64",
                "rollout.samples_per_prompt=4",
                "rollout.max_new_tokens=8",
                f"trainer.max_steps={STEPS}",
                "trainer.prompts_per_step=4",
                f"trainer.minibatches_per_step={MINIBATCHES}",
                "trainer.micro_batch_tokens_per_gpu=512",
                "optim.lr=1.0e-3",
                "optim.warmup_steps=2",
                "optim.schedule=warmup_cosine",
                "reward.name=resume_helpers:text_value_reward",  # every group has reward variance
                "reward.import_modules=[resume_helpers]",
                "reward.num_workers=1",
                f"distributed.single_process_zero_stage={stage}",
                "eval.files={}",
                "eval.at_start=false",
                "checkpoint.every_steps=2",
                "checkpoint.keep_last=3",
                "checkpoint.export_final=false",
                "tracking.progress_bar=false",
                "tracking.wandb.mode=disabled",
            ],
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved, restored = {}, {}
    real_save, real_build = loop.save_run, loop.build_run

    def save_run(run):
        saved[run.step] = engine_state(run)
        return real_save(run)

    def build_run(*args, **kwargs):
        run = real_build(*args, **kwargs)
        restored.update(engine_state(run))
        return run

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "save_run", save_run)
    random.seed(100 + stage)  # streams the trainer does not seed: A's checkpoints save these...
    np.random.seed(100 + stage)
    loop.train(config(d / "a"), ctx=one_process_ctx)
    random.seed(1234)  # ...and a resume that does not restore them keeps these
    np.random.seed(1234)
    mp.setattr(loop, "build_run", build_run)
    loop.train(config(d / "b"), resume=str(d / "a" / "checkpoints" / "step_000002"), ctx=one_process_ctx)
    mp.undo()
    torch.set_num_threads(threads)
    return d / "a", d / "b", saved, restored


def test_resumed_run_with_dropout_continues_bitwise(runs):
    a, b, _, _ = runs
    rows_a = [without_timings(r) for r in metrics_rows(a) if r.get("step", 0) > 2]
    rows_b = [without_timings(r) for r in metrics_rows(b)]
    assert [r["step"] for r in rows_b] == [3, 4]
    assert rows_b == rows_a
    wa, wb = (consolidated_weights(x / "checkpoints" / "step_000004") for x in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_resume_restores_adam_moments_and_the_lr_schedule(runs):
    _, _, saved, restored = runs
    want = saved[2]
    n = len(want["exp_avg"])
    assert n > 0 and all(m is not None for m in want["exp_avg"])  # two steps x 2 mini-batches of Adam
    assert want["adam_step"] == [2.0 * MINIBATCHES] * n
    assert restored["adam_step"] == want["adam_step"]
    for key in ("exp_avg", "exp_avg_sq"):
        for i, (w, r) in enumerate(zip(want[key], restored[key])):
            assert r is not None, f"{key}[{i}] was not restored"
            assert torch.equal(w, r), f"{key}[{i}]"
    # the schedule is at optimizer step 4 of 8: warm-up over, one cosine increment in
    assert restored["schedule_epoch"] == want["schedule_epoch"] == 2 * MINIBATCHES
    assert restored["lr"] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 2 / 6)), rel=1e-12)


def test_resume_restores_every_global_rng_stream(runs):
    _, _, saved, restored = runs
    want = saved[2]
    assert restored["python_rng"] == want["python_rng"]
    w, r = want["numpy_rng"], restored["numpy_rng"]
    assert (r[0], r[2:]) == (w[0], w[2:]) and np.array_equal(r[1], w[1])
    assert torch.equal(restored["torch_rng"], want["torch_rng"])
