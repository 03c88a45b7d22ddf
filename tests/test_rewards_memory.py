"""Verifier workers whose memory grows after timeouts are replaced, so memory stays bounded.

`leak_then_hang` keeps 4 MiB for good every time its sample hits the deadline, like a computation
interrupted half-way that leaves garbage Python never frees (math-verify left 0.7-2 MB per timeout).
Without recycling, 16 timeouts grow the worker by 64 MiB; with an 8 MiB bound it never holds more
than the bound plus one sample's leak over its start-up size.
"""

import time

import pytest

from drpo_trainer.rewards import RewardScorer, register_reward

LEAK_MB = 4
TIMEOUTS = 16
BOUND_MB = 8
_HELD = []


@register_reward("test_leak_then_hang")
def leak_then_hang(completion, answer, **kwargs):
    if completion == "LEAK":
        _HELD.append(b"\x01" * (LEAK_MB * 2**20))  # written, so resident
        time.sleep(60)  # the worker's deadline interrupts this; the bytes stay held
    return 1.0


def _run(growth_mb: float) -> tuple[float, float, int]:
    """(start-up RSS, largest RSS seen after any batch, workers recycled) over TIMEOUTS leaking samples."""
    with RewardScorer("test_leak_then_hang", num_workers=1, timeout_s=0.2, memory_growth_mb=growth_mb) as scorer:
        assert scorer.score(["ok"], [""])[0] == [1.0]  # started and ready
        start = scorer.worker_rss_mb()[0]
        largest = start
        for _ in range(TIMEOUTS // 4):  # batches of 4: one sample per chunk, the size checked before each
            scores, metrics = scorer.score(["LEAK"] * 4, [""] * 4)
            assert scores == [0.0] * 4 and metrics["reward/timeouts"] == 4.0
            largest = max(largest, scorer.worker_rss_mb()[0])
        assert scorer.score(["ok"], [""])[0] == [1.0]  # still scoring
        return start, largest, scorer.recycled


def test_worker_memory_stays_bounded_over_many_timeouts():
    if not _can_read_rss():
        pytest.skip("resident memory is read from /proc (Linux)")
    start, largest, recycled = _run(BOUND_MB)
    assert largest - start <= BOUND_MB + LEAK_MB + 8  # 8 MiB of allocator noise
    # each worker takes ceil(8 / 4) + 1 = 3 leaks before it is over the bound: 16 leaks -> 5 recycles
    assert recycled >= 4
    # the control: with recycling out of reach the same run grows by the whole 64 MiB
    start, largest, recycled = _run(10_000)
    assert recycled == 0 and largest - start >= TIMEOUTS * LEAK_MB - 8


def _can_read_rss() -> bool:
    import os

    return os.path.exists(f"/proc/{os.getpid()}/statm")
