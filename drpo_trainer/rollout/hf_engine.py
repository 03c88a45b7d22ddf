"""Rollout engine on transformers `generate`: CPUs, small models and the test suite.

Same interface as the vLLM engine. It keeps its own full copy of the model (the learner's
ZeRO-3 parameters are sharded), refreshed by `load_weights` after every update.
Log-probs are of the sampling distribution, computed from the RAW logits (`output_logits`)
by `drpo_trainer.learner.logprobs.sampling_logprobs`: log_softmax(logits / T), truncated to the top-k /
top-p set and renormalised when those are on (the learner's and vLLM's definition).
`output_scores` would also carry other processors (min-length EOS ban), so they are not used.

With `quantization="fp8"` the engine's linear-projection weights are rounded to float8_e4m3fn and
back after loading and after every sync, with vLLM's per-tensor scales (`drpo_trainer.rollout.fp8`):
the learner stays in full precision, so the engine samples from an FP8-style policy.

A mixture-of-experts model (drpo_trainer.learner.routing) has its routers tapped: every completion
carries `routes`, the experts chosen for each of its prompt and completion tokens at every MoE layer
(the last sampled token is never run through the model and has none), for routing replay and the
moe/* metrics.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch

from drpo_trainer.learner.logprobs import sampling_logprobs
from drpo_trainer.learner.routing import RouterTap, is_moe
from drpo_trainer.rollout.base import Completion, SamplingSpec
from drpo_trainer.rollout.fp8 import fake_quantize_params, fp8_scale_group, fp8_scale_groups


class HFEngine:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        generation_batch_size: int = 64,
        tokenizer=None,
        show_progress: bool = False,
        quantization: Optional[str] = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.generation_batch_size = generation_batch_size
        self.show_progress = show_progress
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        )
        self._fp8_groups = self._fp8_setup(quantization, model_path)
        self._fp8_arrived: dict[str, set[str]] = {}  # group -> members synced since it was last quantized
        self._tap = RouterTap(self.model) if is_moe(self.model) else None  # records every token's experts

    def _fp8_setup(self, quantization: Optional[str], model_path: str) -> dict[str, list[str]]:
        if quantization is None:
            return {}
        if quantization != "fp8":
            raise ValueError(f"HFEngine: unknown quantization {quantization!r}; use 'fp8' or None")
        groups = fp8_scale_groups([n for n, _ in self.model.named_parameters(remove_duplicate=False)])
        if not groups:
            raise ValueError(
                f"rollout.quantization=fp8: {model_path} has no linear projections named like "
                "'model.layers.N.self_attn.q_proj.weight' to quantize; drop rollout.quantization for this model"
            )
        fake_quantize_params(
            dict(self.model.named_parameters(remove_duplicate=False)), groups
        )  # the checkpoint, as vLLM loads it
        return groups

    # -- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"weight sync: the rollout model has no parameter '{name}'")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
            group = fp8_scale_group(name) if self._fp8_groups else None
            if group is not None:
                self._fp8_arrived.setdefault(group, set()).add(name)
        # a fused group is quantized once all its members are in (one scale over q, k and v)
        self._quantize_arrived(lambda group, names: names == set(self._fp8_groups[group]))

    def finish_weight_update(self) -> None:
        """End of a sync: quantize any group only part of which was sent."""
        self._quantize_arrived(lambda group, names: True)

    def _quantize_arrived(self, ready) -> None:
        done = {g: self._fp8_groups[g] for g, names in self._fp8_arrived.items() if ready(g, names)}
        if done:
            fake_quantize_params(dict(self.model.named_parameters(remove_duplicate=False)), done)
            for group in done:
                del self._fp8_arrived[group]

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.score_routed(sequences)[0]

    @torch.no_grad()
    def score_routed(self, sequences: list[list[int]]) -> tuple[list[list[float]], Optional[list[torch.Tensor]]]:
        """`score`, and for an MoE model each sequence's (L, layers, k) experts (else None)."""
        out, routes = [], []
        for seq in sequences:  # one at a time: a probe is small, and no padding enters the numbers
            ids = torch.tensor([seq], device=self.device)
            with self._recording() as calls:
                logits = self.model(input_ids=ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(lp.cpu().tolist())
            if calls is not None:
                routes.append(torch.stack([layer[0] for layer in calls], dim=1))  # (L, layers, k)
        return out, (routes if self._tap is not None else None)

    @contextlib.contextmanager
    def _recording(self):
        """Within: every forward appends each MoE layer's (tokens, k) experts to the yielded lists."""
        if self._tap is None:
            yield None
            return
        self._tap.recording = calls = [[] for _ in range(self._tap.num_layers)]
        try:
            yield calls
        finally:
            self._tap.recording = None

    def sleep(self) -> None:  # nothing to release on CPU
        pass

    def wake_up(self) -> None:
        pass

    # -- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        jobs = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(spec.n)]  # grouped by prompt
        out: list[Completion] = []
        bar = None
        if self.show_progress:  # over problems: a problem is done when its last completion is
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompt_ids), desc="generate", unit="problem", leave=False, dynamic_ncols=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            for s in range(0, len(jobs), self.generation_batch_size):
                out.extend(self._generate_batch(jobs[s : s + self.generation_batch_size], spec))
                if bar is not None:
                    bar.update(len(out) // spec.n - bar.n)
        if bar is not None:
            bar.close()
        return out

    def _generate_batch(self, jobs: list[tuple[int, list[int]]], spec: SamplingSpec) -> list[Completion]:
        width = max(len(ids) for _, ids in jobs)
        input_ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, (_, ids) in enumerate(jobs):  # left padding
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        with self._recording() as calls:
            res = self._generate_padded(input_ids, attention, spec)
        new_tokens = res.sequences[:, width:].cpu()  # (B, steps)
        logits = torch.stack(res.logits, dim=1).float().cpu()  # (B, steps, V), raw
        logprobs = sampling_logprobs(logits, spec.temperature, spec.top_k, spec.top_p)
        token_lp = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)  # (B, steps)
        routes = _batch_routes(calls, len(jobs), width) if calls is not None else None
        return [
            self._completion(
                jobs[row], new_tokens[row], token_lp[row], spec, _row_routes(routes, row, width, jobs[row])
            )
            for row in range(len(jobs))
        ]

    def _generate_padded(self, input_ids: torch.Tensor, attention: torch.Tensor, spec: SamplingSpec):
        return self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            do_sample=True,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,  # 0 disables; generate would otherwise apply top_k=50
            max_new_tokens=spec.max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )

    def _completion(
        self, job, tokens: torch.Tensor, lps: torch.Tensor, spec: SamplingSpec, routes: Optional[torch.Tensor] = None
    ) -> Completion:
        prompt_index, prompt = job
        ids = tokens.tolist()
        end: Optional[int] = next((t + 1 for t, tok in enumerate(ids) if tok in self.eos_ids), None)
        finish = "stop" if end is not None else "length"
        end = end if end is not None else min(len(ids), spec.max_new_tokens)
        ids = ids[:end]
        return Completion(
            prompt_index=prompt_index,
            prompt_ids=list(prompt),
            completion_ids=ids,
            rollout_logprobs=lps[:end].tolist(),
            finish_reason=finish,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            routes=None if routes is None else routes[: len(prompt) + end - 1].clone(),  # the last token has none
        )


def _batch_routes(calls: list[list[torch.Tensor]], rows: int, width: int) -> torch.Tensor:
    """The recorded router calls of one `generate` -> (B, width + steps - 1, layers, k): the prefill's
    (B * width, k) choices per layer, then one (B, k) per decode step."""
    prefill = torch.stack([layer[0] for layer in calls], dim=1).view(rows, width, len(calls), -1)
    if len(calls[0]) == 1:
        return prefill
    decode = torch.stack([torch.stack(layer[1:], dim=1) for layer in calls], dim=2)  # (B, steps - 1, layers, k)
    return torch.cat([prefill, decode.view(rows, -1, len(calls), prefill.shape[-1])], dim=1)


def _row_routes(routes: Optional[torch.Tensor], row: int, width: int, job) -> Optional[torch.Tensor]:
    """Row `row`'s routes from its first prompt token on (the prompt is left-padded to `width`)."""
    return None if routes is None else routes[row, width - len(job[1]) :]
