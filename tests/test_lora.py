"""LoRA training (model.lora, peft) on the real DeepSpeed learner, one process, tiny random Qwen3.

What must hold: with B = 0 the adapted learner's log-probs are the base model's bitwise; only the
adapters are trainable, in the optimizer and moved by a step, at ZeRO 0 and 3 with gradient
checkpointing; a sync sends the merged weights W + (alpha / r) B A of the adapted layers only, the
engine's copy equals them exactly, and after one optimizer step the engine's log-probs agree with the
learner's below the fp32 parity threshold.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from drpo_trainer.config import ConfigError, load_config
from drpo_trainer.learner.learner import Learner, TrainSample
from drpo_trainer.rollout import SamplingSpec
from drpo_trainer.rollout.hf_engine import HFEngine
from drpo_trainer.rollout.parity import DEFAULT_THRESHOLDS
from drpo_trainer.rollout.weight_sync import sync_weights

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from drpo_trainer.builtin.tiny_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("lora_model"), hidden_size=64, num_layers=2, seed=1)


@pytest.fixture(scope="module")
def ctx(one_process_ctx):
    return one_process_ctx


def make_cfg(model_dir, *overrides, lora=True):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "optim.lr=1e-2",
            "optim.weight_decay=0.0",
            "trainer.prompts_per_step=4",
            "trainer.minibatches_per_step=1",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=12",
            *([f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}"] if lora else []),
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def engine(model_dir):
    return HFEngine(model_dir)


@pytest.fixture(scope="module")
def samples(engine):
    prompts = [engine.tokenizer(f"Compute {a} + {a}.")["input_ids"] for a in (3, 14, 25, 61)]
    comps = engine.generate(prompts, SamplingSpec(n=4, max_new_tokens=12, seed=5))
    adv = torch.randn(len(comps), generator=torch.Generator().manual_seed(0))
    return [
        TrainSample(c.prompt_ids + c.completion_ids, len(c.prompt_ids), float(a), torch.tensor(c.rollout_logprobs))
        for c, a in zip(comps, adv)
    ]


def adapted_linears(model_dir) -> dict[str, torch.nn.Linear]:
    """The base model's linear layers the default target_modules name, by their HF weight name."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return {
        f"{n}.weight": m
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS
    }


def peft_params(learner) -> dict[str, torch.Tensor]:
    """Every parameter of the learner's PeftModel (gathered under ZeRO-3), by its peft name."""
    import deepspeed

    named = list(learner.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None, enabled=learner.zero_stage == 3):
        return {n: p.data.detach().clone() for n, p in named}


def test_config_defaults_bounds_and_a_target_that_matches_nothing(model_dir, ctx):
    lora = load_config(None, ["model.lora={}"]).model.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.init) == (16, 32.0, 0.0, "default")
    assert tuple(lora.target_modules) == TARGETS
    assert load_config(None, []).model.lora is None  # full fine-tuning unless asked
    for bad in ("model.lora.rank=0", "model.lora.dropout=1.0", "model.lora.init=pissa"):
        with pytest.raises(ConfigError, match="model.lora"):
            load_config(None, [bad])
    with pytest.raises(ValueError, match=r"matches no module of the model\. Fix: .*q_proj"):
        Learner(make_cfg(model_dir, "model.lora.target_modules=[attn_qkv]"), model_dir, total_optimizer_steps=1)


def test_step0_logprobs_are_the_base_models_bitwise_and_the_parity_gate_passes(model_dir, ctx, engine, samples):
    from drpo_trainer.runtime.rollouts import check_engine_parity

    seqs = [s.input_ids for s in samples]
    base = Learner(make_cfg(model_dir, lora=False), model_dir, total_optimizer_steps=1).score(seqs)
    cfg = make_cfg(model_dir)
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    assert learner.score(seqs) == base  # B = 0: x W^T + (x A^T) 0^T adds exact zeros
    stats = sync_weights(learner.module, engine, 1 << 20)
    linears = adapted_linears(model_dir)
    assert stats["sync/params"] == len(linears) == 14  # 7 projections x 2 layers, nothing else
    assert stats["sync/bytes"] == sum(m.weight.numel() * 4 for m in linears.values())
    engine_params = dict(engine.model.named_parameters())
    for name, m in linears.items():
        assert torch.equal(engine_params[name], m.weight), name  # W + 0 = W
    probe = [SimpleNamespace(prompt_ids=s) for s in seqs[:4]]
    run = SimpleNamespace(cfg=cfg, engine=engine, learner=learner, train_set=probe)
    assert check_engine_parity(run)["parity/mean_abs_logprob_diff"] < 1e-5


@pytest.mark.parametrize("stage", [0, 3])
def test_one_step_moves_only_adapters_and_the_synced_engine_matches(model_dir, ctx, samples, stage):
    cfg = make_cfg(model_dir, f"distributed.single_process_zero_stage={stage}", "model.gradient_checkpointing=true")
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    assert learner.zero_stage == stage
    # trainable = the adapters: r x (in + out) for every adapted linear layer
    expected = sum(RANK * (m.in_features + m.out_features) for m in adapted_linears(model_dir).values())
    assert learner.trainable_params == expected == 11264
    trainable = {n for n, p in learner.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimized = sum(getattr(p, "ds_numel", p.numel()) for group in _groups(learner) for p in group)
    assert optimized == expected
    before = peft_params(learner)
    batch = [copy.deepcopy(s) for s in samples]
    learner.recompute_logprobs(batch)
    learner.update(batch)
    after = peft_params(learner)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert {n for n in changed if ".lora_B." in n} == {n for n in trainable if ".lora_B." in n}  # every B moved
    assert changed <= trainable  # nothing frozen moved
    engine = HFEngine(model_dir)
    sync_weights(learner.module, engine, 1 << 16)
    engine_params = dict(engine.model.named_parameters())
    scale = ALPHA / RANK
    for name, m in adapted_linears(model_dir).items():  # the engine's copy: W + scale * B A, exactly
        peft = "base_model.model." + name.removesuffix(".weight")
        merged = m.weight + (after[f"{peft}.lora_B.default.weight"] @ after[f"{peft}.lora_A.default.weight"]) * scale
        assert torch.equal(engine_params[name], merged), name
    seqs = [s.input_ids for s in samples]
    diffs = [abs(a - b) for e, lr in zip(engine.score(seqs), learner.score(seqs)) for a, b in zip(e, lr)]
    assert max(diffs) < DEFAULT_THRESHOLDS["float32"] / 10 and sum(diffs) / len(diffs) < 1e-5


def _groups(learner) -> list[list[torch.nn.Parameter]]:
    """The parameters the optimizer updates (ZeRO-3 keeps them as fp16_groups, a torch optimizer in param_groups)."""
    opt = learner.optimizer
    return getattr(opt, "fp16_groups", None) or [g["params"] for g in opt.param_groups]


def test_adapter_dropout_switches_off_minibatch_one_reuse(model_dir, ctx):
    assert Learner(make_cfg(model_dir), model_dir, total_optimizer_steps=1).can_reuse_logprobs
    dropped = Learner(make_cfg(model_dir, "model.lora.dropout=0.1"), model_dir, total_optimizer_steps=1)
    assert not dropped.can_reuse_logprobs


def test_a_sync_sends_the_fused_siblings_of_an_adapted_projection(model_dir, ctx, engine):
    # adapters on q_proj and up_proj only: k_proj, v_proj (one qkv_proj in vLLM) and gate_proj
    # (gate_up_proj) go too, unchanged; o_proj, down_proj and everything else stay behind
    cfg = make_cfg(model_dir, "model.lora.target_modules=[q_proj,up_proj]")
    learner = Learner(cfg, model_dir, total_optimizer_steps=1)
    sent = []
    spy = SimpleNamespace(load_weights=lambda bucket: sent.extend(name for name, _ in bucket))
    stats = sync_weights(learner.module, spy, 1 << 20)
    want = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "k_proj", "v_proj")}
    want |= {f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate_proj", "up_proj")}
    assert sorted(sent) == sorted(want) and stats["sync/params"] == 10


def test_preflight_names_the_missing_peft_and_the_extra_that_installs_it(monkeypatch):
    from importlib import util

    from drpo_trainer.runtime import preflight

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r'model.lora needs peft.*pip install -e "\.\[lora\]"'):
        preflight.check_lora(load_config(None, ["model.lora={}"]))
    preflight.check_lora(load_config(None, []))  # full fine-tuning does not need it
