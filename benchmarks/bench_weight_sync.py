"""Weight-sync time vs a plain copy of the same bytes (issue 7, benchmark 5).

    python benchmarks/bench_weight_sync.py [--repeats 5] [--bucket-mb 512]

On a ~34M-parameter Qwen3 (hidden 512, 8 layers, tied 16k vocabulary; 134 MB of fp32), in one run:
  plain copy_        `dst.copy_(src)` for every learner parameter into the same-named rollout-model
                     parameter (state dict to state dict; the bytes sync moves: parameters, tied
                     weights once, no buffers) -- the baseline
  sync, plain module `sync_weights(model, engine, bucket_bytes)` from the bare learner module into the
                     CPU rollout engine (`HFEngine.load_weights`): bucket planning + name mapping + copy
  sync, ZeRO-3       the same from the learner's DeepSpeed ZeRO-3 engine (one process): every bucket is
                     gathered with `GatheredParameters` before the copy and re-partitioned after it,
                     which is the path `drpo-train` runs
The three are timed in interleaved rounds (all see the same load on a shared machine).
Headline: ratio = ZeRO-3 sync time / plain copy time, best of the rounds (the machine's attainable
time: load from other processes only adds time); the medians are printed beside it. Target <= 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks.common import build_qwen3, init_single_process, median, print_table, ratio_line  # noqa: E402

TARGET = 2.0


def rollout_engine(model_dir: str):
    """The CPU rollout engine with its own full copy of the model (a stand-in tokenizer: no text is made)."""
    from drpo_trainer.rollout.hf_engine import HFEngine

    return HFEngine(model_dir, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=2))


def plain_copy(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """The baseline: copy_ every source parameter into the destination parameter of the same name."""
    targets = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            targets[name].copy_(p)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def zero3_module(model_dir: str) -> torch.nn.Module:
    """The learner's module, partitioned by ZeRO-3 exactly as `drpo-train` builds it."""
    from drpo_trainer.config import load_config
    from drpo_trainer.learner.learner import Learner

    init_single_process()
    cfg = load_config(None, [f"model.path={model_dir}", "distributed.zero_stage=3"])
    return Learner(cfg, model_dir, total_optimizer_steps=1).module


def check_synced(src: torch.nn.Module, engine) -> None:
    """The benchmark must time a sync that works: the engine's weights now equal the source's."""
    dst = dict(engine.model.named_parameters())
    for name, p in src.named_parameters():
        if not torch.equal(dst[name], p.detach()):
            raise AssertionError(f"weight sync left {name} different from the learner")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time every function once per round, `repeats` rounds, so that all of them see the same load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--bucket-mb", type=int, default=512, help="rollout.sync_bucket_mb")
    args = parser.parse_args()
    from drpo_trainer.rollout.weight_sync import sync_weights

    bucket = args.bucket_mb * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        src = build_qwen3(tmp, seed=0)
        zero3 = zero3_module(tmp)  # the same weights, partitioned
        engine = rollout_engine(tmp)
        with torch.no_grad():  # make the engine's copy differ, so that the first sync really changes it
            for p in engine.model.parameters():
                p.add_(1.0)
        sync_weights(zero3, engine, bucket)
        check_synced(src, engine)  # time a sync that works
        n_buckets = int(sync_weights(zero3, engine, bucket)["sync/buckets"])
        times = interleaved(
            {
                "plain copy_": lambda: plain_copy(src, engine.model),
                "sync_weights, plain module": lambda: sync_weights(src, engine, bucket),
                "sync_weights, ZeRO-3": lambda: sync_weights(zero3, engine, bucket),
            },
            args.repeats,
        )
        nbytes = param_bytes(src)

    best = {name: min(t) for name, t in times.items()}
    mid = {name: median(t) for name, t in times.items()}
    base_best, base_mid = best["plain copy_"], mid["plain copy_"]
    print(
        f"{nbytes / 1e6:.0f} MB of fp32 parameters, bucket {args.bucket_mb} MiB ({n_buckets} bucket(s)), "
        f"{torch.get_num_threads()} torch threads; {args.repeats} interleaved rounds"
    )
    print_table(
        "",
        ["method", "best s", "median s", "GB/s (best)", "vs copy (best)", "vs copy (median)"],
        [[n, best[n], mid[n], nbytes / best[n] / 1e9, best[n] / base_best, mid[n] / base_mid] for n in times],
    )
    ratio = best["sync_weights, ZeRO-3"] / base_best
    print(ratio_line(ratio, f"<= {TARGET}x a plain copy, best of {args.repeats}"))


if __name__ == "__main__":
    main()
