"""Shared pytest fixtures: tiny models built offline, once per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised tiny Qwen3 (hidden 64, 2 layers) + tokenizer, saved with save_pretrained.
    Builds in seconds; use it wherever the weights need not know anything."""
    from drpo_trainer.builtin.tiny_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_random_model"))


@pytest.fixture(scope="session")
def moe_model_dir(tmp_path_factory) -> str:
    """A randomly initialised tiny Qwen3-MoE (hidden 64, 2 sparse layers, 8 experts, top-2) + tokenizer."""
    from drpo_trainer.builtin.tiny_moe import build_random_moe

    return build_random_moe(tmp_path_factory.mktemp("tiny_moe"), hidden_size=64, num_attention_heads=4, head_dim=16)


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory) -> str:
    """The warm-started `builtin:tiny-math` model. Reuses $DRPO_CACHE_DIR when set (build once with
    `python -m drpo_trainer.builtin.tiny_model`), else builds it once per session under pytest's tmp dir
    (the directory all xdist workers share: the first builds it under a file lock, the others load it)."""
    from drpo_trainer.builtin.tiny_model import BUILD_VERSION, ensure_built, resolve_model_path

    if os.environ.get("DRPO_CACHE_DIR"):
        return resolve_model_path("builtin:tiny-math")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-N/ holds one folder per worker
    return str(ensure_built(base / "drpo_cache" / BUILD_VERSION, progress=False))


@pytest.fixture(scope="module")
def one_process_ctx():
    """A one-process gloo group (its DistContext) for a module of in-process learner tests. Torn
    down through DeepSpeed, which keeps references to the groups it has seen (a plain torch
    teardown would leave it holding a dead group for the next module), and the environment is
    restored, so later tests that start `drpo-train` subprocesses inherit no RANK / MASTER_PORT."""
    import deepspeed.comm
    import torch

    from drpo_trainer.runtime.distributed import setup_distributed

    saved = dict(os.environ)
    yield setup_distributed("gloo")
    deepspeed.comm.destroy_process_group()
    assert not torch.distributed.is_initialized()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def one_thread():
    """One torch thread for tests made of many tiny ops (op overhead, not compute, is their cost);
    the thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
