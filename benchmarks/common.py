"""Helpers shared by the benchmarks: the 20-50M-parameter Qwen3 they measure, the machine's
matmul FLOP/s baseline, robust timing, and the printed table / ratio line.

Every benchmark prints a table and one line `ratio = X (target: ...)`; the baseline of each
ratio is measured in the same run, so the ratio is comparable across machines even though the
absolute figures are not. Imports only torch at module level (transformers where a model is built).
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

# A Qwen3 of ~34M parameters (hidden 512, 8 layers, GQA 8/4 heads, tied 16k vocabulary):
# the size the issue asks for (20-50M), small enough for a few steps on 2 CPU cores.
MID_QWEN3 = dict(hidden_size=512, num_layers=8, intermediate_size=1536, vocab_size=16384, num_heads=8, num_kv_heads=4)


def qwen3_config(
    *,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    vocab_size: int,
    num_heads: int,
    num_kv_heads: int,
    max_positions: int = 4096,
):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_qwen3(out_dir: Optional[str | Path] = None, *, seed: int = 0, **shape) -> torch.nn.Module:
    """A randomly initialised fp32 Qwen3 of `shape` (default MID_QWEN3); saved to `out_dir` when given."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(qwen3_config(**{**MID_QWEN3, **shape})).float()
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
    return model


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding / head counts once)."""
    return sum(p.numel() for p in model.parameters())


def time_call(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s: the best of `repeats` (n x n) @ (n x n) products, 2 n^3 FLOPs each.

    The best (not the median) repeat is the machine's attainable peak; the benchmarks that divide by it
    take the median of their own repeats, so noise from other processes lowers the ratio, never raises it.
    """
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    best = min(time_call(lambda: torch.mm(a, b), repeats=repeats, warmup=1))
    return 2.0 * n**3 / best


def eval_curve(rows: Sequence[dict]) -> dict[int, float]:
    """step -> eval avg@k of a run's metrics.jsonl rows (the default job has one eval set; pass@j, maj@n
    and the vote's counts are logged beside it and left out here)."""
    return {r["step"]: v for r in rows for k, v in r.items() if k.startswith("eval/") and "/avg@" in k}


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(title)
    for j, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


_TARGET = re.compile(r"^(<=|>=)\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)x?(?:\s|$)")


def ratio_line(value: float, target: str, met: Optional[bool] = None) -> str:
    """`ratio = X (target: T) -> met | NOT met`, the verdict read from `target`, which starts with
    "<= BOUND" or ">= BOUND" (a trailing x allowed: "<= 2x a plain copy"). A `met` the caller
    passes must agree with it."""
    m = _TARGET.match(target)
    if m is None:
        raise ValueError(f"target {target!r} must start with '<= BOUND' or '>= BOUND'")
    bound = float(m.group(2))
    verdict = value <= bound if m.group(1) == "<=" else value >= bound
    if met is not None and met != verdict:
        raise ValueError(
            f"ratio {value} against {target!r} is {'met' if verdict else 'not met'}, the caller said {met}"
        )
    return f"ratio = {value:.3f} (target: {target}) -> {'met' if verdict else 'NOT met'}"


def default_job_runs(
    settings: dict[str, list[str]], *, steps: int, rounds: int, config: str = "configs/tiny_cpu.yaml"
) -> Iterator[tuple[str, list[dict], float]]:
    """Run `drpo-train --config configs/tiny_cpu.yaml` (the README's main job, or `config`; `steps` steps,
    no export) once per setting per round, alternating, each in a fresh process; yields (setting,
    metrics.jsonl rows, wall seconds of the whole command)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    job = [sys.executable, "-m", "drpo_trainer.cli", "--config", config]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, (name, overrides) in enumerate(settings.items()):
                out = Path(tmp) / f"setting{i}_round{r}"
                cmd = [*job, f"output_dir={out}", f"trainer.max_steps={steps}", "checkpoint.export_final=false"]
                cmd += ["tracking.progress_bar=false", *overrides]
                start = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
                wall = time.perf_counter() - start
                if res.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                yield name, rows, wall


def init_single_process() -> None:
    """A one-process gloo group, as `drpo-train` sets up with distributed.nproc_per_node=1."""
    from drpo_trainer.runtime.distributed import setup_distributed

    setup_distributed("gloo")
