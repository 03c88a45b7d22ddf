"""Group-relative advantages: hand-computed groups, std normalisation, zero-variance groups."""

import pytest
import torch

from drpo_trainer.algorithms.advantages import group_advantages

# Three prompts x G = 4: group 0 mixed, group 1 all correct (zero variance), group 2 one correct of four.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])


def test_mean_centred_only():
    adv, stats = group_advantages(REWARDS, 4)
    # group 0: mean 0.5 -> +-0.5 ; group 1: mean 1 -> 0 ; group 2: mean 0.25 -> -0.25 x3, 0.75
    expected = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert stats["advantage/zero_variance_group_fraction"].item() == pytest.approx(1 / 3)
    assert stats["advantage/reward_mean"].item() == pytest.approx(7 / 12)
    # abs mean = (4 * 0.5 + 3 * 0.25 + 0.75) / 12 = 3.5 / 12
    assert stats["advantage/abs_mean"].item() == pytest.approx(3.5 / 12)
    assert stats["advantage/value_max"].item() == pytest.approx(0.75)
    assert stats["advantage/value_min"].item() == pytest.approx(-0.5)


def test_std_normalised():
    adv, stats = group_advantages(REWARDS, 4, normalize_by_std=True)
    # group 0: squared deviations 4 x 0.25 = 1, / (G - 1) = 1/3, std = 0.577350 -> A = +-0.5 / 0.577350 = +-0.866025
    # group 2: 3 x 0.0625 + 0.5625 = 0.75, / 3 = 0.25, std = 0.5 -> A = -0.5 x3, 1.5
    # group 1: zero variance -> 0 (not 0 / 1e-6 noise)
    s = 0.866025
    expected = [s, -s, -s, s, 0, 0, 0, 0, -0.5, -0.5, -0.5, 1.5]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # mean of group stds (0.577350 + 0 + 0.5) / 3
    assert stats["advantage/reward_group_std_mean"].item() == pytest.approx(0.359117, abs=1e-6)


def test_groups_sum_to_zero_for_any_rewards():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=g)
    for normalize in (False, True):
        adv, _ = group_advantages(rewards, 8, normalize_by_std=normalize)
        torch.testing.assert_close(adv.view(5, 8).sum(dim=1), torch.zeros(5), atol=1e-5, rtol=0)


def test_group_of_one_and_all_equal():
    adv, stats = group_advantages(torch.tensor([1.0, 0.0, 1.0]), 1, normalize_by_std=True)
    assert adv.tolist() == [0.0, 0.0, 0.0]
    assert stats["advantage/zero_variance_group_fraction"].item() == 1.0
    adv, stats = group_advantages(torch.full((6,), 0.3), 3, normalize_by_std=True)
    assert adv.tolist() == [0.0] * 6 and torch.isfinite(torch.stack(list(stats.values()))).all()


def test_bad_layout_names_the_fix():
    with pytest.raises(ValueError, match="10 rewards cannot be split into groups of group_size=4"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)


def test_empty_rewards_and_a_group_of_one():
    with pytest.raises(ValueError) as err:
        group_advantages(torch.tensor([]), 1)
    assert str(err.value) == "rewards is empty; there must be at least one group"
    adv, stats = group_advantages(torch.tensor([0.7]), 1, normalize_by_std=True)  # one reward is valid
    assert adv.tolist() == [0.0] and stats["advantage/reward_group_std_mean"].item() == 0.0


def test_groups_of_two_are_divided_by_std_plus_eps():
    # Rewards 0 and 1: mean 0.5, Bessel std sqrt(0.5) = 0.70711; with eps = 0.5, A = +-0.5 / 1.20711 = +-0.41421.
    adv, stats = group_advantages(torch.tensor([0.0, 1.0]), 2, normalize_by_std=True, eps=0.5)
    torch.testing.assert_close(adv, torch.tensor([-0.414214, 0.414214]), rtol=0, atol=1e-6)
    assert stats["advantage/reward_group_std_mean"].item() == pytest.approx(0.5**0.5, abs=1e-7)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in stats.values())
