"""pass@j (Chen et al. 2021's unbiased estimator) and maj@n (the vote over extracted answers), checked
against brute force and hand-made cases; the sums of several shards combine into the one-shard result."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction
from types import SimpleNamespace

import pytest

from drpo_trainer.config import load_config
from drpo_trainer.rewards.pool import RewardScorer
from drpo_trainer.rewards.vote import pool_judge, vote_buckets, winner
from drpo_trainer.rollout.base import Completion
from drpo_trainer.rollout.evaluation import combine_counts, eval_counts, eval_metrics, pass_at_k, pass_ks


def brute_force_pass(correct: list[bool], k: int) -> Fraction:
    """The mean over every k-subset of the n samples of "the subset holds a correct one"."""
    subsets = list(itertools.combinations(correct, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_equals_the_average_over_all_k_subsets():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        correct = [rng.random() < rng.random() for _ in range(n)]
        for k in range(1, n + 1):
            want = brute_force_pass(correct, k)
            assert pass_at_k(n, sum(correct), k) == pytest.approx(float(want), abs=1e-15), (correct, k)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16])
def test_pass_at_n_is_any_correct(n):
    for c in range(n + 1):
        assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)


def test_pass_at_k_hand_values_and_bounds():
    assert pass_at_k(4, 1, 1) == 0.25  # one of four
    assert pass_at_k(4, 1, 2) == 0.5  # C(3,2)/C(4,2) = 3/6 left out
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_the_reported_ks_are_powers_of_two_below_n_and_n():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(16) == [1, 2, 4, 8, 16]


# -- the vote, with a judge written out here -------------------------------------------------------
def table_judge(equal_pairs: set[frozenset]):
    """Equivalent exactly when the pair is listed (either way round); records the comparisons asked."""
    asked = []

    def judge(pairs):
        asked.append(list(pairs))
        return [frozenset(p) in equal_pairs for p in pairs]

    return judge, asked


def test_equivalent_answers_vote_together_and_win():
    # 0.5 and 1/2 are one answer (2 votes), 3 has one vote, 4 has one
    judge, _ = table_judge({frozenset({"0.5", "1/2"})})
    (buckets,) = vote_buckets([["3", "0.5", "4", "1/2"]], judge)
    assert buckets == [[0], [1, 3], [2]]
    assert winner(buckets) == 1  # the winning bucket's first completion


def test_a_tie_goes_to_the_bucket_that_appeared_first():
    judge, _ = table_judge(set())
    (buckets,) = vote_buckets([["7", "5", "5", "7"]], judge)  # two votes each: 7 came first
    assert buckets == [[0, 3], [1, 2]] and winner(buckets) == 0
    (buckets,) = vote_buckets([["5", "7", "7", "5"]], judge)
    assert winner(buckets) == 0  # now 5 came first


def test_no_answer_abstains_and_all_abstaining_is_no_winner():
    judge, asked = table_judge(set())
    abstain, none = vote_buckets([[None, None, "2", None], [None, None]], judge)
    assert abstain == [[2]] and winner(abstain) == 2  # one vote beats three abstentions
    assert none == [] and winner(none) is None
    assert asked == []  # identical or single answers need no comparison


def test_comparisons_run_in_rounds_against_each_buckets_first_answer():
    judge, asked = table_judge({frozenset({"a", "b"})})
    vote_buckets([["a", "c", "b", "a"], ["x", "y"]], judge)
    # round 1: every unplaced answer against the first of each problem; round 2: "c" opens a bucket alone
    assert asked == [[("c", "a"), ("b", "a"), ("y", "x")]]


# -- the vote with the real verifier in its workers --------------------------------------------------
@pytest.fixture(scope="module")
def scorer():
    with RewardScorer("math", num_workers=1, timeout_s=5.0) as s:
        yield s


def test_the_verifier_puts_different_forms_of_one_number_in_one_bucket(scorer):
    judge, failures = pool_judge(scorer)
    answers = [["3", "0.5", "\\frac{1}{2}", "4", "1/2", "x = 3"]]
    (buckets,) = vote_buckets(answers, judge)
    assert buckets == [[0, 5], [1, 2, 4], [3]]  # 3 and "x = 3" (a value), 0.5 = \frac{1}{2} = 1/2
    assert winner(buckets) == 1 and failures == [0]


class FakeEngine:
    """Returns fixed completion texts, n per prompt in order."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def generate(self, prompt_ids, spec):
        assert len(prompt_ids) * spec.n == len(self.texts)
        return [
            Completion(i // spec.n, p, [], [], "stop", t)
            for i, (p, t) in enumerate(zip([p for p in prompt_ids for _ in range(spec.n)], self.texts))
        ]


def test_eval_counts_and_metrics_on_known_completions(scorer):
    cfg = load_config(None, ["eval.samples_per_prompt=4", "eval.files={s: x.jsonl}"])
    problems = [SimpleNamespace(prompt_ids=[i], answer=a) for i, a in enumerate(["0.5", "3", "7"])]
    texts = [
        *["\\boxed{1/2}", "\\boxed{2}", "\\boxed{0.5}", "no answer"],  # 2 correct; the vote 1/2 = 0.5 wins
        *["\\boxed{4}", "\\boxed{4}", "\\boxed{3}", "\\boxed{5}"],  # 1 correct; the vote 4 is wrong
        *["x", "y", "z", "w"],  # none: every completion abstains
    ]
    counts = eval_counts(cfg, FakeEngine(texts), scorer, {"s": problems}, 0, 0, 1)
    m = eval_metrics(cfg, counts)
    assert m["eval/s/avg@4"] == 3 / 12
    assert m["eval/s/pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert m["eval/s/pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6) + 0) / 3)  # C(2,2)/C(4,2), C(3,2)/C(4,2)
    assert m["eval/s/pass@4"] == pytest.approx(2 / 3)
    assert m["eval/s/maj@4"] == pytest.approx(1 / 3) and m["eval/s/vote_failures"] == 0
    # the same problems in two shards (1 + 2 problems) add up to the same metrics
    shard0 = eval_counts(cfg, FakeEngine(texts[:4] + texts[8:]), scorer, {"s": problems}, 0, 0, 2)
    shard1 = eval_counts(cfg, FakeEngine(texts[4:8]), scorer, {"s": problems}, 0, 1, 2)
    assert combine_counts([shard0, shard1]) == {"s": pytest.approx(counts["s"])}
    assert eval_metrics(cfg, combine_counts([shard0, shard1])) == pytest.approx(m)


def test_a_comparison_that_times_out_counts_as_different_and_is_counted():
    class Workers:  # the equivalence workers' answer: the first comparison hit its deadline (scored 0)
        def score(self, answers, references):
            assert (answers, references) == (["1/2", "0.50"], ["0.5", "0.5"])
            return [0.0, 1.0], {"reward/timeouts": 1.0, "reward/errors": 0.0}

    judge, failures = pool_judge(SimpleNamespace(equivalence=Workers))
    (buckets,) = vote_buckets([["0.5", "1/2", "0.50"]], judge)
    assert buckets == [[0, 2], [1]] and failures == [1]  # 1/2 opens a bucket of its own
