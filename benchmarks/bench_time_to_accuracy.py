"""Time to accuracy: drpo-train against TRL's GRPOTrainer on the default job's task, each at its best on 2 CPU cores.

    pip install -e ".[dev,bench]"
    python benchmarks/bench_time_to_accuracy.py [--part grid|settings|seeds|report|all] [--out DIR]
                                                [--lrs 5e-5 1e-4 2e-4 4e-4 8e-4] [--seeds 0 1 2] [--eval-every 5]

The task is the README's main job (configs/tiny_cpu.yaml) on both sides: builtin:tiny-math (the
warm-started 0.8M Qwen3 and its tokenizer), the bundled train set through the same chat template,
16 prompts x G = 8 per rollout step, <= 24 new tokens at temperature 1 (top_p 1, top_k 0), 60 rollout
steps of 2 optimizer steps each, AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0, clip 1.0) with the
learning rate decayed by a cosine to 0 over the 120 optimizer steps, fp32, and our math verifier
(`drpo_trainer.rewards.math_reward`, called in-process by TRL).

Evaluation, the same for both: every --eval-every rollout steps each trainer saves its policy (ours:
checkpoint.every_steps; TRL: a callback after optimizer step 2s, its time taken off TRL's clock), and
after the run the saved policies are scored by `drpo-train eval`'s own function
(`runtime/eval_command.run_eval`) with the bundled 128-problem eval set, avg@4, with the seeds of a
run's eval at that step. So a point's score depends only on the weights. TRL's initial policy, saved
the same way, must score exactly the builtin model's step-0 eval (checked: "same evaluator").

Timed (the x axis): wall seconds from the start of the first step to the end of step s. Ours:
`time/elapsed` of metrics.jsonl (its checkpoint saves included, which counts against us). TRL: the
wall clock from its first `on_step_begin`, minus the callback's saves. Start-up (imports, model
load, engines, reward workers) is outside both; each run's whole-command wall time is reported too.

Parts (results accumulate in OUT/results.jsonl, one line per run; a run already there is skipped,
so parts can be run one at a time and a stopped benchmark continues):

    grid      the learning-rate grid (--lrs), seed 0: ours synchronous in one process; TRL dr_grpo
    settings  at each trainer's best lr, seed 0: ours' layouts (two synchronous processes,
              asynchronous 1 learner + 1 rollout process at k = 1 and 2, skipping on as by default;
              and our grpo loss in place of DRPO, at TRL's best lr too); TRL's settings (loss type,
              steps per generation, paged generation, threads)
    seeds     the fastest setting of each trainer to the target, seeds 1 and 2 (3 with seed 0)
    budget    each reported setting given 60 s of training (its schedule over the steps that fit at
              its pace), 3 seeds: the eval of the policy it holds at 60 s
    report    the tables, the figure (docs/figures/time_to_accuracy.png) and the ratio line

Each part runs its runs interleaved (ours, TRL, ours, TRL, ...) so machine noise hits both.
Target: ours / TRL of the median time to eval avg@4 >= 0.2 <= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/tiny_cpu.yaml"
TARGET_EVAL = 0.2
TARGET_RATIO = 0.5
EQUAL_WALL_S = (30.0, 60.0, 120.0)
BUDGET_S = 60.0  # part budget: each trainer's schedule fitted to this much training
RESULT = "BENCH_RESULT "

# ours: overrides of the default job (skipping and mini-batch-1 reuse are on by default)
ASYNC = ["distributed.nproc_per_node=2", "distributed.rollout_processes=1", "algorithm.mismatch_correction=tis"]
OURS_SETTINGS = {
    "synchronous, 1 process": [],
    "synchronous, 2 processes": ["distributed.nproc_per_node=2"],
    "asynchronous k=1": [*ASYNC, "trainer.max_off_policy_steps=1"],
    "asynchronous k=2": [*ASYNC, "trainer.max_off_policy_steps=2"],
    "synchronous, 1 process, grpo loss": [],  # the clipped loss in place of DRPO: OURS_ALGORITHM
}
# settings that change the algorithm section (a loss and its parameters replace the config's, which a
# dotted override would merge into): written into a copy of the config
OURS_ALGORITHM = {
    "synchronous, 1 process, grpo loss": {"loss": "grpo", "loss_params": {"clip_low": 0.2, "clip_high": 0.2}},
}
# TRL: GRPOConfig fields over TRL_BASE (and "threads": torch.set_num_threads)
TRL_BASE = dict(loss_type="dr_grpo", scale_rewards="none", steps_per_generation=2, threads=2)
TRL_SETTINGS = {
    "dr_grpo": {},
    "dapo (TRL's default loss), std-scaled": dict(loss_type="dapo", scale_rewards="group"),
    "grpo, std-scaled": dict(loss_type="grpo", scale_rewards="group"),
    "dr_grpo, 1 step per generation": dict(steps_per_generation=1),
    "dr_grpo, paged generate": dict(use_transformers_paged=True),
    "dr_grpo, 1 thread": dict(threads=1),
}


def job_settings() -> dict:
    """The default job's settings that both trainers share, read from its config."""
    from drpo_trainer.config import load_config

    cfg = load_config(str(ROOT / CONFIG), [])
    return dict(
        steps=cfg.trainer.max_steps,
        prompts=cfg.trainer.prompts_per_step,
        group=cfg.rollout.samples_per_prompt,
        max_new_tokens=cfg.rollout.max_new_tokens,
        minibatches=cfg.trainer.minibatches_per_step,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        train_file=str(ROOT / cfg.data.train_files[0]),
        extraction=cfg.reward.extraction,
        grad_clip=cfg.optim.grad_clip,
        weight_decay=cfg.optim.weight_decay,
        betas=list(cfg.optim.betas),
        eps=cfg.optim.eps,
    )


# ------------------------------------------------------------------------------------------------ runs
def run_key(run: dict) -> str:
    budget = f"|{run['steps']} steps" if run.get("steps") else ""  # a wall-time budget's run (part budget)
    return f"{run['trainer']}|{run['setting']}|{run['lr']:g}|{run['seed']}{budget}"


def train_ours(run: dict, out: Path, every: int, steps: int) -> dict:
    """`drpo-train --config configs/tiny_cpu.yaml` with a checkpoint every `every` steps and no in-loop eval."""
    cmd = [sys.executable, "-m", "drpo_trainer.cli", "--config", _config_for(run["setting"], out), f"output_dir={out}"]
    cmd += [f"optim.lr={run['lr']}", f"trainer.seed={run['seed']}", "eval.files={}", "eval.at_start=false"]
    cmd += [f"checkpoint.every_steps={every}", "checkpoint.keep_last=10000", "checkpoint.export_final=false"]
    cmd += [f"trainer.max_steps={steps}", "tracking.progress_bar=false", *OURS_SETTINGS[run["setting"]]]
    start = time.perf_counter()
    _check_run(subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT), cmd)
    command_s = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/elapsed" in r]
    elapsed = {r["step"]: r["time/elapsed"] for r in rows}
    models = {s: str(out / "checkpoints" / f"step_{s:06d}") for s in elapsed if s % every == 0}
    return dict(
        elapsed=elapsed,
        models=models,
        command_s=command_s,
        step_s=_median([r["time/step"] for r in rows]),
        skipped=_median([r["perf/skipped_sample_fraction"] for r in rows]),
    )


def _config_for(setting: str, out: Path) -> str:
    """The default job's config, or a copy with the setting's algorithm section (OURS_ALGORITHM)."""
    if setting not in OURS_ALGORITHM:
        return CONFIG
    import yaml

    raw = yaml.safe_load((ROOT / CONFIG).read_text())
    raw["algorithm"].update(OURS_ALGORITHM[setting])
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def train_trl(run: dict, out: Path, every: int, steps: int) -> dict:
    """TRL's GRPOTrainer in a fresh process (`--side trl`), saving its policy every `every` rollout steps."""
    spec = dict(run=run, out=str(out), every=every, steps=steps)
    cmd = [sys.executable, __file__, "--side", "trl", "--spec", json.dumps(spec)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    _check_run(res, cmd)
    command_s = time.perf_counter() - start
    result = json.loads([line for line in res.stdout.splitlines() if line.startswith(RESULT)][-1][len(RESULT) :])
    result["elapsed"] = {int(k): v for k, v in result["elapsed"].items()}
    result["models"] = {int(k): v for k, v in result["models"].items()}
    return {**result, "command_s": command_s}


def trl_child(spec: dict) -> dict:
    """The TRL side: GRPOTrainer on the default job's task (module docstring), timed by a callback."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from drpo_trainer.builtin.resolve import resolve_model_path
    from drpo_trainer.rewards import math_reward

    run, out, every = spec["run"], Path(spec["out"]), spec["every"]
    job = job_settings()
    options = {**TRL_BASE, **TRL_SETTINGS[run["setting"]]}
    torch.set_num_threads(options.pop("threads"))
    spg = options["steps_per_generation"]
    model_dir = resolve_model_path("builtin:tiny-math")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list(_trl_rows(job, tokenizer))

    def reward(completions, answer, **_) -> list[float]:
        return [math_reward(c[0]["content"], a, extraction=job["extraction"]) for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        """Wall time from the first step's start to the end of each rollout step, the saves taken off."""

        def __init__(self) -> None:
            self.start, self.saving = None, 0.0
            self.elapsed: dict[int, float] = {}
            self.models: dict[int, str] = {}

        def save(self, model, generation: int) -> None:
            began = time.perf_counter()
            path = out / f"step_{generation:06d}"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            self.models[generation] = str(path)
            self.saving += time.perf_counter() - began

        def on_train_begin(self, args, state, control, model=None, **_):
            self.save(model, 0)  # the initial policy: it must score the builtin model's step-0 eval

        def on_step_begin(self, *_, **__):
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **_):
            if state.global_step % spg:
                return
            generation = state.global_step // spg
            self.elapsed[generation] = time.perf_counter() - self.start - self.saving
            if generation % every == 0:
                self.save(model, generation)

    per_device = job["prompts"] * job["group"] // spg
    config = GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        use_vllm=False,
        bf16=False,
        gradient_checkpointing=False,  # TRL defaults it on (and then generates without a KV cache); ours is off
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=run["seed"],
        data_seed=run["seed"],
        num_generations=job["group"],
        max_completion_length=job["max_new_tokens"],
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        max_steps=spec["steps"] * spg,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=run["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=job["weight_decay"],
        adam_beta1=job["betas"][0],
        adam_beta2=job["betas"][1],
        adam_epsilon=job["eps"],
        max_grad_norm=job["grad_clip"],
        beta=0.0,
        dataloader_num_workers=0,
        log_completions=False,
        **options,
    )
    clock = Clock()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    times = [clock.elapsed[g] - clock.elapsed.get(g - 1, 0.0) for g in sorted(clock.elapsed)]
    return dict(elapsed=clock.elapsed, models=clock.models, step_s=_median(times))


def _trl_rows(job: dict, tokenizer) -> list[dict]:
    """The train set as TRL's conversational prompts, without the prompts ours drops (data.max_prompt_tokens)."""
    rows = [json.loads(line) for line in Path(job["train_file"]).read_text().splitlines() if line.strip()]
    out = []
    for r in rows:
        messages = [{"role": "user", "content": r["prompt"]}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in newer transformers
        if len(ids) <= job["max_prompt_tokens"]:
            out.append({"prompt": messages, "answer": r["answer"]})
    return out


# ------------------------------------------------------------------------------------------------ eval
def evaluate(points: list[tuple[str, int]], out: Path) -> list[float]:
    """eval avg@4 of each (model, step) in one fresh process (`--side eval`)."""
    if not points:
        return []
    spec = dict(points=points, out=str(out))
    cmd = [sys.executable, __file__, "--side", "eval", "--spec", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    _check_run(res, cmd)
    return json.loads([line for line in res.stdout.splitlines() if line.startswith(RESULT)][-1][len(RESULT) :])


def eval_child(spec: dict) -> list[float]:
    from drpo_trainer.config import load_config
    from drpo_trainer.runtime.eval_command import check_eval, run_eval

    scores = []
    for i, (model, step) in enumerate(spec["points"]):
        out = Path(spec["out"]) / f"eval_{int(time.time() * 1e6)}_{i}"
        cfg = load_config(str(ROOT / CONFIG), [f"output_dir={out.parent}", "tracking.progress_bar=false"])
        check_eval(cfg, model, out)
        result = run_eval(cfg, model, out, step=step)
        (avg,) = [v for k, v in result["metrics"].items() if "/avg@" in k]
        scores.append(avg)
    return scores


def ensure_evals(rec: dict, steps: list[int], out: Path) -> None:
    """Score the run's saved policies at `steps` that are not scored yet (in rec["evals"])."""
    todo = [s for s in steps if str(s) not in rec["evals"] and s in rec["models"]]
    for s, score in zip(todo, evaluate([(rec["models"][s], s) for s in todo], out / "evals")):
        rec["evals"][str(s)] = score


def first_crossing(rec: dict, out: Path, chunk: int = 4) -> None:
    """Score the run's policies in step order (`chunk` per eval process) until eval avg@4 first reaches the
    target; the last policy is scored too."""
    steps = sorted(s for s in rec["models"] if s > 0)
    for i in range(0, len(steps), chunk):
        ensure_evals(rec, steps[i : i + chunk] + ([steps[-1]] if i == 0 else []), out)
        if any(rec["evals"][str(s)] >= TARGET_EVAL for s in steps[i : i + chunk]):
            break


# ------------------------------------------------------------------------------------------------ report
def time_to_target(rec: dict) -> float | None:
    for s in sorted(int(k) for k in rec["evals"]):
        if s > 0 and rec["evals"][str(s)] >= TARGET_EVAL:
            return rec["elapsed"][s]
    return None


def eval_at(rec: dict, seconds: float, step0: float) -> float:
    """The score of the newest scored policy the run had at `seconds` of training (its last one after it ended)."""
    best, at = step0, -1.0
    for k, v in rec["evals"].items():
        s = int(k)
        t = rec["elapsed"].get(s, 0.0) if s else 0.0
        if t <= seconds and t >= at:
            best, at = v, t
    return best


# ------------------------------------------------------------------------------------------------ driver
class Bench:
    def __init__(self, out: Path, every: int, steps: int) -> None:
        self.out, self.every, self.steps = out, every, steps
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.jsonl"
        self.runs = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                rec["elapsed"] = {int(k): v for k, v in rec["elapsed"].items()}
                rec["models"] = {int(k): v for k, v in rec["models"].items()}
                self.runs[run_key(rec)] = rec

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.runs.values()))
        tmp.replace(self.path)

    def run(self, trainer: str, setting: str, lr: float, seed: int, steps: int | None = None) -> dict:
        run = dict(trainer=trainer, setting=setting, lr=lr, seed=seed, **({"steps": steps} if steps else {}))
        key = run_key(run)
        if key not in self.runs:
            where = self.out / "runs" / key.replace("|", "_").replace(" ", "").replace(",", "_").replace("=", "")
            print(f"[{time.strftime('%H:%M:%S')}] {key}: training", flush=True)
            res = (train_ours if trainer == "ours" else train_trl)(run, where, self.every, steps or self.steps)
            self.runs[key] = {**run, **res, "evals": {}}
            first_crossing(self.runs[key], self.out)
            self.save()
            rec = self.runs[key]
            print(
                f"  median step {rec['step_s']:.2f} s, command {rec['command_s']:.0f} s, "
                f"to {TARGET_EVAL}: {_fmt_s(time_to_target(rec))}, evals {rec['evals']}",
                flush=True,
            )
        return self.runs[key]

    def interleave(self, ours: list[tuple], trl: list[tuple]) -> None:
        for i in range(max(len(ours), len(trl))):
            for trainer, runs in (("ours", ours), ("trl", trl)):
                if i < len(runs):
                    self.run(trainer, *runs[i])

    def best(self, trainer: str, *, setting: str) -> dict:
        """The seed-0 run of `setting` fastest to the target (then the highest last eval): its lr is the best."""
        runs = [r for r in self.plain(trainer) if r["seed"] == 0 and r["setting"] == setting]
        if not runs:
            raise SystemExit(f"no {trainer} runs yet: run --part grid first")
        return min(runs, key=_rank)

    def plain(self, trainer: str) -> list[dict]:
        """`trainer`'s runs of the job's own length (not a budget's)."""
        return [r for r in self.runs.values() if r["trainer"] == trainer and not r.get("steps")]

    def step0(self) -> float:
        """The builtin model's step-0 eval, and TRL's saved initial policy's: the same evaluator must agree."""
        from drpo_trainer.builtin.resolve import resolve_model_path

        trl = next((r for r in self.runs.values() if r["trainer"] == "trl"), None)
        points = [(resolve_model_path("builtin:tiny-math"), 0)] + ([(trl["models"][0], 0)] if trl else [])
        scores = evaluate(points, self.out / "evals")
        if len(scores) == 2 and scores[0] != scores[1]:
            raise SystemExit(f"TRL's initial policy scores {scores[1]}, the builtin model {scores[0]}: not equal")
        return scores[0]


def part_grid(b: Bench, lrs: list[float]) -> None:
    b.interleave([("synchronous, 1 process", lr, 0) for lr in lrs], [("dr_grpo", lr, 0) for lr in lrs])


def part_settings(b: Bench) -> None:
    lr_ours, lr_trl = b.best("ours", setting="synchronous, 1 process")["lr"], b.best("trl", setting="dr_grpo")["lr"]
    ours = [(s, lr_ours, 0) for s in OURS_SETTINGS]
    ours += [(s, lr_trl, 0) for s in OURS_ALGORITHM if lr_trl != lr_ours]  # another loss: at TRL's lr too
    b.interleave(ours, [(s, lr_trl, 0) for s in TRL_SETTINGS])
    # each trainer's fastest setting also at its grid's second-best lr, so that both candidates of the seeds
    # part can be that setting
    b.interleave(*[[(fastest(b, t)["setting"], lr, 0) for lr in grid_lrs(b, t)] for t in ("ours", "trl")])


def grid_lrs(b: Bench, trainer: str) -> list[float]:
    """The grid's two learning rates whose base setting reached the target soonest on seed 0."""
    base = {"ours": "synchronous, 1 process", "trl": "dr_grpo"}[trainer]
    runs = [r for r in b.plain(trainer) if r["seed"] == 0 and r["setting"] == base]
    return [r["lr"] for r in sorted(runs, key=_rank)[:2]]


def fastest(b: Bench, trainer: str) -> dict:
    return min((r for r in b.plain(trainer) if r["seed"] == 0), key=_rank)


def candidates(b: Bench, trainer: str) -> list[dict]:
    """The seed-0 runs that go on to every seed: the fastest setting to the target at each of the two
    learning rates whose fastest settings are fastest (one seed picks a lucky run; two candidates keep a
    fast but unstable one from standing alone)."""
    by_lr: dict[float, dict] = {}
    for r in b.plain(trainer):
        if r["seed"] == 0 and (r["lr"] not in by_lr or _rank(r) < _rank(by_lr[r["lr"]])):
            by_lr[r["lr"]] = r
    return sorted(by_lr.values(), key=_rank)[:2]


def part_seeds(b: Bench, seeds: list[int]) -> None:
    ours, trl = candidates(b, "ours"), candidates(b, "trl")
    b.interleave(
        [(c["setting"], c["lr"], s) for c in ours for s in seeds],
        [(c["setting"], c["lr"], s) for c in trl for s in seeds],
    )
    for c in ours + trl:  # every saved policy of these runs, for the curves and the equal-time evals
        for s in seeds:
            rec = b.run(c["trainer"], c["setting"], c["lr"], s)
            ensure_evals(rec, sorted(rec["models"]), b.out)
            b.save()


def budget_steps(rs: list[dict], seconds: float, steps: int) -> int:
    """Rollout steps that fill `seconds` of training at the pace of `rs` (60-step runs: their median end)."""
    ends = sorted(max(r["elapsed"].values()) for r in rs)
    return max(1, int(seconds * steps / ends[len(ends) // 2]))


def part_budget(b: Bench, seeds: list[int], seconds: float) -> None:
    """Each reported setting given `seconds` of training: its schedule stretched over the steps that fit
    (from the pace of its 60-step runs), 3 seeds, the policy it holds at `seconds` scored."""
    plan = {t: reported(b, t, seeds) for t in ("ours", "trl")}
    if any(rs is None for rs in plan.values()):
        raise SystemExit("the budget part needs the seeds part first")
    runs = {
        t: [(rs[0]["setting"], rs[0]["lr"], s, budget_steps(rs, seconds, b.steps)) for s in seeds]
        for t, rs in plan.items()
    }
    b.interleave(runs["ours"], runs["trl"])
    for t, rs in runs.items():
        for r in rs:
            rec = b.run(t, *r)
            held = [s for s in rec["models"] if s == 0 or rec["elapsed"].get(s, 0.0) <= seconds]
            ensure_evals(rec, [max(held)], b.out)
            b.save()


def budget_table(b: Bench, seeds: list[int], seconds: float, step0: float) -> None:
    from benchmarks.common import median, print_table

    rows = []
    for t in ("ours", "trl"):
        rs = [r for r in b.runs.values() if r["trainer"] == t and r.get("steps") and r["seed"] in seeds]
        if len(rs) < len(seeds):
            return
        at = [eval_at(r, seconds, step0) for r in rs]
        rows.append(
            [f"{t}: {rs[0]['setting']}, lr {rs[0]['lr']:g}", rs[0]["steps"],
             median([max(r["elapsed"].values()) for r in rs]), f"{median(at):.3f}", " / ".join(f"{a:.3f}" for a in at)]
        )  # fmt: skip
    print_table(
        f"\na {seconds:.0f} s training budget (schedule over the steps that fit; policy held at {seconds:.0f} s)",
        ["trainer", "steps", "median s trained", f"eval at {seconds:.0f} s (median)", "per seed"],
        rows,
    )


def reported(b: Bench, trainer: str, seeds: list[int]) -> list[dict] | None:
    """The candidate with the lowest median time to the target over `seeds` (not reached = infinite; ties:
    the higher median last eval), as its runs; None before the seeds part."""
    from benchmarks.common import median

    runs = [[b.runs.get(run_key({**c, "seed": s})) for s in seeds] for c in candidates(b, trainer)]
    runs = [rs for rs in runs if all(r is not None for r in rs)]
    if not runs:
        return None
    return min(runs, key=lambda rs: (median([_ttt(r) for r in rs]), -median([_last_eval(r) for r in rs])))


def report(b: Bench, seeds: list[int], figure: Path | None) -> None:
    from benchmarks.common import median, print_table, ratio_line

    step0 = b.step0()
    print(f"\nstep-0 eval avg@4 (builtin model; TRL's saved initial policy scores the same): {step0:.4f}")
    rows = []
    for r in sorted(b.runs.values(), key=lambda r: (r["seed"], r["trainer"], r["setting"], r["lr"])):
        rows.append(
            [r["trainer"], r["setting"], f"{r['lr']:g}", r["seed"], r["step_s"], _fmt_s(time_to_target(r)),
             _last_eval(r), r["command_s"]]
        )  # fmt: skip
    print_table(
        "\nevery run (time to target: training wall seconds until eval avg@4 first >= 0.2)",
        ["trainer", "setting", "lr", "seed", "median step s", "to 0.2 s", "last eval", "command s"],
        rows,
    )
    chosen = {"ours": reported(b, "ours", seeds), "trl": reported(b, "trl", seeds)}
    if any(rs is None for rs in chosen.values()):
        print("\n(the seeds part has not run yet: no summary)")
        return
    summary, medians = [], {}
    for side, rs in chosen.items():
        ttt = [time_to_target(r) for r in rs]
        reached = sorted(t for t in ttt if t is not None)
        medians[side] = median([_ttt(r) for r in rs])
        at = [[eval_at(r, t, step0) for r in rs] for t in EQUAL_WALL_S]
        summary.append(
            [f"{side}: {rs[0]['setting']}, lr {rs[0]['lr']:g}", _fmt_s(medians[side]),
             f"{_fmt_s(reached[0])} - {_fmt_s(max(ttt, key=lambda t: t or float('inf')))}" if reached else "-",
             f"{len(reached)}/{len(rs)}", *(f"{median(a):.3f}" for a in at)]
        )  # fmt: skip
    print_table(
        f"\nthe fastest setting of each, {len(seeds)} seeds",
        ["trainer", "median s to 0.2", "range", "reached", *(f"eval at {t:.0f} s (median)" for t in EQUAL_WALL_S)],
        summary,
    )
    budget_table(b, seeds, BUDGET_S, step0)
    if figure is not None:
        _figure(chosen, step0, figure)
        print(f"figure: {figure}")
    inf = float("inf")
    ratio = medians["ours"] / medians["trl"] if medians["trl"] < inf else (0.0 if medians["ours"] < inf else inf)
    print(ratio_line(ratio, f"<= {TARGET_RATIO} of TRL's median time to eval avg@4 {TARGET_EVAL}"))


def _figure(chosen: dict[str, list[dict]], step0: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    end = max(max(r["elapsed"].values()) for rs in chosen.values() for r in rs)
    grid = [end * i / 400 for i in range(401)]
    for (side, rs), color in zip(chosen.items(), ("tab:blue", "tab:orange")):
        curves = [[eval_at(r, t, step0) for t in grid] for r in rs]
        lo = [min(c[i] for c in curves) for i in range(len(grid))]
        hi = [max(c[i] for c in curves) for i in range(len(grid))]
        mid = [sorted(c[i] for c in curves)[len(curves) // 2] for i in range(len(grid))]
        label = f"{'drpo-train' if side == 'ours' else 'TRL GRPOTrainer'} ({rs[0]['setting']}, lr {rs[0]['lr']:g})"
        ax.step(grid, mid, where="post", color=color, label=label + f", median of {len(rs)} seeds")
        ax.fill_between(grid, lo, hi, step="post", color=color, alpha=0.2)
        ends = sorted(max(r["elapsed"].values()) for r in rs)  # after its last step a run holds its final policy
        ax.axvline(ends[len(ends) // 2], color=color, linestyle="--", linewidth=1)
    ax.axhline(TARGET_EVAL, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("training wall time, s (2 CPU cores; start-up and evaluation left out)")
    ax.set_ylabel("eval avg@4 (128 problems)")
    ax.set_title("Time to accuracy on the default job: band = range over seeds, dashed = median run's end", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------ helpers
def _env() -> dict:
    return dict(
        os.environ,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )


def _check_run(res: subprocess.CompletedProcess, cmd: list[str]) -> None:
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")


def _median(xs: list[float]) -> float:
    import statistics

    return float(statistics.median(xs)) if xs else float("nan")


def _ttt(r: dict) -> float:
    """Time to the target; infinite when the run never reached it."""
    t = time_to_target(r)
    return float("inf") if t is None else t


def _rank(r: dict) -> tuple[float, float]:
    return (_ttt(r), -_last_eval(r))


def _last_eval(r: dict) -> float:
    return r["evals"][str(max(int(k) for k in r["evals"]))] if r["evals"] else float("nan")


def _fmt_s(t: float | None) -> str:
    return "not reached" if t is None or t == float("inf") else f"{t:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["grid", "settings", "seeds", "budget", "report", "all"], default="all")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_time_to_accuracy"), help="results and runs")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4, 4e-4, 8e-4], help="the lr grid (both)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the reported runs")
    parser.add_argument("--eval-every", type=int, default=5, help="rollout steps between saved policies")
    parser.add_argument("--steps", type=int, help="rollout steps per run (default: the job's, 60; fewer to try it out)")
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "time_to_accuracy.png"))
    parser.add_argument("--side", choices=["trl", "eval"], help=argparse.SUPPRESS)  # a child process's role
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (trl_child if args.side == "trl" else eval_child)(json.loads(args.spec))
        print(RESULT + json.dumps(result), flush=True)
        return
    b = Bench(Path(args.out), args.eval_every, args.steps or job_settings()["steps"])
    if args.part in ("grid", "all"):
        part_grid(b, args.lrs)
    if args.part in ("settings", "all"):
        part_settings(b)
    if args.part in ("seeds", "all"):
        part_seeds(b, args.seeds)
    if args.part in ("budget", "all"):
        part_budget(b, args.seeds, BUDGET_S)
    report(b, args.seeds, Path(args.figure) if args.figure else None)


if __name__ == "__main__":
    main()
