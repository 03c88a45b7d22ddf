"""LoRA (model.lora) vs full fine-tuning (issue 26): what it costs, and whether the tiny job learns.

    python benchmarks/bench_lora.py [--part costs|learning|both] [--steps 60] [--repeats 5]

costs     a random ~11M Qwen3 (hidden 384, 5 layers, 6 heads, the tokenizer of builtin:tiny-math), one
          process, ZeRO stage 0, the CPU rollout engine beside the learner; each mode in a fresh process:
            step time      median of `--repeats` learner steps (recompute mu + 2 mini-batch updates) on
                           one batch of 32 sequences (16 prompt + 24-48 completion tokens, random ids)
            peak memory    the process's peak RSS growth from just before the learner is built to the
                           end of the timed steps (weights, gradients, optimizer state, activations;
                           the engine is built after)
            checkpoint     bytes of the DeepSpeed state a checkpoint writes (`ds/`)
            sync           bytes and median seconds of `sync_weights` into the engine
learning  configs/tiny_cpu.yaml vs configs/tiny_cpu_lora.yaml for `--steps` steps: eval avg@4 at the start
          and the end (target: LoRA's gain >= half of full fine-tuning's).
The ratio line: LoRA's eval gain / full fine-tuning's (learning), or LoRA / full step time (costs only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import eval_curve, median, print_table, ratio_line  # noqa: E402

RESULT = "BENCH_RESULT "
SHAPE = dict(hidden_size=384, num_layers=5, num_heads=6)
LORA = ["model.lora.rank=16", "model.lora.alpha=32"]
ROOT = Path(__file__).resolve().parents[1]


def measure(mode: str, model_dir: str, repeats: int) -> dict:
    """One mode's costs, in this process (started fresh by `costs`)."""

    from benchmarks.common import init_single_process
    from drpo_trainer.config import load_config
    from drpo_trainer.io.checkpoint import save_checkpoint
    from drpo_trainer.learner.learner import Learner, TrainSample
    from drpo_trainer.rollout.hf_engine import HFEngine
    from drpo_trainer.rollout.weight_sync import sync_weights
    from drpo_trainer.runtime.loop import split_minibatches

    init_single_process()
    cfg = load_config(
        None,
        [f"model.path={model_dir}", "optim.lr=1e-4", "rollout.max_new_tokens=48", "rollout.samples_per_prompt=8"]
        + (LORA if mode == "lora" else []),
    )
    from transformers import AutoConfig

    batch = _random_batch(TrainSample, vocab=AutoConfig.from_pretrained(model_dir).vocab_size)
    rss_before = _rss_now()  # the learner's growth: measured before the engine exists
    learner = Learner(cfg, model_dir, total_optimizer_steps=2 * (repeats + 1))
    step_times = []
    for i in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        mbs = split_minibatches([TrainSample(**vars(s)) for s in batch], 2, 8)
        learner.recompute_logprobs(mbs[1])
        learner.update(mbs[0], behaviour_from_forward=learner.can_reuse_logprobs)
        learner.update(mbs[1])
        if i:
            step_times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    engine = HFEngine(model_dir)
    syncs = [sync_weights(learner.module, engine, 512 << 20) for _ in range(repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        state = {"lora_base": {"path": model_dir, "sha256": "-"}} if mode == "lora" else {}
        ckpt = save_checkpoint(learner.engine, tmp, 1, state, config_yaml="", adapters_only=mode == "lora")
        ckpt_bytes = sum(f.stat().st_size for f in (ckpt / "ds").rglob("*") if f.is_file())
    trainable = sum(p.numel() for p in learner.module.parameters() if p.requires_grad)
    return {
        "mode": mode,
        "trainable_params": trainable,
        "step_s": median(step_times),
        "peak_rss_mb": peak / 2**20,
        "checkpoint_mb": ckpt_bytes / 2**20,
        "sync_mb": syncs[0]["sync/bytes"] / 2**20,
        "sync_s": median([s["sync/seconds"] for s in syncs]),
    }


def _random_batch(sample_cls, vocab: int, n: int = 32, prompt: int = 16) -> list:
    """4 prompts x G=8 sequences: `prompt` tokens + 24-48 completion tokens, random ids of the vocabulary."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        completion = int(torch.randint(24, 49, (), generator=gen))
        ids = torch.randint(3, vocab, (prompt + completion,), generator=gen).tolist()
        out.append(sample_cls(ids, prompt, float(torch.randn((), generator=gen)), torch.zeros(completion)))
    return out


def _rss_now() -> int:
    """This process's resident set now, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def costs(repeats: int) -> dict[str, dict]:
    from drpo_trainer.builtin.tiny_model import build_random_model

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(Path(tmp) / "model", **SHAPE)
        for mode in ("full", "lora"):  # each in a fresh process: its own peak RSS
            cmd = [sys.executable, __file__, "--measure", mode, "--model", model_dir, "--repeats", str(repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
            line = next((x for x in res.stdout.splitlines() if x.startswith(RESULT)), None)
            if line is None:
                raise RuntimeError(f"{mode} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
            out[mode] = json.loads(line[len(RESULT) :])
    return out


def learning(steps: int) -> dict[str, dict[int, float]]:
    """step -> eval avg@4 of the full job and the LoRA job, run one after the other."""
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, config in (("full", "configs/tiny_cpu.yaml"), ("lora", "configs/tiny_cpu_lora.yaml")):
            out = Path(tmp) / mode
            cmd = [sys.executable, "-m", "drpo_trainer.cli", "--config", config, f"output_dir={out}"]
            cmd += [f"trainer.max_steps={steps}", "checkpoint.export_final=false", "tracking.progress_bar=false"]
            start = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
            print(f"{mode}: {time.perf_counter() - start:.0f} s", flush=True)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            curves[mode] = eval_curve(rows)
    return curves


def _env() -> dict:
    return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def gain(curve: dict[int, float]) -> float:
    return curve[max(curve)] - curve[min(curve)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["costs", "learning", "both"], default="both")
    p.add_argument("--steps", type=int, default=60, help="learning: steps of each tiny job (default 60)")
    p.add_argument("--repeats", type=int, default=5, help="costs: timed steps and syncs per mode")
    p.add_argument("--measure", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(RESULT + json.dumps(measure(args.measure, args.model, args.repeats)), flush=True)
        return 0
    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    ratio = None
    if args.part in ("costs", "both"):
        c = costs(args.repeats)
        keys = ["trainable_params", "step_s", "peak_rss_mb", "checkpoint_mb", "sync_mb", "sync_s"]
        rows = [[k, c["full"][k], c["lora"][k], c["lora"][k] / c["full"][k]] for k in keys]
        print_table("~11M Qwen3, one process, ZeRO 0", ["", "full", "LoRA r=16", "LoRA / full"], rows)
        ratio = ("step time LoRA / full", c["lora"]["step_s"] / c["full"]["step_s"], "<= 1")
    if args.part in ("learning", "both"):
        curves = learning(args.steps)
        rows = [[m, curves[m][min(curves[m])], curves[m][max(curves[m])], gain(curves[m])] for m in curves]
        print_table(f"tiny job, {args.steps} steps: eval avg@4", ["", "start", "end", "gain"], rows)
        print("curves:", json.dumps(curves))
        full_gain = gain(curves["full"])
        ratio = ("eval gain LoRA / full", gain(curves["lora"]) / full_gain if full_gain else float("nan"), ">= 0.5")
    name, value, target = ratio
    print(f"{name}: " + ratio_line(value, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
