"""FP8-style rollout weights for the transformers engine: quantise to float8_e4m3fn and back.

`rollout.quantization: fp8` with `rollout.backend: hf` gives the engine the weights an FP8 vLLM
engine computes with, while the learner keeps full precision: the train/inference mismatch of
FP8 rollout, reproduced on a CPU (weights only, see below).

What vLLM does (read in vllm-project/vllm, not copied): `quantization="fp8"` on an unquantized
checkpoint is online dynamic quantization. `Fp8Config.get_quant_method`
(vllm/model_executor/layers/quantization/fp8.py) gives every `LinearBase` layer the per-tensor
online method (`Fp8PerTensorOnlineLinearMethod`, vllm/model_executor/layers/quantization/online/fp8.py;
`Fp8OnlineLinearMethod` in older releases), whose `process_weights_after_loading` calls
`ops.scaled_fp8_quant(layer.weight, scale=None)` (vllm/_custom_ops.py). Without a scale and
without `use_per_token_if_dynamic` that is `dynamic_scaled_fp8_quant`
(csrc/quantization/w8a8/fp8/common.cu): ONE float32 scale per weight tensor,

    scale = max|W| / 448                               (448 = largest finite float8_e4m3fn)
    W_fp8 = float8_e4m3fn(clamp(W * (1 / scale), -448, 448))   (round to nearest even)

and the GEMM multiplies by `scale` again. Per tensor, not per channel. The tensor is vLLM's
FUSED layer: q/k/v projections share one scale (`qkv_proj`), the gate and up projections share
one (`gate_up_proj`); o_proj and down_proj have their own. MoE experts
(`Fp8PerTensorOnlineMoEMethod`) get one scale per expert for its fused gate+up weight and one
for its down weight. Not quantized: embeddings and `lm_head` (`VocabParallelEmbedding` /
`ParallelLMHead` are not `LinearBase`), norms, biases, and the MoE router (built with
`quant_config=None`).

What this module does NOT reproduce: vLLM also quantizes the ACTIVATIONS entering each FP8 GEMM
(dynamically, per token or per tensor) and accumulates in its own kernels; here only the weights
are rounded and the matmuls run in the engine dtype (`rollout.dtype`). With tensor parallelism
vLLM scales each rank's shard separately; here the scale is that of the whole tensor (TP = 1).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# Linear projections of a decoder layer, by Hugging Face parameter name (Qwen/Llama/Mistral naming).
# group key -> the names that vLLM fuses into one tensor with one scale.
_LAYER = r"(?P<owner>.*\.layers\.\d+\..*?)"
_DENSE = re.compile(_LAYER + r"\.(?P<proj>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = re.compile(_LAYER + r"\.experts\.(?P<proj>gate_up_proj|down_proj)$")  # (E, out, in)
_FUSED_WITH = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def fake_quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round `weight` to float8_e4m3fn with vLLM's dynamic per-tensor scale and back.

    Returns (dequantized weight in `weight`'s dtype and shape, scale as a 0-dim float32 tensor):
    scale = max|w| / 448; q = e4m3fn(clamp(w * (1 / scale), +-448)); dequantized = q * scale,
    all in float32 like vLLM's kernel (which also multiplies by the reciprocal). An all-zero
    tensor stays zero (scale 0; vLLM would divide by zero there).
    """
    w = weight.detach().float()
    scale = w.abs().max() / FP8_MAX  # (), float32
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = (w * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * scale).to(weight.dtype), scale


def fp8_scale_group(name: str) -> Optional[str]:
    """The fused vLLM tensor a parameter belongs to (its scale's group), or None if vLLM keeps it unquantized.

    'model.layers.0.self_attn.k_proj.weight' -> 'model.layers.0.self_attn.qkv_proj';
    'model.layers.0.mlp.down_proj.weight' -> 'model.layers.0.mlp.down_proj';
    'model.layers.0.mlp.experts.gate_up_proj' -> itself (one scale per expert, see `quantize_group`);
    embeddings, lm_head, norms, biases and the MoE router ('mlp.gate.weight') -> None.
    """
    m = _DENSE.match(name)
    if m:
        return f"{m['owner']}.{_FUSED_WITH.get(m['proj'], m['proj'])}"
    m = _FUSED_EXPERTS.match(name)
    if m:
        return name
    return None


def fp8_scale_groups(names: list[str]) -> dict[str, list[str]]:
    """{group: [member names in the given order]} for the quantized parameters among `names`."""
    groups: dict[str, list[str]] = {}
    for name in names:
        group = fp8_scale_group(name)
        if group is not None:
            groups.setdefault(group, []).append(name)
    return groups


@torch.no_grad()
def quantize_group(tensors: list[torch.Tensor], per_expert: bool = False) -> list[torch.Tensor]:
    """Fake-quantize tensors that vLLM holds as ONE fused tensor (one scale over all of them).

    With `per_expert`, each tensor is (E, out, in) and expert e gets its own scale.
    """
    if per_expert:
        return [torch.stack([fake_quantize_fp8(t[e])[0] for e in range(t.shape[0])]) for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    deq, _ = fake_quantize_fp8(flat)
    return [d.view_as(t) for d, t in zip(torch.split(deq, [t.numel() for t in tensors]), tensors)]


@torch.no_grad()
def fake_quantize_params(params: dict[str, torch.Tensor], groups: dict[str, list[str]]) -> None:
    """Replace, in place, every parameter of `groups` (from `fp8_scale_groups`) by its FP8 round trip."""
    for group, members in groups.items():
        tensors = [params[name] for name in members]
        for tensor, rounded in zip(
            tensors, quantize_group(tensors, per_expert=_FUSED_EXPERTS.match(group) is not None)
        ):
            tensor.copy_(rounded)
