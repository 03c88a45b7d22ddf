"""Routing replay on a tiny random Qwen3-MoE (8 experts, top-2, norm_topk_prob): the router tap is the
model's own forward when the routes agree (log-probs and gradients, bitwise), replaying other experts
changes the log-probs to those of a hand-written forward through those experts, the engine records
exactly the learner's routes in fp32, and routes survive the wire."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from drpo_trainer.learner.logprobs import token_logprobs
from drpo_trainer.learner.packing import pack_sequences
from drpo_trainer.learner.routing import (
    RouterTap,
    expert_counts,
    load_balance,
    own_routes,
    pack_routes,
    route_agreement_counts,
)


@pytest.fixture(scope="module")
def moe_dir(moe_model_dir):
    return moe_model_dir


def load(moe_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)


SEQS = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51, 52, 53, 54], [1, 60, 61, 62, 63, 64, 65]]
PROMPT = 3


def packed_logprobs(model, routes=None):
    """Completion log-probs of SEQS packed in one row, and the packed batch."""
    packed = pack_sequences(SEQS, prompt_lengths=[PROMPT] * len(SEQS))
    tap = getattr(model, "_tap", None)
    if tap is not None:
        tap.prepare(routes or [None] * len(SEQS), packed, replay=routes is not None)
    lp, _ = token_logprobs(model, packed.input_ids, packed.position_ids, packed.targets)
    return lp, packed


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_replaying_the_learners_own_routes_is_the_plain_forward_bitwise(moe_dir):
    plain = load(moe_dir)
    lp_plain, _ = packed_logprobs(plain)
    lp_plain.sum().backward()
    g_plain = grads(plain)

    tapped = load(moe_dir)
    tapped._tap = tap = RouterTap(tapped)
    lp_own, packed = packed_logprobs(tapped)  # no replay: records its own routes
    own = own_routes(tap)  # (N, layers, k)
    routes = [own[s].to(tap.dtype) for s in packed.seq_slices]
    tapped.zero_grad()
    lp_replay, _ = packed_logprobs(tapped, routes)
    lp_replay.sum().backward()
    g_replay = grads(tapped)

    assert torch.equal(lp_own, lp_plain) and torch.equal(lp_replay, lp_plain)
    assert set(g_replay) == set(g_plain)
    assert any(".mlp.gate.weight" in n for n in g_replay)  # the router still learns under replay
    for n in g_plain:
        assert torch.equal(g_replay[n], g_plain[n]), n


def hand_moe_forward(model, ids: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the logits of one sequence computed layer by layer, each MoE block written out:
    gates = softmax(h W_r^T) over all experts, taken at the FORCED experts and renormalised (norm_topk_prob),
    output = sum_j gate_j * down_j(silu(gate_proj_j h) * up_proj_j h). `forced`: (T, layers, k)."""
    m = model.model
    blocks = [layer.mlp for layer in m.layers]
    saved = [b.forward for b in blocks]

    def block_forward(block, layer):
        def forward(hidden):
            b, t, d = hidden.shape
            h = hidden.reshape(-1, d)
            probs = torch.softmax(h @ block.gate.weight.T, dim=-1)
            chosen = forced[:, layer].long()
            gates = probs.gather(-1, chosen)
            gates = gates / gates.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            inter = block.experts.down_proj.shape[-1]
            for j in range(chosen.shape[1]):
                for tok in range(h.shape[0]):
                    e = int(chosen[tok, j])
                    gu = block.experts.gate_up_proj[e] @ h[tok]
                    act = F.silu(gu[:inter]) * gu[inter:]
                    out[tok] += gates[tok, j] * (block.experts.down_proj[e] @ act)
            return out.view(b, t, d)

        return forward

    try:
        for layer, b in enumerate(blocks):
            b.forward = block_forward(b, layer)
        logits = model(input_ids=ids[None]).logits[0]
    finally:
        for b, f in zip(blocks, saved):
            b.forward = f
    return torch.log_softmax(logits.float(), dim=-1)


def test_replaying_other_experts_changes_logprobs_to_a_hand_computed_forward(moe_dir):
    model = load(moe_dir)
    model._tap = tap = RouterTap(model)
    lp_own, packed = packed_logprobs(model)
    own = own_routes(tap)
    # every token, every layer: the experts (e + 3) mod 8, never the own choice's set for these routes
    forced_all = ((own + 3) % tap.num_experts).to(tap.dtype)
    routes = [forced_all[s] for s in packed.seq_slices]
    with torch.no_grad():
        lp_forced, _ = packed_logprobs(model, routes)
    assert (lp_forced - lp_own).abs().max() > 1e-2  # other experts, other log-probs
    agree, total = route_agreement_counts(own_routes(tap), forced_all, torch.ones(len(own), dtype=torch.bool))
    assert (agree, total) == (0, len(own) * tap.num_layers)  # the tap reports its own routes, not the forced ones
    plain = load(moe_dir)
    with torch.no_grad():
        for seq, r, s in zip(SEQS, routes, packed.target_slices):
            ref = hand_moe_forward(plain, torch.tensor(seq), r)
            expected = ref[PROMPT - 1 : -1].gather(-1, torch.tensor(seq[PROMPT:])[:, None]).squeeze(-1)
            torch.testing.assert_close(lp_forced[0, s], expected, rtol=0, atol=2e-5)


def test_engine_records_the_routes_the_learner_computes_in_fp32(moe_dir):
    from drpo_trainer.rollout.base import SamplingSpec
    from drpo_trainer.rollout.hf_engine import HFEngine

    engine = HFEngine(moe_dir, generation_batch_size=8)
    prompts = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55]]  # left padding: different widths
    comps = engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=6, seed=3))
    model = load(moe_dir)
    tap = RouterTap(model)
    for c in comps:
        seq = c.prompt_ids + c.completion_ids
        assert c.routes.dtype == torch.uint8 and c.routes.shape == (len(seq) - 1, 2, 2)  # last token: no route
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        own = own_routes(tap)[: len(seq) - 1]
        assert torch.equal(own, c.routes.long())  # same experts, same order (descending gate)
    lps, routes = engine.score_routed([prompts[1]])
    assert routes[0].shape == (7, 2, 2) and len(lps[0]) == 6


def test_route_packing_agreement_and_load_balance_by_hand():
    packed = pack_sequences([[5, 6, 7], [8, 9]], row_tokens=4)  # rows [5 6 7] [8 9 pad]
    r0 = torch.tensor([[[1, 2]], [[3, 4]]], dtype=torch.uint8)  # 2 of 3 tokens routed, 1 layer, k=2
    r1 = torch.tensor([[[7, 0]]], dtype=torch.uint8)
    routes, mask = pack_routes([r0, r1], packed.seq_slices, packed.num_tokens, 1, 2)
    assert mask.tolist() == [True, True, False, True, False, False]
    assert routes[3, 0].tolist() == [7, 0] and routes[1, 0].tolist() == [3, 4]
    own = routes.clone()
    own[1, 0] = torch.tensor([4, 3])  # same set, other order: agrees
    own[3, 0] = torch.tensor([7, 1])  # differs
    assert route_agreement_counts(own, routes, mask) == (2, 3)
    counts = expert_counts(own, mask, 8)  # experts 1,2,4,3,7,1 -> expert 1 twice
    assert counts[0].tolist() == [0, 2, 1, 1, 1, 0, 0, 1]
    assert load_balance(counts) == [pytest.approx(2 * 8 / 6)]  # max share 2/6 over mean share 1/8
    with pytest.raises(ValueError, match="MoE layers"):
        pack_routes([torch.zeros(2, 3, 2, dtype=torch.uint8)], [slice(0, 3)], 3, 1, 2)


def test_routes_survive_the_wire_and_dense_completions_carry_none():
    from drpo_trainer.rollout.base import Completion
    from drpo_trainer.runtime.wire import completions_from_plain, completions_to_plain, decode, encode

    routed = Completion(0, [1, 2], [3, 4], [-0.5, -0.25], "stop", "x", routes=torch.arange(18).view(3, 3, 2).byte())
    dense = Completion(0, [1, 2], [5], [-0.1], "length", "y")
    plain = decode(encode(completions_to_plain([routed, dense, copy.deepcopy(routed)])))
    back = completions_from_plain(plain)
    assert "routes" in plain and completions_from_plain(plain)[2].routes is not None  # reading leaves it as it was
    assert torch.equal(back[0].routes, routed.routes) and back[0].routes.dtype == torch.uint8
    assert back[1].routes is None and torch.equal(back[2].routes, routed.routes)
    assert completions_from_plain(completions_to_plain([dense]))[0].routes is None
    assert "routes" not in completions_to_plain([dense])  # dense batches: the message is unchanged


@pytest.mark.slow  # importing transformers' Qwen3.5-MoE module alone takes ~10-20 s here; Qwen3-MoE is the fast cover
def test_qwen3_5_moe_router_replays_exactly_on_cpu():
    """Qwen3.5-MoE (always-normalised top-k, a shared expert beside the routed ones): own routes replay bitwise
    (logits and gradients), other experts change the logits. Full-attention layers only: the linear-attention
    layers run on CPU too (transformers' PyTorch fallback, checked by hand) and do not touch routing."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    cfg = Qwen3_5MoeTextConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        layer_types=["full_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    )
    torch.manual_seed(0)
    model = Qwen3_5MoeForCausalLM(cfg).float()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))

    def logits_and_grads():
        model.zero_grad()
        logits = model(input_ids=ids).logits
        logits.sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, g_ref = logits_and_grads()
    tap = RouterTap(model)
    assert tap.num_layers == 2 and tap.dtype == torch.uint8
    logits_and_grads()
    own = own_routes(tap)
    tap.set_replay(own)
    same, g_same = logits_and_grads()
    assert torch.equal(same, ref) and all(torch.equal(g_same[n], g_ref[n]) for n in g_ref)
    tap.set_replay((own + 3) % 8)
    other, _ = logits_and_grads()
    assert (other - ref).abs().max() > 1e-2
