"""The parity check's arithmetic and its abort rule (drpo_trainer/rollout/parity.py)."""

import math

import pytest

from drpo_trainer.rollout.parity import DEFAULT_THRESHOLDS, check_parity, default_threshold, parity_metrics


def test_metrics_by_hand():
    # Three probe tokens in two sequences; d = learner - engine:
    #   d1 = -1.5 - (-1.0) = -0.5,  d2 = -2.0 - (-2.0) = 0,  d3 = -0.3 - (-0.5) = 0.2
    engine = [[-1.0, -2.0], [-0.5]]
    learner = [[-1.5, -2.0], [-0.3]]
    m = parity_metrics(engine, learner)
    # mean |d| = (0.5 + 0 + 0.2) / 3 = 0.233333; max |d| = 0.5
    assert m["parity/mean_abs_logprob_diff"] == pytest.approx(0.7 / 3, abs=1e-12)
    assert m["parity/max_abs_logprob_diff"] == pytest.approx(0.5, abs=1e-12)
    # |e^-1.5 - e^-1| = |0.2231302 - 0.3678794| = 0.1447493; 0; |e^-0.3 - e^-0.5| = 0.7408182 - 0.6065307 = 0.1342876
    # mean = 0.2790369 / 3 = 0.0930123
    assert m["parity/mean_abs_prob_diff"] == pytest.approx(0.0930123, abs=1e-6)
    # k3 = (e^d - 1) - d: d=-0.5 -> 0.6065307 - 1 + 0.5 = 0.1065307; d=0 -> 0; d=0.2 -> 1.2214028 - 1.2 = 0.0214028
    # mean = 0.1279335 / 3 = 0.0426445
    assert m["parity/k3_kl"] == pytest.approx(0.0426445, abs=1e-6)
    assert m["parity/tokens"] == 3.0


def test_identical_scorings_have_zero_mismatch():
    lp = [[-0.1, -3.2, -7.0], [-0.0001]]
    m = parity_metrics(lp, [list(x) for x in lp])
    assert m["parity/mean_abs_logprob_diff"] == 0.0
    assert m["parity/max_abs_logprob_diff"] == 0.0
    assert m["parity/mean_abs_prob_diff"] == 0.0
    assert m["parity/k3_kl"] == 0.0


def test_k3_is_nonnegative_and_asymmetric():
    # (e^d - 1) - d >= 0 for every d, and differs between d and -d:
    # d = 1: e - 2 = 0.7182818;  d = -1: e^-1 = 0.3678794
    up = parity_metrics([[-2.0]], [[-1.0]])["parity/k3_kl"]
    down = parity_metrics([[-1.0]], [[-2.0]])["parity/k3_kl"]
    assert up == pytest.approx(math.e - 2, abs=1e-12)
    assert down == pytest.approx(math.exp(-1), abs=1e-12)


def test_huge_difference_stays_finite():
    # A broken sync can give |d| of hundreds; exp(d) is clamped at d = 50 so the metric stays printable.
    m = parity_metrics([[-500.0]], [[-0.1]])
    assert m["parity/k3_kl"] == pytest.approx(math.exp(50) - 1 - 50, rel=1e-12)  # d = 499.9 clamped to 50
    assert m["parity/max_abs_logprob_diff"] == pytest.approx(499.9)


@pytest.mark.parametrize(
    "engine, learner, match",
    [
        ([[-1.0]], [[-1.0], [-2.0]], "1 engine sequences but 2 learner"),
        ([[-1.0, -2.0]], [[-1.0]], "sequence 0 has 2 engine log-probs but 1"),
        ([[]], [[]], "no tokens"),
        ([[float("nan")]], [[-1.0]], "non-finite"),
    ],
)
def test_bad_inputs_are_named(engine, learner, match):
    with pytest.raises(ValueError, match=match):
        parity_metrics(engine, learner)


def test_check_parity_threshold():
    m = parity_metrics([[-1.0, -2.0], [-0.5]], [[-1.5, -2.0], [-0.3]])  # mean |d| = 0.2333
    check_parity(m, 0.25)  # below: passes
    check_parity(m, 0.7 / 3)  # equal: passes (abort only above)
    with pytest.raises(RuntimeError) as exc:
        check_parity(m, 0.2)
    msg = str(exc.value)
    assert "0.2333" in msg and "rollout.parity_max_abs_logprob_diff=0.2" in msg
    for cause in ("stale", "dtype", "temperature", "FP8"):
        assert cause in msg


def test_check_parity_rejects_bad_threshold():
    with pytest.raises(ValueError, match="must be > 0"):
        check_parity({"parity/mean_abs_logprob_diff": 0.0}, 0.0)


@pytest.mark.parametrize(
    "learner, engine, quant, expected",
    [
        ("float32", "float32", None, 1e-4),  # same precision: only kernel round-off is allowed
        ("float32", "bfloat16", None, 0.05),  # the coarser side decides
        ("bfloat16", "float32", None, 0.05),
        ("bfloat16", "bfloat16", "fp8", 0.2),  # FP8 rollout is coarser still
        ("float16", "float32", None, 0.05),
    ],
)
def test_default_threshold_follows_the_coarser_precision(learner, engine, quant, expected):
    assert default_threshold(learner, engine, quant) == expected


def test_default_thresholds_are_ordered_by_precision():
    t = DEFAULT_THRESHOLDS
    assert t["float32"] < t["bfloat16"] <= t["fp8"]
    with pytest.raises(ValueError, match="no default threshold for precision 'int4'"):
        default_threshold("float32", "float32", "int4")
