"""Resume with another number of processes: DeepSpeed's universal checkpoint.

A ZeRO checkpoint is split by rank. When a run resumes with a different world size, rank 0
converts the checkpoint's ZeRO-3 shards with DeepSpeed's own converter
(`deepspeed.checkpoint.ds_to_universal`) into `<checkpoint>/universal/state` (once; later resumes
reuse it), and the learner loads it with `"checkpoint": {"load_universal": true}`. Weights, Adam
moments and step, and the lr schedule come back exactly; the data position is global and carries
over; later checkpoints are ordinary ZeRO-3 ones.

Both sides must run ZeRO stage 3: DeepSpeed converts only ZeRO checkpoints with optimizer
shards, and loads a universal checkpoint only into a ZeRO engine of the same stage. A
one-process run therefore resumes a multi-process checkpoint at stage 3 (not its usual stage 0),
and a one-process run that may later grow must checkpoint at stage 3
(`distributed.single_process_zero_stage: null`).

The converter reads the shards with `torch.load`: it runs with weights_only=True and DeepSpeed's
allow-list (drpo_trainer.io.safe_load), after the shards were scanned, like every other load.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from drpo_trainer.config import ConfigError
from drpo_trainer.io.checkpoint import STATE_TAG
from drpo_trainer.runtime.distributed import DistContext

UNIVERSAL_DIR = "universal"


def saved_world_size(ckpt: Path) -> int:
    return int(json.loads((ckpt / "loop_state.json").read_text())["world_size"])


def saved_at_zero3(ckpt: Path) -> bool:
    """ZeRO-3 names its per-rank model states zero_pp_rank_R_mp_rank_00_model_states.pt."""
    return (ckpt / "ds" / STATE_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()


def check_convertible(ckpt: Path, world_size: int) -> None:
    """ConfigError with the fix when a checkpoint cannot be resumed with `world_size` processes."""
    if saved_at_zero3(ckpt):
        return
    raise ConfigError(
        f"checkpoint {ckpt} was written by {saved_world_size(ckpt)} process(es) without ZeRO-3 partitioning "
        f"(distributed.single_process_zero_stage), which DeepSpeed cannot convert for {world_size} processes. "
        f"Fix: resume it with {saved_world_size(ckpt)} process(es); for runs that may change size, set "
        "distributed.single_process_zero_stage=null; or export it (drpo-train export) and start from the model"
    )


def prepare(ckpt: Path, ctx: DistContext) -> Path:
    """Convert (rank 0, once) and return the directory to load with tag STATE_TAG; every rank calls it."""
    out = ckpt / UNIVERSAL_DIR
    if ctx.is_main and not (out / STATE_TAG / "zero" / "optimizer_state.pt").is_file():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        from drpo_trainer.io.safe_load import DEEPSPEED_TYPES, checkpoint_files, scan, weights_only_loads

        shards = ckpt / "ds" / STATE_TAG
        scan(checkpoint_files(shards), DEEPSPEED_TYPES)
        tmp = ckpt / f".tmp-{UNIVERSAL_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        with weights_only_loads(DEEPSPEED_TYPES, where=shards):
            _convert(ds_to_universal, shards, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # a crash mid-conversion leaves only the temp dir, redone next time
    ctx.barrier()
    return out


def _convert(ds_to_universal, shards: Path, tmp: Path) -> None:
    ds_to_universal(
        argparse.Namespace(
            input_folder=str(shards),
            output_folder=str(tmp / STATE_TAG),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
    )
