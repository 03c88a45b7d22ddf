"""The measurement scripts of tests/vllm_engine (engine_checks.py per model, lora_checks.py), started
together for every test this session collected and run two at a time.

Each script starts its own vLLM engine in its own process (vLLM's parallel state is process-global).
vLLM drops its process to one torch thread for serving, so on 2 cores two runs at once finish the
four sooner (measured: 117 s one after the other, 59 s and 85 s in two runs two at a time); the
tests of one model wait only for that model's run. (The drpo-train runs of test_vllm_train_cpu.py stay one at a
time: their learner uses both cores, and a pair at once took 92 s against 59 s in sequence.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "tied": ["engine_checks.py", "tied"],
    "untied": ["engine_checks.py", "untied"],
    "moe": ["engine_checks.py", "moe"],
    "lora": ["lora_checks.py"],
}
PARALLEL_RUNS = 2


def run_checks(kind: str, out: Path) -> subprocess.CompletedProcess:
    script, *args = SCRIPTS[kind]
    return subprocess.run(
        [sys.executable, str(REPO / "tests/vllm_engine" / script), *args, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def wanted_kinds(items) -> list[str]:
    """The runs the collected tests need, in SCRIPTS order: a `checks` fixture parametrized by model
    (test_vllm_engine_cpu.py) or the LoRA module's."""
    kinds = set()
    for item in items:
        if "checks" not in getattr(item, "fixturenames", ()):
            continue
        callspec = getattr(item, "callspec", None)
        kinds.add(callspec.params["checks"] if callspec and "checks" in callspec.params else "lora")
    return [k for k in SCRIPTS if k in kinds]


@pytest.fixture(scope="session")
def check_results(request, tmp_path_factory):
    """`result(kind)`: the measurements of one run once it has finished (a failed run fails the tests
    that need it, with its log). Every kind the session collected is started at the first request."""
    pool = ThreadPoolExecutor(max_workers=PARALLEL_RUNS)
    runs: dict[str, tuple[Future, Path]] = {}
    for kind in wanted_kinds(request.session.items):
        out = tmp_path_factory.mktemp(kind) / "checks.json"
        runs[kind] = (pool.submit(run_checks, kind, out), out)

    def result(kind: str) -> dict:
        future, out = runs[kind]
        proc = future.result()
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return json.loads(out.read_text())

    yield result
    pool.shutdown(wait=True, cancel_futures=True)
