"""reward.overlong_penalty: DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13).

The formula at its boundaries with the numbers written here, the config's refusals, the metrics and
how they combine over ranks, and `sample_batch` (which both layouts call) with a fake engine and a
fake verifier: the penalty is added to the verifier's reward before the group advantages.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from job_helpers import refused_in_one_line

from drpo_trainer.algorithms.overlong import overlong_penalties, overlong_penalty
from drpo_trainer.config import ConfigError, load_config
from drpo_trainer.io.samples import SAMPLES_FILE, SampleLog
from drpo_trainer.metrics import MetricAccumulator
from drpo_trainer.rollout.base import Completion
from drpo_trainer.rollout.producer import sample_batch


def penalty(length: int, limit: int = 20, buffer: int = 4, scale: float = 1.0) -> float:
    return overlong_penalty(length, max_new_tokens=limit, buffer=buffer, scale=scale)


def test_zero_up_to_the_buffer_then_linear_to_minus_the_scale_at_the_limit():
    # L_max = 20, L_cache = 4: no penalty up to 16 tokens, then -(|y| - 16) / 4
    assert [penalty(n) for n in (0, 1, 15, 16)] == [0.0, 0.0, 0.0, 0.0]
    assert [penalty(n) for n in (17, 18, 19, 20)] == [-0.25, -0.5, -0.75, -1.0]
    assert penalty(21) == penalty(1000) == -1.0  # past the limit (an engine never returns it): the full penalty
    # the scale multiplies: half of 0.5 at the midpoint, 0.5 at the limit
    assert [penalty(n, scale=0.5) for n in (16, 18, 20)] == [0.0, -0.25, -0.5]
    # the paper's setting: 16,384 expected tokens + a 4,096-token cache = a 20,480-token limit
    dapo = dict(limit=20480, buffer=4096)
    assert [penalty(n, **dapo) for n in (16384, 18432, 20480)] == [0.0, -0.5, -1.0]
    assert penalty(16385, **dapo) == pytest.approx(-1 / 4096, rel=1e-15)
    # a buffer as long as the limit penalises every token: -|y| / L_max
    assert [penalty(n, limit=8, buffer=8) for n in (0, 2, 8)] == [0.0, -0.25, -1.0]


@pytest.mark.parametrize("buffer", [0, 21])
def test_the_function_refuses_a_buffer_outside_the_limit(buffer):
    with pytest.raises(ValueError, match=f"buffer={buffer} must be in"):
        penalty(5, buffer=buffer)


def test_metrics_are_means_over_completions_and_combine_over_ranks():
    # L_max 20, L_cache 4: lengths 10, 18, 20, 5 -> 0, -0.5, -1, 0
    values, metrics = overlong_penalties([10, 18, 20, 5], max_new_tokens=20, buffer=4, scale=1.0)
    assert values == [0.0, -0.5, -1.0, 0.0]
    assert metrics == {"reward/overlong_penalty_mean": -0.375, "reward/overlong_penalised_fraction": 0.5}
    # two ranks with different batch sizes, combined as the loop does (completion-weighted means,
    # summed over ranks): the mean over all completions. Rank 2: 17, 16 -> -0.25, 0.
    _, other = overlong_penalties([17, 16], max_new_tokens=20, buffer=4, scale=1.0)
    acc = MetricAccumulator()
    acc.add(metrics, weight=4)
    acc.add(other, weight=2)
    assert acc.result() == {
        "reward/overlong_penalty_mean": pytest.approx(-1.75 / 6, rel=1e-15),
        "reward/overlong_penalised_fraction": pytest.approx(3 / 6, rel=1e-15),
    }


# -- configuration ---------------------------------------------------------------------------------
def test_off_by_default_and_the_keys_load():
    cfg = load_config(None, [])
    assert cfg.reward.overlong_penalty == 0.0 and cfg.reward.overlong_buffer is None
    cfg = load_config(None, ["rollout.max_new_tokens=64", "reward.overlong_penalty=1", "reward.overlong_buffer=64"])
    assert (cfg.reward.overlong_penalty, cfg.reward.overlong_buffer) == (1.0, 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reward.overlong_penalty=1"], "reward.overlong_penalty=1.0 needs reward.overlong_buffer"),
        (["reward.overlong_penalty=1", "reward.overlong_buffer=65"], "reward.overlong_buffer=65 does not fit"),
        (["reward.overlong_buffer=65"], "reward.overlong_buffer=65 does not fit inside rollout.max_new_tokens=64"),
        (["reward.overlong_penalty=-0.5", "reward.overlong_buffer=8"], "reward.overlong_penalty: Input should be"),
        (["reward.overlong_penalty=5000", "reward.overlong_buffer=8"], "reward.overlong_penalty: Input should be"),
        (["reward.overlong_penalty=1", "reward.overlong_buffer=0"], "reward.overlong_buffer: Input should be"),
    ],
)
def test_refusals_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.max_new_tokens=64", *overrides])
    text = str(err.value)
    assert message in text and "Fix:" in text and "\n" not in text


def test_a_penalty_without_a_buffer_through_the_cli_is_one_line_and_exit_2(tmp_path):
    line = refused_in_one_line("reward.overlong_penalty=1", f"output_dir={tmp_path / 'run'}")
    # configs/tiny_cpu.yaml: max_new_tokens 24, a fifth of it is 4
    assert line.endswith("Fix: set reward.overlong_buffer to at most 24 (DAPO: a fifth of the limit, 4)")
    assert not (tmp_path / "run").exists()


# -- through sample_batch, as both layouts call it -------------------------------------------------
G, LIMIT, BUFFER, SCALE = 4, 8, 4, 0.5
# prompt 0: 2, 4, 6, 8 tokens -> penalties 0, 0, -0.25, -0.5 (start of the ramp: 8 - 4 = 4 tokens)
# prompt 1: four completions at the limit -> -0.5 each
LENGTHS = [2, 4, 6, 8, 8, 8, 8, 8]
VERIFIER = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]


class FakeEngine:
    def generate(self, prompt_ids, spec):
        assert spec.n == G and spec.max_new_tokens == LIMIT
        return [
            Completion(
                prompt_index=i // G,
                prompt_ids=prompt_ids[i // G],
                completion_ids=[7] * n,
                rollout_logprobs=[-1.0] * n,
                finish_reason="length" if n == LIMIT else "stop",
                text=f"completion {i}",
            )
            for i, n in enumerate(LENGTHS)
        ]


class FakeScorer:
    def score(self, texts, answers):
        assert texts == [f"completion {i}" for i in range(8)]
        return list(VERIFIER), {"reward/mean": sum(VERIFIER) / 8}


def batch(*overrides):
    cfg = load_config(
        None,
        [f"rollout.samples_per_prompt={G}", f"rollout.max_new_tokens={LIMIT}", "data.max_prompt_tokens=8", *overrides],
    )
    problems = [SimpleNamespace(prompt_ids=[1, 2], answer="1"), SimpleNamespace(prompt_ids=[3], answer="2")]
    state = SimpleNamespace(epoch=0, index=2)
    return sample_batch(cfg, FakeEngine(), FakeScorer(), problems, 1, [0, 1], 0, 0, state)


def test_sample_batch_adds_the_penalty_before_the_advantages():
    b = batch(f"reward.overlong_penalty={SCALE}", f"reward.overlong_buffer={BUFFER}")
    assert b.rewards == VERIFIER  # the verifier's rewards, as scored
    # group 0: shaped rewards 1, 0, 0.75, -0.5, mean 0.3125; group 1: all 0.5, no variance -> 0
    assert b.advantages == [0.6875, -0.3125, 0.4375, -0.8125, 0.0, 0.0, 0.0, 0.0]
    assert b.reward_metrics == {
        "reward/mean": 0.75,
        "reward/overlong_penalty_mean": -2.75 / 8,  # (0 + 0 - 0.25 - 0.5 - 4 * 0.5) / 8
        "reward/overlong_penalised_fraction": 0.75,
    }
    assert float(b.adv_metrics["advantage/reward_mean"]) == pytest.approx((1.25 + 2.0) / 8, rel=1e-7)


def test_sample_batch_without_the_penalty_centres_the_verifiers_rewards():
    b = batch()
    assert b.advantages == [0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    assert b.reward_metrics == {"reward/mean": 0.75}  # no penalty metrics: the default run's log is unchanged


def test_train_samples_record_the_penalty_only_when_it_is_on(tmp_path):
    engine, problems = (
        FakeEngine(),
        [SimpleNamespace(prompt_text="p0", answer="1"), SimpleNamespace(prompt_text="p1", answer="2")],
    )
    completions = engine.generate([[1], [2]], SimpleNamespace(n=G, max_new_tokens=LIMIT))
    rows = {}
    for name, extra in (("off", []), ("on", [f"reward.overlong_penalty={SCALE}", f"reward.overlong_buffer={BUFFER}"])):
        cfg = load_config(
            None,
            [f"output_dir={tmp_path / name}", f"rollout.max_new_tokens={LIMIT}", "tracking.samples_every_steps=1"]
            + ["tracking.samples_per_step=8", *extra],
        )
        log = SampleLog(cfg)
        log.train(1, problems, completions, VERIFIER, [0.0] * 8, [5, 9])
        log.close()
        rows[name] = [json.loads(line) for line in (tmp_path / name / SAMPLES_FILE).read_text().splitlines()]
    assert all("overlong_penalty" not in r for r in rows["off"])
    assert [r["overlong_penalty"] for r in rows["on"]] == [0.0, 0.0, -0.25, -0.5, -0.5, -0.5, -0.5, -0.5]
    assert [r["reward"] for r in rows["on"]] == VERIFIER  # `reward` stays the verifier's
    assert [{k: v for k, v in r.items() if k != "overlong_penalty"} for r in rows["on"]] == rows["off"]


def test_the_asynchronous_layout_receives_the_penalised_batch_and_the_truncation():
    """A rollout process sends its batch over the wire: the penalty metrics, the advantages and each
    completion's finish reason (the learner's truncation flag) arrive unchanged."""
    from drpo_trainer.runtime.wire import batch_from_plain, batch_to_plain

    sent = batch(f"reward.overlong_penalty={SCALE}", f"reward.overlong_buffer={BUFFER}")
    got = batch_from_plain(batch_to_plain(sent))
    assert got.reward_metrics == sent.reward_metrics and "reward/overlong_penalty_mean" in got.reward_metrics
    assert got.rewards == VERIFIER and got.advantages == sent.advantages
    assert [c.finish_reason for c in got.completions] == ["stop"] * 3 + ["length"] * 5
