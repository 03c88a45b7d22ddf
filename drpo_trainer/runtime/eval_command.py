"""`drpo-train eval MODEL --config X`: a model's scores on the config's eval sets, without training.

MODEL is a Hugging Face model directory (a `final/` export too), `builtin:tiny-math`, a hub id in the
local cache, a checkpoint directory (`checkpoints/step_*`: exported weights-only into a temporary
folder of the output directory with `drpo-train export`'s code, removed afterwards; a LoRA checkpoint
is merged onto its base model), or a peft adapter directory (`drpo-train export --adapter`: merged onto
the base model its adapter_config.json names, in the same temporary folder).

The evaluation is the training run's (drpo_trainer/rollout/evaluation.py): the same engine
(`rollout.backend`), the same verifier (`reward.*`), the eval section's sampling settings, and the
seeds of a one-process run's eval at step `--step` (default 0). So on `builtin:tiny-math` with a
run's config it reproduces that run's step-0 eval exactly. One process; problems are not sharded.

Writes to `--out` (default `<output_dir>/eval/<model name>`): `metrics.json` (per set: problems, n,
avg@n, pass@j, maj@n; and the flat `eval/<set>/...` keys a run logs), `samples.jsonl` (every
completion, in the rows of a run's samples.jsonl) and `eval_config.yaml` (the resolved config).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from drpo_trainer.config import Config, ConfigError, dump_config

MODEL_COPY = ".checkpoint-model"  # a checkpoint's weights exported for the engine, inside --out


def model_kind(model: str) -> str:
    """'builtin', 'checkpoint', 'adapter', 'directory' or 'hub'; ConfigError for a run directory or a missing path."""
    if model.startswith("builtin:"):
        return "builtin"
    p = Path(model).expanduser()
    if p.is_dir():
        if (p / "hf").is_dir() and (p / "ds").is_dir():
            return "checkpoint"
        if (p / "adapter_config.json").is_file() and not (p / "config.json").exists():
            return "adapter"  # a peft LoRA adapter (`drpo-train export --adapter`): merged onto its base first
        if not (p / "config.json").exists() and ((p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file()):
            raise ConfigError(
                f"eval: {model} is a run directory, not a model. Fix: give its final/ export or one of its "
                "checkpoints/step_* directories"
            )
        return "directory"
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(
            f"eval: {model} is not a model directory, a checkpoint, builtin:tiny-math or a hub id (org/name). "
            "Fix: check the path"
        )
    return "hub"


def default_out(cfg: Config, model: str) -> Path:
    name = re.sub(r"[^\w.-]+", "-", Path(model.rstrip("/")).name or model).strip("-.") or "model"
    return Path(cfg.output_dir) / "eval" / name.removeprefix("builtin-")


def check_eval(cfg: Config, model: str, out: Path) -> str:
    """Every check before anything loads; returns MODEL's kind. ConfigError (exit 2) on a problem."""
    from drpo_trainer.io.run_dir import check_eval_target
    from drpo_trainer.runtime import preflight

    if not cfg.eval.files:
        raise ConfigError("eval: the config has no eval sets (eval.files is empty). Fix: set eval.files")
    if cfg.rollout.backend == "vllm" and cfg.rollout.vllm.tensor_parallel_size > 1:
        raise ConfigError(
            f"eval: rollout.vllm.tensor_parallel_size={cfg.rollout.vllm.tensor_parallel_size}, but drpo-train eval "
            "runs one process. Fix: set rollout.vllm.tensor_parallel_size=1"
        )
    kind = model_kind(model)
    check_eval_target(out, model if kind in ("checkpoint", "adapter", "directory") else None)
    if kind in ("directory", "hub"):
        preflight.check_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": model})}))
    if kind == "adapter":
        base = json.loads((Path(model) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise ConfigError(
                f"eval: the adapter {model} names the base model {base!r}, which is not a model directory here. "
                "Fix: set base_model_name_or_path in its adapter_config.json to the base model's directory"
            )
    if kind == "checkpoint":
        from drpo_trainer.io.checkpoint import verify_checkpoint

        problem = verify_checkpoint(Path(model), hashes=False)
        if problem:
            raise ConfigError(f"eval: {model} is not a complete checkpoint: {problem}. Fix: give a published step_*")
    preflight.check_backend(cfg)
    preflight.check_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_files": []})}))  # eval's
    preflight.check_reward(cfg)
    preflight.check_gpus(cfg, 1)
    return kind


class _AllSamples:
    """Writes every evaluated completion to samples.jsonl, in the rows of a run's samples.jsonl."""

    def __init__(self, path: Path, extraction: str) -> None:
        self.file = open(path, "w", encoding="utf-8")
        self.extraction = extraction

    def eval(self, step, name, problems, completions, rewards) -> None:
        from drpo_trainer.io.samples import sample_rows

        kind = f"eval:{name}"
        rows = sample_rows(step, kind, problems, completions, rewards, len(completions), extraction=self.extraction)
        self.file.write("".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        self.file.close()


def run_eval(cfg: Config, model: str, out: Path, *, step: int = 0, config_file: Optional[str] = None) -> dict:
    """Evaluate MODEL (checked by `check_eval`) and write the results into `out`; returns metrics.json's content."""
    import torch

    from drpo_trainer.io.run_dir import EVAL_MARKER
    from drpo_trainer.rollout.evaluation import eval_counts, eval_metrics, per_set
    from drpo_trainer.rollout.producer import make_engine_and_scorer
    from drpo_trainer.runtime.run import load_eval_sets

    kind = model_kind(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_MARKER).write_text(json.dumps({"model": model}) + "\n")
    path = _model_path(cfg, model, kind, out)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        eval_sets = load_eval_sets(cfg, tokenizer)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine, scorer = make_engine_and_scorer(cfg, path, tokenizer=tokenizer, device=device)
        engine.show_progress = cfg.tracking.progress_bar
        samples = _AllSamples(out / "samples.jsonl", cfg.reward.extraction)
        counts = {}
        try:
            for name, problems in eval_sets.items():
                shown = len(problems[: cfg.eval.max_problems or None])
                n = cfg.eval.samples_per_prompt_of(name)
                print(f"eval {name}: {shown} problems x {n} samples", file=sys.stderr, flush=True)
                counts.update(eval_counts(cfg, engine, scorer, {name: problems}, step, 0, 1, samples))
        finally:
            samples.close()
            scorer.close()
    finally:
        if kind in ("checkpoint", "adapter"):
            shutil.rmtree(out / MODEL_COPY, ignore_errors=True)  # ours: written by _model_path
    metrics = eval_metrics(cfg, counts)
    by_set = per_set(metrics)
    sets = {
        name: {
            "problems": int(c["problems"]),
            "samples_per_prompt": cfg.eval.samples_per_prompt_of(name),
            **by_set[name],
        }
        for name, c in counts.items()
    }
    result = {"model": model, "config": config_file, "seed_step": step, "sets": sets, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval_config.yaml").write_text(dump_config(cfg))
    return result


def _model_path(cfg: Config, model: str, kind: str, out: Path) -> str:
    """A directory (or hub id) the engine loads: a checkpoint is exported weights-only into `out` first."""
    if kind == "builtin":
        from drpo_trainer.builtin.resolve import resolve_model_path

        return resolve_model_path(model)
    if kind == "checkpoint":
        from drpo_trainer.io.export import export_checkpoint

        print(f"eval: exporting {model} for the engine", file=sys.stderr, flush=True)
        return str(export_checkpoint(model, out / MODEL_COPY, dtype=cfg.rollout.dtype or cfg.model.dtype))
    if kind == "adapter":
        from drpo_trainer.io.export import merge_adapter_dir

        print(f"eval: merging the adapter {model} onto its base model", file=sys.stderr, flush=True)
        return str(merge_adapter_dir(model, out / MODEL_COPY, dtype=cfg.rollout.dtype or cfg.model.dtype))
    return model


def table(result: dict) -> str:
    """The metrics per set as a text table: one row per set, one column per metric."""
    sets = result["sets"]
    columns = ["problems", "samples_per_prompt"]
    for values in sets.values():
        columns += [c for c in values if c not in columns]
    head = ["set", *("n" if c == "samples_per_prompt" else c for c in columns)]
    rows = [head]
    for name, values in sets.items():
        cells = [values.get(c) for c in columns]
        rows.append([name, *(_cell(c, v) for c, v in zip(columns, cells))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if "@" in column else str(int(value))  # a metric, or a count
