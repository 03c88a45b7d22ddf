"""The majority vote of maj@k: a problem's k extracted final answers, grouped into buckets of
answers that the math verifier judges equivalent, and the bucket that wins.

Rules (docs/evaluation.md):

- a completion with no final answer (under ``reward.extraction``) abstains;
- identical answer strings are one answer; a new answer joins the first bucket (in order of
  appearance) whose first answer, taken as the reference, it is equivalent to
  (``verify_answer(answer, reference)``, so ``1/2`` joins a bucket opened by ``0.5``); otherwise it
  opens a bucket of its own;
- the bucket with the most completions wins; a tie goes to the bucket whose first member appeared
  earliest; when every completion abstains there is no winner (the vote is wrong).

The comparisons read untrusted text with math-verify, so they run in killable worker processes with
the reward's time limit (``RewardScorer.equivalence``); a comparison that times out or fails counts
as "not equivalent" and is counted. They are batched: round r compares, for every problem at once,
each answer not yet in a bucket with the r-th bucket's first answer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from drpo_trainer.rewards.math import verify_answer, warm_up

# [(answer, reference), ...] -> whether each answer is equivalent to its reference
Judge = Callable[[list[tuple[str, str]]], list[bool]]


def same_answer(answer: str, reference: str) -> float:
    """1.0 when the extracted final answer `answer` is equivalent to `reference` (another extracted
    answer, read as the gold answer is), else 0.0. Runs in a verifier worker; it takes no `extraction`,
    so the worker passes none and looks for no final answer in `answer`."""
    return 1.0 if verify_answer(answer, reference) else 0.0


same_answer.warm_up = warm_up  # type: ignore[attr-defined]  # math-verify's set-up before the first deadline


def vote_buckets(answers: Sequence[Sequence[Optional[str]]], judge: Judge) -> list[list[list[int]]]:
    """For each problem, its buckets in order of appearance, each the list of its completions' indices
    (None answers abstain and are in no bucket). `judge` decides a whole round of comparisons."""
    # per problem: distinct answers in order of first appearance, and the completions that gave each
    distinct: list[list[str]] = []
    members: list[dict[str, list[int]]] = []
    for row in answers:
        seen: dict[str, list[int]] = {}
        for i, a in enumerate(row):
            if a is not None:
                seen.setdefault(a, []).append(i)
        distinct.append(list(seen))
        members.append(seen)
    buckets: list[list[list[str]]] = [[] for _ in answers]
    open_ = [list(d) for d in distinct]  # answers in no bucket yet, in order
    while any(open_):
        pairs, where = [], []
        for p, waiting in enumerate(open_):
            if not waiting:
                continue
            reference = waiting[0]  # the earliest unplaced answer opens the next bucket
            buckets[p].append([reference])
            for a in waiting[1:]:
                pairs.append((a, reference))
                where.append((p, a))
            open_[p] = []
        for (p, a), same in zip(where, judge(pairs) if pairs else []):
            (buckets[p][-1] if same else open_[p]).append(a)
    return [
        [sorted(i for a in bucket for i in members[p][a]) for bucket in problem] for p, problem in enumerate(buckets)
    ]


def winner(buckets: list[list[int]]) -> Optional[int]:
    """The index of the first completion of the winning bucket: most members; on a tie, the bucket whose
    first member came first. None when there is no bucket (every completion abstained)."""
    if not buckets:
        return None
    best = max(buckets, key=lambda b: (len(b), -b[0]))
    return best[0]


def pool_judge(scorer: Any) -> tuple[Judge, list[int]]:
    """A judge that decides comparisons in `scorer`'s equivalence workers, and a one-element list that
    counts the comparisons that timed out or failed (they count as not equivalent)."""
    failures = [0]

    def judge(pairs: list[tuple[str, str]]) -> list[bool]:
        scores, metrics = scorer.equivalence().score([a for a, _ in pairs], [r for _, r in pairs])
        failures[0] += int(metrics["reward/timeouts"] + metrics["reward/errors"])
        return [s >= 1.0 for s in scores]

    return judge, failures
