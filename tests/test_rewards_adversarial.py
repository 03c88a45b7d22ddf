"""Untrusted completions: code injection, power towers, huge factorials, huge and deeply nested text.

Each hostile sample must score 0 within its timeout plus a small margin, the honest samples of the
same batch must still score correctly, nothing may be executed or written, and a worker killed
mid-batch must be replaced so that later batches still score. The time bounds asserted here are
liveness bounds (a hang would blow through them by minutes), not performance measurements.
"""

import os
import signal
import time

import pytest

from drpo_trainer.rewards import RewardScorer, math_reward, register_reward
from drpo_trainer.rewards.pool import KILL_GRACE_S

B = r"\boxed"
TIMEOUT_S = 1.5
# Scoring the honest samples and handing results back takes milliseconds; 2 s covers a loaded machine.
MARGIN_S = 2.0

# Honest samples that share every hostile batch, with their hand-checked rewards.
HONEST = [
    (B + "{4}", "4", 1.0),
    (B + "{3}", "4", 0.0),
    (B + r"{\frac{1}{2}}", "0.5", 1.0),
    ("no final answer", "4", 0.0),
    ("reasoning " * 10_000 + B + "{42}", "42", 1.0),  # a 100,000-character honest output
]


@register_reward("test_hang_or_math")
def hang_or_math(completion, answer, **kwargs):
    """Hangs where no signal can interrupt it on 'HANG'; otherwise the math reward."""
    if completion == "HANG":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # like a long C call: the timer is ignored
        time.sleep(600)
    return math_reward(completion, answer, **kwargs)


hang_or_math.warm_up = math_reward.warm_up  # sympy's first-use set-up must not run inside a deadline


def _injections(folder):
    path = os.path.join(folder, "pwned")
    return [
        B + f"{{__import__('os').system('touch {path}1')}}",
        B + f"{{open('{path}2', 'w').write('x')}}",
        B + f"{{eval(\"open('{path}3', 'w')\")}}",
        B + f"{{exec(\"import os; os.mkdir('{path}4')\")}}",
        B + f"{{(lambda: __import__('os').makedirs('{path}5'))()}}",
        B + r"{\text{$(touch " + path + r"6)}}",
        f"__import__('os').system('touch {path}7')",  # no box at all
        "Answer: " + f"__import__('os').system('touch {path}8')",
    ]


HOSTILE = {
    "power_tower": B + "{2^{2^{2^{2^{2^2}}}}}",
    "power_tower_10": B + "{10^{10^{10^{10^{10}}}}}",
    "huge_factorial": B + "{(10^{100})!}",
    "nested_factorial": B + "{((100!)!)!}",
    "long_box_content": B + "{" + "9^" * 50_000 + "9}",  # 100,000 characters inside the box
    "nested_braces": B + "{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "nested_parens": B + "{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "nested_boxes": B + "{" * 3000 + "1" + "}" * 3000,
    "nested_fracs": B + "{" + r"\frac{1}{" * 2000 + "1" + "}" * 2000 + "}",
}


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer("test_hang_or_math", num_workers=2, timeout_s=TIMEOUT_S, memory_limit_mb=1024) as s:
        s.score([B + "{1}"], ["1"])  # wait for the workers to start before anything is timed
        yield s


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_sample_scores_zero_in_time_and_others_still_score(scorer, name):
    # Gold '2' is wrong for every hostile answer (each is astronomically large, 1, or unparseable).
    completions = [HOSTILE[name]] + [c for c, _, _ in HONEST]
    answers = ["2"] + [a for _, a, _ in HONEST]
    start = time.monotonic()
    scores, metrics = scorer.score(completions, answers)
    elapsed = time.monotonic() - start
    assert scores == [0.0] + [e for _, _, e in HONEST]
    assert elapsed < TIMEOUT_S + KILL_GRACE_S + MARGIN_S
    assert metrics["reward/timeouts"] + metrics["reward/errors"] <= 1  # only the hostile sample may fail


def test_code_injection_executes_nothing(scorer, tmp_path):
    injections = _injections(str(tmp_path))
    completions = injections + [c for c, _, _ in HONEST]
    answers = ["0"] * len(injections) + [a for _, a, _ in HONEST]
    scores, _ = scorer.score(completions, answers)
    assert scores == [0.0] * len(injections) + [e for _, _, e in HONEST]
    for text in injections:  # the in-process call is the same code path: nothing may run there either
        for mode in ("boxed", "answer_line", "auto"):
            assert math_reward(text, "0", extraction=mode) == 0.0
    assert os.listdir(tmp_path) == []


def test_killed_worker_is_replaced_and_later_batches_score(scorer):
    restarts = scorer.restarts
    pids = set(scorer.worker_pids())
    completions = ["HANG"] + [c for c, _, _ in HONEST]
    answers = ["4"] + [a for _, a, _ in HONEST]
    start = time.monotonic()
    scores, metrics = scorer.score(completions, answers)
    elapsed = time.monotonic() - start
    assert scores == [0.0] + [e for _, _, e in HONEST]
    assert metrics["reward/timeouts"] == 1.0 and metrics["reward/errors"] == 0.0
    assert elapsed < TIMEOUT_S + KILL_GRACE_S + MARGIN_S  # the hung sample delayed the batch by its deadline only
    assert scorer.restarts == restarts + 1
    assert len(pids - set(scorer.worker_pids())) == 1  # exactly the hung worker was killed
    # Two hung samples at once take both workers down; the next batches wait for replacements and score.
    scores, metrics = scorer.score(["HANG", "HANG"] + [B + "{4}"], ["4", "4", "4"])
    assert scores == [0.0, 0.0, 1.0] and metrics["reward/timeouts"] == 2.0
    for _ in range(2):
        assert scorer.score([c for c, _, _ in HONEST], [a for _, a, _ in HONEST])[0] == [e for _, _, e in HONEST]
