"""samples.jsonl: the completions of a real run with the rewards and advantages the step used,
eval samples at eval steps, the same rows as W&B Tables (offline), and the file across a resume."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
from job_helpers import job_env, run_tiny_job

from drpo_trainer.config import ConfigError, load_config
from drpo_trainer.io.samples import SAMPLES_FILE, SampleLog, pick
from drpo_trainer.io.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
G = 8  # configs/tiny_cpu.yaml: samples_per_prompt
PER_STEP = 16 * G  # prompts_per_step x samples_per_prompt
EVAL_K, EVAL_PROBLEMS = 4, 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, warm_model_dir) -> Path:
    """3 steps of the default job writing every completion (samples_per_step above the batch), eval at
    steps 0, 2 and 3, W&B offline."""
    out = tmp_path_factory.mktemp("samples") / "run"
    env = job_env(WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)
    run_tiny_job(
        out,
        warm_model_dir,
        f"eval.max_problems={EVAL_PROBLEMS}",
        "tracking.wandb.mode=offline",
        "tracking.samples_every_steps=1",
        "tracking.samples_per_step=1000",
        env=env,
    )
    return out


def _samples(run_dir: Path) -> dict[tuple[int, str], list[dict]]:
    out = defaultdict(list)
    for line in (run_dir / SAMPLES_FILE).read_text().splitlines():
        row = json.loads(line)
        out[row["step"], row["kind"]].append(row)
    return dict(out)


def _metrics(run_dir: Path) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row.pop("step"), {}).update(row)
    return merged


def test_train_rows_hold_the_steps_rewards_and_advantages(run_dir):
    from drpo_trainer.io.data import PromptSampler
    from drpo_trainer.rewards import extract_final_answer

    samples, metrics = _samples(run_dir), _metrics(run_dir)
    judged: list[tuple] = []
    assert sorted(k for k in samples if k[1] == "train") == [(1, "train"), (2, "train"), (3, "train")]
    train_rows = (REPO / "data" / "synthetic_math_train.jsonl").read_text().splitlines()
    sampler = PromptSampler(len(train_rows), PER_STEP // G, seed=0)  # configs/tiny_cpu.yaml: data.seed 0
    for step in (1, 2, 3):
        rows = samples[step, "train"]
        assert [r["index"] for r in rows] == list(range(PER_STEP))  # every completion of the step, in order
        rewards = [r["reward"] for r in rows]
        # the step's own numbers: the rows' mean reward and mean |advantage| are what metrics.jsonl logged
        assert sum(rewards) / len(rewards) == pytest.approx(metrics[step]["reward/mean"], abs=1e-12)
        abs_adv = sum(abs(r["advantage"]) for r in rows) / len(rows)
        assert abs_adv == pytest.approx(metrics[step]["advantage/abs_mean"], rel=1e-6)
        # a group's advantages are its rewards minus the group mean (algorithm.normalize_by_std: false)
        for g in range(PER_STEP // G):
            group = rows[g * G : (g + 1) * G]
            assert len({r["prompt"] for r in group}) == 1 and len({r["gold_answer"] for r in group}) == 1
            mean = sum(r["reward"] for r in group) / G
            assert [r["advantage"] for r in group] == pytest.approx([r["reward"] - mean for r in group], abs=1e-6)
        # each reward is the one decided by the rule written here (not by the reward code under test)
        for r in rows:
            want = expected_reward(r["completion"], r["gold_answer"])
            if want is not None:
                judged.append((r["reward"], want, r["completion"], r["gold_answer"]))
        # train_index: the prompt's row of the training file (no prompt is over-long here), in the
        # order the data position draws them
        drawn = sampler.next_indices()
        assert [rows[g * G]["train_index"] for g in range(PER_STEP // G)] == drawn
        for r in rows:
            assert json.loads(train_rows[r["train_index"]])["answer"] == r["gold_answer"]
            assert r["extracted_answer"] == extract_final_answer(r["completion"], "boxed")
            assert "<|im_start|>user" in r["prompt"] and "\\boxed" in r["prompt"]  # the chat-formatted prompt
    assert [j for j in judged if j[0] != j[1]] == []
    # the rule covers most rows (the others box something other than a plain integer), right and wrong ones
    assert len(judged) >= 0.9 * 3 * PER_STEP
    assert 0 < sum(j[1] for j in judged) < len(judged)


def expected_reward(completion: str, gold: str) -> Optional[float]:
    """The reward of an arithmetic completion (integer gold answer) by the rule of docs/rewards.md,
    for the forms the rule decides plainly: 0 without any box; else, when the completion ends its
    last box as `\\boxed{<integer>}` (nothing boxed after it), 1 if that integer is the gold answer.
    None (undecided here) for every other form."""
    if "box" not in completion:
        return 0.0
    m = re.search(r"\\boxed\{(-?\d+)\}", completion[completion.rfind("\\boxed") :])
    if m is None or completion.rfind("\\boxed") != completion.rfind("box") - 1 or m.start() != 0:
        return None
    return float(int(m.group(1)) == int(gold))


def test_eval_rows_at_eval_steps_match_avg_at_k(run_dir):
    from drpo_trainer.rewards import math_reward

    samples, metrics = _samples(run_dir), _metrics(run_dir)
    assert sorted(k for k in samples if k[1] != "train") == [
        (0, "eval:synthetic"),
        (2, "eval:synthetic"),
        (3, "eval:synthetic"),
    ]
    for step in (0, 2, 3):
        rows = samples[step, "eval:synthetic"]
        assert len(rows) == EVAL_PROBLEMS * EVAL_K and all("advantage" not in r for r in rows)
        assert sum(r["reward"] for r in rows) / len(rows) == metrics[step]["eval/synthetic/avg@4"]
        assert all(r["reward"] == math_reward(r["completion"], r["gold_answer"]) for r in rows)


def test_wandb_offline_tables_hold_the_same_rows(run_dir):
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    tables = offline / "files" / "media" / "table" / "samples"
    train = [json.loads(p.read_text()) for p in sorted(tables.glob("train_*.table.json"))]
    evals = [json.loads(p.read_text()) for p in sorted((tables / "eval").glob("synthetic_*.table.json"))]
    assert len(train) == 3 and len(evals) == 3
    samples = _samples(run_dir)
    columns = list(samples[1, "train"][0])
    assert all(t["columns"] == columns for t in train)
    logged = Counter(
        (row[columns.index("completion")], row[columns.index("reward")]) for t in train for row in t["data"]
    )
    written = Counter((r["completion"], r["reward"]) for s in (1, 2, 3) for r in samples[s, "train"])
    assert logged == written


# ------------------------------------------------------------------------------------------------
def _fake_batch(n: int, step: int):
    prompts = [SimpleNamespace(prompt_text=f"p{step}.{i}", answer=str(i)) for i in range(n // 2)]
    completions = [
        SimpleNamespace(prompt_index=i // 2, text=f"\\boxed{{{i // 2}}}" if i % 2 else "no") for i in range(n)
    ]
    return prompts, completions, [float(i % 2) for i in range(n)], [0.5 - (i % 2) for i in range(n)]


def test_default_cadence_and_spread(tmp_path):
    assert pick(128, 4) == [0, 32, 64, 96] and pick(3, 4) == [0, 1, 2] and pick(10, 3) == [0, 3, 6]
    cfg = load_config(None, [f"output_dir={tmp_path}"])  # defaults: 4 samples every 10 steps
    log = SampleLog(cfg)
    for step in range(1, 21):
        log.train(step, *_fake_batch(16, step))
    log.eval(20, "tiny", *_fake_batch(16, 20)[:3])
    log.close()
    rows = [json.loads(l) for l in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [(r["step"], r["kind"], r["index"]) for r in rows] == [
        (s, k, i) for s, k in ((10, "train"), (20, "train"), (20, "eval:tiny")) for i in (0, 4, 8, 12)
    ]
    assert rows[1] == {
        "step": 10,
        "kind": "train",
        "index": 4,
        "prompt": "p10.2",
        "completion": "no",
        "extracted_answer": None,
        "gold_answer": "2",
        "reward": 0.0,
        "advantage": 0.5,
    }


def test_a_resumed_run_continues_the_file(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.samples_every_steps=1", "tracking.samples_per_step=1"])
    log = SampleLog(cfg)
    for step in range(1, 6):  # the checkpoint was at step 3; steps 4 and 5 ran, then the run died
        log.train(step, *_fake_batch(4, step))
    log.close()
    with open(tmp_path / SAMPLES_FILE, "a") as f:
        f.write('{"step": 6, "kind": "tr')  # a line cut by the crash
    resumed = SampleLog(cfg, start_step=3)
    for step in (4, 5, 6):
        resumed.train(step, *_fake_batch(4, step))
    resumed.close()
    rows = [json.loads(l) for l in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 1-3 kept, 4-5 written once, 6 whole
    SampleLog(cfg).close()  # a new run from step 0 starts the file anew
    assert (tmp_path / SAMPLES_FILE).read_text() == ""


def test_config_keys_are_validated():
    with pytest.raises(ConfigError, match="tracking.samples_per_step"):
        load_config(None, ["tracking.samples_per_step=-1"])
    with pytest.raises(ConfigError, match="tracking.samples_every_steps"):
        load_config(None, ["tracking.samples_every_stepz=5"])


def test_a_table_wandb_refuses_costs_one_message_not_the_run(tmp_path, capsys):
    class Refusing:
        def log(self, data, step):
            raise RuntimeError("no tables today")

    t = Tracker(load_config(None, [f"output_dir={tmp_path}", "tracking.progress_bar=false"]), enabled=True)
    t.run = Refusing()
    for step in (1, 2):
        t.log_table(step, "samples/train", [{"step": step, "reward": 1.0}])
    t.run = None
    t.close()
    err = capsys.readouterr().err
    assert err.count("could not log the table samples/train (RuntimeError: no tables today)") == 1
