"""The training loop's contract, through the real `train` / `run_step` (not a copy of their wiring).

- Every optimizer step's learning rate is the schedule's formula (written out here) over the WHOLE
  run: max_steps x minibatches_per_step optimizer steps, warm-up included.
- Every mini-batch's behaviour log-probs mu are a no-grad forward of the weights from the START of
  the step (a copy taken when the step begins, scored here by a plain transformers forward), also
  for mini-batches 2.. after the weights have moved, with and without
  trainer.reuse_first_minibatch_logprobs.
- The learner's staleness guard (RemoteRollouts.batch) takes a batch whose lag is 0 or k and refuses
  lags -1 and k + 1 with its message; the batches come from a fake bridge.

The runs are in-process (one gloo process, ZeRO stage 0), 4 steps x 3 mini-batches of a tiny random
model, a few seconds each.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time

import pytest
import torch

from drpo_trainer.config import load_config
from drpo_trainer.learner.learner import Learner
from drpo_trainer.runtime import loop
from drpo_trainer.runtime.wire import batch_to_plain

STEPS, MINIBATCHES, G, PROMPTS = 4, 3, 4, 6
LR, WARMUP = 1.0e-3, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from drpo_trainer.builtin.arithmetic import problem_row, train_problems

    d = tmp_path_factory.mktemp("loop_contract")
    (d / "train.jsonl").write_text("".join(json.dumps(problem_row(p)) + "\n" for p in train_problems()[:24]))
    return d


def tiny_config(data_dir, model_dir, out, *overrides: str):
    return load_config(
        None,
        [
            f"output_dir={out}",
            f"model.path={model_dir}",
            f"data.train_files=[{data_dir / 'train.jsonl'}]",
            "data.max_prompt_tokens=64",
            f"rollout.samples_per_prompt={G}",
            "rollout.max_new_tokens=8",
            f"trainer.max_steps={STEPS}",
            f"trainer.prompts_per_step={PROMPTS}",
            f"trainer.minibatches_per_step={MINIBATCHES}",
            "trainer.micro_batch_tokens_per_gpu=256",  # several micro-batches per mini-batch
            f"optim.lr={LR}",
            f"optim.warmup_steps={WARMUP}",
            "reward.name=resume_helpers:text_value_reward",  # every group has reward variance
            "reward.import_modules=[resume_helpers]",
            "reward.num_workers=1",
            "eval.files={}",
            "eval.at_start=false",
            "checkpoint.export_final=false",
            "tracking.progress_bar=false",
            "tracking.wandb.mode=disabled",
            *overrides,
        ],
    )


class UpdateLog:
    """Wraps Learner.update (the class's, so the learner `train` builds is covered): per call, the
    step it belongs to, the lr it reports and its trained samples' mu."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        self.step_start_weights: dict[int, dict] = {}
        real_update, real_run_step = Learner.update, loop.run_step
        self.step = 0

        def run_step(run, step, stop=None):
            # the weights the step starts from (stage 0: the module holds every full tensor)
            self.step_start_weights[step] = copy.deepcopy(run.learner.module.state_dict())
            self.step = step
            return real_run_step(run, step, stop)

        def update(learner, minibatch, **kwargs):
            out = real_update(learner, minibatch, **kwargs)
            mu = [(s.input_ids, s.prompt_len, s.old_logprobs.clone()) for s in minibatch if s.old_logprobs is not None]
            self.calls.append({"step": self.step, "lr": out["optim/lr"], "mu": mu, "n": len(minibatch)})
            return out

        monkeypatch.setattr(loop, "run_step", run_step)
        monkeypatch.setattr(Learner, "update", update)


def expected_lr(schedule: str, i: int, total: int) -> float:
    """The lr of optimizer step i (0-based) of `total`: linear warm-up over WARMUP steps to LR, then
    LR (constant) or a half cosine from LR towards 0 over the remaining total - WARMUP steps."""
    if i < WARMUP:
        return LR * (i + 1) / WARMUP
    if schedule == "constant":
        return LR
    return LR * 0.5 * (1.0 + math.cos(math.pi * (i - WARMUP) / (total - WARMUP)))


@pytest.mark.parametrize("schedule", ["constant", "warmup_cosine"])
def test_every_optimizer_step_reports_the_schedules_lr(
    schedule, data_dir, tiny_model_dir, tmp_path, monkeypatch, one_process_ctx, one_thread
):
    cfg = tiny_config(data_dir, tiny_model_dir, tmp_path / "out", f"optim.schedule={schedule}")
    log = UpdateLog(monkeypatch)
    began = time.perf_counter()
    loop.train(cfg, ctx=one_process_ctx)
    wall = time.perf_counter() - began
    total = STEPS * MINIBATCHES
    assert [c["step"] for c in log.calls] == [s for s in range(1, STEPS + 1) for _ in range(MINIBATCHES)]
    want = [expected_lr(schedule, i, total) for i in range(total)]
    assert [c["lr"] for c in log.calls] == pytest.approx(want, rel=1e-12, abs=1e-15)
    if schedule == "warmup_cosine":  # the last optimizer step is one cosine increment above 0, not 0
        assert log.calls[-1]["lr"] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 9 / 10)), rel=1e-12)
    # metrics.jsonl: a step's optim/lr is the mean over its mini-batches
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["optim/lr"] for r in rows if "optim/lr" in r]
    means = [sum(want[i : i + MINIBATCHES]) / MINIBATCHES for i in range(0, total, MINIBATCHES)]
    assert logged == pytest.approx(means, rel=1e-12)
    # time/elapsed: the training wall clock at each step's end, which holds every step so far and not start-up
    step_rows = [r for r in rows if "time/step" in r]
    elapsed = [r["time/elapsed"] for r in step_rows]
    assert len(elapsed) == STEPS and all(b > a for a, b in zip(elapsed, elapsed[1:]))
    assert all(e >= s for e, s in zip(elapsed, itertools.accumulate(r["time/step"] for r in step_rows)))
    assert elapsed[-1] < wall


def fresh_logprobs(model_dir: str, weights: dict, samples, temperature: float) -> list[torch.Tensor]:
    """Completion-token log-probs of each sample, one unpacked sequence at a time, by a plain
    transformers model holding `weights` (eval mode, no grad), at the sampling temperature."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(weights)
    model.eval()
    out = []
    with torch.no_grad():
        for input_ids, prompt_len, _ in samples:
            ids = torch.tensor([input_ids])
            logits = model(ids).logits[0, prompt_len - 1 : -1].float()  # (Tc, V): predicts tokens prompt_len..
            lp = torch.log_softmax(logits / temperature, dim=-1)
            out.append(lp.gather(-1, ids[0, prompt_len:, None])[:, 0])
    return out


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse_first_minibatch", "recompute_all"])
def test_every_minibatch_mu_is_the_step_start_policy(
    reuse, data_dir, tiny_model_dir, tmp_path, monkeypatch, one_process_ctx, one_thread
):
    T = 0.8
    cfg = tiny_config(
        data_dir,
        tiny_model_dir,
        tmp_path / "out",
        f"rollout.temperature={T}",
        f"trainer.reuse_first_minibatch_logprobs={str(reuse).lower()}",
        "trainer.skip_zero_advantage=false",  # every sample gets mu
        "optim.lr=1.0e-2",
        "optim.weight_decay=0.1",  # the weights move at every optimizer step, whatever the rewards
        "trainer.max_steps=2",
    )
    log = UpdateLog(monkeypatch)
    loop.train(cfg, ctx=one_process_ctx)
    assert len(log.calls) == 2 * MINIBATCHES
    for step in (1, 2):
        calls = [c for c in log.calls if c["step"] == step]
        start = log.step_start_weights[step]
        for i, call in enumerate(calls):
            assert len(call["mu"]) == call["n"] == PROMPTS // MINIBATCHES * G
            want = fresh_logprobs(tiny_model_dir, start, call["mu"], T)
            for (_, _, got), w in zip(call["mu"], want):
                torch.testing.assert_close(got, w, rtol=0, atol=2e-5, msg=f"step {step} mini-batch {i + 1}")
    # the check has teeth: the weights after step 1's updates score its last mini-batch differently
    last = [c for c in log.calls if c["step"] == 1][-1]["mu"]
    moved = fresh_logprobs(tiny_model_dir, log.step_start_weights[2], last, T)
    assert max(float((m - got).abs().max()) for m, (_, _, got) in zip(moved, last)) > 1e-3


# -- the learner's staleness guard ------------------------------------------------------------------
class FakeStore:
    def add(self, key: str, amount: int) -> int:
        return 0


class FakeBridge:
    """The part of runtime.bridge.Bridge that RemoteRollouts.batch uses: one learner, one rollout
    process that sends the queued messages in order."""

    n_learners, n_rollouts, rank = 1, 1, 0
    rollout_ranks = [1]

    def __init__(self, messages: list) -> None:
        self.store, self.messages = FakeStore(), list(messages)

    def recv(self, src: int):
        assert src == 1
        return self.messages.pop(0)

    def describe(self, src: int) -> str:
        return f"rollout process {src}"


def make_batch(step: int, version: int):
    from drpo_trainer.rollout.producer import RolloutBatch

    return RolloutBatch(
        step=step,
        version=version,
        learner_rank=0,
        indices=[0],
        completions=[],
        rewards=[],
        reward_metrics={},
        advantages=[],
        adv_metrics={},
        sampler_after=(0, step),
    )


def remote_rollouts(max_lag: int, step: int, version: int):
    from types import SimpleNamespace

    from drpo_trainer.io.data import SamplerState
    from drpo_trainer.runtime.async_rollouts import RemoteRollouts

    run = SimpleNamespace(
        cfg=SimpleNamespace(trainer=SimpleNamespace(max_off_policy_steps=max_lag)),
        rank_state=None,
        step=step - 1,
        sampler=SimpleNamespace(state=SamplerState(0, 0)),
    )
    return RemoteRollouts(run, FakeBridge([("batch", step, batch_to_plain(make_batch(step, version)))])), run


@pytest.mark.parametrize("max_lag", [0, 1, 3])
@pytest.mark.parametrize("lag", ["zero", "k"])
def test_learner_takes_batches_at_the_staleness_bounds(max_lag, lag):
    step = 6
    version = step - 1 - (0 if lag == "zero" else max_lag)  # lag = step - 1 - version
    rollouts, run = remote_rollouts(max_lag, step, version)
    batch = rollouts.batch(step)
    assert (batch.step, batch.version) == (step, version)
    assert (run.sampler.state.epoch, run.sampler.state.index) == (0, step)  # the saved data position moved on
    assert rollouts._stamp["lag"] == float(step - 1 - version)


@pytest.mark.parametrize("max_lag", [0, 1, 3])
@pytest.mark.parametrize("lag", ["-1", "k+1"])
def test_learner_refuses_batches_just_outside_the_staleness_bound(max_lag, lag):
    step = 6
    version = step if lag == "-1" else step - 2 - max_lag  # lag -1: sampled by weights the learner has not made yet
    rollouts, _ = remote_rollouts(max_lag, step, version)
    with pytest.raises(RuntimeError) as err:
        rollouts.batch(step)
    assert str(err.value) == (
        f"batch of step {step} sampled by policy version {version} arrived for step {step} "
        f"(trainer.max_off_policy_steps={max_lag}): the rollout processes broke the staleness bound"
    )


def test_prompts_over_max_prompt_tokens_are_dropped_and_said_once(
    data_dir, tiny_model_dir, tmp_path, monkeypatch, one_process_ctx, one_thread, capsys
):
    """Three prompts of 300 words cannot fit data.max_prompt_tokens=64: they are left out of the data
    (never sampled) and the console says how many, once."""
    from drpo_trainer.builtin.arithmetic import problem_row, train_problems

    long = [{"prompt": "add these numbers " + " ".join(["7"] * 300), "answer": "7"} for _ in range(3)]
    rows = [problem_row(p) for p in train_problems()[:12]] + long
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    more = (f"data.train_files=[{path}]", "trainer.max_steps=2", "tracking.samples_every_steps=1")
    cfg = tiny_config(data_dir, tiny_model_dir, out, *more)
    log = UpdateLog(monkeypatch)
    loop.train(cfg, ctx=one_process_ctx)
    err = capsys.readouterr().err
    assert err.count("dropped 3 prompts over data.max_prompt_tokens") == 1, err[-2000:]
    text = (out / "samples.jsonl").read_text()
    trained = {json.loads(line)["prompt"] for line in text.splitlines()}
    assert trained and not any("7 7 7" in p for p in trained), text[:3000]  # no long prompt was sampled
    assert len(log.calls) == 2 * MINIBATCHES
