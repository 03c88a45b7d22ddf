"""LoRA checkpoints (model.lora): the adapters and their optimizer state only, the base model named by
path and weights hash and checked on resume, and a resume that continues bitwise.

Fast: a checkpoint's size against the adapters' parameter count, and an in-process save / load / step
that reproduces the uninterrupted learner bitwise (`test_checkpoint_holds_only_the_adapters...`).
Through the CLI (SIGTERM and resume): tests/test_lora_cli.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import resume_helpers as h
import torch
import yaml

from drpo_trainer.config import ConfigError, dump_config
from drpo_trainer.io.checkpoint import load_checkpoint, save_checkpoint
from drpo_trainer.learner.learner import Learner, TrainSample
from drpo_trainer.learner.lora import base_reference
from drpo_trainer.rollout import SamplingSpec
from drpo_trainer.rollout.hf_engine import HFEngine


@pytest.fixture(scope="module")
def ctx(one_process_ctx):
    return one_process_ctx


def _cfg(model_dir: str, stage: int):
    from drpo_trainer.config import load_config

    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.lora.rank=4",
            "optim.lr=1e-2",
            "optim.weight_decay=0.0",
            "trainer.prompts_per_step=4",
            "trainer.minibatches_per_step=1",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=12",
            f"distributed.single_process_zero_stage={stage}",
        ],
    )


def _batch(model_dir: str, seed: int) -> list[TrainSample]:
    engine = HFEngine(model_dir)
    prompts = [engine.tokenizer(f"Compute {a} + {a}.")["input_ids"] for a in (3, 14)]
    comps = engine.generate(prompts, SamplingSpec(n=4, max_new_tokens=12, seed=seed))
    adv = torch.randn(len(comps), generator=torch.Generator().manual_seed(seed))
    return [
        TrainSample(c.prompt_ids + c.completion_ids, len(c.prompt_ids), float(a), torch.tensor(c.rollout_logprobs))
        for c, a in zip(comps, adv)
    ]


def _step(learner: Learner, batch: list[TrainSample]) -> None:
    batch = copy.deepcopy(batch)
    learner.recompute_logprobs(batch)
    learner.update(batch)


def _adapters(learner: Learner) -> dict[str, torch.Tensor]:
    import deepspeed

    named = [(n, p) for n, p in learner.module.named_parameters() if ".lora_" in n]
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=learner.zero_stage == 3):
        return {n: p.detach().clone() for n, p in named}


@pytest.mark.parametrize("stage", [0, 3])
def test_checkpoint_holds_only_the_adapters_and_resumes_bitwise(tmp_path, ctx, stage):
    model_dir = h.workspace()["model"]
    cfg = _cfg(model_dir, stage)
    batches = [_batch(model_dir, seed) for seed in (1, 2)]
    learner = Learner(cfg, model_dir, total_optimizer_steps=2)
    _step(learner, batches[0])
    loop_state = {"lora_base": base_reference(model_dir)}
    ckpt = save_checkpoint(
        learner.engine,
        str(tmp_path / "run"),
        1,
        loop_state,
        config_yaml=dump_config(cfg),
        hf_save=lambda path: _hf_save(learner, model_dir, path),
        adapters_only=True,
        ctx=ctx,
    )
    seqs = [s.input_ids for s in batches[1]]
    _check_exports(ckpt, learner.score(seqs), seqs, tmp_path, model_dir)
    _step(learner, batches[1])
    want = _adapters(learner)

    # size: the adapters (fp32; ZeRO-3: its fp32 partition) and Adam's two moments of each, 3 x 4 bytes per
    # adapter parameter, plus a few KiB of pickle framing, names and scalars; the frozen base (12x more
    # parameters) is absent
    n_adapter = learner.trainable_params
    assert n_adapter == 11264 and learner.total_params > 10 * n_adapter
    ds_bytes = sum(f.stat().st_size for f in (ckpt / "ds").rglob("*") if f.is_file())
    assert 12 * n_adapter <= ds_bytes <= 12 * n_adapter + 96 * 1024, ds_bytes
    if stage == 0:
        saved = torch.load(ckpt / "ds" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
        assert sum(t.numel() for t in saved["module"].values()) == n_adapter
    assert json.loads((ckpt / "loop_state.json").read_text())["lora_base"]["path"] == model_dir

    resumed = Learner(cfg, model_dir, total_optimizer_steps=2)
    load_checkpoint(resumed.engine, ckpt, ctx=ctx)
    _step(resumed, batches[1])
    got = _adapters(resumed)
    assert want.keys() == got.keys() and len(want) == 28
    for name in want:
        assert torch.equal(want[name], got[name]), name  # weights and Adam moments came back exactly


def test_resume_onto_another_base_model_is_refused(tmp_path):
    from drpo_trainer.builtin.tiny_model import build_random_model
    from drpo_trainer.config import load_config
    from drpo_trainer.runtime.run_identity import check_resume

    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    other = build_random_model(tmp_path / "other", hidden_size=64, num_layers=2, seed=7)
    saved = base_reference(h.workspace()["model"])
    (ckpt / "loop_state.json").write_text(json.dumps({"step": 1, "world_size": 1, "lora_base": saved}))
    cfg = load_config(None, [f"model.path={other}", "model.lora.rank=4", f"output_dir={tmp_path / 'run'}"])
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    files = {f.name: [f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()] for f in ckpt.iterdir()}
    (ckpt / "MANIFEST.json").write_text(json.dumps({"files": files}))  # a complete checkpoint's small files
    with pytest.raises(ConfigError, match=r"trained on the base model .*Fix: set model.path"):
        check_resume(cfg, str(ckpt), allowed=["model.path"])
    cfg_same = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": h.workspace()["model"]})})
    check_resume(cfg_same, str(ckpt), allowed=["model.path"])  # the right base: accepted


def _hf_save(learner: Learner, model_dir: str, path: Path) -> None:
    from transformers import AutoTokenizer

    learner.module.config.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)


def _scores(model: torch.nn.Module, seqs: list[list[int]]) -> list[list[float]]:
    """Temperature-1 log-probs of tokens 1..L-1, one sequence at a time (the engine's `score`)."""
    out = []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            out.append(lp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
    return out


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def _check_exports(ckpt: Path, learner_scores, seqs, tmp_path: Path, model_dir: str) -> None:
    """Merged export, adapter export (peft) and the eval command's merge of the adapter all give the
    learner's log-probs (to float round-off: merged W + s B A vs the unmerged forward, packed vs not)."""
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from drpo_trainer.io.export import export_checkpoint, merge_adapter_dir

    merged = AutoModelForCausalLM.from_pretrained(export_checkpoint(ckpt, tmp_path / "merged"))
    assert _max_diff(_scores(merged, seqs), learner_scores) < 1e-5
    adapter_dir = export_checkpoint(ckpt, tmp_path / "adapter", adapter=True)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    assert _max_diff(_scores(adapter, seqs), learner_scores) < 1e-5
    saved = h.consolidated_weights(ckpt)  # the checkpoint's adapters, bitwise in the peft directory
    exported = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(exported) == 28
    for name, value in exported.items():
        assert torch.equal(value, saved[name.replace(".weight", ".default.weight")]), name
    for_eval = AutoModelForCausalLM.from_pretrained(merge_adapter_dir(adapter_dir, tmp_path / "eval", dtype="float32"))
    assert _max_diff(_scores(for_eval, seqs), _scores(merged, seqs)) < 1e-6
