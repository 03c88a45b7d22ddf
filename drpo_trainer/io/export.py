"""Hugging Face export: safetensors + config + tokenizer, loadable by transformers and vLLM.

Two ways in: from a live learner at the end of a run (ZeRO-3 parameters gathered in
buckets; rank 0 assembles the full state dict on CPU), or offline from a checkpoint
directory (`drpo-train export <checkpoint> <dir>`), which consolidates the ZeRO shards
with DeepSpeed's own converter and needs no process group.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from drpo_trainer.runtime.distributed import DistContext


def _save(state_dict: dict, hf_dir: Path, out_dir: Path, dtype: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in state_dict.items()}, strict=False, assign=True)
    model.tie_weights()  # a tied head shares the embedding just loaded
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export: no weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    tmp = Path(str(out_dir) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


def export_live(
    module: torch.nn.Module,
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str,
    bucket_bytes: int = 1 << 30,
    ctx: Optional[DistContext] = None,
) -> None:
    """Every rank of `ctx` calls this (each bucket is a collective gather); rank 0 writes."""
    from drpo_trainer.rollout.weight_sync import iter_gathered_buckets

    ctx = ctx or DistContext.current()
    state: dict[str, torch.Tensor] = {}
    for bucket in iter_gathered_buckets(module, bucket_bytes):
        if ctx.is_main:
            state.update({name: t.detach().to("cpu", copy=True) for name, t in bucket})
    if ctx.is_main:
        _save(state, Path(hf_dir), Path(out_dir), dtype)
    ctx.barrier()


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None) -> Path:
    """Offline: a `step_*` checkpoint directory -> an HF model directory."""
    import yaml

    from drpo_trainer.io.checkpoint import verify_checkpoint

    ckpt = Path(checkpoint)
    problem = verify_checkpoint(ckpt, hashes=False)
    if problem:
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint: {problem}")
    if dtype is None:
        dtype = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]["dtype"]
    state = checkpoint_weights(ckpt)
    _save(state, ckpt / "hf", Path(out_dir), dtype)
    return Path(out_dir)


def checkpoint_weights(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a `step_*` checkpoint, whatever ZeRO stage wrote it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from drpo_trainer.io.checkpoint import STATE_TAG

    ckpt = Path(checkpoint)
    shards = ckpt / "ds" / STATE_TAG
    if any(shards.glob("zero_pp_rank_*")):  # ZeRO: consolidate the partitions (fp32 master weights)
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "ds"), tag=STATE_TAG)
    # ZeRO stage 0 (one process): the module's full state dict is stored as it is
    return torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
