"""algorithm.dynamic_sampling (DAPO's dynamic sampling, docs/algorithms.md).

- The per-share rule of `sample_step` on hand-made rewards (a fake engine and scorer, two learner shares):
  which groups each share keeps, in which order, what is dropped and counted, the seeds of each round,
  the data position after the step, and the rule when algorithm.max_sampling_rounds is reached.
- The default job (configs/tiny_cpu.yaml, the warm builtin model) through the real `train`, in-process:
  with a reward that is flat for every problem with an even gold answer, no trained group has zero reward
  variance, the data position after each step is the start plus the prompts sampled, and a run resumed
  from a checkpoint logs the same metrics as the uninterrupted run; with a flat reward the step trains
  on what there is, says so in one line and counts it.
- The asynchronous layout (1 learner + 1 rollout process, k = 1): the rollout process samples the extra
  prompts and the learner's data position follows; two synchronous learners (slow) agree on the rounds.
- Settings that cannot work are refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import resume_helpers as h
import torch
from sampling_rewards import even_answer

from drpo_trainer.config import ConfigError, load_config
from drpo_trainer.io.data import Problem
from drpo_trainer.rollout.base import Completion
from drpo_trainer.rollout.producer import make_prompt_sampler, sample_batch, sample_step, sampling_seed

REPO = Path(__file__).resolve().parents[1]


# -- the per-share rule, on a fake engine ----------------------------------------------------------------
class FakeEngine:
    """Completion j of prompt p is the text 'p:j'; records the seed of every generate call."""

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def generate(self, prompt_ids, spec):
        self.seeds.append(spec.seed)
        return [
            Completion(i, ids, [j], [-1.0], "stop", f"{ids[0]}:{j}")
            for i, ids in enumerate(prompt_ids)
            for j in range(spec.n)
        ]


class FakeScorer:
    """Reward j % 2 for completion j, or 0 for every completion of a problem in `flat` (zero variance)."""

    def __init__(self, flat: set[int]) -> None:
        self.flat = flat

    def score(self, texts, answers):
        rewards = [0.0 if int(a) in self.flat else float(int(t.split(":")[1]) % 2) for t, a in zip(texts, answers)]
        return rewards, {"reward/mean": sum(rewards) / len(rewards), "reward/timeouts": 1.0, "reward/errors": 0.0}


PROBLEMS = [Problem(prompt_ids=[p], prompt_text=f"p{p}", answer=str(p)) for p in range(40)]


def _config(*overrides: str):
    # 4 prompts a step over 2 learners (2 groups each), G = 2, the data in file order
    base = ["trainer.prompts_per_step=4", "rollout.samples_per_prompt=2", "data.shuffle=false", "trainer.seed=3"]
    return load_config(None, base + ["algorithm.dynamic_sampling=true", *overrides])


def _step(cfg, flat: set[int], start: int = 0, step: int = 5):
    sampler = make_prompt_sampler(cfg, len(PROBLEMS))
    sampler.state.index = start
    engine = FakeEngine()
    shares = sample_step(cfg, engine, FakeScorer(flat), PROBLEMS, step, sampler, [0, 1], 2, 4)
    return shares, engine.seeds, sampler.state


def test_each_share_keeps_its_informative_groups_in_order():
    # draws: round 0 = 8..11 (share 0: 8, 9; share 1: 10, 11), round 1 = 12..15, round 2 = 16..19
    # share 0: 8, 9 flat; 12 kept, 13 flat; 16 flat, 17 kept -> full after 3 rounds
    # share 1: 10 kept, 11 flat; 14 kept (full), 15 extra; 18, 19 extra (it samples while share 0 is short)
    cfg = _config("algorithm.max_sampling_rounds=5")
    shares, seeds, state = _step(cfg, flat={8, 9, 11, 13, 16}, start=8)
    assert [s.indices for s in shares] == [[12, 17], [10, 14]]
    assert (state.epoch, state.index) == (0, 20)  # start 8 + 3 rounds x 4 prompts
    assert [s.sampler_after for s in shares] == [(0, 20), (0, 20)]
    assert shares[0].sampling == {
        "sampling/rounds": 3.0,
        "sampling/prompts_sampled": 6.0,
        "sampling/groups_dropped_zero_variance": 4.0,
        "sampling/groups_dropped_extra": 0.0,
        "sampling/groups_missing": 0.0,
    }
    assert shares[1].sampling["sampling/groups_dropped_zero_variance"] == 1.0
    assert shares[1].sampling["sampling/groups_dropped_extra"] == 3.0
    # the kept completions point at their place in the share, rewards j % 2, advantages r - 0.5
    assert [(c.prompt_index, c.text) for c in shares[0].completions] == [
        (0, "12:0"),
        (0, "12:1"),
        (1, "17:0"),
        (1, "17:1"),
    ]
    assert shares[0].rewards == [0.0, 1.0, 0.0, 1.0]
    assert shares[0].advantages == [-0.5, 0.5, -0.5, 0.5]
    assert float(shares[0].adv_metrics["advantage/zero_variance_group_fraction"]) == 0.0
    # rewards' metrics over every completion sampled: share 0 scored 4 + 4 + 4 completions, 2 of them 1.0 (12:1, 17:1)
    assert shares[0].reward_metrics == {
        "reward/mean": pytest.approx(2 / 12),
        "reward/timeouts": 3.0,
        "reward/errors": 0.0,
    }
    # seeds: (seed, step, rank, round); round 0 is the seed without dynamic sampling
    assert seeds == [sampling_seed(3, 5, r, salt=k) for k in range(3) for r in (0, 1)]
    assert seeds[:2] == [sampling_seed(3, 5, 0), sampling_seed(3, 5, 1)]
    assert seeds[0] == (3 * 1_000_003 + 5 * 10_007 + 0) % (2**31 - 1)


def test_the_round_bound_trains_the_first_rounds_groups_in_the_missing_places():
    # share 0's prompts are all flat (0, 1 then 4, 5); share 1 is full after round 0
    cfg = _config("algorithm.max_sampling_rounds=2")
    shares, _, state = _step(cfg, flat={0, 1, 4, 5})
    assert (state.epoch, state.index) == (0, 8)
    assert shares[0].indices == [0, 1]  # round 0's zero-variance groups, in order
    assert shares[0].advantages == [0.0] * 4  # no gradient (trainer.skip_zero_advantage: not even a forward)
    assert shares[0].sampling["sampling/groups_missing"] == 2.0
    assert shares[0].sampling["sampling/groups_dropped_zero_variance"] == 2.0  # 4 flat, 2 of them trained
    assert shares[0].sampling["sampling/rounds"] == 2.0
    assert shares[1].indices == [2, 3] and shares[1].sampling["sampling/groups_dropped_extra"] == 2.0


def test_a_full_first_round_is_the_batch_without_dynamic_sampling():
    off = _config("algorithm.dynamic_sampling=false")
    on = _config()
    (a0, a1), seeds_off, state_off = _step(off, flat={1})  # flat groups are kept when it is off
    (b0, b1), seeds_on, state_on = _step(on, flat=set())
    assert a0.indices == [0, 1] and a0.sampling == {} and (state_off.index, state_on.index) == (4, 4)
    assert seeds_on == seeds_off
    for a, b in ((a0, b0), (a1, b1)):
        assert (b.indices, b.sampler_after) == (a.indices, a.sampler_after)
        assert [c.text for c in b.completions] == [c.text for c in a.completions]
    assert b1.rewards == a1.rewards and b1.advantages == a1.advantages
    assert b0.sampling["sampling/rounds"] == 1.0 and b0.sampling["sampling/prompts_sampled"] == 2.0
    # without dynamic sampling sample_step is sample_batch of each rank's slice
    direct = sample_batch(off, FakeEngine(), FakeScorer({1}), PROBLEMS, 5, [0, 1], 0, 4, state_off)
    assert (direct.indices, direct.rewards, direct.advantages) == (a0.indices, a0.rewards, a0.advantages)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match=r"samples_per_prompt=1 .*Fix: set rollout.samples_per_prompt >= 2"):
        load_config(None, ["algorithm.dynamic_sampling=true", "rollout.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="Fix: set distributed.rollout_processes=1"):
        load_config(None, ["algorithm.dynamic_sampling=true", "distributed.rollout_processes=2"])
    with pytest.raises(ConfigError, match="max_sampling_rounds"):
        load_config(None, ["algorithm.max_sampling_rounds=0"])
    with pytest.raises(ConfigError, match="max_sampling_rounds"):
        load_config(None, ["algorithm.max_sampling_rounds=101"])


# -- the default job, in-process -------------------------------------------------------------------------
PROMPTS, G, STEPS = 8, 8, 3


def _job(out: Path, model_dir: str, *overrides: str):
    return load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            f"output_dir={out}",
            f"model.path={model_dir}",
            f"trainer.max_steps={STEPS}",
            f"trainer.prompts_per_step={PROMPTS}",
            "algorithm.dynamic_sampling=true",
            "algorithm.max_sampling_rounds=4",
            "reward.name=sampling_rewards:even_answer_flat_reward",
            "reward.import_modules=[sampling_rewards]",
            "reward.num_workers=1",
            "eval.files={}",
            "eval.at_start=false",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=3",
            "checkpoint.export_final=false",
            "tracking.progress_bar=false",
            "tracking.samples_every_steps=1",
            f"tracking.samples_per_step={PROMPTS * G}",  # every trained completion
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory, warm_model_dir, one_process_ctx):
    """(uninterrupted run's dir, the run resumed from its step-1 checkpoint)."""
    from drpo_trainer.runtime.loop import train

    d = tmp_path_factory.mktemp("dynamic_sampling")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_job(d / "a", warm_model_dir), ctx=one_process_ctx)
        train(_job(d / "b", warm_model_dir), resume=str(d / "a" / "checkpoints" / "step_000001"), ctx=one_process_ctx)
    finally:
        torch.set_num_threads(threads)
    return d / "a", d / "b"


def _trained_groups(out: Path) -> dict[int, list[tuple[int, list[float]]]]:
    """Per step: (training-set index, the G rewards) of every trained group, from samples.jsonl."""
    steps: dict[int, list] = {}
    for row in map(json.loads, (out / "samples.jsonl").read_text().splitlines()):
        if row["kind"] == "train":
            groups = steps.setdefault(row["step"], [])
            if row["index"] % G == 0:
                groups.append((row["train_index"], row["gold_answer"], []))
            groups[-1][2].append(row["reward"])
    return steps


def test_no_trained_group_has_zero_reward_variance(job):
    a, _ = job
    steps = _trained_groups(a)
    assert sorted(steps) == [1, 2, 3]
    for step, groups in steps.items():
        assert len(groups) == PROMPTS and all(len(r) == G for _, _, r in groups)
        assert all(max(r) > min(r) for _, _, r in groups), step
        assert not any(even_answer(gold) for _, gold, _ in groups), step  # their groups are flat: all dropped


def test_data_position_is_the_start_plus_the_prompts_sampled(job):
    a, _ = job
    rows = h.metrics_rows(a)
    position = 0
    for row in rows:
        assert row["sampling/groups_missing"] == 0
        assert row["sampling/prompts_sampled"] == row["sampling/rounds"] * PROMPTS
        # every sampled group is trained, dropped for zero variance, or dropped beyond the share
        dropped = row["sampling/groups_dropped_zero_variance"] + row["sampling/groups_dropped_extra"]
        assert row["sampling/prompts_sampled"] == PROMPTS + dropped
        position += row["sampling/prompts_sampled"]
        # 500 training prompts: no new epoch
        assert (row["sampling/data_epoch"], row["sampling/data_index"]) == (0, position)
    assert position > STEPS * PROMPTS  # about half of the prompts have an even answer: extra rounds ran
    assert max(r["sampling/groups_dropped_zero_variance"] for r in rows) > 0


def test_resumed_run_logs_the_uninterrupted_metrics(job):
    a, b = job
    rows_a = [h.without_timings(r) for r in h.metrics_rows(a) if r["step"] > 1]
    rows_b = [h.without_timings(r) for r in h.metrics_rows(b)]
    assert [r["step"] for r in rows_b] == [2, 3]
    assert rows_b == rows_a
    assert {k: v for k, v in _trained_groups(b).items() if k > 1} == {
        k: v for k, v in _trained_groups(a).items() if k > 1
    }


def test_round_bound_trains_what_there_is(tmp_path, warm_model_dir, one_process_ctx, capsys):
    from drpo_trainer.runtime.loop import train

    cfg = _job(
        tmp_path / "flat",
        warm_model_dir,
        "trainer.max_steps=1",
        "algorithm.max_sampling_rounds=2",
        "reward.name=sampling_rewards:flat_reward",
        "checkpoint.every_steps=0",
    )
    train(cfg, ctx=one_process_ctx)
    (row,) = h.metrics_rows(tmp_path / "flat")
    assert row["sampling/rounds"] == 2 and row["sampling/prompts_sampled"] == 2 * PROMPTS
    assert row["sampling/groups_missing"] == PROMPTS  # the first round's 8 groups, zero advantage
    assert row["sampling/groups_dropped_zero_variance"] == PROMPTS  # the second round's
    assert (row["sampling/data_epoch"], row["sampling/data_index"]) == (0, 2 * PROMPTS)
    assert row["advantage/zero_variance_group_fraction"] == 1.0
    lines = [l for l in capsys.readouterr().err.splitlines() if "dynamic sampling" in l]
    assert lines == [
        "step 1: dynamic sampling stopped at algorithm.max_sampling_rounds=2 with 8 of 8 groups without reward "
        "variance; trained on what there is (those groups carry zero advantage)"
    ]


# -- two processes: the asynchronous layout, and two synchronous learners --------------------------------
LAYOUTS = {
    "async": {
        "distributed.rollout_processes": 1,
        "trainer.max_off_policy_steps": 1,
        "algorithm.mismatch_correction": "tis",
    },
    # ZeRO-3 over 2 learners, each sampling its share: an all-reduce decides every further round
    "two_learners": {},
}


@pytest.mark.distributed
# two learners: slow, as the rule is the same function; it covers the all-reduce that ends the rounds
@pytest.mark.parametrize("layout", ["async", pytest.param("two_learners", marks=pytest.mark.slow)])
def test_two_process_layouts_sample_the_extra_prompts(tmp_path, layout):
    out = tmp_path / layout
    cfg = h.write_config(
        tmp_path / f"{layout}.yaml",
        h.workspace(),
        out,
        **{
            "distributed.nproc_per_node": 2,
            **LAYOUTS[layout],
            "algorithm.dynamic_sampling": True,
            "algorithm.max_sampling_rounds": 2,  # 3 steps x 2 rounds x 4 prompts: within the 32 prompts
            "reward.name": "sampling_rewards:even_answer_flat_reward",
            "reward.import_modules": ["sampling_rewards"],
            "trainer.max_steps": 3,
            "checkpoint.every_steps": 0,
            "tracking.samples_per_step": 1000,
        },
    )
    # not the process-group variables of this module's in-process runs (one_process_ctx): the CLI launches its own
    env = {k: v for k, v in h.env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run(h.command(cfg), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = h.metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    position = 0
    for row in rows:
        assert row["sampling/prompts_sampled"] == row["sampling/rounds"] * 4
        position += row["sampling/prompts_sampled"]
        assert (row["sampling/data_epoch"], row["sampling/data_index"]) == (0, position)
    assert position > 3 * 4  # about half of the prompts have an even answer: more rounds ran
    groups: dict[int, list] = {}
    for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines()):
        if r["kind"] == "train":
            groups.setdefault((r["step"], r["index"] // 4), []).append(r)
    share = 4 if layout == "async" else 2  # samples.jsonl holds learner 0's share
    for row in rows:  # the groups with reward variance are trained; the missing places hold flat ones
        step_groups = [g for (s, _), g in groups.items() if s == row["step"]]
        flat = [g for g in step_groups if len({x["reward"] for x in g}) == 1]
        assert len(step_groups) == share
        if layout == "async":
            assert len(flat) == row["sampling/groups_missing"]
        else:  # the count is over both learners
            assert len(flat) <= row["sampling/groups_missing"]
        assert all(not even_answer(g[0]["gold_answer"]) for g in step_groups if g not in flat)


# -- what travels and what the benchmark reads -----------------------------------------------------------
def test_a_dynamic_batch_travels_with_its_counts():
    from drpo_trainer.runtime.wire import batch_from_plain, batch_to_plain, decode, encode

    (share, _), _, _ = _step(_config(), flat={0})
    plain = decode(encode(batch_to_plain(share)))
    assert batch_from_plain(plain).sampling == share.sampling
    assert batch_from_plain(plain).indices == [1, 4]  # 0 flat; round 1 draws 4..7, share 0 takes 4
    del plain["sampling"]  # a batch kept by a checkpoint written before the key
    assert batch_from_plain(plain).sampling == {}


def test_benchmark_summary_counts_prompts_and_times_until_the_target():
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_dynamic_sampling import summarize

    rows = [
        {"step": 0, "eval/synthetic/avg@4": 0.1},
        {"step": 1, "time/step": 2.0, "sampling/prompts_sampled": 32.0, "sampling/rounds": 2.0},
        {"step": 2, "time/step": 5.0, "sampling/prompts_sampled": 16.0, "sampling/rounds": 1.0},
        {"step": 3, "time/step": 3.0, "sampling/prompts_sampled": 48.0, "sampling/rounds": 3.0},
        {"step": 3, "eval/synthetic/avg@4": 0.25, "eval/synthetic/pass@4": 0.5, "eval/synthetic/vote_failures": 0.0},
    ]
    s = summarize(rows, target=0.2)  # the curve is avg@4, not the pass@j / maj@n / vote keys beside it
    assert (s["step_s"], s["prompts"], s["rounds"]) == (3.0, 32.0, 2.0)  # median of 2, 5, 3; means
    assert (s["reached_step"], s["seconds_to_target"], s["final_eval"]) == (3, 10.0, 0.25)
    without = summarize([{k: v for k, v in r.items() if not k.startswith("sampling/")} for r in rows], target=0.3)
    assert (without["prompts"], without["rounds"], without["seconds_to_target"]) == (16.0, 1.0, None)


def test_with_the_overlong_penalty_a_group_is_informative_by_the_rewards_the_advantages_see():
    """Groups are judged by the rewards the advantages see: a group the verifier scores all 0 whose two
    completions' lengths fall at different places in the overlong buffer is informative and kept, and
    its advantages are of the penalised rewards. Fake completions: 'p:0' has 1 token, 'p:1' has 4."""

    class LengthEngine(FakeEngine):
        def generate(self, prompt_ids, spec):
            out = super().generate(prompt_ids, spec)
            return [
                Completion(
                    c.prompt_index, c.prompt_ids, [7] * (1 if c.text.endswith(":0") else 4), [-1.0], "stop", c.text
                )
                for c in out
            ]

    # max_new_tokens 4, buffer 2, scale 1: length 1 -> 0, length 4 -> -1 (the full penalty at the limit)
    cfg = _config(
        "rollout.max_new_tokens=4",
        "reward.overlong_penalty=1.0",
        "reward.overlong_buffer=2",
        "algorithm.max_sampling_rounds=2",
    )
    sampler = make_prompt_sampler(cfg, len(PROBLEMS))
    shares = sample_step(cfg, LengthEngine(), FakeScorer(flat=set(range(40))), PROBLEMS, 1, sampler, [0, 1], 2, 0)
    assert [s.indices for s in shares] == [[0, 1], [2, 3]]  # round 0 is full: every group has reward variance
    assert shares[0].sampling["sampling/rounds"] == 1.0
    assert shares[0].rewards == [0.0] * 4  # the verifier's
    assert shares[0].advantages == [0.5, -0.5, 0.5, -0.5]  # of (0, -1): mean -0.5
    assert shares[0].reward_metrics["reward/overlong_penalty_mean"] == pytest.approx(-0.5)


@pytest.mark.slow  # three CLI runs, ~2.5 min; the in-process checkpoint-and-resume test covers the restore
def test_sigterm_and_resume_equal_the_uninterrupted_run(tmp_path):
    """drpo-train with dynamic sampling, stopped by SIGTERM after its first step (exit 75, a checkpoint
    at the stop) and resumed with --resume auto: the same non-timing metrics and samples as a run that
    was never stopped, with extra rounds sampled (the even-answer problems' groups are flat)."""
    import signal

    from drpo_trainer.runtime.stop import EXIT_PREEMPTED

    overrides = {
        "algorithm.dynamic_sampling": True,
        "reward.name": "sampling_rewards:even_answer_flat_reward",
        "reward.import_modules": ["sampling_rewards"],
        "trainer.max_steps": 4,
        "checkpoint.every_steps": 0,
    }
    full = tmp_path / "full"
    h.train(h.write_config(tmp_path / "full.yaml", h.workspace(), full, **overrides))
    out = tmp_path / "stopped"
    cfg = h.write_config(tmp_path / "stopped.yaml", h.workspace(), out, **overrides)
    proc = h.start(cfg, log=tmp_path / "first.log")
    logged = lambda: (out / "metrics.jsonl").is_file() and '"step": 1' in (out / "metrics.jsonl").read_text()  # noqa: E731
    assert h.wait_for(logged, timeout=240), (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    stopped = int((out / "PREEMPTED").read_text())
    assert 1 <= stopped < 4
    h.train(cfg, "--resume", "auto")

    rows_full, rows_resumed = h.metrics_rows(full), h.metrics_rows(out)
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4]
    assert [h.without_timings(r) for r in rows_resumed] == [h.without_timings(r) for r in rows_full]
    assert (out / "samples.jsonl").read_text() == (full / "samples.jsonl").read_text()
    assert any(r["sampling/rounds"] > 1 for r in rows_full)  # the extra prompts were sampled and resumed over
