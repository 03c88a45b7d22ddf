"""Every shipped config parses, fits its planned world, and the paper recipes hold the paper's settings.

The expected values below are typed from the paper settings (docs/algorithms.md, "Paper
settings"), not read from the YAML files.
"""

import json
from pathlib import Path

import pytest

from drpo_trainer.algorithms.losses import validate_loss_params
from drpo_trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))

# name -> (model, prompts/step, samples/prompt, prompts per mini-batch, loss, loss params, rollout quantization)
PAPER = {
    "qwen3_4b_base_drpo.yaml": ("Qwen/Qwen3-4B-Base", 64, 8, 32, "drpo", {"delta": 12.5}, None),
    "qwen3_4b_base_dppo.yaml": ("Qwen/Qwen3-4B-Base", 64, 8, 32, "dppo_tv", {"delta": 0.15}, None),
    "qwen3_4b_base_grpo.yaml": ("Qwen/Qwen3-4B-Base", 64, 8, 32, "grpo", {"clip_low": 0.2, "clip_high": 0.28}, None),
    "qwen3_30b_a3b_base_drpo.yaml": ("Qwen/Qwen3-30B-A3B-Base", 256, 16, 32, "drpo", {"delta": 12.5}, None),
    "qwen3_30b_a3b_base_drpo_fp8_rollout.yaml": (
        "Qwen/Qwen3-30B-A3B-Base",
        256,
        16,
        32,
        "drpo",
        {"delta": 12.5},
        "fp8",
    ),
    "r1_distill_qwen_1p5b_drpo.yaml": (
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        64,
        8,
        16,
        "drpo",
        {"delta": 12.5},
        None,
    ),
}


def _load(name, overrides=None):
    return load_config(ROOT / "configs" / name, overrides)


def test_every_paper_recipe_is_shipped():
    assert set(PAPER) <= set(ALL_CONFIGS), sorted(set(PAPER) - set(ALL_CONFIGS))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_parses_and_batch_sizes_divide_its_world(name):
    cfg = _load(name)
    d = cfg.distributed
    gpus_per_node = 8 if d.nproc_per_node == "auto" else int(d.nproc_per_node)  # "auto": nodes of 8 GPUs
    world = gpus_per_node * d.nnodes
    cfg.check_world(world)
    validate_loss_params(cfg.algorithm.loss, cfg.algorithm.loss_params)
    # one full-length sample must fit one micro-batch (the packer refuses longer samples)
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    assert cfg.trainer.micro_batch_tokens_per_gpu >= longest
    if cfg.rollout.vllm.max_model_len is not None:
        assert cfg.rollout.vllm.max_model_len >= longest
    # a tensor-parallel engine lives inside one node
    tp = cfg.rollout.vllm.tensor_parallel_size
    assert gpus_per_node % tp == 0 and world % tp == 0


WITH_DEEPSPEED_JSON = [n for n in ALL_CONFIGS if load_config(ROOT / "configs" / n).distributed.deepspeed_config]


def test_the_large_recipes_name_a_deepspeed_json():
    assert set(WITH_DEEPSPEED_JSON) == set(PAPER)  # tiny_cpu.yaml runs on our defaults


@pytest.mark.parametrize("name", WITH_DEEPSPEED_JSON)
def test_deepspeed_config_file_agrees_with_the_yaml(name):
    cfg = _load(name)
    path = ROOT / cfg.distributed.deepspeed_config
    zero = json.loads(path.read_text())["zero_optimization"]
    assert zero["stage"] == cfg.distributed.zero_stage  # the JSON would silently win otherwise
    # ZeRO-Offload needs DeepSpeed's CPU Adam, which the learner builds only when the YAML says so
    assert ("offload_optimizer" in zero) == cfg.distributed.offload_optimizer


@pytest.mark.parametrize("json_name, offload", [("zero3.json", False), ("zero3_offload.json", True)])
def test_deepspeed_jsons_merge_into_a_valid_deepspeed_config(json_name, offload):
    """Our keys <- the JSON's keys, then DeepSpeed's own (extra-forbidding) config parser."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from drpo_trainer.learner.learner import deepspeed_config

    cfg = _load(
        "qwen3_4b_base_drpo.yaml",
        [
            f"distributed.deepspeed_config={ROOT / 'configs/deepspeed' / json_name}",
            f"distributed.offload_optimizer={offload}",
        ],
    )
    merged = deepspeed_config(cfg, world_size=8)
    ds = DeepSpeedConfig(merged)
    assert ds.zero_optimization_stage == 3
    assert ds.zero_config.overlap_comm is True and ds.zero_config.reduce_bucket_size == 50_000_000
    assert ds.gradient_clipping == 1.0 and merged["bf16"] == {"enabled": True}
    assert merged["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False  # ours, kept
    if offload:
        assert ds.zero_config.offload_optimizer.device == "cpu" and ds.zero_config.offload_optimizer.pin_memory
    else:
        assert ds.zero_config.offload_optimizer is None


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_settings(name):
    model, prompts, samples, minibatch_prompts, loss, params, quant = PAPER[name]
    cfg = _load(name)
    assert cfg.model.path == model and cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    t, r, a, o = cfg.trainer, cfg.rollout, cfg.algorithm, cfg.optim
    assert (t.prompts_per_step, r.samples_per_prompt) == (prompts, samples)
    assert t.prompts_per_step // t.minibatches_per_step == minibatch_prompts
    assert a.loss == loss and a.loss_params == validate_loss_params(loss, params)  # file values over defaults
    assert all(a.loss_params[k] == v for k, v in params.items())
    assert r.quantization == quant and r.backend == "vllm"
    # shared by every recipe of the paper
    assert (o.lr, tuple(o.betas), o.weight_decay, o.grad_clip, o.schedule, o.warmup_steps) == (
        1e-6, (0.9, 0.999), 0.01, 1.0, "constant", 0
    )  # fmt: skip
    assert (r.temperature, r.top_p, r.top_k) == (1.0, 1.0, 0)
    assert (cfg.data.max_prompt_tokens, r.max_new_tokens, cfg.horizon) == (2048, 8192, 8192)
    assert (a.loss_agg_mode, a.normalize_by_std, a.mismatch_correction) == ("seq-mean-token-sum-norm", False, None)
    assert cfg.reward.name == "math" and cfg.reward.extraction == "boxed"
    assert cfg.data.train_files == ["data/dapo_math_17k.jsonl"]
    assert (
        cfg.eval.files == {"aime24": "data/aime24.jsonl", "aime25": "data/aime25.jsonl"}
        and cfg.eval.samples_per_prompt == 16
    )
    assert cfg.tracking.wandb.mode == "online"
    assert Path(cfg.output_dir).name == Path(name).stem  # runs never overwrite each other


def _algorithm_free(name):
    dump = _load(name).model_dump()
    dump.pop("output_dir")
    dump["tracking"]["wandb"].pop("tags")
    return dump


@pytest.mark.parametrize("baseline", ["qwen3_4b_base_dppo.yaml", "qwen3_4b_base_grpo.yaml"])
def test_baselines_differ_from_drpo_only_in_the_policy_loss(baseline):
    ours, theirs = _algorithm_free("qwen3_4b_base_drpo.yaml"), _algorithm_free(baseline)
    for d in (ours, theirs):
        d["algorithm"].pop("loss"), d["algorithm"].pop("loss_params")
    assert ours == theirs


def test_fp8_rollout_differs_from_bf16_only_in_rollout_precision():
    bf16, fp8 = (
        _algorithm_free("qwen3_30b_a3b_base_drpo.yaml"),
        _algorithm_free("qwen3_30b_a3b_base_drpo_fp8_rollout.yaml"),
    )
    assert (bf16["rollout"].pop("quantization"), fp8["rollout"].pop("quantization")) == (None, "fp8")
    assert bf16 == fp8


def test_30b_recipe_needs_a_matching_node_count():
    # 256 prompts over 3 nodes x 8 GPUs x 8 mini-batches: 256 % 192 = 64, not whole groups per rank
    cfg = _load("qwen3_30b_a3b_base_drpo.yaml")
    with pytest.raises(ConfigError, match="prompts_per_step=256"):
        cfg.check_world(8 * 3)
    cfg.check_world(8 * 2)  # 256 % 128 == 0: two nodes also divide (with offload)


def test_data_files_are_the_converter_outputs(tmp_path, monkeypatch):
    """Every dataset a paper recipe reads is written by a converter command that data/README.md
    shows. Those commands need the network: here each runs with the download replaced by rows in
    the dataset's layout, and its output loads as training data."""
    import importlib.util

    from doc_commands import collect

    from drpo_trainer.io.data import load_problems

    spec = importlib.util.spec_from_file_location("convert_hub_datasets", ROOT / "data/convert_hub_datasets.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    hub_rows = {
        "dapo": [{"prompt": [{"role": "user", "content": "What is $1+2$?"}], "reward_model": {"ground_truth": "3"}}],
        "aime": [{"problem": "Find $x$ if $x + 1 = 3$.", "answer": "2"}],
    }
    downloads = []

    def fake_hub(name, split, kind):
        downloads.append(name)
        return hub_rows[kind]

    written = {}
    for cmd in collect(ROOT / "data/README.md"):
        if cmd.argv[1:2] != ("data/convert_hub_datasets.py",) or "--hub" not in cmd.argv:
            continue
        argv = list(cmd.argv[2:])
        kind, out = argv[0], argv[argv.index("--output") + 1]
        argv[argv.index("--output") + 1] = str(tmp_path / Path(out).name)
        monkeypatch.setattr(converter, "read_hub", lambda name, split, kind=kind: fake_hub(name, split, kind))
        assert converter.main(argv) == 0, cmd.where
        written[out] = tmp_path / Path(out).name
    assert downloads  # the documented commands did reach the (stubbed) download

    class Tokenizer:  # enough of one for load_problems
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return " ".join(m["content"] for m in messages)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

    read = set()
    for name in sorted(PAPER):
        cfg = _load(name)
        read |= set(cfg.data.train_files) | set(cfg.eval.files.values())
    assert read == {"data/dapo_math_17k.jsonl", "data/aime24.jsonl", "data/aime25.jsonl"}
    assert read <= set(written), sorted(read - set(written))
    for path in read:
        problems, _ = load_problems([str(written[path])], Tokenizer())
        assert problems and all("\\boxed{}" in p.prompt_text for p in problems), path


def test_lora_recipe_is_the_drpo_recipe_training_adapters_on_one_gpu():
    lora = _load("qwen3_4b_base_drpo_lora.yaml")
    adapters = lora.model.lora
    assert (adapters.rank, adapters.alpha, adapters.dropout, adapters.init) == (32, 64.0, 0.0, "default")
    assert adapters.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora.optim.lr == 1e-5  # 10x the paper's full fine-tuning rate
    assert lora.distributed.nproc_per_node == 1 and lora.distributed.deepspeed_config is None
    assert lora.effective_zero_stage(1) == 0  # one process: unpartitioned
    ours, paper = _algorithm_free("qwen3_4b_base_drpo_lora.yaml"), _algorithm_free("qwen3_4b_base_drpo.yaml")
    for dump in (ours, paper):
        dump["model"].pop("lora")
        dump["optim"].pop("lr")
        dump["distributed"].pop("nproc_per_node")
        dump["distributed"].pop("deepspeed_config")
    assert ours == paper
