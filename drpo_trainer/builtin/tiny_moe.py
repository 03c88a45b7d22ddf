"""The embedded mixture-of-experts model `builtin:tiny-math-moe`: a tiny Qwen3-MoE warmed up on the
arithmetic task exactly like `builtin:tiny-math` (same tokenizer, same supervised recipe, same cache
and lock rules: drpo_trainer.builtin.tiny_model), for routing replay on CPU (docs/moe.md).

Both decoder layers are sparse: 8 experts, 2 chosen per token (`norm_topk_prob`, as Qwen3-30B-A3B).
The build takes about a minute on one thread and is cached under `tiny-math-moe-v1`.

Build ahead of time: `python -m drpo_trainer.builtin.tiny_moe [--out DIR]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

from drpo_trainer.builtin import tiny_model as tm

BUILTIN_NAME = "builtin:tiny-math-moe"
BUILD_VERSION = "tiny-math-moe-v1"


@dataclass(frozen=True)
class MoeWarmStartRecipe(tm.WarmStartRecipe):
    """The tiny-math recipe plus the experts; the warm start is the same 240 supervised steps."""

    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 128


def moe_config(tokenizer, recipe: MoeWarmStartRecipe, **overrides):
    """The Qwen3-MoE config of the builtin (every layer sparse); `overrides` for tests."""
    from transformers import Qwen3MoeConfig

    kw: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=4 * recipe.hidden_size,
        moe_intermediate_size=recipe.moe_intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=max(1, recipe.num_heads // 2),
        head_dim=recipe.hidden_size // recipe.num_heads,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.experts_per_token,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        router_aux_loss_coef=0.0,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(tm.BOS),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def new_moe_model(tokenizer, recipe: MoeWarmStartRecipe, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(moe_config(tokenizer, recipe, **overrides))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float()


def build_random_moe(out_dir: str | os.PathLike, *, seed: int = 0, **overrides) -> str:
    """A randomly initialised tiny Qwen3-MoE and its tokenizer (seconds): for tests whose weights need
    not know anything. `overrides` go to the Qwen3MoeConfig (e.g. hidden_size=64)."""
    recipe = MoeWarmStartRecipe(seed=seed)
    tokenizer = tm.build_tokenizer(tm._tokenizer_texts(), recipe.vocab_size)
    model = new_moe_model(tokenizer, recipe, **overrides)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def build_tiny_math_moe(
    out_dir: str | os.PathLike, recipe: MoeWarmStartRecipe = MoeWarmStartRecipe(), progress: bool = True
) -> dict[str, Any]:
    """Tokenizer, Qwen3-MoE, supervised warm start, saved into `out_dir` (see tiny_model.build_tiny_math)."""
    return tm.build_tiny_math(out_dir, recipe, progress, new_model=new_moe_model, version=BUILD_VERSION)


def ensure_built(target: Path, progress: bool = True) -> Path:
    """Build `builtin:tiny-math-moe` into `target` unless a finished build is there (file-locked)."""
    return tm.ensure_built(
        target, progress, build=partial(build_tiny_math_moe, recipe=MoeWarmStartRecipe()), name=BUILTIN_NAME
    )


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m drpo_trainer.builtin.tiny_moe", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", help=f"output directory (default: $DRPO_CACHE_DIR or ~/.cache/drpo-trainer, /{BUILD_VERSION})"
    )
    args = ap.parse_args(argv)
    print(ensure_built(Path(args.out) if args.out else tm.default_cache_dir() / BUILD_VERSION))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
