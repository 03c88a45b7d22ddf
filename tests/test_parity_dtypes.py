"""The parity gate's default thresholds against measured engine/learner gaps (docs/gpu.md):
a bf16 engine next to an fp32 learner is caught by the fp32 threshold and passes the bf16 one."""

from __future__ import annotations

import pytest

from drpo_trainer.io.data import load_problems
from drpo_trainer.rollout.hf_engine import HFEngine
from drpo_trainer.rollout.parity import check_parity, default_threshold, parity_metrics


@pytest.fixture(scope="module")
def probe(warm_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    problems, _ = load_problems(["data/synthetic_math_train.jsonl"], tok, max_prompt_tokens=64)
    return [p.prompt_ids for p in problems[:8]]  # the trainer's probe: the first 8 training prompts


def test_bf16_engine_gap_sits_between_the_fp32_and_bf16_thresholds(warm_model_dir, probe):
    learner_side = HFEngine(warm_model_dir, dtype="float32").score(probe)
    same = parity_metrics(HFEngine(warm_model_dir, dtype="float32").score(probe), learner_side)
    bf16 = parity_metrics(HFEngine(warm_model_dir, dtype="bfloat16").score(probe), learner_side)
    print(
        f"fp32 engine: mean {same['parity/mean_abs_logprob_diff']:.2e}; "
        f"bf16 engine: mean {bf16['parity/mean_abs_logprob_diff']:.2e}, max {bf16['parity/max_abs_logprob_diff']:.2e}"
    )
    assert same["parity/mean_abs_logprob_diff"] < 1e-6
    check_parity(bf16, default_threshold("float32", "bfloat16"))  # passes at the bf16 default
    with pytest.raises(RuntimeError, match="disagree"):
        check_parity(bf16, default_threshold("float32", "float32"))  # a stale-looking gap at fp32's
