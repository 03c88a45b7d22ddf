"""Properties checked on random inputs (hypothesis): what must hold for every batch, not one example.

- Every policy loss, under every aggregation mode, ignores padding (extra columns and all-padding
  rows, whatever they hold) and the order of the samples: same loss, same metrics, same gradient
  per sample.
- Packing then unpacking is the identity: each sequence, its positions and its targets come back.
- The truncation mask equals a brute-force reading of its definition: top-k keeps the logits
  >= the k-th largest (exactly k without a tie there); top-p keeps the shortest prefix of the
  tokens sorted by probability whose probability sums to at least top_p.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drpo_trainer.algorithms.aggregation import AGG_MODES, aggregate_loss
from drpo_trainer.algorithms.losses import compute_policy_loss, policy_loss_names
from drpo_trainer.learner.logprobs import truncation_mask
from drpo_trainer.learner.packing import IGNORE_INDEX, pack_sequences, pad_rows

# Small example counts and no deadline: each test stays well under a few seconds on 2 shared cores.
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HORIZON = 9  # fixed for seq-mean-token-sum-norm: it must not depend on how wide the batch is padded


# ---------------------------------------------------------------------------------------------
# Losses and aggregation: padding and sample order.

# Every registered loss under every mode, checked on each drawn batch (one draw serves all 24).
LOSSES_AND_MODES = [(name, mode) for name in policy_loss_names() for mode in AGG_MODES]


@st.composite
def loss_batches(draw):
    """A (B, T) float64 batch: log-probs, behaviour log-probs, (B,) advantages and a 0/1 mask."""
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 5))
    logp = st.floats(-6.0, -0.01)
    lp = torch.tensor(draw(st.lists(logp, min_size=b * t, max_size=b * t)), dtype=torch.float64).view(b, t)
    old = torch.tensor(draw(st.lists(logp, min_size=b * t, max_size=b * t)), dtype=torch.float64).view(b, t)
    adv = torch.tensor(draw(st.lists(st.floats(-3.0, 3.0), min_size=b, max_size=b)), dtype=torch.float64)
    mask = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=b * t, max_size=b * t))).view(b, t)
    return lp, old, adv, mask


def _loss_and_grad(name, mode, lp, old, adv, mask):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(name, lp, old, adv, mask, loss_agg_mode=mode, horizon=HORIZON)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def _assert_metrics_equal(a: dict, b: dict, where: str):
    assert a.keys() == b.keys(), where
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{where}: {key}")


@FAST
@given(batch=loss_batches(), pad_cols=st.integers(1, 3), pad_rows_=st.integers(0, 2), data=st.data())
def test_loss_ignores_padding_columns_and_rows(batch, pad_cols, pad_rows_, data):
    lp, old, adv, mask = batch
    b, t = lp.shape
    # Padding holds garbage: log-probs far off (even +inf / NaN in `logprobs`), behaviour log-probs far
    # off but finite, any advantage. None of it may reach the loss, the metrics or the gradient.
    junk_lp = st.one_of(st.floats(-80.0, 80.0), st.sampled_from([math.inf, -math.inf, math.nan]))
    junk_old = st.floats(-80.0, 0.0)
    rows, cols = b + pad_rows_, t + pad_cols
    lp_p = torch.tensor(data.draw(st.lists(junk_lp, min_size=rows * cols, max_size=rows * cols)), dtype=torch.float64)
    lp_p = lp_p.view(rows, cols)
    old_p = torch.tensor(data.draw(st.lists(junk_old, min_size=rows * cols, max_size=rows * cols))).view(rows, cols)
    adv_p = torch.tensor(data.draw(st.lists(st.floats(-5.0, 5.0), min_size=rows, max_size=rows)), dtype=torch.float64)
    lp_p, old_p = lp_p.double(), old_p.double()
    lp_p[:b, :t], old_p[:b, :t], adv_p[:b] = lp, old, adv
    mask_p = torch.zeros(rows, cols, dtype=mask.dtype)
    mask_p[:b, :t] = mask

    for name, mode in LOSSES_AND_MODES:
        loss, grad, metrics = _loss_and_grad(name, mode, lp, old, adv, mask)
        loss_p, grad_p, metrics_p = _loss_and_grad(name, mode, lp_p, old_p, adv_p, mask_p)
        where = f"{name}, {mode}"
        torch.testing.assert_close(loss_p, loss, rtol=1e-9, atol=1e-12, msg=where)
        torch.testing.assert_close(grad_p[:b, :t], grad, rtol=1e-9, atol=1e-12, msg=where)
        assert torch.equal(grad_p[mask_p == 0], torch.zeros_like(grad_p[mask_p == 0])), where  # exactly 0
        _assert_metrics_equal(metrics_p, metrics, where)


@FAST
@given(batch=loss_batches(), data=st.data())
def test_loss_ignores_sample_order(batch, data):
    lp, old, adv, mask = batch
    perm = torch.tensor(data.draw(st.permutations(range(lp.shape[0]))))
    for name, mode in LOSSES_AND_MODES:
        loss, grad, metrics = _loss_and_grad(name, mode, lp, old, adv, mask)
        loss_s, grad_s, metrics_s = _loss_and_grad(name, mode, lp[perm], old[perm], adv[perm], mask[perm])
        where = f"{name}, {mode}"
        torch.testing.assert_close(loss_s, loss, rtol=1e-9, atol=1e-12, msg=where)
        torch.testing.assert_close(grad_s, grad[perm], rtol=1e-9, atol=1e-12, msg=where)  # per sample
        _assert_metrics_equal(metrics_s, metrics, where)


@pytest.mark.parametrize("mode", AGG_MODES)
@FAST
@given(batch=loss_batches(), pad_cols=st.integers(1, 3), data=st.data())
def test_aggregation_ignores_padding_and_order(mode, batch, pad_cols, data):
    loss_mat, _, _, mask = batch
    b, t = loss_mat.shape
    # The brute-force value of each mode, from its definition (aggregation.aggregate_loss docstring).
    rows = [[loss_mat[i, j].item() for j in range(t) if mask[i, j]] for i in range(b)]
    rows = [r for r in rows if r]
    per_seq = {
        "token-mean": None,
        "seq-mean-token-sum": [sum(r) for r in rows],
        "seq-mean-token-sum-norm": [sum(r) / HORIZON for r in rows],
        "seq-mean-token-mean": [sum(r) / len(r) for r in rows],
    }[mode]
    if mode == "token-mean":
        expected = sum(map(sum, rows)) / max(1, sum(map(len, rows)))
    else:
        expected = sum(per_seq) / max(1, len(rows))

    padded = torch.full((b, t + pad_cols), math.nan, dtype=torch.float64)  # NaN padding must not leak
    padded[:, :t] = loss_mat
    padded_mask = torch.zeros(b, t + pad_cols, dtype=mask.dtype)
    padded_mask[:, :t] = mask
    perm = torch.tensor(data.draw(st.permutations(range(b))))
    for lm, m in [(loss_mat, mask), (padded, padded_mask), (padded[perm], padded_mask[perm])]:
        assert aggregate_loss(lm, m, mode, horizon=HORIZON).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Packing: pack then unpack is the identity.

sequences = st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=9), min_size=1, max_size=6)


@FAST
@given(
    seqs=sequences,
    row_tokens=st.one_of(st.none(), st.integers(0, 25)),
    with_prompts=st.booleans(),
    data=st.data(),
)
def test_pack_then_unpack_is_the_identity(seqs, row_tokens, with_prompts, data):
    prompts = None
    if with_prompts:  # any prompt length, even 0 or past the end: clipped to the sequence
        prompts = [data.draw(st.integers(0, len(s) + 1)) for s in seqs]
    p = pack_sequences(seqs, prompt_lengths=prompts, row_tokens=row_tokens)

    assert [x.tolist() for x in p.split(p.input_ids)] == seqs
    assert [x.tolist() for x in p.split(p.position_ids)] == [list(range(len(s))) for s in seqs]
    # Targets: the next token of the same sequence, from the last prompt token on (every token without
    # prompts); nothing else in the packed rows is a target.
    first = [0 if prompts is None else max(min(q, len(s)) - 1, 0) for q, s in zip(prompts or seqs, seqs)]
    assert [x.tolist() for x in p.split_targets(p.targets)] == [s[f + 1 :] for s, f in zip(seqs, first)]
    assert int((p.targets != IGNORE_INDEX).sum()) == sum(len(s) - 1 - f for s, f in zip(seqs, first))
    # A per-position value computed on the packed rows comes back per sequence, in order.
    values = torch.arange(p.num_tokens, dtype=torch.float64).view_as(p.input_ids) * 0.5
    starts = [sl.start for sl in p.seq_slices]
    assert starts == sorted(starts)
    for sl, v in zip(p.seq_slices, p.split(values)):
        assert v.tolist() == [0.5 * j for j in range(sl.start, sl.stop)]

    rows, width = p.input_ids.shape
    longest = max(map(len, seqs))
    if row_tokens is None:
        assert rows == 1 and width == sum(map(len, seqs))
    else:
        assert longest <= width <= max(row_tokens, longest)
    # cu_seqlens: each sequence is one segment; the rest of each row is padding positions only.
    bounds = p.cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == p.num_tokens and bounds == sorted(set(bounds))
    for sl in p.seq_slices:
        assert sl.start in bounds and sl.stop in bounds and sl.start // width == (sl.stop - 1) // width
    used = [0] * rows
    for sl in p.seq_slices:
        used[sl.start // width] += sl.stop - sl.start
    assert all(used)  # no empty row
    assert len(bounds) - 1 == len(seqs) + sum(u < width for u in used)  # one pad segment per short row
    pad = [j for r in range(rows) for j in range(r * width + used[r], (r + 1) * width)]
    assert p.targets.view(-1)[pad].eq(IGNORE_INDEX).all()


@FAST
@given(
    lengths=st.lists(st.integers(0, 7), max_size=5),
    extra=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.long]),
)
def test_pad_rows_then_unpad_is_the_identity(lengths, extra, dtype):
    rows = [torch.arange(1, n + 1).to(dtype) * (i + 1) for i, n in enumerate(lengths)]
    width = max([1, *lengths]) + extra
    values, mask = pad_rows(rows, width=width)
    assert values.shape == mask.shape == (max(1, len(rows)), width)
    assert values.dtype == (dtype if rows else torch.float32)
    assert [values[i][mask[i] > 0].tolist() for i in range(len(rows))] == [r.tolist() for r in rows]
    assert mask.sum(dim=1).tolist() == [float(n) for n in lengths] or (not rows and mask.sum() == 0)
    assert torch.equal(values[mask == 0], torch.zeros_like(values[mask == 0]))  # zero-filled
    # Masks are prefixes: row i is 1 on its first n_i positions only.
    assert all(mask[i, : lengths[i]].all() and not mask[i, lengths[i] :].any() for i in range(len(rows)))


# ---------------------------------------------------------------------------------------------
# Truncation: the mask against brute force.

# Half-integers give many exact ties; free floats give none. Both are needed.
logit = st.one_of(st.integers(-8, 8).map(lambda x: x / 2.0), st.floats(-6.0, 6.0))
logit_rows = st.integers(2, 12).flatmap(
    lambda v: st.lists(st.lists(logit, min_size=v, max_size=v), min_size=1, max_size=3)
)  # 1-3 rows of a 2-12 token vocabulary


def _top_k_brute(z: list[float], k: int) -> list[bool]:
    kth = sorted(z, reverse=True)[k - 1]
    return [x >= kth for x in z]


def _top_p_count(probs: list[float], top_p: float) -> int:
    """Length of the shortest prefix of the probabilities sorted descending whose sum is >= top_p."""
    total = 0.0
    for n, q in enumerate(sorted(probs, reverse=True), start=1):
        total += q
        if total >= top_p:
            return n
    return len(probs)


def _softmax(z: list[float], keep: list[bool]) -> list[float]:
    top = max(x for x, k in zip(z, keep) if k)
    e = [math.exp(x - top) if k else 0.0 for x, k in zip(z, keep)]
    return [x / sum(e) for x in e]


@settings(max_examples=150, deadline=None)
@given(rows=logit_rows, data=st.data())
def test_top_k_keeps_the_k_largest_and_their_ties(rows, data):
    vocab = len(rows[0])
    k = data.draw(st.integers(1, vocab - 1))
    logits = torch.tensor(rows)  # float32: the brute force reads the same rounded values
    keep = truncation_mask(logits, top_k=k)
    for z, kept in zip(logits.tolist(), keep.tolist()):
        assert kept == _top_k_brute(z, k)
        ordered = sorted(z, reverse=True)
        if ordered[k - 1] > ordered[k]:  # no tie at the k-th value: exactly k
            assert sum(kept) == k
        else:  # ties with the k-th value are all kept (vLLM's and transformers' rule)
            assert sum(kept) == sum(x >= ordered[k - 1] for x in z) > k


@settings(max_examples=150, deadline=None)
@given(rows=logit_rows, top_p=st.floats(0.01, 0.99), data=st.data())
def test_top_p_keeps_the_smallest_set_reaching_top_p(rows, top_p, data):
    vocab = len(rows[0])
    k = data.draw(st.sampled_from([0, *range(1, vocab)]))  # top-p alone, or after top-k
    logits = torch.tensor(rows)
    keep = truncation_mask(logits, top_k=k, top_p=top_p)
    for z, kept in zip(logits.tolist(), keep.tolist()):
        base = _top_k_brute(z, k) if k else [True] * vocab
        probs = _softmax(z, base)  # top-p works on the top-k distribution, renormalised
        # The code sums in float32: skip inputs where a prefix sum is within rounding of the threshold.
        prefix = [sum(sorted(probs, reverse=True)[:n]) for n in range(1, vocab + 1)]
        assume(all(abs(s - top_p) > 1e-5 for s in prefix))
        n = _top_p_count(probs, top_p)
        assert sum(kept) == n
        assert all(b for b, k_ in zip(base, kept) if k_)  # never a token top-k dropped
        # The kept tokens are the most probable ones: with tied probabilities, which of the tied
        # tokens fills the last place is the sort's choice, so only the probabilities are compared.
        kept_p = sorted((q for q, k_ in zip(probs, kept) if k_), reverse=True)
        assert kept_p == pytest.approx(sorted(probs, reverse=True)[:n], rel=1e-9, abs=1e-12)
        assert any(k_ for x, k_ in zip(z, kept) if x == max(z))  # a most likely token always stays


@given(rows=logit_rows)
@settings(max_examples=20, deadline=None)
def test_truncation_off_returns_none(rows):
    z = torch.tensor(rows)
    assert truncation_mask(z) is None
    assert truncation_mask(z, top_k=z.shape[-1], top_p=1.0) is None  # k = vocab keeps everything
