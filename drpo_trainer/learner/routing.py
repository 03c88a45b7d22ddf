"""Mixture-of-experts routing: record the experts each router picks, and replay given ones (R3).

Rollout routing replay (Ma et al. 2025, "Stabilizing MoE RL by aligning training and inference
routers", arXiv:2510.11370): the rollout engine records, for every token at every sparse-MoE layer,
the top-k experts its router chose; the learner then sends each token through those experts instead
of the ones its own router would pick, so a small numeric difference between the two can no longer
send a token to other weights (docs/moe.md).

`RouterTap` replaces the forward of each router module of a model (instance attribute, so module
hooks, ZeRO-3's gathers included, still fire). Each call:
  logits = h W^T;  p = softmax(logits) over ALL experts (fp32);  own = top-k(p)
  experts = replayed ids where a route is given, else own
  weights = p[experts], divided by their sum when the model normalises (norm_topk_prob)
That is the model's own computation whenever `experts == own` (bitwise: the same softmax, the same
gathered values in the same order), and the gate weights keep their gradient to the router, whose
logits still depend on the learner's weights: only the discrete choice is replayed.

Encoding: routes of one sequence are a (tokens, layers, k) tensor of uint8 (<= 256 experts) or int16;
token t's route is the one that computed token t's hidden state. A sequence may carry fewer routes
than tokens (the engine never runs the last sampled token): positions without one use their own.

Covered routers: Qwen3-MoE (`norm_topk_prob` from the config) and Qwen3.5-MoE (always normalised).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# router class -> whether it renormalises the top-k weights (None: read router.norm_topk_prob)
ROUTER_CLASSES: dict[str, Optional[bool]] = {"Qwen3MoeTopKRouter": None, "Qwen3_5MoeTopKRouter": True}


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The model's top-k router modules, in layer order (empty for a dense model)."""
    return [m for m in model.modules() if type(m).__name__ in ROUTER_CLASSES]


def is_moe(model: nn.Module) -> bool:
    """A sparse-MoE model with a router this module can record and replay."""
    return bool(find_routers(model))


def route_dtype(num_experts: int) -> torch.dtype:
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    raise ValueError(f"routing replay: {num_experts} experts do not fit int16 routes; at most 32768 are supported")


class RouterTap:
    """Record-and-replay hooks on every router of `model` (see the module docstring).

    `replay`: None (plain routing) or a (N, layers, k) tensor of experts for the N flattened token
    positions of the next forward(s), with `replay_mask` (N,) marking the positions that have a route.
    After each forward `own[layer]` holds the (N, k) experts the router itself picked (detached).
    With `recording` a list per layer, each call also appends its own (N, k) choice (the engine)."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(
                "routing replay: the model has no sparse-MoE router this trainer knows "
                f"({', '.join(ROUTER_CLASSES)}); turn rollout.routing_replay off for a dense model"
            )
        first = self.routers[0]
        self.num_layers, self.top_k, self.num_experts = len(self.routers), first.top_k, first.num_experts
        self.dtype = route_dtype(self.num_experts)
        self.replay: Optional[Tensor] = None
        self.replay_mask: Optional[Tensor] = None
        # the engine's routes of the last `prepare`d forward, packed, and the positions that have one
        self.engine_routes: Optional[Tensor] = None
        self.engine_mask: Optional[Tensor] = None
        self.own: list[Optional[Tensor]] = [None] * self.num_layers
        self.recording: Optional[list[list[Tensor]]] = None
        for layer, router in enumerate(self.routers):
            router.forward = self._make_forward(router, layer)

    def set_replay(self, routes: Optional[Tensor], mask: Optional[Tensor] = None) -> None:
        self.replay, self.replay_mask = routes, mask

    def prepare(self, routes: list[Optional[Tensor]], packed, replay: bool) -> None:
        """Before a learner forward of `packed` (drpo_trainer.learner.packing.PackedBatch): pack the samples'
        engine routes (kept for the moe/* metrics) and replay them when `replay`."""
        if all(r is None for r in routes):
            self.engine_routes = self.engine_mask = None
            self.set_replay(None)
            return
        self.engine_routes, self.engine_mask = pack_routes(
            routes, packed.seq_slices, packed.num_tokens, self.num_layers, self.top_k
        )
        self.set_replay(*((self.engine_routes, self.engine_mask) if replay else (None, None)))

    def last_agreement(self) -> tuple[int, int]:
        """(agreeing, total) (token, layer) routes of the last prepared forward: the learner's own top-k set
        against the engine's, over the positions that have an engine route."""
        if self.engine_routes is None:
            return 0, 0
        return route_agreement_counts(own_routes(self), self.engine_routes, self.engine_mask)

    def last_expert_counts(self) -> Tensor:
        """(layers, E) the learner's own choices over the last forward's engine-routed positions."""
        if self.engine_routes is None:
            return torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        return expert_counts(own_routes(self), self.engine_mask, self.num_experts)

    def _make_forward(self, router: nn.Module, layer: int):
        norm = ROUTER_CLASSES[type(router).__name__]
        norm = bool(router.norm_topk_prob) if norm is None else norm

        def forward(hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            h = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(h, router.weight)  # (N, E)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top_value, experts = torch.topk(probs, router.top_k, dim=-1)  # (N, k), descending
            own = experts.detach()
            self.own[layer] = own
            if self.recording is not None:
                self.recording[layer].append(own.to("cpu", self.dtype))
            if self.replay is not None:
                replayed = self.replay[:, layer].to(experts.device, torch.long)
                if self.replay_mask is not None:
                    replayed = torch.where(self.replay_mask.to(experts.device)[:, None], replayed, experts)
                experts = replayed
                top_value = probs.gather(-1, experts)
            if norm:
                top_value = top_value / top_value.sum(dim=-1, keepdim=True)
            return logits, top_value.to(logits.dtype), experts

        return forward


def routing_tap(model: nn.Module, replay: bool) -> tuple[Optional[RouterTap], bool]:
    """(the learner's tap on an MoE model's routers, or None for a dense one; whether to replay). Refuses
    rollout.routing_replay on a model without a known router."""
    if not is_moe(model):
        if replay:
            RouterTap(model)  # raises, naming the fix
        return None, False
    return RouterTap(model), replay


def pack_routes(
    routes: list[Optional[Tensor]], seq_slices: list[slice], num_tokens: int, num_layers: int, top_k: int
) -> tuple[Tensor, Tensor]:
    """Per-sequence routes -> (num_tokens, layers, k) long routes of the packed rows and their (num_tokens,)
    mask; sequence i's routes land at the start of its slice (drpo_trainer.learner.packing)."""
    packed = torch.zeros(num_tokens, num_layers, top_k, dtype=torch.long)
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    for r, s in zip(routes, seq_slices):
        if r is None:
            continue
        n = min(r.shape[0], s.stop - s.start)
        if r.shape[1:] != (num_layers, top_k):
            raise ValueError(
                f"routing replay: routes of shape {tuple(r.shape)} do not fit a model with {num_layers} MoE layers "
                f"and top-{top_k}; the engine's model must be the learner's"
            )
        packed[s.start : s.start + n] = r[:n].long()
        mask[s.start : s.start + n] = True
    return packed, mask


def own_routes(tap: RouterTap) -> Tensor:
    """The last forward's own experts as one (N, layers, k) tensor."""
    return torch.stack([o.cpu() for o in tap.own], dim=1)


def route_agreement_counts(own: Tensor, engine: Tensor, mask: Tensor) -> tuple[int, int]:
    """(agreeing, total) (token, layer) routes over the masked positions: agreeing when the engine's top-k
    SET equals the learner's (order does not matter)."""
    a = own[mask].sort(dim=-1).values
    b = engine[mask].long().sort(dim=-1).values
    same = (a == b).all(dim=-1)  # (M, layers)
    return int(same.sum()), int(same.numel())


def expert_counts(own: Tensor, mask: Tensor, num_experts: int) -> Tensor:
    """(layers, E) how many (token, k) slots chose each expert over the masked positions."""
    chosen = own[mask]  # (M, layers, k)
    layers = chosen.shape[1]
    out = torch.zeros(layers, num_experts, dtype=torch.float64)
    for layer in range(layers):
        out[layer] = torch.bincount(chosen[:, layer].reshape(-1), minlength=num_experts).double()
    return out


def load_balance(counts: Tensor) -> list[float]:
    """Per layer: the busiest expert's token share over the mean share (1.0 = perfectly even, E = one
    expert takes everything)."""
    totals = counts.sum(dim=1).clamp(min=1)
    return (counts.max(dim=1).values * counts.shape[1] / totals).tolist()


def routes_from_routed_experts(routed: Any, sequence_len: int, where: str) -> torch.Tensor:
    """vLLM's `routed_experts` (a [tokens, layers, top_k] numpy array, prompt tokens first; uint8 up to 256
    experts, else uint16) -> the compact (tokens, layers, k) routes of this module (uint8, else int16). The
    engine routes every token it ran: the whole sequence, or all but the last sampled token."""
    import numpy as np

    a = np.asarray(routed)
    if a.ndim != 3 or a.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: routed_experts of shape {a.shape} and dtype {a.dtype} is not a [tokens, layers, top_k] "
            "integer array; this vLLM version's format is not supported"
        )
    if a.shape[0] not in (sequence_len - 1, sequence_len):
        raise ValueError(
            f"{where}: routed_experts covers {a.shape[0]} tokens, the sequence has {sequence_len}; leave "
            "routed_experts_prompt_start at 0 so that prompt tokens are returned too"
        )
    t = torch.from_numpy(a.astype(np.int64))
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{where}: routed_experts holds a negative expert id ({int(t.min())})")
    dtype = route_dtype(256 if a.dtype.itemsize == 1 else 257)
    if t.numel() and int(t.max()) > torch.iinfo(dtype).max:
        raise ValueError(f"{where}: expert id {int(t.max())} does not fit {dtype}")
    return t.to(dtype)
