"""Bucketed weight sync (drpo_trainer/rollout/weight_sync.py): the plan, the sizes, a real 2-process ZeRO-3 gather."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drpo_trainer.rollout.weight_sync import hf_name, iter_gathered_buckets, param_nbytes, plan_buckets, sync_weights

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ plan


def test_plan_by_hand():
    # budget 10: a(4)+b(5)=9 fits; +c(3)=12 does not -> [a,b]; c(3)+d(7)=10 fits exactly -> [c,d];
    # e(11) > 10 stands alone; f(0) and g(10): 0+10=10 fits -> [f,g]
    sizes = [("a", 4), ("b", 5), ("c", 3), ("d", 7), ("e", 11), ("f", 0), ("g", 10)]
    assert plan_buckets(sizes, 10) == [["a", "b"], ["c", "d"], ["e"], ["f", "g"]]


def test_oversized_parameter_closes_the_open_bucket():
    # a(2) is open when big(50) arrives: big must not join it, and c starts a new bucket after big.
    assert plan_buckets([("a", 2), ("big", 50), ("c", 2)], 10) == [["a"], ["big"], ["c"]]


def test_plan_invariants_on_random_sizes():
    g = torch.Generator().manual_seed(0)
    sizes = [(f"p{i}", int(x)) for i, x in enumerate(torch.randint(0, 300, (200,), generator=g))]
    budget = 256
    plan = plan_buckets(sizes, budget)
    flat = [n for b in plan for n in b]
    assert flat == [n for n, _ in sizes]  # every name exactly once, in model order
    size = dict(sizes)
    for b in plan:
        total = sum(size[n] for n in b)
        assert total <= budget or len(b) == 1, (b, total)
    # greedy: a bucket is closed only when the next name would not fit
    for b, nxt in zip(plan, plan[1:]):
        assert sum(size[n] for n in b) + size[nxt[0]] > budget


@pytest.mark.parametrize(
    "sizes, budget, match",
    [
        ([("a", 1)], 0, "bucket_bytes must be > 0"),
        ([("a", 1), ("a", 2)], 8, "listed twice"),
        ([("a", -1)], 8, "negative"),
    ],
)
def test_plan_rejects_bad_input(sizes, budget, match):
    with pytest.raises(ValueError, match=match):
        plan_buckets(sizes, budget)


# ----------------------------------------------------------------------------------------- sizes


def test_param_nbytes_plain_and_partitioned():
    p = torch.nn.Parameter(torch.zeros(3, 5, dtype=torch.bfloat16))
    assert param_nbytes(p) == 3 * 5 * 2  # 15 bf16 elements
    # A ZeRO-3 partitioned parameter: local data is empty, ds_numel carries the full size.
    q = torch.nn.Parameter(torch.empty(0, dtype=torch.float32))
    q.ds_numel = 64 * 128
    assert q.numel() == 0
    assert param_nbytes(q) == 64 * 128 * 4


def test_hf_name_strips_wrappers():
    assert hf_name("module.model.norm.weight") == "model.norm.weight"
    assert hf_name("module.module.lm_head.weight") == "lm_head.weight"
    assert hf_name("model.module_list.0.weight") == "model.module_list.0.weight"  # only a leading prefix


# ------------------------------------------------------------------------------ plain module path


class _Wrapper(torch.nn.Module):
    """Shaped like DeepSpeedEngine/DDP: the model lives under `.module`."""

    def __init__(self, inner):
        super().__init__()
        self.module = inner


class _Recorder:
    def __init__(self):
        self.calls, self.weights = [], {}

    def load_weights(self, named_tensors):
        names = []
        for n, t in named_tensors:
            self.weights[n] = t.clone()
            names.append(n)
        self.calls.append(names)


def _tiny():
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2, bias=False))
    return inner, _Wrapper(inner)


def test_plain_module_buckets_and_names():
    inner, wrapped = _tiny()
    # fp32 sizes: 0.weight 8*4*4=128 B, 0.bias 8*4=32 B, 1.weight 2*8*4=64 B; budget 160: [128+32], [64]
    buckets = [[(n, t.clone()) for n, t in b] for b in iter_gathered_buckets(wrapped, 160)]
    assert [[n for n, _ in b] for b in buckets] == [["0.weight", "0.bias"], ["1.weight"]]
    ref = inner.state_dict()
    for b in buckets:
        for n, t in b:
            assert torch.equal(t, ref[n])


def test_sync_weights_reports_bytes_and_buckets(monkeypatch):
    from types import SimpleNamespace

    import drpo_trainer.rollout.weight_sync as ws

    inner, wrapped = _tiny()
    rec = _Recorder()
    clock = iter([100.0, 100.75])  # the sync's start and end on a clock the test controls
    monkeypatch.setattr(ws, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    m = sync_weights(wrapped, rec, 160)
    monkeypatch.undo()
    assert rec.calls == [["0.weight", "0.bias"], ["1.weight"]]
    assert m["sync/bytes"] == 128 + 32 + 64
    assert m["sync/buckets"] == 2 and m["sync/params"] == 3
    assert m["sync/seconds"] == 0.75  # the whole sync: from before the first bucket to after the last
    assert all(torch.equal(rec.weights[n], t) for n, t in inner.state_dict().items())


def test_tied_weights_are_sent_under_every_name():
    # vLLM on CPU keeps a repacked copy of a tied lm_head that only a tensor sent under the
    # head's own name refreshes: sending the embedding alone left the engine 0.83 away in log-prob.
    inner = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    inner[1].weight = inner[0].weight  # tie, as tie_word_embeddings does
    rec = _Recorder()
    m = sync_weights(inner, rec, 1 << 20)
    assert rec.calls == [["0.weight", "1.weight"]]
    assert rec.weights["1.weight"] is rec.weights["0.weight"] or torch.equal(rec.weights["1.weight"], inner[0].weight)
    assert m["sync/params"] == 2


# ------------------------------------------------------------------------ 2-process ZeRO-3 gather


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_sync")
    budget = 100_000
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(REPO / "tests" / "dist_weight_sync_worker.py"),
        str(out),
        str(budget),
    ]
    # First DeepSpeed start on a machine compiles a CPU comm op (~40 s); cached afterwards.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return budget, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
def test_zero3_sizes_come_from_ds_numel(zero3_results):
    _, results = zero3_results
    for r in results:
        assert r["world_size"] == 2
        # Partitioned for real: every parameter's local numel is 0 ...
        assert set(r["local_numel"].values()) == {0}
        # ... yet the plan's sizes are the full sizes: numel x 4 bytes (fp32).
        for name, nbytes in r["sizes"]:
            assert nbytes == r["reference_numel"][name] * r["element_size"][name], name


@pytest.mark.distributed
def test_zero3_buckets_within_budget_and_complete(zero3_results):
    budget, results = zero3_results
    r0, r1 = results
    assert r0["plan"] == r1["plan"]  # every rank walks the same gathers
    size = dict(r0["sizes"])
    for b in r0["plan"]:
        assert sum(size[n] for n in b) <= budget or len(b) == 1
    assert len(r0["plan"]) > 3  # the budget really splits this model
    # q_proj is 512 x 64 x 4 B = 131072 B > 100000 B: it must stand alone
    assert ["model.layers.0.self_attn.q_proj.weight"] in r0["plan"]
    names = [n for b in r0["plan"] for n in b]
    assert sorted(names) == sorted(r0["reference_numel"])  # every parameter exactly once
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names  # the tied head under both names
    assert len(names) == len(set(names))


@pytest.mark.distributed
def test_zero3_gathered_tensors_equal_unsharded_model(zero3_results):
    _, results = zero3_results
    for r in results:
        assert sorted(r["gathered_names"]) == sorted(r["reference_numel"])
        assert max(r["max_abs_diff"].values()) == 0.0
        # Never the whole model at once: during each bucket nothing outside it is resident,
        # and everything is re-partitioned at the end.
        assert all(extra == [] for extra in r["extra_resident"])
        assert r["resident_after"] == []


@pytest.mark.distributed
def test_zero3_sync_into_engine(zero3_results):
    _, results = zero3_results
    for r in results:
        assert r["engine_calls"] == r["plan"]
        assert r["engine_sessions"] == {"begin": 1, "finish": 1}
        assert max(r["engine_max_abs_diff"].values()) == 0.0
        total = sum(r["reference_numel"][n] * r["element_size"][n] for n in r["reference_numel"])
        assert r["metrics"]["sync/bytes"] == total
        assert r["metrics"]["sync/buckets"] == len(r["plan"])
