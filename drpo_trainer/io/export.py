"""Hugging Face export: safetensors + config + tokenizer, loadable by transformers and vLLM.

A LoRA run (model.lora) exports the merged model W + (alpha / r) B A, or offline with `--adapter` a
peft adapter directory. Two ways in: from a live learner at the end of a run (ZeRO-3 parameters gathered in
buckets; rank 0 assembles the full state dict on CPU), or offline from a checkpoint
directory (`drpo-train export <checkpoint> <dir>`), which consolidates the ZeRO shards
with DeepSpeed's own converter and needs no process group. The checkpoint's files are read with
weights_only=True and an allow-list (drpo_trainer.io.safe_load); what the export may replace is
drpo_trainer.io.run_dir's rule (an earlier export, or with --overwrite another directory; never the
current directory, a run or the checkpoint), and it is written beside the target and renamed in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from drpo_trainer.io.run_dir import check_export_target, publish_export, staging_dir
from drpo_trainer.runtime.distributed import DistContext


def _save(state_dict: dict, hf_dir: Path, out_dir: Path, dtype: str) -> None:
    """Write the export beside `out_dir` and rename it into place (the caller checked the target)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in state_dict.items()}, strict=False, assign=True)
    model.tie_weights()  # a tied head shares the embedding just loaded
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export: no weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    staged = staging_dir(out_dir)
    try:
        model.save_pretrained(staged, safe_serialization=True)
        AutoTokenizer.from_pretrained(hf_dir).save_pretrained(staged)
        publish_export(staged, out_dir, source=str(hf_dir.parent))
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # ours; gone already once published


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
    check_export_target(out_dir, hf_dir, overwrite=True)  # final/ of a run: replaced when a resumed run ends again
    state: dict[str, torch.Tensor] = {}
    for bucket in iter_gathered_buckets(module, bucket_bytes, full=True):  # LoRA: merged
        if ctx.is_main:
            state.update({name: t.detach().to("cpu", copy=True) for name, t in bucket})
    if ctx.is_main:
        _save(state, Path(hf_dir), Path(out_dir), dtype)
    ctx.barrier()


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    adapter: bool = False,
) -> Path:
    """Offline: a `step_*` checkpoint directory -> an HF model directory. ConfigError (a target it
    may not replace, a checkpoint file that needs a type outside the allow-list, `adapter` for a
    checkpoint without LoRA adapters, a base model whose weights are not the ones the adapters were
    trained on) before anything is written; FileNotFoundError for an incomplete checkpoint.

    A LoRA checkpoint (model.lora) holds adapters only: they are put on the base model it names (path
    and weights sha256, checked) and the export is the merged model, or with `adapter` a peft adapter
    directory (`peft.PeftModel.from_pretrained(base, out_dir)`)."""
    import yaml

    from drpo_trainer.io.checkpoint import scan_checkpoint, verify_checkpoint

    ckpt = Path(checkpoint)
    check_export_target(out_dir, ckpt, overwrite=overwrite)
    problem = verify_checkpoint(ckpt, hashes=False)
    if problem:
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint: {problem}")
    scan_checkpoint(ckpt)
    if dtype is None:
        dtype = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]["dtype"]
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    base = _lora_base(ckpt, adapter)
    state = checkpoint_weights(ckpt)
    if base is None:
        _save(state, ckpt / "hf", Path(out_dir), dtype)
    else:
        _save_lora(base, config["model"]["lora"], state, ckpt, Path(out_dir), dtype, adapter)
    return Path(out_dir)


def _lora_base(ckpt: Path, adapter: bool) -> Optional[str]:
    """The checked base model of a LoRA checkpoint; None for full fine-tuning (ConfigError with `adapter`)."""
    from drpo_trainer.config import ConfigError
    from drpo_trainer.learner.lora import check_base_reference, saved_base_reference

    saved = saved_base_reference(ckpt)
    if saved is None:
        if adapter:
            raise ConfigError(
                f"export --adapter: {ckpt} holds full weights, no LoRA adapters (model.lora was not set). "
                "Fix: export it without --adapter"
            )
        return None
    try:
        check_base_reference(saved, saved["path"], f"export of {ckpt}")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{err} (the base model must be where the run found it)") from None
    return saved["path"]


def _save_lora(base: str, lora: dict, state: dict, ckpt: Path, out_dir: Path, dtype: str, adapter: bool) -> None:
    """Merged weights through `_save`, or the peft adapter directory (adapter_config.json + weights + tokenizer)."""
    from transformers import AutoTokenizer

    from drpo_trainer.config import LoraConfig
    from drpo_trainer.learner.lora import load_adapted
    from drpo_trainer.rollout.weight_sync import iter_gathered_buckets

    model = load_adapted(base, LoraConfig(**lora), state, dtype)
    if not adapter:
        merged = {n: t.clone() for bucket in iter_gathered_buckets(model, 1 << 30, full=True) for n, t in bucket}
        _save(merged, ckpt / "hf", out_dir, dtype)
        return
    staged = staging_dir(out_dir)
    try:
        model.save_pretrained(staged, safe_serialization=True)
        AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(staged)
        publish_export(staged, out_dir, source=str(ckpt))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def checkpoint_weights(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a `step_*` checkpoint, whatever ZeRO stage wrote it (every file read
    with weights_only=True and DeepSpeed's allow-list)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from drpo_trainer.io.checkpoint import STATE_TAG
    from drpo_trainer.io.safe_load import DEEPSPEED_TYPES, weights_only_loads

    ckpt = Path(checkpoint)
    shards = ckpt / "ds" / STATE_TAG
    with weights_only_loads(DEEPSPEED_TYPES, where=shards):
        if any(shards.glob("zero_pp_rank_*")):  # ZeRO: consolidate the partitions (fp32 master weights)
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "ds"), tag=STATE_TAG)
        # ZeRO stage 0 (one process): the module's full state dict is stored as it is
        return torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def merge_adapter_dir(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str) -> Path:
    """A peft adapter directory (`export --adapter`) merged onto the base model it names -> an HF model
    directory (what `drpo-train eval` gives its engine). Reads safetensors only (no pickle)."""
    import json

    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return Path(out_dir)
