"""Padding-free packing of sequences and token-budget micro-batch planning.

Owns how a mini-batch of variable-length sequences becomes learner forward passes:

- ``pack_sequences`` concatenates sequences into one (1, N) row with position ids that
  restart at 0 for each sequence. Called with ``attention_mask=None`` and no cache,
  transformers (>= 5) detects the packed sequences from the restarting position ids
  (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal
  mask for sdpa/eager, so no token attends across sequences; flash-attention kernels
  derive the same boundaries from the position ids. No pad token is ever computed.
- ``plan_micro_batches`` splits one rank's share of a mini-batch (its own rollouts: rank r
  holds the r-th slice of the step's prompts) into micro-batches of at most
  ``micro_batch_tokens_per_gpu`` tokens. Under ZeRO-3 every forward/backward is a sequence of
  collectives and ranks taking different numbers of micro-steps hang, so the learner pads
  each rank to the largest count over the ranks with padding micro-batches: one of the
  rank's own samples run again at loss weight 0 (benchmarks/bench_padding.py measures
  what that and the row padding below cost).

Imports only torch (and only for building tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100  # a position with no target (the value torch's cross_entropy ignores)


@dataclass(frozen=True)
class PackedBatch:
    """Sequences packed into one row, or R rows of equal length N (``pack_sequences(row_tokens=)``).

    Attributes:
        input_ids: (R, N) tokens of all sequences back to back (R = 1 unless rows were asked for).
        position_ids: (R, N) position within its own sequence (0, 1, ..., L_i - 1 per sequence).
        targets: (R, N) the next token of the same sequence, ``IGNORE_INDEX`` at each sequence's
            last token and at positions before its ``prompt_length - 1``; position j's log-prob is
            that of token j + 1.
        cu_seqlens: (S + 1,) int32 cumulative lengths [0, L_0, L_0 + L_1, ...] (flash-attn layout) of
            the flattened rows; a row's end padding counts as a segment of its own.
        seq_slices: per sequence, its slice of the flattened (R * N) rows.
        target_slices: per sequence, the slice of the row whose targets are live: the log-probs
            of its scored tokens (its response when ``prompt_lengths`` was given), in order.
    """

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    cu_seqlens: Tensor
    seq_slices: list[slice]
    target_slices: list[slice]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def split(self, values: Tensor) -> list[Tensor]:
        """Per-sequence views of a (1, N) or (N,) tensor aligned with the packed row."""
        flat = values.reshape(-1) if values.dim() == 2 else values
        if flat.shape[0] != self.num_tokens:
            raise ValueError(f"values have {flat.shape[0]} positions, the packed row has {self.num_tokens}.")
        return [flat[s] for s in self.seq_slices]

    def split_targets(self, values: Tensor) -> list[Tensor]:
        """Per-sequence values at the live-target positions (e.g. each response's token log-probs)."""
        flat = values.reshape(-1) if values.dim() == 2 else values
        if flat.shape[0] != self.num_tokens:
            raise ValueError(f"values have {flat.shape[0]} positions, the packed row has {self.num_tokens}.")
        return [flat[s] for s in self.target_slices]


def pack_sequences(
    seqs: list[list[int]], *, prompt_lengths: Optional[Sequence[int]] = None, row_tokens: Optional[int] = None
) -> PackedBatch:
    """Pack token lists into one row, or into rows of at most ``row_tokens`` (see ``PackedBatch``).

    Args:
        seqs: token ids per sequence, each non-empty (prompt + response for the learner).
        prompt_lengths: optional prompt length per sequence; targets are then live only for
            the response tokens. Without it every next token is a target.
        row_tokens: None = one row. Otherwise sequences fill rows in order, a row closing when the
            next sequence would pass ``max(row_tokens, longest sequence)`` (0: rows no wider than the
            longest sequence, the cheapest for sdpa when sequences are short); rows are padded at the
            end to the longest row with a pad segment of its own (positions from 0, no targets).
            Attention kernels without variable-length support (sdpa, eager) cost (row length)^2
            per row, so bounded rows make them linear in the micro-batch instead of quadratic.
            All positions index the flattened (R * N) layout: ``split`` and ``split_targets`` work
            unchanged.
    """
    if not seqs:
        raise ValueError("pack_sequences needs at least one sequence.")
    if prompt_lengths is not None and len(prompt_lengths) != len(seqs):
        raise ValueError(f"prompt_lengths has {len(prompt_lengths)} entries for {len(seqs)} sequences.")
    capacity = None if row_tokens is None else max(row_tokens, max(len(s) for s in seqs))
    rows: list[list[int]] = [[]]  # sequence indices per row
    used = 0
    for i, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"sequence {i} is empty; drop it before packing.")
        if capacity is not None and rows[-1] and used + len(seq) > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += len(seq)
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    seq_slices: list[Optional[slice]] = [None] * len(seqs)
    target_slices: list[Optional[slice]] = [None] * len(seqs)
    bounds = [0]
    for row in rows:
        for i in row:
            seq, length = seqs[i], len(seqs[i])
            start = len(input_ids)
            first_target = 0 if prompt_lengths is None else max(min(int(prompt_lengths[i]), length) - 1, 0)
            input_ids.extend(seq)
            position_ids.extend(range(length))
            # position j predicts token j + 1 of the same sequence; the last token predicts nothing
            targets.extend([IGNORE_INDEX] * first_target + list(seq[first_target + 1 :]) + [IGNORE_INDEX])
            seq_slices[i] = slice(start, start + length)
            target_slices[i] = slice(start + first_target, start + length - 1)
            bounds.append(start + length)
        pad = width - sum(len(seqs[i]) for i in row)
        if pad:  # a segment of its own: restarting positions isolate it, no target scores it
            input_ids.extend([0] * pad)
            position_ids.extend(range(pad))
            targets.extend([IGNORE_INDEX] * pad)
            bounds.append(len(input_ids))
    shape = (len(rows), width)
    return PackedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long).view(shape),
        position_ids=torch.tensor(position_ids, dtype=torch.long).view(shape),
        targets=torch.tensor(targets, dtype=torch.long).view(shape),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        seq_slices=seq_slices,
        target_slices=target_slices,
    )


def plan_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """One rank's samples -> micro-batches (lists of sample indices) of at most ``token_budget``
    tokens each, first-fit by decreasing length; every index appears exactly once.

    A sample longer than ``token_budget`` raises: one over-budget forward would break the
    memory bound the budget exists for. Ranks are padded to the same count by the learner
    (``Learner._micro_batches``), not here.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be > 0, got {token_budget}; set trainer.micro_batch_tokens_per_gpu.")
    if not lengths:
        raise ValueError("plan_micro_batches got no samples; the mini-batch is empty.")
    for i, length in enumerate(lengths):
        if length <= 0:
            raise ValueError(f"sample {i} has length {length}; every sample needs at least one token.")
        if length > token_budget:
            raise ValueError(
                f"sample {i} has {length} tokens, more than micro_batch_tokens_per_gpu={token_budget}; "
                f"raise trainer.micro_batch_tokens_per_gpu to at least {max(lengths)} "
                "(prompt + response length) or lower data.max_prompt_tokens / rollout.max_new_tokens."
            )
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):  # longest first
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
    return bins


def pad_rows(
    rows: list[torch.Tensor], *, width: Optional[int] = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample token values (T_i,) -> (B, width) values and their 0/1 mask, zero-filled. `width`
    defaults to the longest row; an empty list gives one fully masked row (a rank with no samples)."""
    width = width or max(1, max((r.numel() for r in rows), default=0))
    dtype = rows[0].dtype if rows else torch.float32
    values = torch.zeros(max(1, len(rows)), width, dtype=dtype, device=device)
    mask = torch.zeros(max(1, len(rows)), width, dtype=torch.float32, device=device)
    for i, r in enumerate(rows):
        values[i, : r.numel()] = r.to(device) if device is not None else r
        mask[i, : r.numel()] = 1.0
    return values, mask
