"""The moe/* metrics of a step, logged whether routing replay is on or off (docs/moe.md).

The step's own forwards use one routing mode (rollout.routing_replay). `MoePass` runs, before the
updates, one extra no-grad forward of the trained samples with the pre-update weights in the OTHER mode,
so that the engine-vs-learner mismatch is known both ways:

  moe/k3_kl_without_replay, moe/k3_kl_with_replay   mean k3 = (rho - 1) - log rho, rho = exp(learner - engine),
                                                    over the trained completion tokens (mismatch/k3_kl is the
                                                    one of the mode the step trains with)
  moe/route_agreement     fraction of (token, layer) routes where the learner's own top-k SET equals the
                          engine's, over every token with an engine route (prompt tokens too)
  moe/load_balance/layer_i  the busiest expert's share of the learner's (token, k) slots over the mean share
                          (1 = even; E = one expert takes all)

Costs one no-grad forward of the trained samples per step (about a third of a mini-batch update).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from drpo_trainer.learner.routing import load_balance
from drpo_trainer.metrics import all_reduce_sum

if TYPE_CHECKING:
    from drpo_trainer.learner.learner import Learner, TrainSample


def has_routes(learner: Learner, samples: list[TrainSample]) -> bool:
    return learner.routing is not None and any(s.routes is not None for s in samples)


class MoePass:
    """The other routing mode's pre-update log-probs of the trained samples, and the learner's routes."""

    def __init__(self, learner: Learner, samples: list[TrainSample]) -> None:
        tap = learner.routing
        self.replay = learner.replay
        self.trained = learner.samples_to_train(samples)
        self.other: dict[int, torch.Tensor] = {}  # trained index -> log-probs (Tc,) in the other mode
        self.agree = self.total = 0
        self.counts = torch.zeros(tap.num_layers, tap.num_experts, dtype=torch.float64)
        learner.engine.eval()
        with torch.no_grad():
            for mb in learner._micro_batches(self.trained):
                chosen = [self.trained[i] for i in mb] or samples[:1]  # empty: keep ZeRO-3 ranks in step
                lps, _ = learner._forward(chosen, with_entropy=False, replay=not self.replay)
                if not mb:
                    continue
                agree, total = tap.last_agreement()
                self.agree, self.total = self.agree + agree, self.total + total
                self.counts += tap.last_expert_counts()
                for i, lp in zip(mb, lps):
                    self.other[i] = lp.float().cpu()
        learner.engine.train()

    def metrics(self, ctx=None) -> dict[str, float]:
        """After the updates (mini-batch 1's mu may come from its update forward): reduced over ranks."""
        mine = _k3_sums([s.old_logprobs for s in self.trained], self.trained)
        other = _k3_sums([self.other.get(i) for i in range(len(self.trained))], self.trained)
        n_layers, n_experts = self.counts.shape
        flat = [self.agree, self.total, *mine, *other, *self.counts.reshape(-1).tolist()]
        reduced = all_reduce_sum(flat, ctx)
        agree, total, k3_mine, n_mine, k3_other, n_other = reduced[:6]
        counts = torch.tensor(reduced[6:], dtype=torch.float64).view(n_layers, n_experts)
        with_replay, without = (k3_mine / max(n_mine, 1), k3_other / max(n_other, 1))
        if not self.replay:
            with_replay, without = without, with_replay
        out = {
            "moe/route_agreement": agree / total if total else math.nan,
            "moe/k3_kl_with_replay": with_replay,
            "moe/k3_kl_without_replay": without,
        }
        for layer, value in enumerate(load_balance(counts)):
            out[f"moe/load_balance/layer_{layer}"] = value
        return out


def _k3_sums(learner_lps: list[Optional[torch.Tensor]], samples: list[TrainSample]) -> tuple[float, float]:
    """(sum of k3 over the tokens, token count) for the samples whose learner log-probs are known."""
    total, count = 0.0, 0
    for lp, s in zip(learner_lps, samples):
        if lp is None:
            continue
        d = lp.double() - s.rollout_logprobs.double()
        total += float((torch.expm1(d) - d).sum())
        count += d.numel()
    return total, float(count)
