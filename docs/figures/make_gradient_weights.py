"""Plot the gradient weight of drpo, dppo_tv, spo and grpo against pi (docs/figures/gradient_weights.png).

The weight of a token is its gradient w.r.t. log pi divided by the unregularised one, -A r:
1 means "plain importance-weighted policy gradient", 0 means "no gradient", below 0 means
"pushed back toward mu". It is measured with autograd on drpo_trainer.algorithms.losses, so the figure
shows what the code does. Run: python docs/figures/make_gradient_weights.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from drpo_trainer.algorithms.losses import compute_policy_loss  # noqa: E402

OUT = Path(__file__).with_name("gradient_weights.png")
CURVES = [  # (label, loss, params, style)
    ("drpo, delta = 12.5 (default)", "drpo", {"delta": 12.5}, dict(color="C0", lw=2.5)),
    ("drpo, delta = 0.2", "drpo", {"delta": 0.2}, dict(color="C0", lw=1.5, ls="--")),
    ("dppo_tv, delta = 0.15", "dppo_tv", {"delta": 0.15}, dict(color="C1", lw=1.5)),
    ("spo, epsilon = 0.2", "spo", {"epsilon": 0.2}, dict(color="C2", lw=1.5)),
    ("grpo, clip 0.2 / 0.28", "grpo", {"clip_low": 0.2, "clip_high": 0.28}, dict(color="C3", lw=1.5, ls=":")),
]


def gradient_weight(loss: str, params: dict, pi: torch.Tensor, mu: float, adv: float) -> torch.Tensor:
    """d loss / d log pi divided by -A r, one token per value of pi."""
    lp = pi.log().double()[:, None].requires_grad_(True)  # (P, 1): one sequence per point
    old = torch.full_like(lp, mu).log()
    advantages = torch.full((len(pi),), adv, dtype=torch.float64)
    # seq-mean-token-sum: each point's gradient is its own token's, divided by P; undo that.
    loss_value, _ = compute_policy_loss(
        loss, lp, old, advantages, torch.ones_like(lp), loss_agg_mode="seq-mean-token-sum", **params
    )
    loss_value.backward()
    ratio = pi.double() / mu
    return (lp.grad[:, 0] * len(pi) / (-adv * ratio)).detach()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Draw the per-token gradient weight of each loss against pi.")
    parser.add_argument("--out", type=Path, default=OUT, help=f"PNG to write (default {OUT.name} beside this script)")
    out = parser.parse_args().out
    pi = torch.logspace(-3, 0, 600, dtype=torch.float64).clamp(max=0.999)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, sharey=True)
    for row, mu in enumerate((0.01, 0.5)):
        for col, adv in enumerate((+1.0, -1.0)):
            ax = axes[row, col]
            ax.axhline(1.0, color="0.6", lw=0.8)
            ax.axhline(0.0, color="0.3", lw=0.8)
            ax.axvline(mu, color="0.5", lw=0.8, ls="--")
            for label, loss, params, style in CURVES:
                ax.plot(pi.numpy(), gradient_weight(loss, params, pi, mu, adv).numpy(), label=label, **style)
            ax.set_xscale("log")
            ax.set_ylim(-1.5, 2.5)
            ax.set_title(f"mu = {mu}, A = {adv:+.0f}   (dashed line: pi = mu)")
            if row == 1:
                ax.set_xlabel("pi (current probability of the sampled token)")
            if col == 0:
                ax.set_ylabel("gradient weight  (grad / (-A r))")
            ax.grid(alpha=0.25)
    axes[0, 0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Per-token gradient weight vs. pi: 1 = plain policy gradient, 0 = no gradient, < 0 = pulled back")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
