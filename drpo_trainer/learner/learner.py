"""The learner: the policy on a DeepSpeed engine (ZeRO-3 by default).

It owns two things the trainer calls in order each step:
  1. `recompute_logprobs(samples)`: log mu, the behaviour log-probs of every sampled token
     with the pre-update weights (no grad), frozen for the whole step;
  2. `update(minibatch)`: one optimizer step on one (possibly stale) mini-batch, split into
     padding-free token-budget micro-batches; the loss comes from the registry.

Two exact shortcuts (config `trainer.*`, both on by default; the update is unchanged):
  - `skip_zero_advantage`: a sample with advantage exactly 0 has zero gradient under every
    registry loss, so it gets no forward or backward; it still counts in the token and
    sequence normalisers. Metrics measured on log-probs (entropy, ratio statistics) then cover
    the trained samples only.
  - `reuse_first_minibatch_logprobs`: mini-batch 1 is trained before the policy moves, so its
    behaviour log-probs are its update forward's own log-probs, detached (the separate no-grad
    pass computes the same numbers bitwise); only mini-batches 2..k are recomputed.

Mixture-of-experts models: with `rollout.routing_replay` every forward (mu, updates, the parity probe)
sends each token through the experts the engine chose for it (`TrainSample.routes`,
drpo_trainer/learner/routing.py; docs/moe.md).

`algorithm.mask_truncated` (off by default; it changes the update) leaves completions that hit
max_new_tokens without EOS out of the loss entirely: no forward, no gradient, and not counted in the
normalisers (`samples_in_loss`; docs/algorithms.md says why).

Gradient accumulation is ours, not DeepSpeed's: `managed_gradient_accumulation: false`
makes every `engine.step()` the boundary, so micro-batch counts may vary per step. Each
micro-batch's loss is normalised by the WHOLE mini-batch's token / sequence counts over
all ranks, and multiplied by the world size to undo DeepSpeed's gradient averaging, so
neither the micro-batch split nor the rank split changes the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from drpo_trainer.algorithms.losses import compute_policy_loss, metric_reductions
from drpo_trainer.config import Config, merge_dicts
from drpo_trainer.learner.packing import pack_sequences, pad_rows, plan_micro_batches
from drpo_trainer.learner.routing import routing_tap
from drpo_trainer.metrics import MetricAccumulator, all_reduce_max, all_reduce_sum
from drpo_trainer.rollout.base import SamplingSpec
from drpo_trainer.rollout.producer import sampling_spec
from drpo_trainer.runtime.distributed import DistContext

NO_CLIP = 1e30  # optim.grad_clip = 0: clip at a norm no gradient reaches, so the norm is still computed


class NonFiniteUpdate(RuntimeError):
    """The update's loss or gradient norm is NaN or infinite; `applied`: the optimizer step already ran."""

    def __init__(self, metric: str, value: float, *, applied: bool) -> None:
        self.metric, self.value, self.applied = metric, value, applied
        when = "after the optimizer step (its weights are not saved)" if applied else "before the optimizer step"
        super().__init__(f"{metric} is {value}; the run stopped {when}")


@dataclass
class TrainSample:
    """One completion as the learner sees it."""

    input_ids: list[int]  # prompt + completion
    prompt_len: int
    advantage: float
    rollout_logprobs: torch.Tensor  # (Tc,) from the engine
    old_logprobs: Optional[torch.Tensor] = None  # (Tc,) learner recomputation with pre-update weights
    truncated: bool = False  # hit max_new_tokens without EOS; left out of the loss with algorithm.mask_truncated
    routes: Optional[torch.Tensor] = None  # (n, layers, k) the engine's experts of tokens 0..n-1 (MoE models)

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "warmup_cosine":
            span = max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
        return 1.0

    return fn


def deepspeed_config(cfg: Config, world_size: int = 1, *, load_universal: bool = False, zero3: bool = False) -> dict:
    # a universal or ZeRO-3 checkpoint loads only into ZeRO-3, also with one process (drpo_trainer.io.reshard)
    stage = 3 if (load_universal or zero3) else cfg.effective_zero_stage(world_size)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if cfg.distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        # 0 = no clipping; a bound no norm reaches keeps DeepSpeed computing (and us logging) the norm
        "gradient_clipping": cfg.optim.grad_clip or NO_CLIP,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if cfg.distributed.deepspeed_config:
        import json

        with open(cfg.distributed.deepspeed_config) as f:
            user = json.load(f)
        ds = merge_dicts(ds, user)
    return ds


def load_policy_model(cfg: Config, model_path: str, ds_config: dict) -> torch.nn.Module:
    """The policy from `model_path` in cfg.model's dtype; under ZeRO-3 built straight into shards."""
    from transformers import AutoModelForCausalLM

    hf_ds_config = None
    if ds_config["zero_optimization"]["stage"] == 3:
        # While alive, makes transformers build the model straight into ZeRO-3 shards (zero.Init).
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    kwargs = {"dtype": getattr(torch, cfg.model.dtype), "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if hf_ds_config is not None:  # later loads (the rollout engine's full copy, exports) must not shard
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del hf_ds_config
    model.config.use_cache = False
    return model


def adamw(cfg: Config, trainable: list[torch.nn.Parameter], ds_config: dict) -> Optional[torch.optim.Optimizer]:
    """torch's AdamW over `trainable`; None under ZeRO-Offload, which needs DeepSpeed's CPU Adam (set in ds_config)."""
    o = cfg.optim
    if not cfg.distributed.offload_optimizer:
        return torch.optim.AdamW(trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    ds_config["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
    }
    return None


class Learner:
    def __init__(
        self,
        cfg: Config,
        model_path: str,
        *,
        total_optimizer_steps: int,
        sampling: Optional[SamplingSpec] = None,
        ctx: Optional[DistContext] = None,
        load_universal: bool = False,
        zero3: bool = False,
    ) -> None:
        import deepspeed

        self.cfg = cfg
        # the distribution mu and pi are scored under: the rollouts' temperature, top-k and top-p
        self.sampling = sampling or sampling_spec(cfg)
        self.ctx = ctx or DistContext.current()  # the ranks that train together (the default process group)
        self.world_size = self.ctx.world_size
        ds_config = deepspeed_config(cfg, self.world_size, load_universal=load_universal, zero3=zero3)
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        model = load_policy_model(cfg, model_path, ds_config)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora is not None:  # only the adapters train (docs/lora.md)
            model = self._apply_lora(model)
        trainable = [p for p in model.parameters() if p.requires_grad]  # every parameter, without LoRA
        optimizer = adamw(cfg, trainable, ds_config)
        sched = lr_lambda(cfg.optim.schedule, cfg.optim.warmup_steps, total_optimizer_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=trainable if optimizer is None else None,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched),
            config=ds_config,
        )
        self.device = self.engine.device
        if cfg.model.lora is not None:
            from drpo_trainer.learner.lora import save_adapters_only

            save_adapters_only(self.engine)
        self.engine.train()
        # varlen flash-attention attends within each packed sequence; other kernels pay row_length^2
        varlen = cfg.model.attn_implementation == "flash_attention_2"
        rows = cfg.trainer.packed_row_tokens
        self.row_tokens = None if varlen else (0 if rows == "longest" else rows)  # 0: rows as wide as the longest
        self._grad_norm: Optional[float] = None
        if self.zero_stage == 0:
            self._record_stage0_grad_norm()
        # with active dropout the update forward is not the policy mu was defined as (eval mode)
        self.can_reuse_logprobs = not _has_dropout(model)
        self.routing, self.replay = routing_tap(model, cfg.rollout.routing_replay)  # MoE: record / replay experts

    def _apply_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with LoRA adapters (model.lora), only they trainable; says how many parameters train."""
        import sys

        from drpo_trainer.learner.lora import apply_lora, parameter_counts

        model = apply_lora(model, self.cfg.model.lora, seed=self.cfg.trainer.seed)
        self.trainable_params, self.total_params = parameter_counts(model)
        if self.ctx.is_main:
            print(
                f"drpo-train: model.lora trains {self.trainable_params:,} of {self.total_params:,} parameters "
                f"({100 * self.trainable_params / self.total_params:.3g}%)",
                file=sys.stderr,
                flush=True,
            )
        return model

    def _record_stage0_grad_norm(self) -> None:
        """Without ZeRO, DeepSpeed clips with a torch optimizer but keeps no norm: record it."""
        from deepspeed.runtime.utils import clip_grad_norm_

        engine = self.engine

        def clip_and_record() -> None:
            norm = clip_grad_norm_(
                parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
            )
            self._grad_norm = float(norm)
            if not math.isfinite(self._grad_norm):  # called before the optimizer step: stop before it
                raise NonFiniteUpdate("optim/grad_norm", self._grad_norm, applied=False)

        engine.clip_fp32_gradients = clip_and_record

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    # -- log-probs of completion tokens -------------------------------------------------------
    def _forward(
        self, samples: list[TrainSample], *, with_entropy: bool, probe: bool = False, replay: Optional[bool] = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Packed forward; returns each sample's completion log-probs (Tc,) (and entropies) under
        the sampling distribution (rollout temperature, top-k, top-p), or at temperature 1
        without truncation for the parity probe. MoE models: with `replay` (default
        rollout.routing_replay) every token goes through the experts in its sample's `routes`."""
        from drpo_trainer.learner.logprobs import token_logprobs

        packed = pack_sequences(
            [s.input_ids for s in samples], prompt_lengths=[s.prompt_len for s in samples], row_tokens=self.row_tokens
        )
        if self.routing is not None:  # stays set until the next forward: a checkpointed backward recomputes it
            self.routing.prepare([s.routes for s in samples], packed, self.replay if replay is None else replay)
        r = self.sampling
        lp, ent = token_logprobs(
            self.engine,
            packed.input_ids.to(self.device),
            packed.position_ids.to(self.device),
            packed.targets.to(self.device),
            temperature=1.0 if probe else r.temperature,
            top_k=0 if probe else r.top_k,
            top_p=1.0 if probe else r.top_p,
            chunk_tokens=self.cfg.trainer.logprob_chunk_tokens,
            with_entropy=with_entropy,
        )
        return packed.split_targets(lp), (packed.split_targets(ent) if ent is not None else [])

    def samples_in_loss(self, samples: list[TrainSample]) -> list[TrainSample]:
        """The samples the loss and its normalisers count: all of them, or with algorithm.mask_truncated
        those that ended with EOS (a truncated one is left out entirely, docs/algorithms.md)."""
        if not self.cfg.algorithm.mask_truncated:
            return list(samples)
        return [s for s in samples if not s.truncated]

    def samples_to_train(self, samples: list[TrainSample]) -> list[TrainSample]:
        """The samples that carry gradient: those in the loss, less those with advantage exactly 0 under
        trainer.skip_zero_advantage."""
        counted = self.samples_in_loss(samples)
        if not self.cfg.trainer.skip_zero_advantage:
            return counted
        return [s for s in counted if s.advantage != 0.0]

    def _micro_batches(self, samples: list[TrainSample], *, at_least_one: bool = False) -> list[list[int]]:
        """This rank's micro-batches, padded with empty ones to the max count over ranks."""
        budget = self.cfg.trainer.micro_batch_tokens_per_gpu
        plan = plan_micro_batches([len(s.input_ids) for s in samples], budget) if samples else []
        (n_max,) = all_reduce_max([len(plan)])
        n_max = max(int(n_max), int(at_least_one))
        return plan + [[] for _ in range(n_max - len(plan))]

    @torch.no_grad()
    def recompute_logprobs(self, samples: list[TrainSample], entropy: Optional[MetricAccumulator] = None) -> None:
        """Fill `old_logprobs` of every trained sample with the current (pre-update) weights; the
        tokens' policy entropy goes into `entropy` (token-weighted, not yet reduced over ranks)."""
        self.engine.eval()  # no dropout: mu must be the deterministic policy
        trained = self.samples_to_train(samples)
        for mb in self._micro_batches(trained):
            if not mb:  # keep ZeRO-3 collectives in step with ranks that have more work
                self._forward(samples[:1], with_entropy=False)
                continue
            lps, ents = self._forward([trained[i] for i in mb], with_entropy=True)
            for i, lp, ent in zip(mb, lps, ents):
                trained[i].old_logprobs = lp.float().cpu()
                if entropy is not None and ent.numel():
                    entropy.add({"policy/entropy": ent.float().mean()}, weight=ent.numel())
        self.engine.train()

    @torch.no_grad()
    def score(self, sequences: list[list[int]], routes: Optional[list[torch.Tensor]] = None) -> list[list[float]]:
        """Log-probs of tokens 1..L-1 at temperature 1 (the parity probe; every rank calls it), through the
        engine's experts `routes` under rollout.routing_replay."""
        self.engine.eval()
        routes = routes or [None] * len(sequences)
        probe = [
            TrainSample(input_ids=s, prompt_len=1, advantage=0.0, rollout_logprobs=torch.zeros(0), routes=r)
            for s, r in zip(sequences, routes)
        ]
        lps, _ = self._forward(probe, with_entropy=False, probe=True)
        self.engine.train()
        return [lp.float().cpu().tolist() for lp in lps]

    # -- one optimizer step on one mini-batch -------------------------------------------------
    def update(
        self,
        minibatch: list[TrainSample],
        *,
        behaviour_from_forward: bool = False,
        entropy: Optional[MetricAccumulator] = None,
    ) -> dict[str, float]:
        """One optimizer step on `minibatch`. With `behaviour_from_forward` (mini-batch 1, weights not
        yet moved) log mu is this forward's own detached log-probs, stored in `old_logprobs`, and the
        entropy goes into `entropy`, as `recompute_logprobs` would have done."""
        a = self.cfg.algorithm
        use_rollout_mu = a.behaviour_logprobs == "rollout"
        trained = self.samples_to_train(minibatch)
        if behaviour_from_forward and not self.can_reuse_logprobs:
            raise RuntimeError("behaviour_from_forward needs a model without active dropout; recompute instead")
        if not (use_rollout_mu or behaviour_from_forward) and any(s.old_logprobs is None for s in trained):
            raise RuntimeError("update() before recompute_logprobs(): behaviour log-probs are missing")
        # normalisers count every sample in the loss, also the skipped ones (their loss terms are exactly 0)
        counted = self.samples_in_loss(minibatch)
        num_tokens, num_seqs = all_reduce_sum([sum(s.completion_len for s in counted), len(counted)])
        acc = MetricAccumulator()
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        # at least one backward: the optimizer step must see (zero) gradients, as without skipping
        for mb in self._micro_batches(trained, at_least_one=True):
            # an empty micro-batch (ZeRO-3 collectives in step with busier ranks) runs one sample at weight 0
            chosen = [trained[i] for i in mb] or minibatch[:1]
            lps, ents = self._forward(chosen, with_entropy=bool(mb) and behaviour_from_forward and entropy is not None)
            logprobs, mask = pad_rows(lps, device=self.device)
            if not mb:
                mask.zero_()
            if behaviour_from_forward and mb:
                for s, lp, ent in zip(chosen, lps, ents or [None] * len(chosen)):
                    s.old_logprobs = lp.detach().float().cpu()
                    if ent is not None and ent.numel():
                        entropy.add({"policy/entropy": ent.detach().float().mean()}, weight=ent.numel())
            # log mu: the engine's (behaviour_logprobs: rollout), this forward's (mini-batch 1 reuse, or an
            # empty micro-batch at weight 0), else the recomputation's
            if use_rollout_mu:
                old, _ = pad_rows([s.rollout_logprobs for s in chosen], device=self.device)
            elif behaviour_from_forward or not mb:
                old = logprobs.detach()
            else:
                old, _ = pad_rows([s.old_logprobs for s in chosen], device=self.device)
            adv = torch.tensor([s.advantage if mb else 0.0 for s in chosen], dtype=torch.float32, device=self.device)
            loss, metrics = self._policy_loss(chosen, logprobs, old, adv, mask, num_tokens, num_seqs)
            # losses are normalised by global counts; DeepSpeed averages grads over ranks
            self.engine.backward(loss * self.world_size)
            total_loss += loss.detach()
            acc.add(metrics, weight=float(mask.sum()), reduce=metric_reductions(a.loss))
        self._grad_norm = None
        lr = float(self.engine.get_lr()[0])  # this step's; step() moves the schedule on to the next
        (loss,) = all_reduce_sum([float(total_loss)])
        if not math.isfinite(loss):  # every rank sees the same sum: all stop before the optimizer step
            raise NonFiniteUpdate("loss/policy", loss, applied=False)
        self.engine.step()
        out = acc.result(all_reduce=True)
        out["loss/policy"] = loss
        grad_norm = self.engine.get_global_grad_norm()  # ZeRO and DeepSpeed's bf16/fp16 optimizers keep it
        if grad_norm is None:
            grad_norm = self._grad_norm  # stage 0 with a torch optimizer: recorded by our clip hook
        out["optim/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        if grad_norm is not None and not math.isfinite(float(grad_norm)):  # ZeRO: known only after the step
            raise NonFiniteUpdate("optim/grad_norm", float(grad_norm), applied=True)
        out["optim/lr"] = lr
        (trained_here, all_here) = all_reduce_sum([len(trained), len(minibatch)])
        out["perf/skipped_sample_fraction"] = 1.0 - trained_here / max(all_here, 1)
        return out

    def _policy_loss(self, chosen, logprobs, old, adv, mask, num_tokens, num_seqs) -> tuple[torch.Tensor, dict]:
        """The registry loss of one micro-batch, normalised by the whole mini-batch's global counts."""
        a = self.cfg.algorithm
        rollout, _ = pad_rows([s.rollout_logprobs for s in chosen], device=self.device)
        return compute_policy_loss(
            a.loss,
            logprobs.float(),
            old,
            adv,
            mask,
            loss_agg_mode=a.loss_agg_mode,
            horizon=self.cfg.horizon,
            global_num_tokens=num_tokens,
            global_num_seqs=num_seqs,
            rollout_logprobs=rollout,
            mismatch_correction=a.mismatch_correction,
            tis_cap=a.tis_cap,
            mis_lower=a.mis_lower,
            mis_upper=a.mis_upper,
            **a.loss_params,
        )


def _has_dropout(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    rates = [getattr(config, k, 0.0) or 0.0 for k in ("attention_dropout", "hidden_dropout", "dropout")]
    modules = (m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
    return any(float(r) > 0 for r in rates) or any(p > 0 for p in modules)
