"""The real vLLM engine on one GPU: generate, processed log-probs, sleep/wake, weight sync, parity.

Needs CUDA and vllm (tested range in drpo_trainer/rollout/vllm_engine.py); skipped otherwise.
Run: python -m pytest tests/gpu -m gpu -q   (one process; the engine uses the external launcher
with world size 1). The model is a small random Qwen3 with its offline tokenizer, built here.
"""

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
        reason="needs a CUDA GPU and vllm",
    ),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from drpo_trainer.builtin.tiny_model import build_random_model

    # head_dim 64 (256 / 4): a size every vLLM attention backend supports
    return build_random_model(tmp_path_factory.mktemp("tiny"), hidden_size=256, num_layers=2, num_heads=4, seed=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    from drpo_trainer.config import VLLMRolloutConfig
    from drpo_trainer.rollout.vllm_engine import VLLMEngine

    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29533",
    }.items():
        os.environ.setdefault(k, v)
    cfg = VLLMRolloutConfig(gpu_memory_utilization=0.3, enable_sleep_mode=True)
    return VLLMEngine(model_dir, cfg, seed=0, max_model_len=256, dtype="float32")


@pytest.fixture(scope="module")
def learner(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()


def _learner_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (T, V) predicting the completion
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(-1, ids[0, len(prompt) :, None])[:, 0].tolist()


PROMPTS = [[5, 17, 30, 41, 2], [7, 8, 9], [100, 3, 4, 60, 61, 62, 63]]


def test_generate_n_samples_with_processed_logprobs(engine, learner):
    from drpo_trainer.rollout.base import SamplingSpec
    from drpo_trainer.rollout.parity import parity_metrics

    spec = SamplingSpec(n=4, temperature=0.7, max_new_tokens=16, seed=1)
    comps = engine.generate(PROMPTS, spec)
    assert [c.prompt_index for c in comps] == [0] * 4 + [1] * 4 + [2] * 4
    for c in comps:
        assert c.finish_reason in ("stop", "length")
        assert len(c.rollout_logprobs) == len(c.completion_ids) > 0
        assert c.finish_reason != "length" or len(c.completion_ids) == 16
    # Engine log-probs are log_softmax(logits / 0.7): they match the learner's at T = 0.7 ...
    eng = [c.rollout_logprobs for c in comps]
    at_t = parity_metrics(eng, [_learner_logprobs(learner, c.prompt_ids, c.completion_ids, 0.7) for c in comps])
    assert at_t["parity/mean_abs_logprob_diff"] < 1e-2, at_t
    # ... and not the raw T = 1 ones (what vLLM's default raw_logprobs mode would give).
    at_1 = parity_metrics(eng, [_learner_logprobs(learner, c.prompt_ids, c.completion_ids, 1.0) for c in comps])
    assert at_1["parity/mean_abs_logprob_diff"] > 10 * at_t["parity/mean_abs_logprob_diff"]


def test_same_seed_same_samples_different_seed_different(engine):
    from drpo_trainer.rollout.base import SamplingSpec

    a = engine.generate(PROMPTS, SamplingSpec(n=2, max_new_tokens=12, seed=3))
    b = engine.generate(PROMPTS, SamplingSpec(n=2, max_new_tokens=12, seed=3))
    c = engine.generate(PROMPTS, SamplingSpec(n=2, max_new_tokens=12, seed=4))
    assert [x.completion_ids for x in a] == [x.completion_ids for x in b]
    assert [x.completion_ids for x in a] != [x.completion_ids for x in c]


def test_sleep_frees_memory_and_wake_restores(engine):
    from drpo_trainer.rollout.base import SamplingSpec

    spec = SamplingSpec(n=1, max_new_tokens=8, seed=0)
    before = engine.generate(PROMPTS, spec)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep > free_awake  # KV cache and weights released
    engine.wake_up()
    after = engine.generate(PROMPTS, spec)
    assert [c.completion_ids for c in before] == [c.completion_ids for c in after]


def test_sync_then_parity(engine, learner):
    from drpo_trainer.rollout.parity import check_parity, parity_metrics
    from drpo_trainer.rollout.weight_sync import sync_weights

    probe = [p + [11, 12, 13, 14] for p in PROMPTS]
    ref = [_learner_logprobs(learner, s[:1], s[1:], 1.0) for s in probe]
    check_parity(parity_metrics(engine.score(probe), ref), 0.01)  # same weights: in parity

    torch.manual_seed(1)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.5 * torch.randn_like(p))  # a large "update"
    new = [_learner_logprobs(learner, s[:1], s[1:], 1.0) for s in probe]
    with pytest.raises(RuntimeError, match="stale"):
        check_parity(parity_metrics(engine.score(probe), new), 0.01)  # engine still has the old weights

    engine.sleep()
    metrics = sync_weights(learner, engine, bucket_bytes=256 * 1024)  # many small buckets
    engine.wake_up()
    assert metrics["sync/buckets"] > 3
    m = parity_metrics(engine.score(probe), new)
    check_parity(m, 0.01)
    assert m["parity/mean_abs_logprob_diff"] < 1e-2
