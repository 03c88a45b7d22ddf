"""The training loop on a tiny random Qwen3-MoE (drpo-train, real processes): the moe/* metrics with an
FP8-style engine, routing replay's effect on the mismatch, and (slow) a SIGTERM resume of the asynchronous
layout whose checkpoint keeps batches sampled ahead WITH their routes, equal to the uninterrupted run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import resume_helpers as h
import torch

from drpo_trainer.runtime.stop import EXIT_PREEMPTED
from drpo_trainer.runtime.wire import batch_from_plain

MOE = {
    "rollout.quantization": "fp8",  # the engine's routers see other hidden states: some routes flip
    "rollout.parity_check": True,
    "rollout.parity_max_abs_logprob_diff": 100.0,  # a random model's probe gap is not what this test checks
}


def _config(tmp: Path, moe_dir: str, name: str, **overrides) -> tuple[Path, Path]:
    from drpo_trainer.builtin.arithmetic import problem_row, train_problems

    train = tmp / "train.jsonl"  # resume_helpers' data, without its dense model
    train.write_text("".join(json.dumps(problem_row(p)) + "\n" for p in train_problems()[:32]))
    ws = {"model": moe_dir, "train": str(train)}
    out = tmp / name
    return h.write_config(tmp / f"{name}.yaml", ws, out, **{**MOE, **overrides}), out


@pytest.mark.parametrize("replay", [True, False])
def test_moe_metrics_and_replay_in_the_loop(moe_model_dir, tmp_path, replay):
    cfg, out = _config(tmp_path, moe_model_dir, "run", **{"trainer.max_steps": 1, "rollout.routing_replay": replay})
    h.train(cfg)
    rows = h.metrics_rows(out)
    assert [r["step"] for r in rows] == [1]
    for r in rows:
        assert 0.5 < r["moe/route_agreement"] < 1.0  # FP8 weights flip some of a random router's near-ties
        assert 0.5 < r["parity/route_agreement"] < 1.0
        # the step's own mismatch is that of the mode it trains with; without replay it is larger
        trained = "moe/k3_kl_with_replay" if replay else "moe/k3_kl_without_replay"
        assert r["mismatch/k3_kl"] == pytest.approx(r[trained], rel=1e-3)
        assert r["moe/k3_kl_without_replay"] > r["moe/k3_kl_with_replay"]
        for layer in (0, 1):
            assert 1.0 <= r[f"moe/load_balance/layer_{layer}"] <= 8.0  # 8 experts: between even and one expert


@pytest.mark.slow  # three runs of the asynchronous layout (~2 min); test_routing's wire test is the fast cover
@pytest.mark.distributed
def test_async_sigterm_keeps_routes_of_batches_sampled_ahead_and_resumes_exactly(moe_model_dir, tmp_path):
    common = {
        "distributed.nproc_per_node": 2,
        "distributed.rollout_processes": 1,
        "trainer.max_off_policy_steps": 2,
        "algorithm.mismatch_correction": "tis",
        "rollout.routing_replay": True,
        "rollout.parity_check": False,
    }
    base_cfg, base = _config(tmp_path, moe_model_dir, "base", **common)
    h.train(base_cfg)
    cfg, out = _config(tmp_path, moe_model_dir, "run", **common, **{"checkpoint.every_steps": 0})
    proc = h.start(cfg, log=tmp_path / "first.log")

    def logged() -> bool:
        return (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2

    assert h.wait_for(logged, timeout=240), (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    stopped = int((out / "PREEMPTED").read_text())
    state = torch.load(out / "checkpoints" / f"step_{stopped:06d}" / "ranks" / "state_00000.pt", weights_only=True)
    kept = [batch_from_plain(b) for b in state["batches_ahead"]]
    assert kept and all(c.routes is not None and c.routes.dtype == torch.uint8 for b in kept for c in b.completions)
    h.train(cfg, "--resume", "auto")

    def comparable(row: dict) -> dict:
        return {k: v for k, v in h.without_timings(row).items() if not k.startswith("sync/")}

    assert [comparable(r) for r in h.metrics_rows(out)] == [comparable(r) for r in h.metrics_rows(base)]
    want = h.consolidated_weights(base / "checkpoints" / "step_000006")
    got = h.consolidated_weights(out / "checkpoints" / "step_000006")
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
