"""Chunked token log-probs equal the full-logits reference, in values and gradients."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from drpo_trainer.learner.logprobs import (
    IGNORE_INDEX,
    OUT_OF_SUPPORT_LOGPROB,
    naive_token_logprobs,
    sampling_logprobs,
    token_logprobs,
    truncation_mask,
)
from drpo_trainer.learner.packing import pack_sequences

VOCAB = 256


def tiny_qwen3(seed: int = 0, attn: str = "sdpa", tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
    )
    config._attn_implementation = attn
    model = transformers.Qwen3ForCausalLM(config)
    # random init has tiny lm_head weights (near-uniform softmax); widen them so log-probs and
    # entropies differ clearly between positions and a wrong gather or shift would show
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.float()


def random_batch(lengths, prompt_lengths=None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    return seqs, pack_sequences(seqs, prompt_lengths=prompt_lengths)


def assert_grads_close(actual, expected, name: str = "", tol: float = 1e-5) -> None:
    """max |actual - expected| <= tol * max |expected|: fp32 summation-order noise scales with the
    gradient's magnitude (here up to ~150), so the 1e-5 bound is relative to each tensor's largest entry."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def enable_activation_checkpointing(model) -> None:
    # transformers 5.23 renamed gradient_checkpointing_enable (deprecated alias kept until v6)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()


def grads_of(model, loss) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters()]))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 16, 40, 1024])
def test_chunked_equals_naive_values_and_grads(chunk_tokens):
    model = tiny_qwen3()
    # 40 tokens, 3 sequences; prompts of 5/3/4 tokens leave 31 live targets (7 / 16 do not divide it)
    _, batch = random_batch([12, 20, 8], prompt_lengths=[5, 3, 4])
    weights = torch.randn(1, batch.num_tokens, generator=torch.Generator().manual_seed(2))
    args = (batch.input_ids, batch.position_ids, batch.targets)

    lp_chunk, _ = token_logprobs(model, *args, chunk_tokens=chunk_tokens)
    lp_naive, _ = naive_token_logprobs(model, *args)
    torch.testing.assert_close(lp_chunk, lp_naive, rtol=0, atol=1e-5)

    grads_chunk = grads_of(model, (lp_chunk * weights).sum())
    grads_naive = grads_of(model, (lp_naive * weights).sum())
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" in names
    for name, g_chunk, g_naive in zip(names, grads_chunk, grads_naive):
        assert g_naive.abs().max() > 0, name  # every parameter really receives gradient
        assert_grads_close(g_chunk, g_naive, name)


def test_ignored_positions_are_zero_and_log_probs_are_proper():
    model = tiny_qwen3()
    _, batch = random_batch([9, 6], prompt_lengths=[4, 1])
    lp, ent = token_logprobs(
        model, batch.input_ids, batch.position_ids, batch.targets, chunk_tokens=3, with_entropy=True
    )
    ignored = batch.targets == IGNORE_INDEX
    # sequence 0: prompt 4 -> positions 0..2 and the last (8) ignored; sequence 1: only its last (14)
    assert ignored[0].nonzero().squeeze(-1).tolist() == [0, 1, 2, 8, 14]
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (lp[~ignored] < 0).all()
    # entropy of a distribution over 256 tokens lies in (0, log 256 = 5.545]
    assert (ent[~ignored] > 0).all() and (ent[~ignored] <= math.log(VOCAB) + 1e-5).all()


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_and_entropy_match_naive(temperature):
    model = tiny_qwen3()
    _, batch = random_batch([15, 11], prompt_lengths=[2, 6])
    args = (batch.input_ids, batch.position_ids, batch.targets)
    lp, ent = token_logprobs(model, *args, temperature=temperature, chunk_tokens=5, with_entropy=True)
    lp_ref, ent_ref = naive_token_logprobs(model, *args, temperature=temperature, with_entropy=True)
    lp_t1, _ = naive_token_logprobs(model, *args)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-5)
    live = batch.targets != IGNORE_INDEX
    assert (lp[live] - lp_t1[live]).abs().max() > 1e-2  # the temperature really changes the result

    # entropy is differentiable too (an entropy bonus needs it)
    g = grads_of(model, ent.sum() + lp.sum())
    g_ref = grads_of(model, ent_ref.sum() + lp_ref.sum())
    for a, b in zip(g, g_ref):
        assert_grads_close(a, b)


def test_truncation_mask_by_hand():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    # softmax = 0.6439, 0.2369, 0.0871, 0.0321; ascending cumsum 0.0321, 0.1192, 0.3561, 1
    assert truncation_mask(z, top_k=2).tolist() == [[True, True, False, False]]
    assert truncation_mask(z, top_p=0.8).tolist() == [[True, True, False, False]]  # drop cumsum <= 0.2
    assert truncation_mask(z, top_p=0.9).tolist() == [[True, True, True, False]]  # drop cumsum <= 0.1
    assert truncation_mask(z, top_p=0.01).tolist() == [[True, False, False, False]]  # the top token stays
    assert truncation_mask(torch.tensor([[1.0, 1.0, 0.0]]), top_k=1).tolist() == [[True, True, False]]  # ties
    assert truncation_mask(z) is None and truncation_mask(z, top_k=4) is None  # off
    # renormalised over the kept set: log(0.6439 / 0.8808) = -0.3133; excluded tokens at the floor
    lp = sampling_logprobs(z, 1.0, top_p=0.8)
    assert lp[0, 0].item() == pytest.approx(math.log(0.64391426 / (0.64391426 + 0.23688282)), abs=1e-6)
    assert lp[0, 2].item() == lp[0, 3].item() == OUT_OF_SUPPORT_LOGPROB


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, 1.0), (1.0, 0, 0.9), (0.7, 30, 0.8)])
def test_truncation_mask_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    z = logits / temperature
    warped = z.clone()
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    assert torch.equal(truncation_mask(z, top_k, top_p), warped > float("-inf"))


@pytest.mark.parametrize("top_k, top_p", [(20, 1.0), (0, 0.7), (40, 0.9)])
def test_truncated_chunked_equals_naive_values_and_grads(top_k, top_p):
    model = tiny_qwen3()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.2)  # flatter: the kept set holds some of the random targets
    _, batch = random_batch([30, 24], prompt_lengths=[3, 5])
    args = (batch.input_ids, batch.position_ids, batch.targets)
    kw = dict(temperature=0.7, top_k=top_k, top_p=top_p)
    lp, ent = token_logprobs(model, *args, chunk_tokens=7, with_entropy=True, **kw)
    lp_ref, ent_ref = naive_token_logprobs(model, *args, with_entropy=True, **kw)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-5)
    live = batch.targets != IGNORE_INDEX
    excluded = (lp == OUT_OF_SUPPORT_LOGPROB) & live
    assert 0 < int(excluded.sum()) < int(live.sum())  # random targets: some outside the kept set, some in
    full, _ = naive_token_logprobs(model, *args, temperature=0.7)
    kept = live & ~excluded
    assert (lp[kept] - full[kept]).min() > 1e-4  # renormalised: every kept token gains probability
    g = grads_of(model, (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum() + ent.sum())
    g_ref = grads_of(model, (lp_ref * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum() + ent_ref.sum())
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        assert_grads_close(a, b)


def test_no_grad_path_and_tied_embeddings():
    model = tiny_qwen3(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _, batch = random_batch([10, 10, 3])
    args = (batch.input_ids, batch.position_ids, batch.targets)
    with torch.no_grad():
        lp, _ = token_logprobs(model, *args, chunk_tokens=4)
        lp_ref, _ = naive_token_logprobs(model, *args)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-5)
    # the model's forward is restored after the call
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__


def test_all_targets_ignored_still_connects_every_parameter():
    """An empty (padding) micro-batch: zero log-probs, but a zero gradient for every parameter."""
    model = tiny_qwen3()
    batch = pack_sequences([[5]])
    lp, _ = token_logprobs(model, batch.input_ids, batch.position_ids, batch.targets)
    assert lp.tolist() == [[0.0]]
    grads = torch.autograd.grad(lp.sum(), list(model.parameters()), allow_unused=True)
    assert all(g is not None and (g == 0).all() for g in grads)


def test_gradient_checkpointing_matches():
    model = tiny_qwen3()
    _, batch = random_batch([14, 9], prompt_lengths=[3, 3])
    args = (batch.input_ids, batch.position_ids, batch.targets)
    lp_ref, _ = naive_token_logprobs(model, *args)
    g_ref = grads_of(model, lp_ref.sum())
    enable_activation_checkpointing(model)
    lp, _ = token_logprobs(model, *args, chunk_tokens=6)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-5)
    for a, b in zip(grads_of(model, lp.sum()), g_ref):
        assert_grads_close(a, b)


def test_bfloat16_model_matches_naive():
    """bf16 head output is upcast to fp32 in both paths, so values agree to fp32 rounding."""
    model = tiny_qwen3().to(torch.bfloat16)
    _, batch = random_batch([13, 8], prompt_lengths=[2, 2])
    args = (batch.input_ids, batch.position_ids, batch.targets)
    lp, ent = token_logprobs(model, *args, chunk_tokens=5, with_entropy=True)
    lp_ref, ent_ref = naive_token_logprobs(model, *args, with_entropy=True)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-4)
    # bf16 gradients: the same math, rounded to bf16 (8 bits of mantissa) at different points
    for a, b in zip(grads_of(model, lp.sum()), grads_of(model, lp_ref.sum())):
        assert_grads_close(a.float(), b.float(), tol=2e-2)


def test_bad_inputs_name_the_problem():
    model = tiny_qwen3()
    ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(R, N\)"):
        token_logprobs(model, ids, ids, ids)
    one = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, one, one, one, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(model, one, one, one, chunk_tokens=0)


@pytest.mark.distributed
def test_zero3_two_processes(tmp_path):
    """Chunked log-probs and gradients under ZeRO-3 (2 ranks, gloo, partitioned tied head)."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RESULT_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"ok_{rank}").read_text() == "ok"


def _zero3_worker() -> None:
    """Run by each rank of test_zero3_two_processes (this file is the torchrun script)."""
    import copy

    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = tiny_qwen3(tie=True)
    reference = copy.deepcopy(model)
    enable_activation_checkpointing(model)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        # persistence threshold 0: even this tiny (tied) head is partitioned and gathered by hooks
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    head = engine.module.lm_head.weight
    assert head is engine.module.model.embed_tokens.weight and head.numel() == 0 < head.ds_numel  # partitioned

    # Micro-step 1: ranks hold different token counts (33 vs 81 live targets -> 5 vs 11 chunks of 8).
    # Micro-step 2: rank 0 has an empty micro-batch (dummy token), rank 1 a real one.
    micro_batches = {
        0: [random_batch([12, 20, 8], [2, 3, 1], seed=10)[1], pack_sequences([[0]])],
        1: [random_batch([30, 25, 9, 17], [1, 1, 1, 1], seed=11)[1], random_batch([6, 7], [2, 2], seed=12)[1]],
    }
    weights = {r: [torch.linspace(-1, 1, b.num_tokens).unsqueeze(0) for b in mbs] for r, mbs in micro_batches.items()}
    for step, batch in enumerate(micro_batches[rank]):
        args = (batch.input_ids, batch.position_ids, batch.targets)
        lp, _ = token_logprobs(engine, *args, chunk_tokens=8)
        lp_ref, _ = naive_token_logprobs(reference, *args)
        torch.testing.assert_close(lp.detach(), lp_ref.detach(), rtol=0, atol=1e-5)
        engine.backward((lp * weights[rank][step]).sum())

    # Reference gradient: each micro-step's loss is scaled by 1/2 (accumulation) and averaged over 2 ranks.
    total = 0.0
    for r, mbs in micro_batches.items():
        for step, batch in enumerate(mbs):
            lp_ref, _ = naive_token_logprobs(reference, batch.input_ids, batch.position_ids, batch.targets)
            total = total + (lp_ref * weights[r][step]).sum() / 4
    reference_grads = dict(
        zip([n for n, _ in reference.named_parameters()], torch.autograd.grad(total, list(reference.parameters())))
    )
    for name, param in engine.module.named_parameters():
        full = safe_get_full_grad(param)
        assert_grads_close(full, reference_grads[name], name)
    engine.step()
    Path(os.environ["RESULT_DIR"], f"ok_{rank}").write_text("ok")
    # a clean teardown: exiting with the gloo group alive can abort ("terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _zero3_worker()
