"""Config options through a real Run (build_run: tiny random model, transformers engine, verifier
workers, learner): data.shuffle=false draws prompts in file order, algorithm.normalize_by_std
divides the group-centred rewards by the group's std, eval.max_problems evaluates only the first
problems of each set. The engine, scorer and learner are wrapped to record what they were given.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from drpo_trainer.config import load_config
from drpo_trainer.runtime.loop import run_step
from drpo_trainer.runtime.rollouts import evaluate
from drpo_trainer.runtime.run import build_run

G, PROMPTS, EVAL_PROBLEMS, K = 4, 4, 3, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, one_process_ctx):
    from drpo_trainer.builtin.arithmetic import eval_problems, problem_row, train_problems

    d = tmp_path_factory.mktemp("options_run")
    (d / "train.jsonl").write_text("".join(json.dumps(problem_row(p)) + "\n" for p in train_problems()[:12]))
    (d / "eval.jsonl").write_text("".join(json.dumps(problem_row(p)) + "\n" for p in eval_problems()[:8]))
    cfg = load_config(
        None,
        [
            f"output_dir={d / 'out'}",
            f"model.path={tiny_model_dir}",
            f"data.train_files=[{d / 'train.jsonl'}]",
            "data.shuffle=false",
            "data.max_prompt_tokens=64",
            f"eval.files={{small: {d / 'eval.jsonl'}}}",
            f"eval.max_problems={EVAL_PROBLEMS}",
            f"eval.samples_per_prompt={K}",
            f"rollout.samples_per_prompt={G}",
            "rollout.max_new_tokens=8",
            f"trainer.prompts_per_step={PROMPTS}",
            "trainer.minibatches_per_step=2",
            "trainer.micro_batch_tokens_per_gpu=512",
            "algorithm.normalize_by_std=true",
            "reward.name=resume_helpers:odd_length_reward",  # rewards that vary within a group
            "reward.import_modules=[resume_helpers]",
            "reward.num_workers=1",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = build_run(cfg, one_process_ctx)
    yield run
    run.scorer.close()
    torch.set_num_threads(threads)


class Recorder:
    """Wraps a method of an object and keeps (args, result) of every call."""

    def __init__(self, obj, name: str, monkeypatch) -> None:
        self.calls: list[tuple[tuple, object]] = []
        real = getattr(obj, name)

        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls.append((args, result))
            return result

        monkeypatch.setattr(obj, name, wrapper)


def test_unshuffled_data_is_drawn_in_file_order(run, monkeypatch):
    generate = Recorder(run.engine, "generate", monkeypatch)
    run.sampler.state.epoch, run.sampler.state.index = 0, 0
    for step in (1, 2, 3, 4):
        run_step(run, step)
    drawn = [args[0] for args, _ in generate.calls]
    train = [p.prompt_ids for p in run.train_set]
    # 12 prompts, 4 per step: steps 1-3 are the file in order, step 4 starts epoch 1 in the same order
    assert drawn == [train[0:4], train[4:8], train[8:12], train[0:4]]
    assert (run.sampler.state.epoch, run.sampler.state.index) == (1, 4)


def test_normalize_by_std_divides_by_the_group_std(run, monkeypatch):
    score = Recorder(run.scorer, "score", monkeypatch)
    update = Recorder(run.learner, "update", monkeypatch)
    metrics = run_step(run, 5)
    ((_, (rewards, _)),) = score.calls
    advantages = [s.advantage for args, _ in update.calls for s in args[0]]  # the mini-batches in order
    assert len(rewards) == len(advantages) == PROMPTS * G
    assert 0 < sum(rewards) < len(rewards)  # some groups have reward variance: the division matters
    for g in range(PROMPTS):
        group = rewards[g * G : (g + 1) * G]
        mean = sum(group) / G
        std = statistics.stdev(group)  # Bessel-corrected, as group_advantages documents
        want = [0.0] * G if std == 0 else [(r - mean) / (std + 1e-6) for r in group]
        assert advantages[g * G : (g + 1) * G] == pytest.approx(want, abs=1e-5), (g, group)
    assert metrics["advantage/abs_mean"] == pytest.approx(sum(map(abs, advantages)) / len(advantages), rel=1e-5)


def test_eval_max_problems_evaluates_the_first_problems_only(run, monkeypatch):
    generate = Recorder(run.engine, "generate", monkeypatch)
    score = Recorder(run.scorer, "score", monkeypatch)
    out = evaluate(run, 0)
    (((prompts, spec), completions),) = generate.calls
    assert prompts == [p.prompt_ids for p in run.eval_sets["small"][:EVAL_PROBLEMS]]  # 3 of the 8
    assert spec.n == K and len(completions) == EVAL_PROBLEMS * K
    ((_, (scores, _)),) = score.calls
    full = [sum(s >= 1.0 for s in scores[i * K : (i + 1) * K]) for i in range(EVAL_PROBLEMS)]
    # K = 2: pass@1 is a problem's fraction correct, pass@2 whether any is (the vote: tests/test_eval_metrics.py)
    assert set(out) == {f"eval/small/{m}" for m in (f"avg@{K}", "pass@1", "pass@2", f"maj@{K}", "vote_failures")}
    assert out[f"eval/small/avg@{K}"] == pytest.approx(sum(scores) / (EVAL_PROBLEMS * K))
    assert out["eval/small/pass@1"] == pytest.approx(sum(c / 2 for c in full) / EVAL_PROBLEMS)
    assert out["eval/small/pass@2"] == pytest.approx(sum(c > 0 for c in full) / EVAL_PROBLEMS)
