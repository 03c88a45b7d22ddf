"""Both length options through the real loop (`loop.train`, one gloo process, ZeRO stage 0): the
warm-started tiny model at rollout.max_new_tokens = 12, where some completions end and some are cut.

Every trained sample is recorded at `Learner.update` (the class's, so the learner `train` builds is
covered) and compared with what the step logged: each training row's `overlong_penalty` is the
formula written here of its completion's length, its advantage is its group's centred (reward +
penalty), the penalty metrics are the means of those values, the truncated flag is set exactly on
the completions the engine cut, and the updates skipped exactly the truncated and zero-advantage ones.
"""

from __future__ import annotations

import json

import pytest

from drpo_trainer.config import load_config
from drpo_trainer.learner.learner import Learner
from drpo_trainer.runtime import loop

STEPS, G, PROMPTS, LIMIT, BUFFER, SCALE = 2, 4, 4, 12, 3, 1.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from drpo_trainer.builtin.arithmetic import problem_row, train_problems

    d = tmp_path_factory.mktemp("length_loop")
    (d / "train.jsonl").write_text("".join(json.dumps(problem_row(p)) + "\n" for p in train_problems()[:24]))
    return d


def expected_penalty(n: int) -> float:
    """DAPO eq. 13 at L_max = 12, L_cache = 3: 0 up to 9 tokens, then -(n - 9) / 3."""
    return 0.0 if n <= LIMIT - BUFFER else -SCALE * (n - (LIMIT - BUFFER)) / BUFFER


def test_the_loop_penalises_lengths_and_leaves_truncated_completions_out(
    data_dir, warm_model_dir, tmp_path, monkeypatch, one_process_ctx, one_thread
):
    out = tmp_path / "out"
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            f"model.path={warm_model_dir}",
            f"data.train_files=[{data_dir / 'train.jsonl'}]",
            "data.max_prompt_tokens=64",
            f"rollout.samples_per_prompt={G}",
            f"rollout.max_new_tokens={LIMIT}",
            f"trainer.max_steps={STEPS}",
            f"trainer.prompts_per_step={PROMPTS}",
            "trainer.minibatches_per_step=2",
            "trainer.micro_batch_tokens_per_gpu=256",
            "reward.num_workers=1",
            f"reward.overlong_penalty={SCALE}",
            f"reward.overlong_buffer={BUFFER}",
            "algorithm.mask_truncated=true",
            "eval.files={}",
            "eval.at_start=false",
            "checkpoint.export_final=false",
            "tracking.progress_bar=false",
            "tracking.wandb.mode=disabled",
            "tracking.samples_every_steps=1",
            "tracking.samples_per_step=1000",
        ],
    )
    calls: list[list] = []
    real_update = Learner.update

    def update(learner, minibatch, **kwargs):
        calls.append([(s.truncated, s.completion_len, s.advantage, s.input_ids[-1]) for s in minibatch])
        return real_update(learner, minibatch, **kwargs)

    monkeypatch.setattr(Learner, "update", update)
    loop.train(cfg, ctx=one_process_ctx)

    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(warm_model_dir).eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    metrics = {json.loads(line)["step"]: json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()}
    seen_truncated = seen_ended = 0
    penalties_seen: set[float] = set()
    for step in range(1, STEPS + 1):
        samples = calls[2 * (step - 1)] + calls[2 * (step - 1) + 1]  # the step's two mini-batches, in order
        train = [r for r in rows if r["step"] == step and r["kind"] == "train"]
        assert len(train) == len(samples) == PROMPTS * G
        penalties = [expected_penalty(n) for _, n, _, _ in samples]
        assert [r["overlong_penalty"] for r in train] == pytest.approx(penalties, abs=1e-15)
        for g in range(PROMPTS):
            shaped = [r["reward"] + p for r, p in zip(train[g * G : (g + 1) * G], penalties[g * G : (g + 1) * G])]
            mean = sum(shaped) / G
            centred = [0.0] * G if max(shaped) == min(shaped) else [x - mean for x in shaped]
            assert [r["advantage"] for r in train[g * G : (g + 1) * G]] == pytest.approx(centred, abs=1e-6)
            assert [a for _, _, a, _ in samples[g * G : (g + 1) * G]] == pytest.approx(centred, abs=1e-6)
        m = metrics[step]
        assert m["reward/overlong_penalty_mean"] == pytest.approx(sum(penalties) / len(penalties), rel=1e-12)
        assert m["reward/overlong_penalised_fraction"] == sum(p < 0 for p in penalties) / len(penalties)
        # truncated: cut at the limit, its last token not the EOS
        for truncated, n, _, last in samples:
            assert truncated == (n == LIMIT and last not in eos)
        truncated = [s[0] for s in samples]
        assert m["response/truncated_fraction"] == sum(truncated) / len(truncated)
        # each update trained the samples that ended with a non-zero advantage; the step logs the mean
        trained = [sum(not t and a != 0.0 for t, _, a, _ in mb) / len(mb) for mb in calls[2 * step - 2 : 2 * step]]
        assert m["perf/skipped_sample_fraction"] == pytest.approx(1 - sum(trained) / 2, abs=1e-12)
        seen_truncated += sum(truncated)
        seen_ended += len(truncated) - sum(truncated)
        penalties_seen.update(penalties)
    # the run exercised both kinds of completion and more than one point of the penalty's ramp
    assert seen_truncated > 0 and seen_ended > 0 and len(penalties_seen) >= 2
