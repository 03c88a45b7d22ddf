"""Peak memory of token log-probs: chunked head (drpo_trainer.learner.logprobs) vs full fp32 logits.

Run:  python benchmarks/bench_logprob_memory.py [--tokens 4096] [--vocab 151936] [--chunks 1024 512 256]

Setting: a 1-layer Qwen3 with hidden size 64 (so the run fits in RAM on CPU) and the
Qwen vocabulary of 151,936, one sequence of 4,096 tokens, every position scored, one
forward + backward of sum(log-probs). The decoder is tiny, so the peak is the head's.

Method: each variant runs in its own fresh subprocess (no allocator state shared). After
building the model and a small warm-up, the process resets its peak resident set
(writing 5 to /proc/self/clear_refs resets VmHWM on Linux) and records VmRSS; the figure is
VmHWM - VmRSS(before) after forward and backward, i.e. the peak extra resident memory of
the computation. Tensors this large are mmap-backed, so freed memory leaves the resident
set at once and the high-water mark is the true peak of live tensors.

Prints each variant's peak and the ratio chunked / full against the target (<= 1/8). The
ratio scales like chunk_tokens / tokens: each chunk holds a few (chunk, V) fp32 tensors in
forward and in recomputing backward, the full path a few (tokens, V) ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TARGET_RATIO = 1 / 8


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _run_variant(variant: str, tokens: int, vocab: int) -> dict:
    """Child process: one forward + backward, report the peak extra resident memory."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from drpo_trainer.learner.logprobs import naive_token_logprobs, token_logprobs

    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    model = transformers.Qwen3ForCausalLM(config).float()

    def run(n: int) -> None:
        ids = torch.randint(0, vocab, (1, n))
        positions = torch.arange(n).unsqueeze(0)  # one sequence: causal attention needs no N x N mask
        targets = torch.roll(ids, -1, dims=1)
        if variant == "full":
            lp, _ = naive_token_logprobs(model, ids, positions, targets)
        else:
            lp, _ = token_logprobs(model, ids, positions, targets, chunk_tokens=int(variant.split(":")[1]))
        lp.sum().backward()

    run(64)  # warm-up: kernels, thread pools, gradient buffers of the parameters
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    run(tokens)
    peak = _status_kib("VmHWM")
    return {"variant": variant, "peak_extra_bytes": (peak - before) * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 512, 256])
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_run_variant(args.variant, args.tokens, args.vocab)))
        return

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    results = {}
    for variant in ["full"] + [f"chunk:{c}" for c in args.chunks]:
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]

    full = results["full"]
    fp32_logits = args.tokens * args.vocab * 4
    print(f"tokens={args.tokens} vocab={args.vocab}; one (tokens x vocab) fp32 tensor = {fp32_logits / 2**30:.2f} GiB")
    print(f"{'variant':>12} {'peak extra memory':>18} {'ratio to full':>14}")
    for variant, peak in results.items():
        print(f"{variant:>12} {peak / 2**30:>14.3f} GiB {peak / full:>14.3f}")
    for c in args.chunks:
        ratio = results[f"chunk:{c}"] / full
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        print(f"chunk_tokens={c}: chunked/full peak = {ratio:.3f} (1/{1 / ratio:.1f}); target <= 1/8 -> {verdict}")


if __name__ == "__main__":
    main()
