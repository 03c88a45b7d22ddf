"""One rank of the 2-process ZeRO-3 weight-sync test (run by tests/test_weight_sync.py via torchrun).

Builds the same tiny random Qwen3 on every rank, keeps its unsharded state_dict, wraps it in
DeepSpeed ZeRO-3 (gloo, CPU), then walks the bucketed gather and records, per rank, what the
test asserts: the real (ds_numel) sizes, the bucket plan, whether gathered tensors equal the
unsharded ones, which parameters were resident during each bucket, and what a recording
engine received from sync_weights. Usage: torchrun --nproc_per_node 2 this.py OUT_DIR BUCKET_BYTES
"""

import json
import os
import sys

import torch


class RecordingEngine:
    """Stands in for a rollout engine: copies what it is given, as vLLM's load_weights does."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.sessions = {"begin": 0, "finish": 0}

    def begin_weight_update(self):
        self.sessions["begin"] += 1

    def finish_weight_update(self):
        self.sessions["finish"] += 1

    def load_weights(self, named_tensors):
        names = []
        for name, t in named_tensors:
            self.weights[name] = t.detach().clone()
            names.append(name)
        self.calls.append(names)


def main(out_dir: str, bucket_bytes: int) -> None:
    import deepspeed
    import transformers
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from drpo_trainer.rollout.weight_sync import iter_gathered_buckets, param_nbytes, plan_buckets, sync_weights

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(1234)  # same weights on every rank before partitioning
    cfg = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,  # the tied head must be sent too
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # Threshold 0: partition every parameter, even tiny norms (the default keeps params
        # under 1e5 elements resident, which would make this test see no partitioning at all).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # client optimizer: no fused-Adam compile
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    named = list(engine.named_parameters(remove_duplicate=False))
    sizes = [(n.removeprefix("module."), param_nbytes(p)) for n, p in named]
    local_numel = {n.removeprefix("module."): p.numel() for n, p in named}
    plan = plan_buckets(sizes, bucket_bytes)
    by_name = {n.removeprefix("module."): p for n, p in named}

    gathered_names: list[str] = []
    max_abs_diff: dict[str, float] = {}
    extra_resident: list[list[str]] = []  # params gathered during a bucket that are not in it
    for bucket in iter_gathered_buckets(engine, bucket_bytes):
        in_bucket = {id(by_name[name]) for name, _ in bucket}  # a tied alias is the same parameter
        extra_resident.append(
            sorted(n for n, p in by_name.items() if p.ds_status == ZeroParamStatus.AVAILABLE and id(p) not in in_bucket)
        )
        for name, t in bucket:
            gathered_names.append(name)
            ref = reference[name]
            same_shape = tuple(t.shape) == tuple(ref.shape)
            max_abs_diff[name] = float((t - ref).abs().max()) if same_shape else float("inf")
    after = [n for n, p in named if p.ds_status == ZeroParamStatus.AVAILABLE]

    rec = RecordingEngine()
    metrics = sync_weights(engine, rec, bucket_bytes)
    engine_diff = {n: float((rec.weights[n] - reference[n]).abs().max()) for n in rec.weights}

    result = {
        "rank": rank,
        "world_size": torch.distributed.get_world_size(),
        "sizes": sizes,
        "reference_numel": {k: v.numel() for k, v in reference.items()},
        "element_size": {k: v.element_size() for k, v in reference.items()},
        "local_numel": local_numel,
        "plan": plan,
        "gathered_names": gathered_names,
        "max_abs_diff": max_abs_diff,
        "extra_resident": extra_resident,
        "resident_after": after,
        "engine_calls": rec.calls,
        "engine_sessions": rec.sessions,
        "engine_max_abs_diff": engine_diff,
        "metrics": metrics,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
