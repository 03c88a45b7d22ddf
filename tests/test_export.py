"""HF export: the final model written at the end of a run (gathered live from the learner's
parameters) and `drpo-train export <checkpoint> <dir>` (read offline from the checkpoint) load
with `from_pretrained` and give the learner's logits on a fixed batch, bitwise in float32.

Two processes run ZeRO-3 (the checkpoint holds one shard per rank); one process runs unpartitioned
(`distributed.single_process_zero_stage: 0`, the default), and its checkpoint holds the whole
module. "The learner's logits" come from the checkpoint read here by DeepSpeed's own API, not by
the export code under test: `get_fp32_state_dict_from_zero_checkpoint` (the fp32 master weights
of the ZeRO shards) or, at stage 0, the module state DeepSpeed saved, in the model class built
from the saved config.
"""

from __future__ import annotations

import json

import pytest
import resume_helpers as h
import torch

from drpo_trainer.cli import main as cli_main

PROMPTS = ["Compute 3 + 4. Put the final answer in \\boxed{}.", "Compute 12 * 7. Put the final answer in \\boxed{}."]


def _batch(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


def _learner_weights(checkpoint) -> dict:
    """The checkpoint's weights as DeepSpeed reads them (independent of drpo_trainer.io.export)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    shards = checkpoint / "ds" / "state"
    if any(shards.glob("zero_pp_rank_*")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "ds"), tag="state")
    return torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def _learner_model(checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint / "hf"), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(_learner_weights(checkpoint), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    model.tie_weights()
    return model.eval()


def _check_export(nproc: int, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from drpo_trainer.io.reshard import saved_at_zero3

    out, _ = h.baseline(nproc)
    ckpt = out / "checkpoints" / "step_000006"
    assert saved_at_zero3(ckpt) == (nproc > 1)  # ZeRO-3 shards with two processes, the whole module with one
    assert cli_main(["export", str(ckpt), str(tmp_path / "offline")]) == 0
    batch = _batch(out / "final")
    want = _logits(_learner_model(ckpt), batch)
    for exported in (out / "final", tmp_path / "offline"):
        names = {p.name for p in exported.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
        assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
        model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        assert torch.equal(_logits(model, batch), want), exported
    # six updates moved the weights: the exported logits are not the initial model's
    initial = AutoModelForCausalLM.from_pretrained(h.workspace()["model"], dtype=torch.float32).eval()
    assert (_logits(initial, batch) - want).abs().max() > 1e-3


def test_final_and_offline_exports_reproduce_the_learner_logits(tmp_path):
    _check_export(1, tmp_path)


@pytest.mark.distributed
def test_exports_of_a_two_process_run_reproduce_the_learner_logits(tmp_path):
    _check_export(2, tmp_path)


def test_export_in_bfloat16_stores_bfloat16_weights(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out, _ = h.baseline(1)
    ckpt = out / "checkpoints" / "step_000006"
    assert cli_main(["export", str(ckpt), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    batch = _batch(out / "final")
    want = _logits(_learner_model(ckpt), batch)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval(), batch)
    # bf16 keeps 8 bits of mantissa: weights round by <= 2^-9 relative, logits of this tiny model move by well
    # under 0.05 while the initial-vs-trained difference checked above is larger than 1e-3
    assert 0 < (got - want).abs().max() < 0.05


def test_export_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    import shutil

    out, _ = h.baseline(1)
    broken = tmp_path / "step_000006"
    shutil.copytree(out / "checkpoints" / "step_000006", broken)
    shard = next((broken / "ds" / "state").glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a crash or a full disk
    assert cli_main(["export", str(broken), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "is not a complete checkpoint" in err and shard.name in err
    assert not (tmp_path / "x").exists()
