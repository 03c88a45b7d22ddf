"""Everything around vLLM that runs without it: sampling settings, output conversion, seeds,
the version gate, and the engine's control flow on a fake LLM (drpo_trainer/rollout/vllm_engine.py)."""

import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from drpo_trainer.config import RolloutConfig
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
    kw = ve.to_vllm_sampling_kwargs(spec, seed=42)
    assert kw == {
        "n": 8, "temperature": 0.7, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "max_tokens": 128,
        "logprobs": 0, "seed": 42, "skip_special_tokens": True,
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


def test_request_seeds_by_hand():
    # base = (seed * 65537 + dp_rank) * 2^24 = (0 + 1) * 16777216; prompts n = 4 apart
    assert ve.request_seeds(0, 1, 3, 4) == [16777216, 16777220, 16777224]
    assert ve.request_seeds(0, 1, 0, 4) == []


def test_request_seeds_never_share_a_stream():
    # vLLM gives sample i of a request the seed s + i: all (prompt, sample, rank, step-seed)
    # combinations of a run must be distinct, and TP ranks (same dp_rank) identical.
    n, prompts = 8, 64
    streams = set()
    for step_seed in range(3):
        for dp_rank in range(4):
            for s in ve.request_seeds(step_seed, dp_rank, prompts, n):
                streams.update(s + i for i in range(n))
    assert len(streams) == 3 * 4 * prompts * n
    assert ve.request_seeds(5, 2, 10, 4) == ve.request_seeds(5, 2, 10, 4)


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
    out = FakeRequest(seq, [], prompt_logprobs=[None, {6: FakeLogprob(-0.5), 1: FakeLogprob(-0.1)}, {7: FakeLogprob(-1.5)}])
    assert ve.prompt_logprobs_from_outputs([out], [seq]) == [[-0.5, -1.5]]
    with pytest.raises(ValueError, match="prompt_logprobs=0"):
        ve.prompt_logprobs_from_outputs([FakeRequest(seq, [], None)], [seq])


# ---------------------------------------------------------------------------------- version gate


@pytest.mark.parametrize("version", ["0.33.0", "0.33.2", "0.33.1+cu130", "0.33.0rc1"])
def test_tested_versions_pass(version):
    ve.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.1", "0.34.0", "1.0.0", "0.8.5", "not-a-version"])
def test_untested_versions_fail_with_the_install_command(version):
    with pytest.raises(RuntimeError) as exc:
        ve.check_vllm_version(version)
    assert "pip install 'drpo-trainer[vllm]'" in str(exc.value)


def test_missing_vllm_fails_at_startup_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'drpo-trainer\[vllm\]'"):
        ve.VLLMEngine("some/model", RolloutConfig(backend="vllm"), seed=0, max_model_len=64, dtype="bfloat16")


def test_importing_the_package_never_imports_vllm():
    code = (
        "import sys, drpo_trainer, drpo_trainer.rollout, drpo_trainer.rollout.vllm_engine, "
        "drpo_trainer.weight_sync, drpo_trainer.parity; print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_vllm_is_imported_in_exactly_one_module():
    importers = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "drpo_trainer").rglob("*.py")
        if any(
            line.strip().startswith(("import vllm", "from vllm"))
            for line in p.read_text(encoding="utf-8").splitlines()
        )
    )
    assert importers == ["drpo_trainer/rollout/vllm_engine.py"]


# ------------------------------------------------------------------- engine control flow, fake LLM


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


@dataclass
class FakeLLM:
    init_kwargs: dict
    calls: list = field(default_factory=list)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", [p["prompt_token_ids"] for p in prompts], params))
        outs = []
        for p, sp in zip(prompts, params):
            n = sp.kw["n"]
            # sample i of a prompt: token (seed + i) % 50 with log-prob -(i + 1) / 4
            comps = [
                FakeCompletion(i, [(sp.kw["seed"] + i) % 50], _positions([(sp.kw["seed"] + i) % 50], [-(i + 1) / 4]), "length")
                for i in range(n)
            ]
            outs.append(FakeRequest(p["prompt_token_ids"], comps))
        return outs

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, fn, args=()):
        self.calls.append(("rpc", fn.__name__, args))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.fixture
def fake_engine(monkeypatch):
    fake_vllm = SimpleNamespace(LLM=lambda **kw: FakeLLM(kw), SamplingParams=FakeSamplingParams, __version__="0.33.0")
    monkeypatch.setattr(ve, "import_vllm", lambda: fake_vllm)
    monkeypatch.setattr(ve.torch.cuda, "empty_cache", lambda: None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = RolloutConfig(backend="vllm", quantization="fp8", tensor_parallel_size=1, gpu_memory_utilization=0.4)
    return ve.VLLMEngine("m/path", cfg, seed=7, max_model_len=512, dtype="bfloat16")


def test_engine_is_built_for_colocation(fake_engine):
    kw = fake_engine.llm.init_kwargs
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["quantization"] == "fp8" and kw["enable_sleep_mode"] is True
    assert kw["seed"] == 7 and kw["max_model_len"] == 512 and kw["gpu_memory_utilization"] == 0.4
    assert kw["tensor_parallel_size"] == 1 and kw["dtype"] == "bfloat16"


def test_engine_generate_n_samples_with_request_seeds(fake_engine):
    spec = SamplingSpec(n=3, temperature=1.0, max_new_tokens=4, seed=0)
    comps = fake_engine.generate([[1, 2], [3]], spec)
    _, sent, params = fake_engine.llm.calls[-1]
    assert sent == [[1, 2], [3]]
    # dp_rank 0, seed 0: base 0, prompts n = 3 apart -> seeds 0 and 3
    assert [p.kw["seed"] for p in params] == [0, 3]
    assert [c.prompt_index for c in comps] == [0, 0, 0, 1, 1, 1]
    # fake token = (seed + i) % 50: prompt 0 -> 0, 1, 2; prompt 1 -> 3, 4, 5
    assert [c.completion_ids[0] for c in comps] == [0, 1, 2, 3, 4, 5]
    assert [c.rollout_logprobs[0] for c in comps[:3]] == [-0.25, -0.5, -0.75]


def test_engine_sleep_wake_and_weight_session(fake_engine):
    llm = fake_engine.llm
    fake_engine.sleep()
    fake_engine.sleep()  # idempotent
    fake_engine.begin_weight_update()
    fake_engine.load_weights(iter([("w", 1)]))
    fake_engine.finish_weight_update()
    fake_engine.wake_up()
    fake_engine.wake_up()  # idempotent
    assert llm.calls == [
        ("sleep", 1),
        ("wake_up", ["weights"]),  # only the weights while the learner's gathered tensors are live
        ("rpc", "_worker_begin_reload", ()),
        ("rpc", "_worker_load", ([("w", 1)],)),
        ("rpc", "_worker_finish_reload", ()),
        ("reset_prefix_cache",),  # cached KV came from the old weights
        ("wake_up", None),
    ]


def test_engine_rejects_tp_that_does_not_divide_world(monkeypatch):
    fake_vllm = SimpleNamespace(LLM=lambda **kw: FakeLLM(kw), SamplingParams=FakeSamplingParams)
    monkeypatch.setattr(ve, "import_vllm", lambda: fake_vllm)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 must divide the number of processes \\(3\\)"):
        ve.VLLMEngine("m", RolloutConfig(backend="vllm", tensor_parallel_size=2), seed=0, max_model_len=8, dtype="bfloat16")
