"""The rollout-engine interface shared by the transformers and vLLM backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Protocol

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """What to sample. top_k = 0 and top_p = 1.0 mean "off"."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int = 0


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int  # index into the list of prompts passed to generate()
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the EOS token when finish_reason == "stop"
    rollout_logprobs: list[float]  # engine log-probs of completion_ids under log_softmax(logits / T)
    finish_reason: Literal["stop", "length"]
    text: str = ""
    # mixture-of-experts models: the experts of tokens 0..n-1 of prompt + completion at every MoE layer,
    # (n, layers, k) uint8/int16 (drpo_trainer.learner.routing); n is the sequence length - 1 when the engine
    # never ran the last sampled token. None for dense models or an engine that does not record them.
    routes: Optional[torch.Tensor] = None


class RolloutEngine(Protocol):
    """What the trainer needs from an engine."""

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        """Sample spec.n completions for every prompt; returns them grouped by prompt, in prompt order."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy updated learner weights (HF parameter names, full tensors) into the engine."""
        ...

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of tokens 1..L-1 of each sequence at temperature 1 (the parity probe)."""
        ...

    def score_routed(self, sequences: list[list[int]]) -> tuple[list[list[float]], Optional[list[torch.Tensor]]]:
        """`score` and, for a mixture-of-experts model, each sequence's experts (as Completion.routes; else None)."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory while the learner trains (no-op where meaningless)."""
        ...

    def wake_up(self) -> None:
        """Re-acquire memory before the next generate."""
        ...
