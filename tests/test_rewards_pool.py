"""RewardScorer: results equal in-process scoring, metrics, worker reuse, registry, custom rewards, crashes.

The reward functions defined here are imported by the verifier workers from this module (the
test folder is on sys.path, which the scorer hands to its workers).
"""

import os
import signal
import sys
import threading
import time

import pytest

from drpo_trainer.config import RewardConfig
from drpo_trainer.rewards import (
    RewardScorer,
    get_reward,
    make_reward_scorer,
    math_reward,
    register_reward,
    registered_rewards,
    score_math,
)
from drpo_trainer.rewards.registry import importable_ref

B = r"\boxed"


@register_reward("test_torch_loaded")
def torch_loaded(completion, answer, **kwargs):
    """1.0 when torch is imported in the process that runs the reward (must never be a worker)."""
    return float("torch" in sys.modules)


@register_reward("test_length")
def length_reward(completion, answer, **kwargs):
    """A custom reward: shaped, not binary; also checks the extraction kwarg arrives."""
    assert kwargs == {"extraction": "boxed"}
    return len(completion) / 10


@register_reward("test_exact_match")
def exact_match(completion, answer):
    """A custom reward with no keyword arguments: it must be called without reward.extraction."""
    return float(completion.strip() == answer)


@register_reward("test_misbehaving")
def misbehaving(completion, answer, **kwargs):
    if completion == "RAISE":
        raise RuntimeError("reward bug")
    if completion == "NAN":
        return float("nan")
    if completion == "CRASH":
        os.kill(os.getpid(), signal.SIGSEGV)
    if completion == "ALLOC":
        return float(len(bytearray(3 * 1024**3)))  # 3 GiB, above the 512 MiB cap
    if completion == "PID":
        return float(os.getpid())
    return 1.0


@register_reward("test_slow_length")
def slow_length(completion, answer, **kwargs):
    time.sleep(0.15)
    return float(len(completion))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_rewards_survive_signals_to_every_worker(sig):
    """A scheduler signals every process of a job: workers ignore SIGTERM/SIGINT; a worker killed
    outright has its sample scored again. Either way the step's rewards equal an undisturbed step's."""
    batch = [f"answer {'x' * i}" for i in range(12)]
    with RewardScorer("test_slow_length", num_workers=2, timeout_s=5.0) as scorer:
        quiet, _ = scorer.score(batch, ["1"] * len(batch))
        killer = threading.Timer(0.4, lambda: [os.kill(pid, sig) for pid in scorer.worker_pids()])
        killer.start()
        loud, metrics = scorer.score(batch, ["1"] * len(batch))
        killer.join()
    assert loud == quiet == [float(len(c)) for c in batch]
    assert metrics["reward/errors"] == 0.0 and metrics["reward/timeouts"] == 0.0


@pytest.fixture(scope="module")
def math_scorer():
    with RewardScorer("math", num_workers=2, timeout_s=5.0) as scorer:
        yield scorer


def test_batch_equals_in_process_scoring_in_order(math_scorer):
    # 3 x 8 = 24 samples spread over 2 workers; each result must land at its own index.
    completions, answers = [], []
    for k in range(8):
        completions += [B + f"{{{k}}}", B + f"{{{k + 1}}}", f"I think {k}"]
        answers += [str(k)] * 3
    scores, metrics = math_scorer.score(completions, answers)
    assert scores == [math_reward(c, a) for c, a in zip(completions, answers)]
    assert scores == [1.0, 0.0, 0.0] * 8
    # 8 correct of 24: mean = accuracy = 1/3; 8 have no box: no-answer fraction = 1/3.
    assert metrics == {
        "reward/mean": pytest.approx(1 / 3),
        "reward/accuracy": pytest.approx(1 / 3),
        "reward/no_answer_fraction": pytest.approx(1 / 3),
        "reward/timeouts": 0.0,
        "reward/errors": 0.0,
    }


def test_workers_are_reused_across_calls(math_scorer):
    pids = math_scorer.worker_pids()
    assert math_scorer.score([B + "{2}"], ["2"])[0] == [1.0]
    assert math_scorer.score([B + "{3}"], ["2"])[0] == [0.0]
    assert math_scorer.worker_pids() == pids
    assert math_scorer.score([], []) == (
        [],
        pytest.approx(
            dict.fromkeys(
                ["reward/mean", "reward/accuracy", "reward/no_answer_fraction", "reward/timeouts", "reward/errors"], 0.0
            )
        ),
    )


def test_bad_inputs_name_the_problem(math_scorer):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_scorer.score(["a", "b"], ["1"])
    with pytest.raises(TypeError, match="sample 0"):
        math_scorer.score([None], ["1"])


def test_score_math_scores_one_batch_and_stops_its_workers(monkeypatch):
    pids, scorers = [], []
    real_score = RewardScorer.score

    def score_and_note_workers(self, completions, answers):
        pids.extend(self.worker_pids())
        scorers.append(self)
        return real_score(self, completions, answers)

    monkeypatch.setattr(RewardScorer, "score", score_and_note_workers)
    assert score_math([B + "{1/2}", B + "{3}"], ["0.5", "4"], num_workers=2) == [1.0, 0.0]
    assert score_math(["Answer: 7", B + "{7}"], ["7", "7"], num_workers=1, extraction="answer_line") == [1.0, 0.0]
    assert len(pids) == 3  # 2 workers, then 1: each call has its own scorer
    for pid in pids:  # stopped and reaped when the call returned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert scorers[0] is not scorers[1] and all(s._closed for s in scorers)  # nothing left for exit to close


def test_custom_reward_by_name_and_by_path():
    with make_reward_scorer(RewardConfig(name="test_length", num_workers=1)) as scorer:
        # len("abcd") / 10 = 0.4 and len("x" * 25) / 10 = 2.5; neither has a box.
        scores, metrics = scorer.score(["abcd", "x" * 25], ["", ""])
    assert scores == [pytest.approx(0.4), pytest.approx(2.5)]
    assert metrics["reward/mean"] == pytest.approx((0.4 + 2.5) / 2)
    assert metrics["reward/accuracy"] == 0.5  # only 2.5 reaches full credit (>= 1)
    assert metrics["reward/no_answer_fraction"] == 1.0
    with RewardScorer(f"{__name__}:length_reward", num_workers=1, import_modules=[__name__]) as scorer:
        assert scorer.score(["abc"], [""])[0] == [pytest.approx(0.3)]


def test_a_reward_without_extraction_gets_none_and_no_answer_metric():
    """reward.extraction belongs to rewards that look for a final answer: a reward without the
    keyword is called with (completion, answer) only, and no_answer_fraction is not reported."""
    with RewardScorer("test_exact_match", extraction="answer_line", num_workers=1) as scorer:
        scores, metrics = scorer.score(["42", "Answer: 42", " 7 "], ["42", "42", "7"])
    assert scores == [1.0, 0.0, 1.0]  # exact match, no answer extraction
    assert metrics == pytest.approx(
        {"reward/mean": 2 / 3, "reward/accuracy": 2 / 3, "reward/timeouts": 0.0, "reward/errors": 0.0}
    )


def test_registry_errors():
    assert "math" in registered_rewards()
    assert get_reward("math") is math_reward
    with pytest.raises(ValueError, match="unknown reward 'nope'. Registered: .*math"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_length")(lambda c, a, **k: 0.0)
    with pytest.raises(ValueError, match="cannot be imported by the verifier workers"):
        importable_ref(lambda c, a: 0.0)
    with pytest.raises(ValueError, match="has no function"):
        get_reward(f"{__name__}:missing", [__name__])
    with pytest.raises(ValueError, match="is not in reward.import_modules"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz' \\(ModuleNotFoundError"):
        get_reward("no_such_module_xyz:fn", ["no_such_module_xyz"])


def test_failures_are_counted_and_workers_survive_or_are_replaced():
    with RewardScorer("test_misbehaving", num_workers=2, timeout_s=5.0, memory_limit_mb=512) as scorer:
        batch = ["ok", "RAISE", "NAN", "ALLOC", "CRASH", "ok"]
        scores, metrics = scorer.score(batch, ["1"] * len(batch))
        # raise, NaN, MemoryError and the segfault are 4 errors scoring 0; the two 'ok' score 1.
        assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert metrics["reward/errors"] == 4.0 and metrics["reward/timeouts"] == 0.0
        # only the segfault killed a worker (MemoryError did not), twice: scored again once, then an error
        assert scorer.restarts == 2
        pids = set(scorer.worker_pids())
        got = scorer.score(["PID"] * 4, ["1"] * 4)[0]
        assert {int(p) for p in got} <= pids  # later batches run on the live (replacement) workers
        assert os.getpid() not in {int(p) for p in got}


def test_safe_in_a_process_with_torch_and_a_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with RewardScorer("test_torch_loaded", num_workers=2) as scorer:
            assert "torch" in sys.modules  # the parent has torch ...
            assert scorer.score(["a", "b", "c"], ["", "", ""])[0] == [0.0, 0.0, 0.0]  # ... no worker does
            pids = scorer.worker_pids()
        assert all(not _alive(p) for p in pids)  # closed on leaving the with-block
        with pytest.raises(RuntimeError, match="closed"):
            scorer.score(["a"], ["1"])
    finally:
        dist.destroy_process_group()


def test_bad_settings_fail_with_the_key():
    with pytest.raises(ValueError, match="reward.extraction"):
        RewardScorer("math", extraction="first")
    with pytest.raises(ValueError, match="reward.timeout_s"):
        RewardScorer("math", timeout_s=0)
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward_scorer(RewardConfig(name="does_not_exist"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_stop_at_interpreter_exit(tmp_path):
    import subprocess

    script = (
        "from drpo_trainer.rewards import RewardScorer\n"
        "s = RewardScorer('math', num_workers=2)\n"
        "assert s.score([r'\\boxed{2}'], ['2'])[0] == [1.0]\n"
        "print(*s.worker_pids())\n"  # exits without close(): the atexit hook must stop the workers
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10  # workers are our grandchildren: wait for init to reap them
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
