"""LoRA adapters on the learner's model (peft; config `model.lora`, docs/lora.md).

Owns:
  apply_lora            wraps the base model in a peft `PeftModel`: adapters on `target_modules`, the
                        base frozen, so only the adapters are trainable and reach the optimizer
  merged_items          the weights the rollout engine and an export take from an adapted model: for
                        every adapted layer the merged weight W + (alpha / rank) B A (peft's own
                        `get_delta_weight`, the arithmetic of `merge_and_unload`) under its Hugging Face
                        name, and with `full=True` every other (frozen) weight as it is
  save_adapters_only    a checkpoint of the DeepSpeed engine holds the adapters and their optimizer state,
                        no frozen weight (tied aliases included)
  base_reference        the base model a checkpoint's adapters belong to: its path and a sha256 of its
                        weight files, checked on resume and by the offline export
  load_adapted          base model + a checkpoint's adapter weights -> a PeftModel (offline export, eval)

The engine starts from the same base model as the learner, and the frozen weights never change, so a
sync sends only the adapted layers (`merged_items(full=False)`). peft is imported only here, and only
when `model.lora` is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

ADAPTER = "default"  # peft's name of the one adapter we train
_PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_INIT = {"default": True, "gaussian": "gaussian", "random": False}  # model.lora.init -> peft's init_lora_weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def is_lora(model: torch.nn.Module) -> bool:
    """A peft model (checked without importing peft)."""
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def peft_config(lora, *, inference_mode: bool = False):
    """`model.lora` (drpo_trainer.config.LoraConfig) as peft's LoraConfig."""
    import peft

    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        init_lora_weights=_INIT[lora.init],
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=inference_mode,
    )


def apply_lora(model: torch.nn.Module, lora, *, seed: int) -> torch.nn.Module:
    """The PeftModel training adapters on `model`. The adapters' random initialisation draws from its own
    generator seeded with `seed`, so runs with the same seed start from the same adapters whatever the
    global RNG state. ValueError (one line, with the fix) when no module matches `target_modules`."""
    import peft

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapted = peft.get_peft_model(model, peft_config(lora))
    except ValueError as err:
        if "not found in the base model" not in str(err) and "Target modules" not in str(err):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"model.lora.target_modules={list(lora.target_modules)} matches no module of the model. "
            f"Fix: name some of its linear layers: {', '.join(names[:20])}"
        ) from None
    return adapted


def _numel(p: torch.Tensor) -> int:
    numel = getattr(p, "ds_numel", None)  # ZeRO-3 partitioned: the full size
    return int(numel if numel is not None else p.numel())


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, full sizes also under ZeRO-3."""
    params = list(model.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def hf_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj.base_layer.weight' -> 'model.layers.0.mlp.up_proj.weight'."""
    name = peft_name.removeprefix(_PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + scale * B A of one adapted layer (its parameters gathered), as peft's merge computes it."""
    weight = layer.get_base_layer().weight
    return weight.data + layer.get_delta_weight(ADAPTER).to(weight.dtype)


# Projections an engine may fuse into one layer (vLLM: qkv_proj, gate_up_proj) and reload as a whole:
# when adapters touch one of them, the others are sent too (a fused layer loaded in part is not whole).
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _touched_modules(layer_names: list[str]) -> set[str]:
    """HF module names a sync sends: the adapted layers, and their fused siblings."""
    touched = set()
    for name in layer_names:
        parent, _, leaf = hf_name(name).rpartition(".")
        group = next((g for g in FUSED_SIBLINGS if leaf in g), (leaf,))
        touched.update(f"{parent}.{member}" for member in group)
    return touched


def merged_items(
    model: torch.nn.Module, *, full: bool
) -> list[tuple[str, torch.nn.Parameter, list[torch.nn.Parameter], Callable[[], torch.Tensor]]]:
    """[(hf name, the parameter whose size it has, the parameters to gather, make the tensor)] in model
    order: each adapted layer's merged weight, and every other parameter of the modules a sync touches
    (their biases, the fused siblings of an adapted projection: FUSED_SIBLINGS); with `full` every
    parameter (tied aliases too). The adapters' own A and B are never listed: the engine and an export
    know no such weights."""
    layers = _lora_layers(model)
    weight_of = {f"{name}.base_layer.weight": layer for name, layer in layers.items()}
    touched = _touched_modules(list(layers))
    items = []
    for raw, p in model.named_parameters(remove_duplicate=False):
        if raw in weight_of:
            layer = weight_of[raw]
            gather = [p, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
            items.append((hf_name(raw), p, gather, lambda layer=layer: merged_weight(layer)))
        elif ".lora_" not in raw and (full or hf_name(raw).rpartition(".")[0] in touched):
            items.append((hf_name(raw), p, [p], lambda p=p: p.data))
    return items


def save_adapters_only(engine) -> None:
    """Make `engine.save_checkpoint(..., exclude_frozen_parameters=True)` leave out every frozen weight.
    DeepSpeed drops the frozen parameters it finds with `named_parameters()`, which lists a tied weight
    once: the alias (`lm_head.weight` of a tied head) stayed in the checkpoint, a whole embedding matrix."""
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict


# -- the base model a checkpoint's adapters belong to -------------------------------------------------
def _local_dir(model_path: str) -> Optional[Path]:
    if Path(model_path).is_dir():
        return Path(model_path)
    try:  # a hub id: its snapshot in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: no local copy to hash
        return None


def base_reference(model_path: str) -> dict[str, str]:
    """{"path", "sha256"}: sha256 over the names, sizes and contents of the model's weight files."""
    root = _local_dir(model_path)
    if root is None:
        raise FileNotFoundError(f"model.lora: no local copy of the base model {model_path} to fingerprint")
    from drpo_trainer.io.fingerprint import files_sha256

    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return {"path": str(model_path), "sha256": files_sha256(files, [str(f.relative_to(root)) for f in files])}


def check_base_reference(saved: dict, model_path: str, where: str) -> None:
    """ValueError when `model_path` is not the base model whose reference `saved` is (another sha256)."""
    current = base_reference(model_path)
    if current["sha256"] != saved["sha256"]:
        raise ValueError(
            f"{where}: its LoRA adapters were trained on the base model {saved['path']} (weights sha256 "
            f"{saved['sha256'][:12]}...), but {model_path} has other weights ({current['sha256'][:12]}...). "
            f"Fix: set model.path to the base model the adapters were trained on ({saved['path']})"
        )


def saved_base_reference(checkpoint: Path) -> Optional[dict]:
    """The checkpoint's base-model reference, or None for a full fine-tuning checkpoint."""
    return json.loads((Path(checkpoint) / "loop_state.json").read_text()).get("lora_base")


def load_adapted(base_path: str, lora, adapter_state: dict[str, torch.Tensor], dtype: str) -> torch.nn.Module:
    """The base model with a checkpoint's adapter weights (peft names, as the learner's module has them)."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
    model = peft.get_peft_model(base, peft_config(lora, inference_mode=True))
    own = {n for n, _ in model.named_parameters() if ".lora_" in n}
    state = {k.removeprefix("module."): v for k, v in adapter_state.items()}
    missing = sorted(own - set(state))
    if missing:
        raise ValueError(f"the checkpoint has no weights for the adapters {missing[:3]}; is it a LoRA checkpoint?")
    model.load_state_dict({k: state[k].to(getattr(torch, dtype)) for k in own}, strict=False)
    return model
