"""FP8-style rollout on the transformers engine (drpo_trainer/rollout/fp8.py).

The rounding is checked against an independent e4m3 rounding: a lookup table of all 256 float8
bit patterns and an explicit nearest-value search with ties to the even code, not torch's cast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drpo_trainer.rollout.fp8 import fake_quantize_fp8, fp8_scale_group, fp8_scale_groups, quantize_group
from drpo_trainer.rollout.hf_engine import HFEngine
from drpo_trainer.rollout.weight_sync import sync_weights

ROOT = Path(__file__).resolve().parents[1]


def _e4m3_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite float8_e4m3fn value (sorted, float64) and its 8-bit code."""
    codes = torch.arange(256, dtype=torch.int64)
    values = codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)
    keep = torch.isfinite(values) & (codes != 0x80)  # NaNs out; -0 is the same value as +0
    values, codes = values[keep], codes[keep]
    order = torch.argsort(values)
    return values[order], codes[order]


def reference_fp8_round_trip(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """vLLM's dynamic per-tensor FP8 (one scale over all `tensors`), computed by table look-up:
    scale = max|w| / 448 (float32); y = clamp(w * (1 / scale), +-448) (float32); q = the table
    value nearest to y, ties to the even code (the mantissa's last bit); result q * scale (float32)."""
    values, codes = _e4m3_table()
    scale = torch.stack([t.abs().max() for t in tensors]).max().float() / 448.0
    out = []
    for t in tensors:
        y = (t.float() * (1.0 / scale)).clamp(-448.0, 448.0).to(torch.float64).reshape(-1)
        hi = torch.searchsorted(values, y).clamp(1, len(values) - 1)
        lo = hi - 1
        d_lo, d_hi = y - values[lo], values[hi] - y
        pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
        q = torch.where(pick_hi, values[hi], values[lo]).to(torch.float32)
        out.append((q * scale).view_as(t))
    return out


def test_hand_computed_rounding():
    # max|w| = 448 -> scale 1, so w itself is rounded to the e4m3 grid:
    #   1.0625 lies halfway between 1.0 (mantissa 000) and 1.125 (001): ties to even -> 1.0
    #   1.1875 halfway between 1.125 (001) and 1.25 (010) -> 1.25
    #   -3.3 in [2, 4) where the step is 0.25 -> -3.25
    #   0.001 is subnormal: the grid there is k * 2^-9 = k * 0.001953125; 0.001 / 2^-9 = 0.512 -> k = 1
    #   0.0009 / 2^-9 = 0.46 -> k = 0 -> 0
    w = torch.tensor([448.0, 1.0625, 1.1875, -3.3, 0.001, 0.0009, 0.0])
    deq, scale = fake_quantize_fp8(w)
    assert scale.item() == 1.0
    assert deq.tolist() == [448.0, 1.0, 1.25, -3.25, 0.001953125, 0.0, 0.0]
    # scaled by 2^-10 the same grid points come back scaled by 2^-10 exactly (power-of-two scale)
    deq2, scale2 = fake_quantize_fp8(w * 2**-10)
    assert scale2.item() == 2**-10 and torch.equal(deq2, deq * 2**-10)
    zeros, zero_scale = fake_quantize_fp8(torch.zeros(3, 4))
    assert zero_scale.item() == 0.0 and torch.equal(zeros, torch.zeros(3, 4))


def test_round_trip_equals_the_table_rounding_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    for shape, spread in (((64, 48), 0.02), ((300,), 3.0), ((7, 5, 3), 1e-3)):
        w = torch.randn(shape, generator=gen) * spread
        deq, scale = fake_quantize_fp8(w)
        (ref,) = reference_fp8_round_trip([w])
        assert torch.equal(deq, ref)
        assert scale.item() == pytest.approx(w.abs().max().item() / 448.0, rel=1e-7)
        rel = ((deq - w).abs() / w.abs().clamp_min(1e-30))[w.abs() > 2**-6 * scale.item()]
        assert 0 < rel.max().item() <= 2**-4  # 3 mantissa bits: at most half a step of 2^-3
    bf16 = (torch.randn(32, 32, generator=gen) * 0.05).to(torch.bfloat16)
    deq, _ = fake_quantize_fp8(bf16)
    assert deq.dtype == torch.bfloat16 and torch.equal(deq, reference_fp8_round_trip([bf16])[0].to(torch.bfloat16))


def test_fused_groups_share_one_scale_and_experts_have_their_own():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(8, 4, generator=gen),
        torch.randn(2, 4, generator=gen) * 0.01,
        torch.randn(2, 4, generator=gen),
    )
    assert all(torch.equal(a, b) for a, b in zip(quantize_group([q, k, v]), reference_fp8_round_trip([q, k, v])))
    # k alone would get a 100x finer scale: sharing q's scale rounds it differently
    assert not torch.equal(quantize_group([q, k, v])[1], fake_quantize_fp8(k)[0])
    experts = torch.randn(3, 4, 6, generator=gen) * torch.tensor([1.0, 1e-3, 10.0]).view(3, 1, 1)
    (rounded,) = quantize_group([experts], per_expert=True)
    for e in range(3):
        assert torch.equal(rounded[e], reference_fp8_round_trip([experts[e]])[0])


def test_which_parameters_vllm_quantizes():
    expected = {
        "model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.k_proj.weight": "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.v_proj.weight": "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.o_proj.weight": "model.layers.0.self_attn.o_proj",
        "model.layers.11.mlp.gate_proj.weight": "model.layers.11.mlp.gate_up_proj",
        "model.layers.11.mlp.up_proj.weight": "model.layers.11.mlp.gate_up_proj",
        "model.layers.11.mlp.down_proj.weight": "model.layers.11.mlp.down_proj",
        "model.layers.2.mlp.experts.gate_up_proj": "model.layers.2.mlp.experts.gate_up_proj",
        "model.layers.2.mlp.experts.down_proj": "model.layers.2.mlp.experts.down_proj",
        "model.layers.2.mlp.shared_expert.up_proj.weight": "model.layers.2.mlp.shared_expert.gate_up_proj",
        "model.layers.2.mlp.experts.5.gate_proj.weight": "model.layers.2.mlp.experts.5.gate_up_proj",
        # left in full precision by vLLM's FP8 config
        "model.embed_tokens.weight": None,
        "lm_head.weight": None,
        "model.norm.weight": None,
        "model.layers.0.input_layernorm.weight": None,
        "model.layers.0.self_attn.q_norm.weight": None,
        "model.layers.0.self_attn.q_proj.bias": None,
        "model.layers.2.mlp.gate.weight": None,  # MoE router
        "model.layers.2.mlp.shared_expert_gate.weight": None,
    }
    assert {name: fp8_scale_group(name) for name in expected} == expected
    groups = fp8_scale_groups(list(expected))
    assert groups["model.layers.0.self_attn.qkv_proj"] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    assert len(groups) == 8


def test_engine_weights_differ_from_the_learner_by_exactly_the_fp8_error(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    learner = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a learner that has moved away from the checkpoint
        for p in learner.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    engine = HFEngine(tiny_model_dir, quantization="fp8")
    # 4 KiB buckets: q, k and v arrive in different buckets and are quantized once all are in
    sync_weights(learner, engine, bucket_bytes=4096)
    theirs = dict(learner.named_parameters(remove_duplicate=False))
    mine = dict(engine.model.named_parameters(remove_duplicate=False))
    groups = fp8_scale_groups(list(theirs))
    assert len(groups) == 2 * 4  # per layer: qkv, o, gate_up, down
    quantized = {name for members in groups.values() for name in members}
    for members in groups.values():
        for name, ref in zip(members, reference_fp8_round_trip([theirs[n].detach() for n in members])):
            assert torch.equal(mine[name], ref), name
            assert not torch.equal(mine[name], theirs[name]), name  # a real rounding error
    rest = set(theirs) - quantized
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= rest
    for name in rest:
        assert torch.equal(mine[name], theirs[name]), name


def _start_training(out: Path, model_dir: str, *extra: str) -> subprocess.Popen:
    """A 2-step run of the tiny job in the background, on one torch thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    args = [
        "--config",
        "configs/tiny_cpu.yaml",
        f"output_dir={out}",
        f"model.path={model_dir}",
        "trainer.max_steps=2",
        "trainer.skip_zero_advantage=false",  # mismatch metrics over every sample, also in a step with no variance
        "trainer.prompts_per_step=8",
        "rollout.samples_per_prompt=4",
        "eval.files={}",
        "checkpoint.export_final=false",
        "reward.num_workers=1",
        "tracking.progress_bar=false",
        *extra,
    ]
    cmd = [sys.executable, "-m", "drpo_trainer.cli", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, out: Path) -> tuple[list[dict], str]:
    _, log = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], log


def test_fp8_engine_opens_a_mismatch_the_fp32_engine_does_not(tmp_path, warm_model_dir):
    # the same job twice, side by side: the same prompts, an fp32 engine and an FP8-style one
    runs = {
        name: _start_training(tmp_path / name, warm_model_dir, *extra)
        for name, extra in (("fp32", ()), ("fp8", ("rollout.quantization=fp8",)))
    }
    fp32, _ = _finish(runs["fp32"], tmp_path / "fp32")
    fp8, log = _finish(runs["fp8"], tmp_path / "fp8")
    assert [r["step"] for r in fp8] == [1, 2]
    assert "parity before the first step" in log  # the start-of-run gate ran and passed at its fp8 default
    for a, b in zip(fp32, fp8):
        print(f"step {a['step']}: k3 fp32 {a['mismatch/k3_kl']:.2e}, fp8 {b['mismatch/k3_kl']:.2e}")
        assert a["mismatch/k3_kl"] < 1e-6
        # on sampled tokens (entropy ~0.25 nats) FP8 measured ~2e-5; fp32 rounding alone ~1e-13
        assert b["mismatch/k3_kl"] > 1e-6 and b["mismatch/k3_kl"] > 1e4 * a["mismatch/k3_kl"]


def test_parity_gate_passes_fp8_at_its_default_and_catches_it_at_fp32s(warm_model_dir):
    from transformers import AutoTokenizer

    from drpo_trainer.io.data import load_problems
    from drpo_trainer.rollout.parity import check_parity, default_threshold, parity_metrics

    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    problems, _ = load_problems(["data/synthetic_math_train.jsonl"], tok, max_prompt_tokens=64)
    probe = [p.prompt_ids for p in problems[:8]]  # the trainer's probe
    learner_side = HFEngine(warm_model_dir).score(probe)
    fp8 = parity_metrics(HFEngine(warm_model_dir, quantization="fp8").score(probe), learner_side)
    print(f"fp8 engine: mean {fp8['parity/mean_abs_logprob_diff']:.3g}, max {fp8['parity/max_abs_logprob_diff']:.3g}")
    check_parity(fp8, default_threshold("float32", "float32", "fp8"))
    with pytest.raises(RuntimeError, match="disagree"):
        check_parity(fp8, default_threshold("float32", "float32"))
