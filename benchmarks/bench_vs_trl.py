"""End-to-end rollout-step time of drpo-train vs TRL's GRPOTrainer on CPU, at two geometries.

    python benchmarks/bench_vs_trl.py [--geometry tiny|10m|both] [--minibatches 2]
                                      [--steps 10] [--warmup 4] [--rounds 1]

Geometries (a random Qwen3 built by `tiny_model.build_random_model`, 512-token vocabulary):

    tiny   hidden 128, 4 layers, 4 heads (~0.8M parameters); 8 prompts x G=8, <= 32 new tokens
    10m    hidden 384, 5 layers, 6 heads (~11M parameters, compute-bound); 4 prompts x G=8, <= 48 tokens

Both trainers run in their own process (one process each, one after the other; `--rounds 2`
alternates them twice), on the same model and tokenizer, the same synthetic arithmetic prompts
(`builtin.arithmetic.train_problems`) through the same chat template, the same reward and the same batch
geometry:

    prompts per rollout step        TRL: generation_batch_size = prompts x group
    completions per prompt (G)      TRL: num_generations
    max completion tokens           TRL: max_completion_length
    optimizer steps per rollout     --minibatches    TRL: steps_per_generation (one mini-batch per
                                                          optimizer step, per_device_train_batch_size
                                                          = prompts x group / minibatches)
    sampling                        temperature 1, top_p 1, top_k 0 (unrestricted) on both
    optimizer                       AdamW, lr 1e-6, weight decay 0.01, clip 1.0, fp32
    activation checkpointing        off on both (TRL's GRPOConfig defaults it on: set False)

The reward is `varied_reward`, a deterministic score in [0, 1) of the completion's text: it has
variance in every group, so every sample has a non-zero advantage and both trainers do the full
update (our exact skipping of zero-advantage samples cannot decide the figure; the table shows
the fraction we skipped, which should be 0). Skipping's own gain is measured on the default job by
`benchmarks/bench_zero_advantage.py`.

What is timed: one rollout step = generation, rewards, behaviour log-probs, all optimizer steps.
Ours: `time/step` of `run_step` from metrics.jsonl (weight sync into the rollout engine included).
TRL: the sum of its `on_step_begin` -> `on_step_end` spans over the `steps_per_generation` optimizer
steps that share one generation (generation happens inside the first). Logging, checkpoints and eval
are outside both. The first `--warmup` rollout steps are dropped; the ratio is of the medians.

What differs (by design of each trainer): ours runs the learner on a DeepSpeed engine (ZeRO-0 in one
process) and samples from a separate rollout model (weights synced every step); TRL samples from
the policy model itself with plain torch. Ours scores in a pool of killable verifier processes
(reward.num_workers=2); TRL calls the reward function in-process. Ours: DRPO loss,
seq-mean-token-sum-norm; TRL: its clipped loss with loss_type dr_grpo (the same constant
normaliser) and beta 0 (no reference model).
Target: ratio = ours / TRL <= 0.8 at each geometry.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drpo_trainer.rewards import register_reward  # noqa: E402  (after the path is set; light: no torch)

TARGET = 0.8
RESULT = "BENCH_RESULT "

# name -> (model, prompts per step, G, max new tokens)
GEOMETRIES = {
    "tiny": (dict(hidden_size=128, num_layers=4, num_heads=4), 8, 8, 32),
    "10m": (dict(hidden_size=384, num_layers=5, num_heads=6), 4, 8, 48),
}


@register_reward("bench_varied")
def varied_reward(completion: str, answer: str = "", **_: object) -> float:
    """A deterministic score in [0, 1) of the text: distinct completions score differently, so every
    group has reward variance (a random model's math reward is 0 nearly everywhere)."""
    import zlib

    return (zlib.crc32(completion.encode()) % 1000) / 1000.0


def write_problems(path: Path, n: int = 512) -> None:
    from drpo_trainer.builtin.arithmetic import problem_row, train_problems

    path.write_text("".join(json.dumps(problem_row(p)) + "\n" for p in train_problems()[:n]))


def run_ours(args, model_dir: str, data: str, out: str) -> dict:
    from drpo_trainer.config import load_config
    from drpo_trainer.runtime.loop import train

    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            f"model.path={model_dir}",
            f"data.train_files=[{data}]",
            "eval.files={}",
            f"rollout.samples_per_prompt={args.group}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"rollout.hf.generation_batch_size={args.prompts * args.group}",
            f"trainer.prompts_per_step={args.prompts}",
            f"trainer.minibatches_per_step={args.minibatches}",
            f"trainer.max_steps={args.steps}",
            "trainer.micro_batch_tokens_per_gpu=16384",
            "optim.lr=1e-6",
            "optim.weight_decay=0.01",
            "distributed.nproc_per_node=1",
            f"distributed.zero_stage={args.zero_stage}",
            f"distributed.single_process_zero_stage={args.zero_stage}",  # exactly the stage asked for
            "reward.num_workers=2",
            "reward.name=benchmarks.bench_vs_trl:varied_reward",
            "reward.import_modules=[benchmarks.bench_vs_trl]",
            "checkpoint.export_final=false",
            "tracking.progress_bar=false",
        ],
    )
    train(cfg)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    return {
        "step_s": [r["time/step"] for r in rows],
        "rollout_s": [r["time/generate"] + r["time/score"] + r["time/recompute"] for r in rows],
        "update_s": [r["time/update"] + r["time/sync"] for r in rows],
        "completion_len": [r["response/length_mean"] for r in rows],
        "skipped": [r["perf/skipped_sample_fraction"] for r in rows],
    }


def run_trl(args, model_dir: str, data: str, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )

    def reward(completions, answer, **_) -> list[float]:
        return [varied_reward(c[0]["content"], a) for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.spans: list[float] = []
            self.lengths: list[float] = []
            self._start = 0.0

        def on_step_begin(self, *_, **__):
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.spans.append(time.perf_counter() - self._start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    config = GRPOConfig(
        output_dir=out,
        use_cpu=True,
        use_vllm=False,
        bf16=False,
        gradient_checkpointing=False,  # TRL defaults it on (and so generates without a KV cache); ours is off
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        per_device_train_batch_size=args.prompts * args.group // args.minibatches,
        gradient_accumulation_steps=1,
        steps_per_generation=args.minibatches,
        max_steps=args.steps * args.minibatches,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dr_grpo",
        dataloader_num_workers=0,
        log_completions=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[timer],
    )
    trainer.train()
    k = args.minibatches
    spans = timer.spans
    return {
        "step_s": [sum(spans[i : i + k]) for i in range(0, len(spans) - k + 1, k)],
        # the first span also generates, scores and computes the old log-probs; the others only update
        "rollout_s": [spans[i] - spans[i + 1] for i in range(0, len(spans) - k + 1, k)],
        "update_s": [k * spans[i + 1] for i in range(0, len(spans) - k + 1, k)],
        "completion_len": timer.lengths,
    }


def run_side(side: str, args, model_dir: str, data: str, out: str) -> dict:
    """One trainer in a fresh process (the two must not share a process group or thread pools)."""
    cmd = [sys.executable, __file__, "--side", side, "--model", model_dir, "--data", data, "--out", out]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("side", "model", "data", "out")]
    env = dict(
        os.environ,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),  # the reward workers import it
    )
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in res.stdout.splitlines() if line.startswith(RESULT)]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{side} run failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def summarize(results: dict[str, list[dict]], warmup: int) -> dict[str, dict[str, float]]:
    from benchmarks.common import median

    out = {}
    for side, runs in results.items():
        steady = {
            key: [x for r in runs for x in r[key][warmup:]]
            for key in runs[0]
            if key not in ("completion_len", "skipped")
        }
        out[side] = {key: median(v) for key, v in steady.items()}
        out[side]["min_step_s"] = min(steady["step_s"])
        out[side]["completion_len"] = median([x for r in runs for x in r["completion_len"]])
        out[side]["skipped"] = median([x for r in runs for x in r.get("skipped", [0.0])])
        out[side]["measured_steps"] = len(steady["step_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=[*GEOMETRIES, "both"], default="both")
    parser.add_argument("--minibatches", type=int, default=2, help="optimizer steps per rollout step")
    parser.add_argument("--steps", type=int, default=10, help="rollout steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="rollout steps dropped from each run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each trainer, alternating")
    parser.add_argument(
        "--zero-stage",
        type=int,
        default=0,
        choices=[0, 1, 2, 3],
        help="our learner's ZeRO stage (default 0: what drpo-train uses with one process)",
    )
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # the child process's flags
    for flag in ("--model", "--data", "--out"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--prompts", "--group", "--max-new-tokens"):
        parser.add_argument(flag, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_ours if args.side == "ours" else run_trl)(args, args.model, args.data, args.out)
        print(RESULT + json.dumps(result), flush=True)
        return
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) to leave steps to measure")
    names = list(GEOMETRIES) if args.geometry == "both" else [args.geometry]
    verdicts = [measure(name, args) for name in names]
    for line in verdicts:
        print(line)


def measure(name: str, args: argparse.Namespace) -> str:
    """Both trainers at one geometry; prints the table, returns the ratio line."""
    from benchmarks.common import print_table, ratio_line
    from drpo_trainer.builtin.tiny_model import build_random_model

    model, args.prompts, args.group, args.max_new_tokens = GEOMETRIES[name]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(Path(tmp) / "model", seed=0, **model)
        n_params = _count_params(model_dir)
        data = Path(tmp) / "train.jsonl"
        write_problems(data)
        results: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r in range(args.rounds):
            for side in ("ours", "trl"):
                results[side].append(run_side(side, args, model_dir, str(data), str(Path(tmp) / f"{side}{r}")))
    s = summarize(results, args.warmup)
    print(
        f"\n[{name}] {n_params / 1e6:.1f}M parameters; {args.prompts} prompts x G={args.group}, "
        f"<= {args.max_new_tokens} new tokens, {args.minibatches} optimizer steps per rollout step; "
        f"{args.rounds} round(s) x {args.steps - args.warmup} measured steps per trainer; "
        f"our skipped-sample fraction {s['ours']['skipped']:.2f}"
    )
    print_table(
        "",
        ["trainer", "median step s", "best step s", "rollout phase s", "update phase s", "completion tokens"],
        [
            [
                label,
                s[side]["step_s"],
                s[side]["min_step_s"],
                s[side]["rollout_s"],
                s[side]["update_s"],
                s[side]["completion_len"],
            ]
            for side, label in (
                ("ours", f"drpo-train (ZeRO-{args.zero_stage}, 1 process)"),
                ("trl", "TRL GRPOTrainer (use_vllm off)"),
            )
        ],
    )
    for side in ("ours", "trl"):  # the raw series: warm-up and noise are visible, not hidden in the median
        print(f"{side} step s per run: " + "; ".join(" ".join(f"{x:.2f}" for x in r["step_s"]) for r in results[side]))
    print(
        "rollout phase = generate + score + behaviour log-probs; update phase = optimizer steps (+ weight sync, ours)."
    )
    print("TRL's phases are estimated from its step spans: rollout = first span - second, update = k x second span.")
    ratio = s["ours"]["step_s"] / s["trl"]["step_s"]
    return f"[{name}] " + ratio_line(ratio, f"<= {TARGET} of TRL's step time", ratio <= TARGET)


def _count_params(model_dir: str) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    main()
