"""One learner step on a fixed batch with mixed zero and non-zero advantage groups, for the
exactness tests of the learner's shortcuts (tests/test_exact_shortcuts.py).

`step_delta` runs the learner part of `trainer.run_step` (mu per mini-batch, then the updates)
in the calling process. Run as a script under torchrun it does the same on every rank of a
ZeRO-3 group, on that rank's slice of the groups, and rank 0 saves the parameter change:

    torchrun --nproc_per_node N tests/exact_update_worker.py MODEL_DIR OUT_FILE SKIP REUSE ORDER
"""

from __future__ import annotations

import sys

import torch

G = 4
# group g's advantages: 0 = all exactly zero (no reward variance), else random non-zero
NONZERO_GROUPS = (0, 3)


def make_batch(vocab_size: int, groups: int = 4, seed: int = 0) -> list:
    """`groups` x G samples of random tokens; groups 1 and 2 have advantage exactly 0."""
    from drpo_trainer.learner.learner import TrainSample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in range(groups):
        prompt = torch.randint(3, vocab_size, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen)
        for _ in range(G):
            n = int(torch.randint(2, 11, (1,), generator=gen))
            completion = torch.randint(3, vocab_size, (n,), generator=gen)
            adv = float(torch.randn((), generator=gen)) if g in NONZERO_GROUPS else 0.0
            out.append(
                TrainSample(
                    input_ids=prompt.tolist() + completion.tolist(),
                    prompt_len=len(prompt),
                    advantage=adv,
                    rollout_logprobs=-torch.rand(n, generator=gen),  # an engine that differs a little
                )
            )
    return out


def reorder(samples: list, order: list[int]) -> list:
    """Groups in `order` (e.g. [0, 2, 1, 3]: the one-process batch whose mini-batches equal
    those of two ranks holding groups {0, 1} and {2, 3})."""
    return [s for g in order for s in samples[g * G : (g + 1) * G]]


def full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from drpo_trainer.rollout.weight_sync import iter_gathered_buckets

    out = {}
    for bucket in iter_gathered_buckets(module, 1 << 20):
        out.update({n: t.detach().clone() for n, t in bucket})
    return out


def step_delta(cfg, model_dir: str, samples: list) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(parameter change of one rollout step, metrics of each mini-batch update)."""
    from drpo_trainer.learner.learner import Learner
    from drpo_trainer.metrics import MetricAccumulator
    from drpo_trainer.runtime.loop import split_minibatches

    learner = Learner(cfg, model_dir, total_optimizer_steps=cfg.trainer.minibatches_per_step)
    before = full_params(learner.module)
    minibatches = split_minibatches(samples, cfg.trainer.minibatches_per_step, G)
    reuse = cfg.trainer.reuse_first_minibatch_logprobs and learner.can_reuse_logprobs
    entropy = MetricAccumulator(means=["policy/entropy"])
    for mb in minibatches[1:] if reuse else minibatches:
        learner.recompute_logprobs(mb, entropy)
    metrics = [
        learner.update(mb, behaviour_from_forward=(k == 0 and reuse), entropy=entropy)
        for k, mb in enumerate(minibatches)
    ]
    metrics[0].update(entropy.result(all_reduce=True))
    after = full_params(learner.module)
    return {n: after[n] - before[n] for n in after}, metrics


def step_config(model_dir: str, *overrides: str):
    """A config under which the step's parameter change is proportional to the gradient: Adam's
    first step is -lr g / (|g| + eps), so eps = 1 keeps it monotone in g instead of ~sign(g)."""
    from drpo_trainer.config import load_config

    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "optim.lr=1.0",
            "optim.eps=1.0",
            "optim.weight_decay=0.0",
            "optim.warmup_steps=0",
            "optim.grad_clip=0",
            "trainer.prompts_per_step=4",
            "trainer.minibatches_per_step=2",
            "data.max_prompt_tokens=10",
            "rollout.max_new_tokens=10",
            "trainer.micro_batch_tokens_per_gpu=40",  # several micro-batches per mini-batch
            f"rollout.samples_per_prompt={G}",
            *overrides,
        ],
    )


def main(model_dir: str, out_file: str, skip: str, reuse: str, order: str) -> None:
    from transformers import AutoConfig

    from drpo_trainer.runtime.distributed import setup_distributed

    ctx = setup_distributed("gloo")
    cfg = step_config(
        model_dir,
        f"trainer.skip_zero_advantage={skip}",
        f"trainer.reuse_first_minibatch_logprobs={reuse}",
        "distributed.zero_stage=3",
        "distributed.single_process_zero_stage=null",  # ZeRO-3 also with one process
    )
    batch = reorder(make_batch(AutoConfig.from_pretrained(model_dir).vocab_size), [int(g) for g in order.split(",")])
    per = len(batch) // ctx.world_size
    delta, metrics = step_delta(cfg, model_dir, batch[ctx.rank * per : (ctx.rank + 1) * per])
    if ctx.is_main:
        torch.save({"delta": delta, "metrics": metrics}, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
