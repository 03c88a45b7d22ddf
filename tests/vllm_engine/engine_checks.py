"""Measure the real vLLM engine against the learner for one model; run as a script, one model per
process (vLLM's parallel state is process-global: a second engine of another architecture cannot
start in the same process). Prints one JSON object of measurements that tests/vllm_engine asserts on.

    python tests/vllm_engine/engine_checks.py {tied,untied,moe} OUT.json

Every number compares the engine with drpo-trainer's own Learner (DeepSpeed, one process):
  score_max_diff            engine.score vs learner.score on the probe, fresh weights (T = 1)
  rollout_lp_max_diff       sampled-token log-probs at T = 0.7 vs the learner's log_softmax(logits / 0.7)
  truncated_rollout_lp_max_diff  the same with top_k 20, top_p 0.9 (renormalised on both sides)
  stale_max_diff            after one real optimizer step, before the sync
  stale_gate_error          the parity gate's message on that stale engine ('' if it did not abort)
  synced_max_diff           after sync_weights, the same probe
  synced_rollout_lp_max_diff  the T = 0.7 comparison again with the new weights
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process

import torch  # noqa: E402

TEMPERATURE = 0.7
G = 4


def build_model(kind: str, out: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    from drpo_trainer.builtin.tiny_model import resolve_model_path

    warm = resolve_model_path("builtin:tiny-math")  # tied Qwen3, head_dim 32; it stops with EOS
    if kind == "tied":
        return warm
    tok = AutoTokenizer.from_pretrained(warm)
    torch.manual_seed(0)
    if kind == "untied":
        model = AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    elif kind == "moe":  # the architecture of the paper's Qwen3-30B-A3B runs, in miniature
        cfg = Qwen3MoeConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(cfg).float()
    else:
        raise SystemExit(f"unknown model kind {kind!r}; use tied, untied or moe")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def learner_rollout_logprobs(module, completions, temperature: float, top_k: int = 0, top_p: float = 1.0) -> list:
    from drpo_trainer.learner.logprobs import sampling_logprobs

    out = []
    with torch.no_grad():
        for c in completions:
            ids = torch.tensor([c.prompt_ids + c.completion_ids])
            logits = module(input_ids=ids).logits[0, len(c.prompt_ids) - 1 : -1].float()
            lp = sampling_logprobs(logits, temperature, top_k, top_p)
            out.append(lp.gather(-1, ids[0, len(c.prompt_ids) :, None])[:, 0].tolist())
    return out


def main(kind: str, out_json: str) -> None:
    from drpo_trainer.config import load_config
    from drpo_trainer.io.data import load_problems
    from drpo_trainer.learner.learner import Learner, TrainSample
    from drpo_trainer.rollout import SamplingSpec, make_engine
    from drpo_trainer.rollout.weight_sync import sync_weights
    from drpo_trainer.runtime.distributed import setup_distributed
    from drpo_trainer.runtime.rollouts import check_engine_parity

    work = Path(out_json).parent
    model_dir = build_model(kind, work / f"model_{kind}")
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "rollout.backend=vllm",
            f"rollout.samples_per_prompt={G}",
            "rollout.max_new_tokens=24",
            "trainer.prompts_per_step=4",
            "trainer.minibatches_per_step=1",
            "optim.lr=1e-3",
            "algorithm.loss_agg_mode=token-mean",
        ],
    )
    ctx = setup_distributed("gloo")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    problems, _ = load_problems(["data/synthetic_math_train.jsonl"], tok, max_prompt_tokens=64)
    prompts = [p.prompt_ids for p in problems[:4]]
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    engine = make_engine(cfg, model_dir, tokenizer=tok, device=ctx.device, seed=0)
    module = learner.module
    run = SimpleNamespace(cfg=cfg, engine=engine, learner=learner, train_set=problems)
    probe = prompts
    res: dict = {"kind": kind}

    res["score_max_diff"] = max_diff(engine.score(probe), learner.score(probe))
    spec = SamplingSpec(n=G, temperature=TEMPERATURE, max_new_tokens=24, seed=11)
    comps = engine.generate(prompts, spec)
    res["samples_per_prompt"] = [sum(c.prompt_index == i for c in comps) for i in range(len(prompts))]
    res["finish_reasons"] = sorted({c.finish_reason for c in comps})
    res["stop_ends_with_eos"] = all(
        c.completion_ids[-1] == tok.eos_token_id for c in comps if c.finish_reason == "stop"
    )
    res["length_is_max"] = all(len(c.completion_ids) == 24 for c in comps if c.finish_reason == "length")
    res["rollout_lp_max_diff"] = max_diff(
        [c.rollout_logprobs for c in comps], learner_rollout_logprobs(module, comps, TEMPERATURE)
    )
    # top-k / top-p: vLLM's processed log-probs are renormalised over the kept tokens, as ours
    trunc = SamplingSpec(n=G, temperature=TEMPERATURE, top_k=20, top_p=0.9, max_new_tokens=24, seed=11)
    tcomps = engine.generate(prompts, trunc)
    res["truncated_rollout_lp_max_diff"] = max_diff(
        [c.rollout_logprobs for c in tcomps], learner_rollout_logprobs(module, tcomps, TEMPERATURE, 20, 0.9)
    )
    untruncated = learner_rollout_logprobs(module, tcomps, TEMPERATURE)
    res["truncation_min_gain"] = min(a - b for c, u in zip(tcomps, untruncated) for a, b in zip(c.rollout_logprobs, u))
    again = engine.generate(prompts, spec)
    res["same_seed_same_samples"] = [c.completion_ids for c in comps] == [c.completion_ids for c in again]
    other = engine.generate(prompts, SamplingSpec(n=G, temperature=TEMPERATURE, max_new_tokens=24, seed=12))
    res["other_seed_other_samples"] = [c.completion_ids for c in comps] != [c.completion_ids for c in other]

    # one real optimizer step of the learner on the engine's samples, advantages +-1 by sample
    samples = [
        TrainSample(
            input_ids=c.prompt_ids + c.completion_ids,
            prompt_len=len(c.prompt_ids),
            advantage=1.0 if i % 2 else -1.0,
            rollout_logprobs=torch.tensor(c.rollout_logprobs),
        )
        for i, c in enumerate(comps)
    ]
    learner.recompute_logprobs(samples)
    learner.update(samples)
    res["stale_max_diff"] = max_diff(engine.score(probe), learner.score(probe))
    try:
        check_engine_parity(run)
        res["stale_gate_error"] = ""
    except RuntimeError as exc:
        res["stale_gate_error"] = str(exc)
    res["sync"] = sync_weights(learner.module, engine, 1 << 16)  # small buckets: layers split across them
    res["synced_max_diff"] = max_diff(engine.score(probe), learner.score(probe))
    res["synced_parity"] = check_engine_parity(run)
    comps = engine.generate(prompts, spec)
    res["synced_rollout_lp_max_diff"] = max_diff(
        [c.rollout_logprobs for c in comps], learner_rollout_logprobs(module, comps, TEMPERATURE)
    )
    Path(out_json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
