"""Learner -> rollout-engine weight sync, in buckets, from ZeRO-3 shards or a plain module.

Under ZeRO-3 every rank holds 1/world of each parameter (`p.numel()` is 0 while partitioned;
the real size is `p.ds_numel`). Gathering the whole model at once would need a full copy
per rank, and one gather per parameter is thousands of collectives; so parameters are
gathered in buckets of about `bucket_bytes` of FULL parameter size, in model order:

  plan_buckets          which names go together (pure; a parameter larger than the budget
                        gets a bucket of its own)
  iter_gathered_buckets gathers one bucket at a time with `GatheredParameters` on EVERY rank
                        (it is a collective: all ranks must walk the same plan, which they
                        do because every rank has the same module tree), yields full tensors
                        under Hugging Face names, and re-partitions before the next bucket
  sync_weights          feeds each bucket to `engine.load_weights` and reports timings

Each rank loads the full tensors into its own colocated engine; a tensor-parallel engine
slices them itself. deepspeed is imported only when the module really is ZeRO-3-partitioned.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch

_WRAPPER_PREFIXES = ("module.",)  # DeepSpeedEngine and DDP wrap the model as `.module`


def hf_name(name: str) -> str:
    """Strip wrapper prefixes: 'module.model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj.weight'."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


def param_nbytes(p: torch.Tensor) -> int:
    """Full byte size of a parameter, also while ZeRO-3 has partitioned it away (ds_numel)."""
    numel = getattr(p, "ds_numel", None)
    if numel is None:
        numel = p.numel()
    return int(numel) * p.element_size()


def plan_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Group (name, nbytes) in order into buckets of at most bucket_bytes; oversized names stand alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}; set rollout.sync_bucket_mb >= 1")
    seen: set[str] = set()
    buckets: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes:
        if name in seen:
            raise ValueError(f"parameter {name!r} is listed twice; every parameter must be synced exactly once")
        if nbytes < 0:
            raise ValueError(f"parameter {name!r} has a negative size ({nbytes} bytes)")
        seen.add(name)
        if nbytes > bucket_bytes:
            # Larger than the budget: alone, so the budget is exceeded by one tensor and no more.
            if current:
                buckets.append(current)
                current, current_bytes = [], 0
            buckets.append([name])
            continue
        if current and current_bytes + nbytes > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        buckets.append(current)
    return buckets


def _is_zero3_partitioned(params: list[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def iter_gathered_buckets(
    model: torch.nn.Module, bucket_bytes: int, *, full: bool = False
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield [(hf_name, full tensor), ...] bucket by bucket; tensors are valid only until the next bucket.

    On a ZeRO-3 module every rank must iterate to the end (or all stop at the same bucket):
    each bucket is an all-gather over the data-parallel group. A LoRA model (model.lora) yields the
    merged weights of the layers its adapters touch, and with `full` (an export) every weight.
    """
    from drpo_trainer.learner.lora import is_lora  # peft itself is imported only for a LoRA model

    if is_lora(model):
        yield from _iter_lora_buckets(model, bucket_bytes, full=full)
        return
    # Every name, tied aliases included ('lm_head.weight' next to 'model.embed_tokens.weight'):
    # an engine may keep its own processed copy of a tied tensor (vLLM on CPU repacks lm_head),
    # and that copy is refreshed only when the alias itself is sent.
    named = list(model.named_parameters(remove_duplicate=False))
    by_name: dict[str, torch.nn.Parameter] = {}
    sizes: list[tuple[str, int]] = []
    for raw_name, p in named:
        name = hf_name(raw_name)
        if name in by_name:
            raise ValueError(f"two parameters map to {name!r} after stripping wrapper prefixes ({raw_name!r})")
        by_name[name] = p
        sizes.append((name, param_nbytes(p)))
    plan = plan_buckets(sizes, bucket_bytes)

    if not _is_zero3_partitioned([p for _, p in named]):
        for bucket in plan:
            yield [(name, by_name[name].detach()) for name in bucket]
        return

    import deepspeed  # only a partitioned model needs it

    for bucket in plan:
        params = list({id(by_name[name]): by_name[name] for name in bucket}.values())  # an alias gathers once
        # modifier_rank=None: read-only gather on every rank, nothing is broadcast back on exit.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield [(name, by_name[name].data) for name in bucket]


def _iter_lora_buckets(model: torch.nn.Module, bucket_bytes: int, *, full: bool):
    """The merged weights W + scale * B A of the adapted layers (the frozen rest is the engine's own copy
    of the base model already), in buckets; each bucket gathers its base weights and adapters together."""
    from drpo_trainer.learner.lora import merged_items

    listed = merged_items(model, full=full)
    items = {name: (gather, make) for name, _, gather, make in listed}
    sizes = [(name, param_nbytes(p)) for name, p, _, _ in listed]
    partitioned = _is_zero3_partitioned([p for gather, _ in items.values() for p in gather])
    for bucket in plan_buckets(sizes, bucket_bytes):
        params = list({id(p): p for name in bucket for p in items[name][0]}.values())
        if not partitioned:
            with torch.no_grad():
                yield [(name, items[name][1]().detach()) for name in bucket]
            continue
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
            yield [(name, items[name][1]()) for name in bucket]


def sync_weights(model: torch.nn.Module, engine: Any, bucket_bytes: int) -> dict[str, float]:
    """Push every learner parameter into this rank's `engine` bucket by bucket; returns sync/* metrics."""
    return load_buckets(engine, iter_gathered_buckets(model, bucket_bytes))


def load_buckets(engine: Any, buckets: Iterator[list[tuple[str, torch.Tensor]]]) -> dict[str, float]:
    """Feed `buckets` to `engine.load_weights`; returns sync/* metrics.

    Engines that need a session around a full update (vLLM re-quantizes FP8 layers once all
    of a layer's weights have arrived) expose `begin_weight_update()` / `finish_weight_update()`;
    they are called when present.
    """
    t0 = time.perf_counter()
    begin = getattr(engine, "begin_weight_update", None)
    finish = getattr(engine, "finish_weight_update", None)
    if begin is not None:
        begin()
    n_bytes = 0
    n_buckets = 0
    n_params = 0
    for bucket in buckets:
        engine.load_weights(bucket)
        n_buckets += 1
        n_params += len(bucket)
        n_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
    if finish is not None:
        finish()
    return {
        "sync/seconds": time.perf_counter() - t0,
        "sync/bytes": float(n_bytes),
        "sync/buckets": float(n_buckets),
        "sync/params": float(n_params),
    }
