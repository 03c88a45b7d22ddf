"""The benchmark scripts' bookkeeping: FLOP accounting, the weight-copy baseline, step-time summaries.

The benchmarks themselves are scripts under benchmarks/ (not run by pytest); these tests check, on
tiny hand-sized inputs, the arithmetic their printed ratios rest on.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_learner_flops import body_matmul_params, model_flops  # noqa: E402
from benchmarks.bench_padding import learner_padding  # noqa: E402
from benchmarks.bench_vs_trl import summarize  # noqa: E402
from benchmarks.bench_weight_sync import interleaved, plain_copy  # noqa: E402
from benchmarks.common import ratio_line  # noqa: E402

TINY = dict(hidden_size=8, num_layers=1, intermediate_size=16, vocab_size=32, num_heads=2, num_kv_heads=1)


def _tiny_model(seed: int = 0):
    from benchmarks.common import build_qwen3

    return build_qwen3(seed=seed, **TINY)


def test_model_flops_by_hand():
    model = _tiny_model()
    # one layer, hidden 8, 2 heads x head_dim 4 (q 8), 1 kv head (k, v 4), intermediate 16:
    # q 8x8=64 + k 8x4=32 + v 32 + o 64 + gate 8x16=128 + up 128 + down 128 = 576 (norms are 1-D: excluded)
    assert body_matmul_params(model) == 576
    f = model_flops(model, lengths=[5, 3], prompt_lens=[2, 1])
    # tokens 5 + 3 = 8; scored (5 - 2) + (3 - 1) = 5; head 32 x 8 = 256
    # 6 * 576 * 8 + 6 * 256 * 5 = 27648 + 7680 = 35328
    assert f["tokens"] == 8 and f["scored_tokens"] == 5
    assert f["flops_6nd"] == 35328
    # attention: 6 * layers 1 * width (2 heads x 4) * (5^2 + 3^2) = 6 * 8 * 34 = 1632
    assert f["flops_attention"] == 1632


def test_plain_copy_copies_every_parameter_once_tied_included():
    src, dst = _tiny_model(seed=1), _tiny_model(seed=2)
    assert not torch.equal(src.model.embed_tokens.weight, dst.model.embed_tokens.weight)
    plain_copy(src, dst)
    for (name, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(p, q), name
    assert dst.lm_head.weight is dst.model.embed_tokens.weight  # the tie survives the copy


def test_interleaved_times_every_function_in_every_round():
    calls: list[str] = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up call each, then 3 alternating rounds
    assert [len(t) for t in times.values()] == [3, 3]


def test_summarize_drops_warmup_and_takes_medians():
    runs = [
        {
            "step_s": [9.0, 1.0, 3.0, 2.0],
            "rollout_s": [5.0, 0.5, 0.7, 0.6],
            "update_s": [1, 2, 3, 4],
            "completion_len": [30, 32],
        },
        {
            "step_s": [8.0, 4.0, 6.0, 5.0],
            "rollout_s": [5.0, 0.1, 0.2, 0.3],
            "update_s": [1, 2, 3, 4],
            "completion_len": [31],
        },
    ]
    s = summarize({"ours": runs}, warmup=1)["ours"]
    # steady steps of both runs: [1, 3, 2] + [4, 6, 5] -> median of 6 values = (3 + 4) / 2
    assert s["step_s"] == 3.5 and s["min_step_s"] == 1.0 and s["measured_steps"] == 6
    assert s["rollout_s"] == (0.3 + 0.5) / 2  # steady [0.5, 0.7, 0.6] + [0.1, 0.2, 0.3]: middle two of six
    assert s["completion_len"] == 31


def test_ratio_line_reads_the_verdict_from_the_target():
    assert ratio_line(0.25, "<= 0.5 of TRL's step time") == "ratio = 0.250 (target: <= 0.5 of TRL's step time) -> met"
    assert ratio_line(0.5, "<= 0.5").endswith("-> met")  # the bound itself meets it
    assert ratio_line(0.5001, "<= 0.5").endswith("-> NOT met")
    assert ratio_line(1.05, "<= 2.0x a plain copy").endswith("-> met") and ratio_line(2.1, "<= 2x").endswith("NOT met")
    assert ratio_line(0.523, ">= 0.5 of matmul FLOP/s").endswith("-> met")
    assert ratio_line(0.374, ">= 0.5").endswith("-> NOT met")
    assert ratio_line(1.22, "<= 0.5", False).endswith("NOT met")  # a caller's verdict that agrees is accepted
    with pytest.raises(ValueError, match="the caller said True"):
        ratio_line(1.22, "<= 0.5", True)
    with pytest.raises(ValueError, match="must start with"):
        ratio_line(1.0, "half of TRL")


def test_learner_padding_by_hand():
    # 2 ranks: rank 0 holds [6, 5], rank 1 [3, 2]; budget 10. Rank 0 needs two micro-batches ([6], [5]),
    # rank 1 one ([3, 2]) plus one padding micro-batch re-running its first sample (3 tokens).
    one_row = learner_padding([6, 5, 3, 2], 2, 10, None)
    # real 16; computed 6 + 5 | 5 + 3 -> 19
    assert one_row["fraction"] == pytest.approx(3 / 19) and one_row["row_padding"] == 0.0
    # rows of 4: rank 1's [3, 2] needs two rows (3 + 2 > 4) padded to width 3: 6 computed for 5 real
    rows = learner_padding([6, 5, 3, 2], 2, 10, 4)
    assert (rows["row_padding"], rows["padding_micro_batches"], rows["fraction"]) == pytest.approx(
        (1 / 20, 3 / 20, 4 / 20)
    )
    assert rows["steps"] == 2 and rows["imbalance"] == pytest.approx(11 / 10)  # loads 11 and 6 + 3


def test_zero_advantage_summary_times_until_the_first_eval_crossing():
    from benchmarks.bench_zero_advantage import summarize as summarize_skip

    rows = [
        {"step": 0, "eval/synthetic/avg@4": 0.1},
        {"step": 1, "time/step": 2.0, "perf/skipped_sample_fraction": 0.5},
        {"step": 2, "time/step": 4.0, "perf/skipped_sample_fraction": 0.25, "eval/synthetic/avg@4": 0.15},
        {"step": 3, "time/step": 3.0, "perf/skipped_sample_fraction": 0.0},
        {"step": 4, "time/step": 1.0, "perf/skipped_sample_fraction": 0.25, "eval/synthetic/avg@4": 0.25},
        {"step": 5, "time/step": 9.0, "perf/skipped_sample_fraction": 0.0, "eval/synthetic/avg@4": 0.3},
    ]
    s = summarize_skip(rows, target=0.2)
    assert s["reached_step"] == 4  # first eval >= 0.2, not the best one
    assert s["seconds_to_target"] == 2.0 + 4.0 + 3.0 + 1.0
    assert s["step_s"] == 3.0  # median of 2, 4, 3, 1, 9
    assert s["skipped"] == 0.2
    assert summarize_skip(rows, target=0.5)["seconds_to_target"] is None
    assert s["phases"]["update"] == 0.0  # phases a row lacks count as 0


def test_async_summary_reads_wall_time_gain_and_async_means():
    from benchmarks.bench_async import summarize as summarize_async

    rows = [
        {"step": 0, "eval/synthetic/avg@4": 0.1},
        {"step": 1, "time/step": 2.0, "async/version_lag_mean": 0.0, "async/learner_idle_fraction": 0.5},
        {"step": 2, "time/step": 1.0, "async/version_lag_mean": 1.0, "async/learner_idle_fraction": 0.1},
        {"step": 3, "time/step": 4.0, "async/version_lag_mean": 1.0, "eval/synthetic/avg@4": 0.25},
    ]
    s = summarize_async(rows, wall=30.0)
    assert (s["wall_s"], s["steps_s"], s["step_s"]) == (30.0, 7.0, 2.0)
    assert s["gain"] == pytest.approx(0.15)  # last eval minus step 0's, not the best one
    assert s["lag"] == pytest.approx(2 / 3) and s["learner_idle"] == pytest.approx(0.3)
    assert math.isnan(s["queue"])  # a synchronous run has no async/* keys


def test_moe_replay_summary_skips_steps_that_trained_nothing():
    from benchmarks.bench_moe_replay import KEYS, summarize

    full = {k: 0.5 for k in KEYS}
    rows = [
        {"step": 0, "eval/synthetic/avg@4": 0.1},
        {"step": 1, "time/step": 2.0, **full, "moe/route_agreement": 0.9, "mismatch/k3_kl": 1e-4},
        {"step": 2, "time/step": 6.0, **full, "moe/route_agreement": None, "mismatch/k3_kl": None},  # all skipped
        {"step": 3, "time/step": 4.0, **full, "moe/route_agreement": 0.7, "mismatch/k3_kl": 3e-4},
        {"step": 3, "eval/synthetic/avg@4": 0.25},
    ]
    s = summarize(rows)
    assert s["moe/route_agreement"] == pytest.approx(0.8)  # (0.9 + 0.7) / 2: the null step is left out
    assert s["mismatch/k3_kl"] == pytest.approx(2e-4)
    assert s["parity/k3_kl"] == 0.5 and s["step_s"] == 4.0 and s["final_eval"] == 0.25


def test_time_to_accuracy_reads_the_first_crossing_and_the_policy_held_at_a_time():
    from benchmarks.bench_time_to_accuracy import eval_at, time_to_target

    # a run scored at steps 5, 10, 15 and 20 (evals keyed by str(step), as in results.jsonl)
    rec = {
        "elapsed": {5: 7.0, 10: 14.5, 15: 22.0, 20: 30.0},
        "evals": {"5": 0.12, "10": 0.19, "15": 0.21, "20": 0.18},
    }
    assert time_to_target(rec) == 22.0  # the first crossing, not a later one
    assert time_to_target({**rec, "evals": {"5": 0.1, "20": 0.199}}) is None
    assert eval_at(rec, 6.9, step0=0.078) == 0.078  # before the first saved policy: the initial one
    assert eval_at(rec, 14.5, step0=0.078) == 0.19  # a policy saved at exactly that time counts
    assert eval_at(rec, 29.9, step0=0.078) == 0.21
    assert eval_at(rec, 120.0, step0=0.078) == 0.18  # after the run: its last policy
