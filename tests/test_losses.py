"""Policy losses: hand-computed values, autograd checks of the gradient weights, masks, limits."""

import math

import pytest
import torch

from drpo_trainer.algorithms.losses import (
    POLICY_LOSSES,
    binary_kl,
    compute_policy_loss,
    loss_param_defaults,
    metric_reductions,
    mismatch_metrics,
    policy_loss_names,
    register_policy_loss,
    validate_loss_params,
)

ALL_LOSSES = ["drpo", "spo", "dppo_tv", "dppo_kl", "grpo", "pg"]
LN = math.log


def _grad(name, lp, old, adv, mask, **kw):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(name, lp, old, adv, mask, **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def _two_token_batch():
    """Row 0: mu = 0.5, pi = 0.75 (r = 1.5), A = +1. Row 1: mu = 0.2, pi = 0.1 (r = 0.5), A = -2.

    Column 1 is padding holding garbage that must not matter.
    """
    lp = torch.tensor([[LN(0.75), 3.0], [LN(0.1), -7.0]], dtype=torch.float64)
    old = torch.tensor([[LN(0.5), -90.0], [LN(0.2), 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 0]])
    return lp, old, adv, mask


def _close(a, b, tol=1e-9):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=tol, atol=tol
    )


# ---------------------------------------------------------------------------------------------
# Hand-computed examples (token-mean over N = 2 tokens unless said otherwise).


def test_drpo_hand_example():
    loss, grad, met = _grad("drpo", *_two_token_batch(), delta=12.5)
    # L0 = -1 * 1.5 + |1| * 0.5 * (0.5)^2 / 25 = -1.5 + 0.005 = -1.495
    # L1 = -(-2) * 0.5 + |-2| * 0.2 * (-0.5)^2 / 25 = 1.0 + 0.004 = 1.004
    _close(loss, (-1.495 + 1.004) / 2)  # -0.2455
    # w0 = 1 - sign(1 * 0.5) * 0.25 / 12.5 = 0.98 ; grad0 = -1 * 1.5 * 0.98 / 2 = -0.735
    # w1 = 1 - sign(-2 * -0.5) * 0.1 / 12.5 = 0.992 ; grad1 = 2 * 0.5 * 0.992 / 2 = 0.496
    _close(grad, [[-0.735, 0.0], [0.496, 0.0]])
    _close(met["drpo/weight_mean"], 0.986, 1e-6)
    _close(met["drpo/weight_min"], 0.98, 1e-6)
    _close(met["drpo/weight_max"], 0.992, 1e-6)
    _close(met["drpo/negative_weight_fraction"], 0.0)
    # ratios 1.5 and 0.5; k3 = (0.5 - ln 1.5 + (-0.5) - ln 0.5) / 2 = (0.094535 + 0.193147) / 2
    _close(met["policy/ratio_mean"], 1.0, 1e-6)
    _close(met["policy/ratio_max"], 1.5, 1e-6)
    _close(met["policy/ratio_min"], 0.5, 1e-6)
    _close(met["policy/approx_kl_k3"], 0.143841, 1e-6)
    _close(met["policy/abs_pi_minus_mu_mean"], 0.175, 1e-6)  # (0.25 + 0.1) / 2
    _close(met["policy/abs_pi_minus_mu_max"], 0.25, 1e-6)


def test_drpo_small_delta_gives_negative_weight():
    loss, grad, met = _grad("drpo", *_two_token_batch(), delta=0.2)
    # w0 = 1 - 0.25 / 0.2 = -0.25 (beyond the boundary: corrective) ; grad0 = -1 * 1.5 * -0.25 / 2 = 0.1875
    # w1 = 1 - 0.1 / 0.2 = 0.5 ; grad1 = 2 * 0.5 * 0.5 / 2 = 0.25
    _close(grad, [[0.1875, 0.0], [0.25, 0.0]])
    _close(met["drpo/negative_weight_fraction"], 0.5)
    # L0 = -1.5 + 0.5 * 0.25 / 0.4 = -1.1875 ; L1 = 1.0 + 2 * 0.2 * 0.25 / 0.4 = 1.25
    _close(loss, (-1.1875 + 1.25) / 2)


def test_spo_hand_example():
    loss, grad, met = _grad("spo", *_two_token_batch(), epsilon=0.2)
    # L0 = -1.5 + 1 * 0.25 / 0.4 = -0.875 ; L1 = 1.0 + 2 * 0.25 / 0.4 = 2.25 ; mean 0.6875
    _close(loss, 0.6875)
    # w0 = 1 - 0.5 / 0.2 = -1.5 ; grad0 = -1 * 1.5 * -1.5 / 2 = 1.125
    # w1 = 1 - sign(-2 * -0.5) * 0.5 / 0.2 = -1.5 ; grad1 = 2 * 0.5 * -1.5 / 2 = -0.75
    _close(grad, [[1.125, 0.0], [-0.75, 0.0]])
    _close(met["spo/weight_min"], -1.5, 1e-6)


def test_dppo_tv_hand_example():
    loss, grad, met = _grad("dppo_tv", *_two_token_batch(), delta=0.15)
    # Row 0: A > 0 and pi - mu = 0.25 > 0.15 -> masked. Row 1: A < 0, mu - pi = 0.1 <= 0.15 -> kept.
    # L1 = -(-2) * min(0.5, 20) = 1.0 ; loss = (0 + 1.0) / 2 ; grad1 = 2 * 0.5 / 2 = 0.5
    _close(loss, 0.5)
    _close(grad, [[0.0, 0.0], [0.5, 0.0]])
    _close(met["dppo/masked_fraction"], 0.5)


def test_dppo_kl_hand_example():
    loss, grad, met = _grad("dppo_kl", *_two_token_batch(), delta=0.05)
    # D0 = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = -0.202733 + 0.346574 = 0.143841 > 0.05, A > 0, pi > mu -> masked
    # D1 = 0.2 ln(0.2/0.1) + 0.8 ln(0.8/0.9) = 0.138629 - 0.094226 = 0.044403 <= 0.05 -> kept
    _close(loss, 0.5)
    _close(grad, [[0.0, 0.0], [0.5, 0.0]])
    _close(met["dppo/masked_fraction"], 0.5)


def test_grpo_hand_example():
    lp = torch.tensor([[LN(0.75)], [LN(0.1)], [LN(0.55)], [LN(0.25)]], dtype=torch.float64)
    old = torch.tensor([[LN(0.5)], [LN(0.2)], [LN(0.5)], [LN(0.5)]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 1.0, 1.0], dtype=torch.float64)
    loss, grad, met = _grad("grpo", lp, old, adv, torch.ones(4, 1), clip_low=0.2, clip_high=0.28)
    # r = 1.5, 0.5, 1.1, 0.5
    # L0 = max(-1.5, -1.28) = -1.28 (clipped)      L1 = max(1.0, 2 * 0.8 = 1.6) = 1.6 (clipped)
    # L2 = max(-1.1, -1.1) = -1.1 (inside)         L3 = max(-0.5, -0.8) = -0.5 (A > 0 never clips below)
    _close(loss, (-1.28 + 1.6 - 1.1 - 0.5) / 4)  # -0.32
    _close(grad, [[0.0], [0.0], [-1.1 / 4], [-0.5 / 4]])
    _close(met["grpo/clip_fraction"], 0.5)


def test_pg_hand_example():
    loss, grad, _ = _grad("pg", *_two_token_batch())
    # L0 = -1.5, L1 = 2 * 0.5 = 1.0 ; grads -1.5 / 2 and 1.0 / 2
    _close(loss, -0.25)
    _close(grad, [[-0.75, 0.0], [0.5, 0.0]])


def test_seq_mean_token_mean_through_compute_policy_loss():
    lp = torch.tensor([[LN(0.5), LN(0.5), 0.0], [LN(0.2), 0.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[LN(0.25), LN(0.5), 0.0], [LN(0.4), 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, 3.0], dtype=torch.float64)
    loss, grad, _ = _grad("pg", lp, old, adv, mask, loss_agg_mode="seq-mean-token-mean")
    # row 0: r = 2, 1 -> L = -2, -1, token mean -1.5 ; row 1: r = 0.5 -> L = -1.5 ; seq mean -1.5
    _close(loss, -1.5)
    # d/dlp: row 0 tokens -A r / 2 / 2 = -0.5, -0.25 ; row 1: -3 * 0.5 / 1 / 2 = -0.75
    _close(grad, [[-0.5, -0.25, 0.0], [-0.75, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# Autograd checks of the gradient weights on random inputs.


def _random_batch(seed, B=6, T=9, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.98 + 0.01
    old = mu.log()
    lp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * spread).clamp(max=0.0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return lp, old, adv, mask


@pytest.mark.parametrize("delta", [12.5, 0.1])
def test_drpo_gradient_weight_autograd(delta):
    lp, old, adv, mask = _random_batch(1)
    _, grad, met = _grad("drpo", lp, old, adv, mask, delta=delta)
    A = adv[:, None].expand_as(lp)
    r, pi, mu = (lp - old).exp(), lp.exp(), old.exp()
    w = 1 - torch.sign(A * (r - 1)) * (pi - mu).abs() / delta
    n = mask.sum()
    _close(grad, -A * r * w * mask / n)
    if delta == 0.1:
        assert (w[mask > 0] < 0).any(), "the small-delta case must exercise negative weights"
        assert met["drpo/negative_weight_fraction"] > 0
    else:
        assert 1 - 1 / 12.5 <= w[mask > 0].min() and w[mask > 0].max() <= 1 + 1 / 12.5


@pytest.mark.parametrize("epsilon", [0.2, 5.0])
def test_spo_gradient_weight_autograd(epsilon):
    lp, old, adv, mask = _random_batch(2)
    _, grad, _ = _grad("spo", lp, old, adv, mask, epsilon=epsilon)
    A = adv[:, None].expand_as(lp)
    r = (lp - old).exp()
    w = 1 - torch.sign(A * (r - 1)) * (r - 1).abs() / epsilon
    _close(grad, -A * r * w * mask / mask.sum())


def test_grpo_gradient_matches_ppo():
    lp, old, adv, mask = _random_batch(3, spread=0.4)
    _, grad, met = _grad("grpo", lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    A = adv[:, None].expand_as(lp)
    r = (lp - old).exp()
    # PPO: the gradient vanishes where the clipped branch is the max, i.e. outside the band on A's side.
    clipped = ((A > 0) & (r > 1.28)) | ((A < 0) & (r < 0.8))
    assert clipped[mask > 0].any() and (~clipped)[mask > 0].any()
    _close(grad, -A * r * (~clipped) * mask / mask.sum())
    _close(met["grpo/clip_fraction"], clipped[mask > 0].double().mean(), 1e-6)


# mu = 0.5 for every token. Rows: (A, pi, masked by TV with delta 0.15?, masked by KL with delta 0.05?)
# Binary KL at mu = 0.5: D(0.75) = D(0.25) = 0.143841 > 0.05 ; D(0.6) = D(0.4) = 0.5 ln(0.5/0.6) + 0.5 ln(0.5/0.4)
# = -0.091161 + 0.111572 = 0.020411 <= 0.05.
DPPO_CASES = [
    (+1.0, 0.75, True, True),  # harmful (A > 0, pi up), beyond threshold -> masked
    (+1.0, 0.60, False, False),  # harmful, within threshold -> kept
    (+1.0, 0.25, False, False),  # corrective (A > 0, pi down), beyond -> kept
    (+1.0, 0.40, False, False),  # corrective, within -> kept
    (-1.0, 0.25, True, True),  # harmful (A < 0, pi down), beyond -> masked
    (-1.0, 0.40, False, False),  # harmful, within -> kept
    (-1.0, 0.75, False, False),  # corrective (A < 0, pi up), beyond -> kept
    (-1.0, 0.60, False, False),  # corrective, within -> kept
]


@pytest.mark.parametrize("name,delta,col", [("dppo_tv", 0.15, 2), ("dppo_kl", 0.05, 3)])
def test_dppo_masks_all_direction_threshold_cases(name, delta, col):
    adv = torch.tensor([c[0] for c in DPPO_CASES], dtype=torch.float64)
    pi = torch.tensor([[c[1]] for c in DPPO_CASES], dtype=torch.float64)
    masked = torch.tensor([[c[col]] for c in DPPO_CASES])
    old = torch.full_like(pi, LN(0.5))
    _, grad, met = _grad(name, pi.log(), old, adv, torch.ones_like(pi), delta=delta)
    r = pi / 0.5
    _close(grad, -adv[:, None] * r * (~masked) / len(DPPO_CASES))
    _close(met["dppo/masked_fraction"], 2 / 8)


def test_binary_kl_is_stricter_than_tv_for_rare_tokens():
    # mu = 0.01 -> pi = 0.1, A > 0: |pi - mu| = 0.09 <= 0.15 (TV keeps) but
    # D = 0.01 ln(0.01/0.1) + 0.99 ln(0.99/0.9) = -0.023026 + 0.094357 = 0.071331 > 0.05 (KL masks).
    lp, old = torch.tensor([[LN(0.1)]], dtype=torch.float64), torch.tensor([[LN(0.01)]], dtype=torch.float64)
    _close(binary_kl(old, lp).squeeze(), 0.071331, 1e-6)
    adv, mask = torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1)
    _, g_tv, _ = _grad("dppo_tv", lp, old, adv, mask)
    _, g_kl, _ = _grad("dppo_kl", lp, old, adv, mask)
    _close(g_tv, [[-10.0]])  # -A r = -1 * 10
    _close(g_kl, [[0.0]])


def test_dppo_truncation_cap():
    # Corrective move (A < 0, pi up), r = 0.6 / 0.2 = 3 > C = 2: gradient -A min(r, C) = 2 * 2 = 4.
    lp, old = torch.tensor([[LN(0.6)]], dtype=torch.float64), torch.tensor([[LN(0.2)]], dtype=torch.float64)
    loss, grad, met = _grad("dppo_tv", lp, old, torch.tensor([-2.0], dtype=torch.float64), torch.ones(1, 1), clip_c=2.0)
    _close(grad, [[4.0]])
    _close(loss, 4.0)  # value -A M min(r, C)
    _close(met["dppo/truncated_fraction"], 1.0)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_on_policy_every_loss_is_the_policy_gradient(name):
    lp, _, adv, mask = _random_batch(4)
    loss, grad, _ = _grad(name, lp, lp.clone(), adv, mask)
    A = adv[:, None].expand_as(lp)
    # r = 1, w = 1, nothing masked or clipped: grad = -A / N, loss = -sum(A m) / N
    _close(grad, -A * mask / mask.sum())
    _close(loss, -(A * mask).sum() / mask.sum())


# ---------------------------------------------------------------------------------------------
# Numerical limits.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_extreme_gaps_and_bf16_stay_finite(name, dtype):
    # log-prob gaps of +50 (pi = 1, mu = e^-50) and -50 (pi = e^-50, mu = 1), both advantage signs.
    lp = torch.tensor([[0.0, -50.0], [0.0, -50.0]], dtype=dtype)
    old = torch.tensor([[-50.0, 0.0], [-50.0, 0.0]], dtype=dtype)
    adv = torch.tensor([1.0, -1.0], dtype=dtype)
    lp.requires_grad_(True)
    loss, metrics = compute_policy_loss(name, lp, old, adv, torch.ones(2, 2))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert lp.grad.dtype == dtype and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values()), metrics


def test_bf16_matches_float32_on_ordinary_inputs():
    lp, old, adv, mask = _random_batch(5)
    lp, old, adv = lp.to(torch.bfloat16), old.to(torch.bfloat16), adv.to(torch.bfloat16)
    loss16, g16, _ = _grad("drpo", lp, old, adv, mask)
    loss32, g32, _ = _grad("drpo", lp.float(), old.float(), adv.float(), mask)
    # Same inputs after rounding to bf16; the math runs in float32 in both, only the grad is rounded.
    torch.testing.assert_close(loss16, loss32)
    torch.testing.assert_close(g16.float(), g32, rtol=1e-2, atol=1e-4)


def test_empty_mask_gives_zero_not_nan():
    lp, old, adv, _ = _random_batch(6)
    loss, grad, met = _grad("drpo", lp, old, adv, torch.zeros_like(lp), loss_agg_mode="seq-mean-token-mean")
    assert loss.item() == 0.0 and (grad == 0).all()
    assert met["policy/ratio_mean"].item() == 0.0 and met["policy/ratio_max"].item() == float("-inf")


# ---------------------------------------------------------------------------------------------
# Mismatch correction and metrics.


def _mismatch_batch():
    # r = 1 everywhere (lp == old), A = 1: pg's per-token loss is -1.
    # rho = exp(old - rollout) = 3 for token 0, 0.5 for token 1.
    old = torch.tensor([[LN(0.3), LN(0.1)]], dtype=torch.float64)
    rollout = torch.tensor([[LN(0.1), LN(0.2)]], dtype=torch.float64)
    return old.clone(), old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2), rollout


def test_tis_caps_the_weight():
    lp, old, adv, mask, rollout = _mismatch_batch()
    loss, grad, met = _grad("pg", lp, old, adv, mask, rollout_logprobs=rollout, mismatch_correction="tis", tis_cap=2.0)
    # weights min(3, 2) = 2 and 0.5: loss = (-2 - 0.5) / 2 = -1.25 ; grads -2 / 2, -0.5 / 2
    _close(loss, -1.25)
    _close(grad, [[-1.0, -0.25]])
    _close(met["mismatch/tis_weight_mean"], 1.25)


def test_mis_masks_outside_band_and_keeps_counts():
    lp, old, adv, mask, rollout = _mismatch_batch()
    loss, grad, met = _grad(
        "pg", lp, old, adv, mask, rollout_logprobs=rollout, mismatch_correction="mis", mis_lower=0.5, mis_upper=2.0
    )
    # rho = 3 is outside [0.5, 2] -> weight 0 ; rho = 0.5 is on the band's edge -> kept ; N stays 2
    _close(loss, -0.5)
    _close(grad, [[0.0, -0.5]])
    _close(met["mismatch/mis_masked_fraction"], 0.5)


def test_correction_is_off_by_default():
    lp, old, adv, mask, rollout = _mismatch_batch()
    loss, _, met = _grad("pg", lp, old, adv, mask, rollout_logprobs=rollout)
    _close(loss, -1.0)
    assert not any(k.startswith("mismatch/") for k in met)


def test_mismatch_metrics_hand_example():
    old = torch.tensor([[LN(0.5), LN(0.2), 0.0]])
    rollout = torch.tensor([[LN(0.25), LN(0.2), -30.0]])
    met = mismatch_metrics(old, rollout, torch.tensor([[1, 1, 0]]))
    # |0.25 - 0.5| = 0.25, |0.2 - 0.2| = 0 ; rho = 2 -> k3 = 1 - ln 2 = 0.306853, rho = 1 -> 0
    _close(met["mismatch/abs_prob_diff_mean"], 0.125, 1e-6)
    _close(met["mismatch/abs_prob_diff_max"], 0.25, 1e-6)
    _close(met["mismatch/k3_kl"], 0.306853 / 2, 1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_metrics_are_detached_scalars_with_the_expected_keys(name):
    lp, old, adv, mask = _random_batch(7)
    lp.requires_grad_(True)
    _, met = compute_policy_loss(name, lp, old, adv, mask, rollout_logprobs=old, mismatch_correction="tis")
    expected = {
        "policy/ratio_mean",
        "policy/ratio_max",
        "policy/ratio_min",
        "policy/approx_kl_k3",
        "policy/abs_pi_minus_mu_mean",
        "policy/abs_pi_minus_mu_max",
        "mismatch/tis_weight_mean",
    }
    expected |= {
        "drpo": {"drpo/weight_mean", "drpo/weight_min", "drpo/weight_max", "drpo/negative_weight_fraction"},
        "dppo_tv": {"dppo/masked_fraction"},
        "dppo_kl": {"dppo/masked_fraction"},
        "grpo": {"grpo/clip_fraction"},
    }.get(name, set())
    assert expected <= set(met)
    for key, value in met.items():
        assert value.dim() == 0 and not value.requires_grad and value.dtype == torch.float32, key
    assert met["policy/ratio_min"] <= met["policy/ratio_mean"] <= met["policy/ratio_max"]


# ---------------------------------------------------------------------------------------------
# Registry and validation.


def test_registry_lists_every_loss_with_its_defaults():
    assert set(ALL_LOSSES) <= set(policy_loss_names()) and set(policy_loss_names()) == set(POLICY_LOSSES)
    assert loss_param_defaults("drpo") == {"delta": 12.5}
    assert loss_param_defaults("dppo_tv") == {"delta": 0.15, "clip_c": 20.0}
    assert loss_param_defaults("dppo_kl") == {"delta": 0.05, "clip_c": 20.0}
    assert loss_param_defaults("grpo") == {"clip_low": 0.2, "clip_high": 0.28}
    assert set(loss_param_defaults("spo")) == {"epsilon"} and loss_param_defaults("pg") == {}


def test_unknown_loss_lists_the_valid_ones():
    lp, old, adv, mask = _random_batch(8)
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'.*dppo_kl, dppo_tv, drpo, grpo, pg, spo"):
        compute_policy_loss("ppo", lp, old, adv, mask)


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"eps .*'grpo'.*clip_low \(default 0.2\), clip_high \(default 0.28\)"):
        validate_loss_params("grpo", {"eps": 0.2})
    lp, old, adv, mask = _random_batch(8)
    with pytest.raises(ValueError, match="clip_low"):
        compute_policy_loss("drpo", lp, old, adv, mask, clip_low=0.1)


@pytest.mark.parametrize(
    "name,params",
    [
        ("drpo", {"delta": 0.0}),
        ("spo", {"epsilon": -1.0}),
        ("grpo", {"clip_low": 1.0}),
        ("dppo_tv", {"clip_c": float("nan")}),
    ],
)
def test_out_of_range_parameters_are_rejected(name, params):
    with pytest.raises(ValueError, match=list(params)[0]):
        validate_loss_params(name, params)


def test_validate_fills_defaults():
    assert validate_loss_params("dppo_tv", {"delta": 0.6}) == {"delta": 0.6, "clip_c": 20.0}


def test_bad_shapes_and_options_name_the_problem():
    lp, old, adv, mask = _random_batch(9)
    with pytest.raises(ValueError, match=r"advantages must be \(B,\)"):
        compute_policy_loss("drpo", lp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="needs rollout_logprobs"):
        compute_policy_loss("drpo", lp, old, adv, mask, mismatch_correction="tis")
    with pytest.raises(ValueError, match="unknown mismatch_correction 'icepop'"):
        compute_policy_loss("drpo", lp, old, adv, mask, rollout_logprobs=old, mismatch_correction="icepop")
    with pytest.raises(ValueError, match="horizon"):
        compute_policy_loss("drpo", lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum-norm")


def test_register_a_new_loss():
    @register_policy_loss("_test_scaled_pg")
    def scaled(logprobs, old_logprobs, advantages, mask, *, scale: float = 2.0):
        return -scale * advantages * torch.exp(logprobs - old_logprobs), {}

    try:
        lp, old, adv, mask = _random_batch(10)
        a, _ = compute_policy_loss("_test_scaled_pg", lp, old, adv, mask, scale=3.0)
        b, _ = compute_policy_loss("pg", lp, old, adv, mask)
        _close(a, 3 * b)
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("pg")(scaled)
    finally:
        POLICY_LOSSES.pop("_test_scaled_pg")


def test_core_modules_import_only_torch_and_the_standard_library():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import drpo_trainer.algorithms.losses, drpo_trainer.algorithms.advantages\n"
        "import drpo_trainer.algorithms.aggregation\n"
        "heavy = [m for m in ('transformers', 'deepspeed', 'vllm', 'pydantic', 'yaml', 'wandb', 'datasets')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout}"


def test_each_bad_shape_alone_is_refused_with_all_three_shapes():
    lp, old, adv, mask = _random_batch(11, B=2, T=3)
    head = "logprobs, old_logprobs and mask must all be (B, T); got "
    for args, shapes in [
        ((lp[None], old[None], adv, mask[None]), "(1, 2, 3), (1, 2, 3), (1, 2, 3)"),  # 3-D only
        ((lp, old[:, :2], adv, mask), "(2, 3), (2, 2), (2, 3)"),  # old_logprobs only
        ((lp, old, adv, mask[:, :2]), "(2, 3), (2, 3), (2, 2)"),  # mask only
    ]:
        with pytest.raises(ValueError) as err:
            compute_policy_loss("drpo", *args)
        assert str(err.value) == head + shapes


def test_mismatch_correction_errors_and_bounds():
    lp, old, adv, mask = _random_batch(12, B=2, T=3)
    for rollout, got in [(None, "None"), (old[:, :2], "(2, 2)")]:
        with pytest.raises(ValueError) as err:
            compute_policy_loss("drpo", lp, old, adv, mask, rollout_logprobs=rollout, mismatch_correction="mis")
        assert str(err.value) == (
            f"mismatch_correction='mis' needs rollout_logprobs of shape (2, 3) (got {got}); "
            "pass the engine's log-probs or set mismatch_correction=None"
        )
    kw = dict(rollout_logprobs=old, mismatch_correction="mis")
    for bad in [dict(tis_cap=0.0), dict(mis_lower=1.0, mis_upper=1.0), dict(mis_lower=-0.1)]:  # each alone
        with pytest.raises(ValueError, match=r"need 0 <= mis_lower < mis_upper and tis_cap > 0; got") as err:
            compute_policy_loss("drpo", lp, old, adv, mask, **kw, **bad)
        assert str(err.value).endswith(f"tis_cap={bad.get('tis_cap', 2.0)}")
    # The bounds themselves are valid: mis_lower = 0, tis_cap below 1.
    compute_policy_loss("drpo", lp, old, adv, mask, **kw, mis_lower=0.0, tis_cap=0.5)


def test_mis_band_is_closed_at_both_ends():
    # rollout == old: rho = 1 exactly, on the band's edge either way: kept, not masked.
    lp, old, adv, mask = _random_batch(13, B=2, T=3)
    for lower, upper in [(1.0, 2.0), (0.5, 1.0)]:
        _, metrics = compute_policy_loss(
            "pg", lp, old, adv, mask, rollout_logprobs=old, mismatch_correction="mis", mis_lower=lower, mis_upper=upper
        )
        assert metrics["mismatch/mis_masked_fraction"].item() == 0.0


def test_mismatch_metrics_refuses_a_mask_of_another_shape():
    old = torch.zeros(2, 3)
    with pytest.raises(ValueError) as err:
        mismatch_metrics(old, old, torch.ones(2, 2))
    assert str(err.value) == "old_logprobs, rollout_logprobs and mask must share a shape; got (2, 3), (2, 3), (2, 2)"


def test_dppo_zero_advantage_and_ratio_at_the_cap_are_not_counted():
    # Token 0: A = 0 with a large move (|pi - mu| = 0.5 > delta): nothing pushes, so it is not masked.
    # Token 1: r = C exactly: min(r, C) = r, so it is not truncated.
    old = torch.tensor([[LN(0.1), LN(0.01)]], dtype=torch.float64)
    lp = torch.tensor([[LN(0.6), LN(0.01) + LN(20.0)]], dtype=torch.float64)
    adv = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    for name in ["dppo_tv", "dppo_kl"]:
        _, metrics = compute_policy_loss(name, lp, old, adv, mask, clip_c=20.0)
        assert metrics["dppo/masked_fraction"].item() == 0.0
        assert metrics["dppo/truncated_fraction"].item() == 0.0


def test_a_new_loss_reports_the_ratio_extrema_and_its_own():
    @register_policy_loss("_test_extrema", extrema={"x/max": "max"})
    def with_extrema(logprobs, old_logprobs, advantages, mask):
        return -advantages * torch.exp(logprobs - old_logprobs), {}

    try:
        assert metric_reductions("_test_extrema") == {
            "policy/ratio_max": "max",
            "policy/ratio_min": "min",
            "policy/abs_pi_minus_mu_max": "max",
            "x/max": "max",
        }
    finally:
        POLICY_LOSSES.pop("_test_extrema")


def test_parameter_errors_name_every_unknown_and_refuse_non_numbers():
    lp, old, adv, mask = _random_batch(14, B=2, T=3)
    with pytest.raises(ValueError) as err:
        compute_policy_loss("pg", lp, old, adv, mask, foo=1.0, bar=2.0)
    assert str(err.value) == (
        "unknown parameter(s) bar, foo for policy loss 'pg'; valid: none. Fix: set only these in algorithm.loss_params"
    )
    for value in (True, "12.5"):  # a bool is not a number here, nor a string
        with pytest.raises(ValueError, match=r"policy loss 'drpo': delta="):
            validate_loss_params("drpo", {"delta": value})
    with pytest.raises(ValueError) as err:
        compute_policy_loss("drpo", lp, old, adv[:1], mask)
    assert str(err.value) == "advantages must be (B,) = (2,) or (B, T) = (2, 3); got (1,)"


def test_mismatch_correction_defaults():
    # rho = exp(old - rollout) = 0.4, 1.0 and 2.5 on three tokens. Defaults: tis_cap 2, band [0.5, 2].
    old = torch.zeros(1, 3, dtype=torch.float64)
    rollout = -torch.tensor([[0.4, 1.0, 2.5]], dtype=torch.float64).log()
    adv, mask = torch.ones(1, dtype=torch.float64), torch.ones(1, 3)
    _, tis = compute_policy_loss("pg", old, old, adv, mask, rollout_logprobs=rollout, mismatch_correction="tis")
    assert tis["mismatch/tis_weight_mean"].item() == pytest.approx((0.4 + 1.0 + 2.0) / 3)
    _, mis = compute_policy_loss("pg", old, old, adv, mask, rollout_logprobs=rollout, mismatch_correction="mis")
    assert mis["mismatch/mis_masked_fraction"].item() == pytest.approx(2 / 3)  # 0.4 and 2.5 are outside
