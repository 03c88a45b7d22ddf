"""Group-relative (critic-free) advantages.

Owns the step from per-completion rewards to per-completion advantages: each reward minus
the mean reward of its prompt's group of G completions, optionally divided by the group's
standard deviation (+ eps). The trainer broadcasts the sequence advantage to every
completion token. Groups whose G rewards are all equal carry no learning signal (A = 0);
their fraction is reported.
"""

from __future__ import annotations

import torch

# How the stats combine over ranks: these by max / min, the others as sample-weighted means.
ADVANTAGE_METRIC_REDUCTIONS = {"advantage/value_max": "max", "advantage/value_min": "min"}


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_by_std: bool = False, eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantages (N,) for rewards (N,) laid out group after group (group_size consecutive samples per prompt).

    A_i = R_i - mean_g(R)                       (normalize_by_std=False, the DRPO/DPPO setting)
    A_i = (R_i - mean_g(R)) / (std_g(R) + eps)  (normalize_by_std=True, GRPO's; std with Bessel's
                                                 correction, 0 for a group of one)
    Zero-variance groups give A = 0 exactly in both cases.

    Stats (0-dim float32 tensors): advantage/zero_variance_group_fraction,
    advantage/reward_mean, advantage/reward_group_std_mean (mean over groups of the group's
    reward std), advantage/abs_mean, advantage/value_max, advantage/value_min (the extrema:
    ADVANTAGE_METRIC_REDUCTIONS).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of group_size={group_size}; "
            "pass whole groups (samples_per_prompt consecutive completions per prompt)"
        )
    if rewards.numel() == 0:
        raise ValueError("rewards is empty; there must be at least one group")
    grouped = rewards.detach().double().view(-1, group_size)  # (num_groups, G)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, correction=1) if group_size > 1 else torch.zeros_like(mean)
    # Exact test on the values rather than std == 0: a float std can be 1e-17 for equal rewards.
    zero_var = grouped.amax(dim=1) == grouped.amin(dim=1)  # (num_groups,)
    centred = torch.where(zero_var[:, None], torch.zeros_like(grouped), grouped - mean)
    adv = centred / (std + eps) if normalize_by_std else centred
    adv = adv.reshape(-1).to(torch.float32)
    stats = {
        "advantage/zero_variance_group_fraction": zero_var.double().mean(),
        "advantage/reward_mean": grouped.mean(),
        "advantage/reward_group_std_mean": std.mean(),
        "advantage/abs_mean": adv.abs().double().mean(),
        "advantage/value_max": adv.max().double(),
        "advantage/value_min": adv.min().double(),
    }
    return adv, {k: v.to(torch.float32) for k, v in stats.items()}
