"""Shared by the checkpoint / resume / preemption / export tests: a tiny run directory and a
reward that gives a random model non-zero advantages.

`odd_length_reward` is registered here and importable by the verifier worker processes because the
runs are started with this folder on PYTHONPATH (reward.import_modules=[resume_helpers],
reward.name=resume_helpers:odd_length_reward).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from drpo_trainer.rewards import register_reward

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Wall-clock keys differ between any two runs; everything else must match on an exact resume.
# (In the asynchronous layout how far the rollout process is ahead depends on timing too.)
TIMING_PREFIXES = (
    "time/",
    "perf/",
    "sync/seconds",
    "async/learner_idle_fraction",
    "async/rollout_idle_fraction",
    "async/queue_depth",
)


@register_reward("odd_length")
def odd_length_reward(completion: str, answer: str, **_: object) -> float:
    """1 for a completion with an odd number of characters: about half the group of a random
    model scores, so advantages are non-zero and every update moves the weights."""
    return float(len(completion) % 2)


_SCRATCH: list[Path] = []


def scratch() -> Path:
    """One temporary folder for the whole pytest session, removed at exit."""
    if not _SCRATCH:
        import atexit
        import shutil
        import tempfile

        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="drpo-resume-")))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


@functools.lru_cache(maxsize=None)
def workspace() -> dict:
    """The model and data every run of the session uses (built once)."""
    return make_workspace(scratch() / "ws")


@functools.lru_cache(maxsize=None)
def baseline(nproc: int) -> tuple[Path, str]:
    """(output_dir, stderr) of an uninterrupted 6-step run with `nproc` processes, started with
    `--resume auto` on an empty directory; every step checkpointed and kept, final model exported.
    Shared by the resume, preemption and export tests (one run per process count per session)."""
    out = scratch() / f"baseline_{nproc}"
    cfg = write_config(
        scratch() / f"baseline_{nproc}.yaml",
        workspace(),
        out,
        **{"distributed.nproc_per_node": nproc, "checkpoint.keep_last": 6, "checkpoint.export_final": True},
    )
    return out, train(cfg, "--resume", "auto").stderr


def make_workspace(root: Path, *, num_train: int = 32) -> dict:
    """A random tiny model and a JSONL training file under `root`; returns their paths."""
    from drpo_trainer.builtin.arithmetic import problem_row, train_problems
    from drpo_trainer.builtin.tiny_model import build_random_model

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        build_random_model(model_dir, hidden_size=64, num_layers=2)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(problem_row(p)) + "\n" for p in train_problems()[:num_train]))
    return {"model": str(model_dir), "train": str(train)}


def write_config(path: Path, ws: dict, output_dir: Path, **overrides) -> Path:
    """A YAML config of a ~1 s/step, 6-step run checkpointing every step; `overrides` maps dotted
    keys to values (pass them as **{"trainer.max_steps": 3})."""
    cfg = {
        "output_dir": str(output_dir),
        "model": {"path": ws["model"], "dtype": "float32"},
        "data": {"train_files": [ws["train"]], "max_prompt_tokens": 64},
        "rollout": {"backend": "hf", "samples_per_prompt": 4, "max_new_tokens": 12, "temperature": 1.0},
        "reward": {"name": "resume_helpers:odd_length_reward", "import_modules": ["resume_helpers"], "num_workers": 1},
        "algorithm": {"loss": "drpo", "loss_params": {"delta": 12.5}},
        "optim": {"lr": 1.0e-3, "weight_decay": 0.0},
        "trainer": {
            "max_steps": 6,
            "prompts_per_step": 4,
            "minibatches_per_step": 2,
            "micro_batch_tokens_per_gpu": 512,
        },
        # ZeRO-3 with two processes; one process runs at single_process_zero_stage (0, unpartitioned)
        "distributed": {"nproc_per_node": 1, "zero_stage": 3},
        "eval": {"files": {}, "at_start": False},
        "tracking": {"progress_bar": False, "wandb": {"mode": "disabled"}, "samples_every_steps": 1},
        "checkpoint": {"every_steps": 1, "keep_last": 3, "export_final": False},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("WANDB_SILENT", "true")
    e["HF_DATASETS_OFFLINE"] = "1"
    e["TOKENIZERS_PARALLELISM"] = "false"
    e["OMP_NUM_THREADS"] = "1"  # same kernels in every run; two processes share the 2 cores
    return e


def command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "drpo_trainer.cli", "--config", str(config), *args]


def run_cli(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run drpo-train to its end, whatever its exit code."""
    return subprocess.run(command(config, *args), env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run drpo-train to completion; fail with its output when it does not exit 0."""
    proc = run_cli(config, *args, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"drpo-train exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start(config: Path, *args: str, log: Optional[Path] = None) -> subprocess.Popen:
    """Start drpo-train in its own process group (so a test can kill the whole run)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        command(config, *args), env=env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """`sig` to the run's process group and every descendant: torchrun starts each worker in a
    session of its own, so the group alone would leave the workers training as orphans."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:  # stop first, so that nothing spawns or notices its parent dying
        try:
            p.send_signal(signal.SIGSTOP)
        except psutil.NoSuchProcess:
            pass
    tree += [c for p in tree if p.is_running() for c in p.children(recursive=True) if c not in tree]
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for(predicate, timeout: float, poll: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


def metrics_rows(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)}


def consolidated_weights(checkpoint: Path) -> dict:
    """fp32 parameters of a checkpoint (what `drpo-train export` writes)."""
    from drpo_trainer.io.export import checkpoint_weights

    return checkpoint_weights(checkpoint)


def wandb_offline_records(run_file: Path) -> dict:
    """Run id and logged history steps of an offline `run-<id>.wandb` file.

    The file is a ':W&B' header (7 bytes) followed by LevelDB-log framed records (32 KiB blocks;
    each chunk: crc32c(4) length(2, little-endian) type(1: full, 2: first, 3: middle, 4: last)),
    each record a `wandb_internal_pb2.Record` protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B offline run file"
    block, pos, buf = 32768, 7, b""
    out: dict = {"run_ids": [], "steps": []}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = Record()
            rec.ParseFromString(buf)
            if rec.HasField("run"):
                out["run_ids"].append(rec.run.run_id)
            if rec.HasField("history"):
                out["steps"].append(rec.history.step.num)
    return out


@register_reward("text_value")
def text_value_reward(completion: str, answer: str, **_: object) -> float:
    """A value in [0, 1) that differs between (almost) any two different completions: a group of
    sampled completions has reward variance unless all its completions are the same text."""
    return (sum((i + 1) * ord(c) for i, c in enumerate(completion)) % 1009) / 1009
