"""torchrun worker of tests/test_async.py (3 processes): 2 learners (ZeRO-3 shards) and 1 rollout process.

The learners publish policy versions 0, 1, 2 through RemoteRollouts (the trainer's path: the ZeRO-3
gather, learner 0's broadcast over the bridge), each after a real optimizer step; the rollout
process takes them in with RolloutWorker.receive (the engine's load path) and sends its engine's
whole state back. Learner 0 compares it, tensor by tensor, with the gathered learner weights and
writes report.json to $DRPO_TEST_OUT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from drpo_trainer.config import load_config
from drpo_trainer.learner.learner import TrainSample
from drpo_trainer.rollout.weight_sync import iter_gathered_buckets
from drpo_trainer.runtime.async_rollouts import RemoteRollouts, RolloutWorker
from drpo_trainer.runtime.bridge import connect
from drpo_trainer.runtime.run import build_run

VERSIONS = 3


def config():
    return load_config(
        None,
        [
            f"model.path={os.environ['DRPO_TEST_MODEL']}",
            f"data.train_files=[{os.environ['DRPO_TEST_DATA']}]",
            f"output_dir={os.environ['DRPO_TEST_OUT']}/run",
            "data.max_prompt_tokens=64",
            "distributed.rollout_processes=1",
            "distributed.zero_stage=3",
            "eval.files={}",
            "rollout.parity_check_at_start=false",
            "rollout.max_new_tokens=8",
            "rollout.sync_bucket_mb=1",  # several buckets
            "reward.num_workers=1",
            "trainer.prompts_per_step=4",
            "trainer.max_steps=10",
            "trainer.micro_batch_tokens_per_gpu=512",
            "optim.lr=1e-2",
        ],
    )


def learner_weights(module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for bucket in iter_gathered_buckets(module, 2**30) for name, t in bucket}


def train_once(run, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + run.ctx.rank)
    samples = [
        TrainSample(
            input_ids=torch.randint(0, 100, (12,), generator=g).tolist(),
            prompt_len=4,
            advantage=1.0 if i % 2 else -1.0,
            rollout_logprobs=torch.zeros(8),
        )
        for i in range(4)
    ]
    run.learner.recompute_logprobs(samples)
    run.learner.update(samples)


def main() -> None:
    cfg = config()
    ctx, bridge = connect("gloo", 1)
    if bridge.is_rollout:
        worker = RolloutWorker(cfg, ctx, bridge)
        for _ in range(VERSIONS):
            header = worker.receive()
            state = {k: v.detach().clone() for k, v in worker.engine.model.state_dict().items()}
            bridge.send(0, ("state", header["version"], state))
        assert worker.receive()["stop"]
        worker.finish()
        worker.close()
        return
    run = build_run(cfg, ctx, rollouts=lambda run: RemoteRollouts(run, bridge))
    rollouts = run.rollouts
    report = {"versions": [], "params_compared": [], "mismatched": [], "changed": []}
    previous = None
    for version in range(VERSIONS):
        if version == 0:
            rollouts.start()
        else:
            train_once(run, version)
            run.step = version
            rollouts.publish(version, evaluate=False, last=False)
        want = learner_weights(run.learner.module)  # every learner: a ZeRO-3 gather
        if bridge.rank == 0:
            kind, got_version, state = bridge.recv(bridge.rollout_ranks[0])
            assert kind == "state"
            report["versions"].append(got_version)
            report["params_compared"].append(len(want))
            report["mismatched"].append(sorted(n for n, t in want.items() if not torch.equal(state[n], t)))
            if previous is not None:
                report["changed"].append(any(not torch.equal(previous[n], want[n]) for n in want))
            previous = want
    rollouts.close()
    if bridge.rank == 0:
        Path(os.environ["DRPO_TEST_OUT"], "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
