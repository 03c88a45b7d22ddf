"""End to end through the `drpo-train` CLI: the launcher, ZeRO-3 over two gloo processes,
metrics, checkpoints and the final export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def small_run_files(tmp_path_factory):
    from drpo_trainer.builtin.tiny_model import build_random_model

    d = tmp_path_factory.mktemp("e2e")
    model = build_random_model(d / "model", hidden_size=64, num_layers=2, seed=3)
    rows = [
        {"prompt": f"Compute {a} + {b}. Put the final answer in \\boxed{{}}.", "answer": str(a + b)}
        for a in range(9)
        for b in range(4)
    ]
    return {
        "model": model,
        "train": _write_rows(d / "train.jsonl", rows),
        "eval": _write_rows(d / "eval.jsonl", rows[:6]),
        "dir": d,
    }


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the reward functions defined in tests/ (resume_helpers) import in the verifier workers
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "drpo_trainer.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


@pytest.mark.slow  # two-process export, resume 2 -> 1 and the README's two-process command stay
@pytest.mark.distributed
def test_two_process_zero3_run(small_run_files, warm_model_dir):
    """Two ranks through the launcher, ZeRO-3 over gloo, with the warm model: the checkpoint holds one
    shard per rank, the engine samples from the synced weights, and the final export gathered from the
    shards equals the checkpoint's weights. Whatever tokens this CPU samples, the weights move: weight
    decay moves every parameter at every optimizer step, and the reward (1 for an odd number of
    characters) gives a group of 8 completions reward variance unless all 8 lengths have one parity."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from drpo_trainer.io.export import checkpoint_weights

    f = small_run_files
    out = f["dir"] / "run2"
    res = run_cli(
        [
            f"output_dir={out}",
            f"model.path={warm_model_dir}",
            f"data.train_files=[{f['train']}]",
            f"eval.files={{tiny: {f['eval']}}}",
            "eval.samples_per_prompt=2",
            "distributed.nproc_per_node=2",
            "trainer.skip_zero_advantage=false",  # every sample scored: the mismatch and ratio checks see each step
            "rollout.samples_per_prompt=8",
            "rollout.max_new_tokens=24",
            "trainer.prompts_per_step=4",
            "trainer.minibatches_per_step=2",
            "trainer.max_steps=2",
            "optim.lr=1e-4",
            "optim.weight_decay=0.1",
            "reward.name=resume_helpers:odd_length_reward",
            "reward.import_modules=[resume_helpers]",
            "reward.num_workers=1",
            "tracking.progress_bar=false",
        ]
    )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    # 6 eval problems x k = 2 samples, split over the two ranks: the accuracy is a count over 12
    for r in (rows[0], rows[2]):
        assert r["eval/tiny/avg@2"] * 12 == pytest.approx(round(r["eval/tiny/avg@2"] * 12), abs=1e-9)

    warm = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.float32)
    n_bytes = 4 * sum(p.numel() for _, p in warm.named_parameters(remove_duplicate=False))  # fp32, tied alias too
    for step in rows[1:]:
        assert step["sync/bytes"] == n_bytes  # every parameter gathered from the shards and sent
        assert step["mismatch/k3_kl"] < 1e-6  # the engine samples with exactly the learner's weights
        assert step["optim/lr"] == pytest.approx(1e-4)
        assert 0.0 <= step["reward/mean"] <= 1.0
        assert step["advantage/abs_mean"] > 0.0  # some group of the step has both parities (p = 1 - 2^-28)
    # the 4 groups of a step over 2 ranks x 2 mini-batches: mini-batch 2 is scored after one update
    assert any(step["policy/approx_kl_k3"] > 0 for step in rows[1:])

    ckpt = out / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "loop_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    shards = sorted(p.name for p in (ckpt / "ds" / "state").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    exported = load_file(str(out / "final" / "model.safetensors"))  # gathered live from the two shards
    saved = checkpoint_weights(ckpt)  # DeepSpeed's consolidation of the same shards
    names = [n for n, _ in warm.named_parameters()]
    assert set(names) <= set(exported)
    for name in names:
        assert torch.equal(exported[name], saved[name]), name
    moved = [n for n, p in warm.named_parameters() if not torch.equal(p.detach(), exported[n])]
    assert len(moved) == len(names)  # four optimizer steps moved every parameter


def test_bad_config_fails_fast_with_the_key(small_run_files):
    res = run_cli(
        [
            f"model.path={small_run_files['model']}",
            "trainer.prompts_per_step=3",
            "trainer.minibatches_per_step=2",
            "distributed.nproc_per_node=1",
            f"output_dir={small_run_files['dir'] / 'bad'}",
        ]
    )
    assert res.returncode == 2
    assert "trainer.prompts_per_step=3 must be divisible" in res.stderr


def test_malformed_data_fails_with_file_and_row(small_run_files, tmp_path):
    bad = _write_rows(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": "no answer"}])
    res = run_cli(
        [
            f"model.path={small_run_files['model']}",
            f"data.train_files=[{bad}]",
            "distributed.nproc_per_node=1",
            f"output_dir={tmp_path / 'run'}",
            "eval.files={}",
        ]
    )
    assert res.returncode == 2
    assert f"{bad}, row 2: missing field 'answer'" in res.stderr


def test_default_job_learns(warm_model_dir, tmp_path):
    """The embedded default config, shortened: training reward and eval avg@4 rise, and the
    engine and the learner agree on every sampled token's log-prob (fp32 on both sides)."""
    out = tmp_path / "learn"
    res = run_cli(
        [
            "--config",
            "configs/tiny_cpu.yaml",
            f"output_dir={out}",
            f"model.path={warm_model_dir}",
            "trainer.max_steps=20",
            "eval.every_steps=0",
            "checkpoint.export_final=false",
            "tracking.progress_bar=false",
        ],
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/synthetic/avg@4"] for r in rows if "eval/synthetic/avg@4" in r]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(evals) == 2 and len(rewards) == 20
    # the lr of the whole run is the schedule's: configs/tiny_cpu.yaml's warmup_cosine (no warm-up) over
    # 20 steps x 2 mini-batches = 40 optimizer steps, lr_i = 1e-4 * (1 + cos(pi i / 40)) / 2; a step logs
    # the mean of its two. A schedule 20 optimizer steps long would train the second half at lr 0.
    want = [sum(1e-4 * 0.5 * (1 + math.cos(math.pi * i / 40)) for i in (2 * s, 2 * s + 1)) / 2 for s in range(20)]
    assert [r["optim/lr"] for r in rows if "optim/lr" in r] == pytest.approx(want, rel=1e-9)
    assert evals[1] > evals[0] + 0.03, evals
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5, rewards
    assert max(r["mismatch/k3_kl"] for r in rows if "mismatch/k3_kl" in r) < 1e-6
