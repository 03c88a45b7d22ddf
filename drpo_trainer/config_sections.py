"""The config's sections: every key with its type, bounds, default and meaning (one class per
section, one field per key), and the bounds they share. The rollout engine's sections (`rollout.*`)
are in drpo_trainer/config_rollout.py. drpo_trainer/config.py assembles them into `Config`, checks
the rules between sections and loads files; import the classes from there. Imports only the standard
library and pydantic (no torch).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Upper bounds that catch a typo or a unit slip, far above any real run.
MAX_TOKENS = 2**20  # a prompt, a response, a context, a token budget
MAX_SEED = 2**32 - 1
MAX_STEPS = 10**8
MAX_PROCESSES = 65536
MAX_REWARD_WORKERS = 256  # verifier processes per rank
MAX_REWARD_TIMEOUT_S = 3600.0
MAX_REWARD_MEMORY_MB = 4 * 2**20
# Sampling temperature: below 1e-3 log_softmax(logits / T) is one-hot to float32 precision.
Temperature = Annotated[float, Field(ge=1e-3, le=100.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Section(BaseModel):
    # allow_inf_nan=False: .inf / .nan are refused by every float key, whatever its bounds
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# peft's names of the attention and MLP projections of Llama / Qwen / Mistral-style models
LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(Section):
    """LoRA adapters trained instead of the full weights (peft; docs/lora.md). Only the adapters are
    trainable and in the optimizer; the engine receives the merged weights W + (alpha / rank) B A of the
    layers the adapters touch."""

    rank: int = Field(16, ge=1, le=4096, description="r, the adapters' inner dimension.")
    alpha: float = Field(32.0, gt=0, le=1e6, description="Scale numerator: the update is (alpha / rank) B A.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' input. > 0 switches off trainer.reuse_first_minibatch_logprobs "
        "(as any active dropout does).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_DEFAULT_TARGETS),
        min_length=1,
        description="Module names (peft's suffix match) that get adapters; default: the attention and MLP projections.",
    )
    init: Literal["default", "gaussian", "random"] = Field(
        "default",
        description="Adapter initialisation: default (A Kaiming-uniform, B = 0: the adapted model starts as "
        "the base model), gaussian (A Gaussian, B = 0), random (B random too: NOT a no-op; for tests).",
    )


class ModelConfig(Section):
    path: str = Field(
        "builtin:tiny-math",
        description="A Hugging Face model directory (config.json + weights + tokenizer), or "
        "'builtin:tiny-math' for the embedded tiny Qwen3 model built offline and cached ('builtin:tiny-math-moe': "
        "its mixture-of-experts twin, docs/moe.md).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Learner parameter dtype. bfloat16 on GPU; float32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    attn_implementation: Optional[str] = Field(
        None,
        description="transformers attention kernel ('sdpa', 'flash_attention_2', 'eager'); None = library default.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model directory.")
    lora: Optional[LoraConfig] = Field(
        None,
        description="Train LoRA adapters (peft) instead of the full weights; null = full fine-tuning "
        "(docs/lora.md). `model.lora={}` turns it on with the defaults.",
    )


class DataConfig(Section):
    train_files: list[str] = Field(
        default_factory=lambda: ["data/synthetic_math_train.jsonl"],
        description="JSONL or parquet files with fields `prompt` (text or chat messages) and `answer`.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt (string or list of chat messages).")
    answer_field: str = Field("answer", description="Column holding the gold answer.")
    system_prompt: Optional[str] = Field(None, description="Optional system message prepended to every prompt.")
    apply_chat_template: bool = Field(True, description="Format prompts with the tokenizer's chat template.")
    max_prompt_tokens: int = Field(
        256, gt=0, le=MAX_TOKENS, description="Prompts longer than this are dropped and counted."
    )
    shuffle: bool = Field(True, description="Shuffle the training prompts each epoch (deterministic from `seed`).")
    seed: Seed = Field(0, description="Seed of the per-epoch shuffle.")


class RewardConfig(Section):
    name: str = Field(
        "math",
        description="Registered reward function (see drpo_trainer.rewards), or module:function for a registered "
        "function of a module in import_modules.",
    )
    import_modules: list[str] = Field(
        default_factory=list,
        description="Your modules imported before reward.name is looked up; their @register_reward functions "
        "become selectable. Nothing else is imported by name.",
    )
    extraction: Literal["boxed", "answer_line", "auto"] = Field(
        "boxed", description="Where the final answer is: the LAST \\boxed{}, an 'Answer: X' line, or either."
    )
    num_workers: int = Field(2, ge=1, description="Verifier worker processes (killable, reused across steps).")
    timeout_s: float = Field(5.0, gt=0, description="Wall-clock limit per verification; a hung sample scores 0.")
    memory_limit_mb: int = Field(2048, gt=0, description="Address-space cap of each verifier worker.")
    worker_memory_growth_mb: int = Field(
        256,
        ge=16,
        description="A verifier worker whose resident memory grew this much over its start-up size (timed-out "
        "samples can leave memory behind) is replaced between samples.",
    )
    overlong_penalty: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="DAPO's soft overlong punishment (docs/algorithms.md): added to the reward before the "
        "advantages, 0 up to overlong_buffer tokens before rollout.max_new_tokens, then falling linearly to minus "
        "this value at max_new_tokens. 0 = off.",
    )
    overlong_buffer: Optional[int] = Field(
        None,
        gt=0,
        le=MAX_TOKENS,
        description="The penalty's ramp: the last this-many tokens before rollout.max_new_tokens (DAPO: 4096 of "
        "20480). At most rollout.max_new_tokens; needed when overlong_penalty > 0.",
    )


class AlgorithmConfig(Section):
    loss: str = Field("drpo", description="Policy loss from the registry: drpo, spo, dppo_tv, dppo_kl, grpo, pg.")
    loss_params: dict[str, float] = Field(
        default_factory=dict,
        description="Loss parameters, e.g. {delta: 12.5} for drpo, {clip_low: 0.2, clip_high: 0.28} for grpo; "
        "validated at load and completed with the loss's defaults. A command-line algorithm.loss_params.X=... "
        "merges into the file's; switching algorithm.loss on the command line drops the file's parameters (they "
        "belong to its loss).",
    )
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"] = (
        Field("seq-mean-token-sum-norm", description="How per-token losses become one number (paper: -norm).")
    )
    horizon: Optional[int] = Field(
        None,
        gt=0,
        le=MAX_TOKENS,
        description="Constant divisor of seq-mean-token-sum-norm; default rollout.max_new_tokens.",
    )
    behaviour_logprobs: Literal["recompute", "rollout"] = Field(
        "recompute", description="Which log-probs play mu: learner recomputation (default) or the engine's."
    )
    normalize_by_std: bool = Field(False, description="Divide group-centred rewards by (std + 1e-6).")
    mismatch_correction: Optional[Literal["tis", "mis"]] = Field(
        None, description="Train/inference mismatch correction with rollout log-probs; off by default."
    )
    mask_truncated: bool = Field(
        False,
        description="Completions that hit rollout.max_new_tokens without EOS are left out of the loss: no "
        "gradient, and not counted in the token and sequence normalisers. They still count in their group's "
        "advantage baseline (docs/algorithms.md).",
    )
    tis_cap: float = Field(2.0, gt=0, le=1e6, description="tis: cap of the truncated importance weight.")
    mis_lower: float = Field(0.5, ge=0, le=1e6, description="mis: tokens with rho below this are masked.")
    mis_upper: float = Field(2.0, gt=0, le=1e6, description="mis: tokens with rho above this are masked.")
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476); changes the algorithm: each step "
        "samples more prompts and drops the groups whose rewards are all equal until it has "
        "trainer.prompts_per_step groups with reward variance (docs/algorithms.md). Off: exact zero-advantage "
        "skipping keeps the batch as sampled.",
    )
    max_sampling_rounds: int = Field(
        4,
        ge=1,
        le=100,
        description="dynamic_sampling: at most this many draws of trainer.prompts_per_step prompts per step; when "
        "groups are still missing then, the step trains on what there is (the missing places hold zero-advantage "
        "groups of the first draw; a message and the metric sampling/groups_missing say so).",
    )

    @model_validator(mode="after")
    def _resolve_loss(self) -> "AlgorithmConfig":
        from drpo_trainer.algorithms.loss_params import validate_loss_params  # no torch

        # ValueError names the key and the fix; object.__setattr__: no re-validation of the completed dict
        object.__setattr__(self, "loss_params", validate_loss_params(self.loss, self.loss_params))
        return self


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0, le=1, description="AdamW learning rate.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)."
    )
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW decoupled weight decay.")
    # below 1e-12 eps no longer guards the division: float32 sqrt(v) of a tiny gradient is already smaller
    eps: float = Field(1e-8, ge=1e-12, le=1, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Global gradient-norm clip; 0 = off.")
    schedule: Literal["constant", "warmup_cosine"] = Field(
        "constant",
        description="Learning-rate schedule over optimizer steps, both after the linear warm-up of warmup_steps: "
        "constant, or cosine decay to 0 at the last step (warmup_cosine).",
    )
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warm-up length in optimizer steps.")

    @field_validator("schedule", mode="before")
    @classmethod
    def _removed_schedules(cls, value: Any) -> Any:
        if value == "warmup_constant":
            raise ValueError(
                "'warmup_constant' was removed: 'constant' already warms up linearly over optim.warmup_steps. "
                "Fix: set optim.schedule=constant (same schedule)"
            )
        return value


class TrainerConfig(Section):
    max_steps: int = Field(
        100, gt=0, le=MAX_STEPS, description="Rollout steps to run (each step = minibatches_per_step updates)."
    )
    prompts_per_step: int = Field(16, gt=0, le=2**20, description="Prompts per step over all ranks.")
    minibatches_per_step: int = Field(
        2, gt=0, le=4096, description="Optimizer steps per rollout batch; k > 1 are stale."
    )
    micro_batch_tokens_per_gpu: int = Field(
        8192,
        gt=0,
        le=2**26,
        description="Token budget of one learner forward/backward on one rank (padding-free packing).",
    )
    logprob_chunk_tokens: int = Field(
        1024, gt=0, le=MAX_TOKENS, description="Tokens per chunk of the log-prob head (no B*T*V logits)."
    )
    packed_row_tokens: Optional[Annotated[int, Field(gt=0, le=2**26)] | Literal["longest"]] = Field(
        "longest",
        description="Pack a micro-batch into rows of at most this many tokens, or of at most its longest sequence "
        "('longest'; a longer sequence always gets a row of its own), unless model.attn_implementation is "
        "flash_attention_2: sdpa/eager attention costs row_length^2 per row. null = one row per micro-batch.",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="No forward or backward for samples whose advantage is exactly 0: every registry loss gives "
        "them zero gradient and the normalisers still count them, so the update is unchanged (exact).",
    )
    reuse_first_minibatch_logprobs: bool = Field(
        True,
        description="Mini-batch 1 is trained before the policy moves: its behaviour log-probs are the update "
        "forward's own (detached) log-probs instead of a separate no-grad pass (exact; not used when the model "
        "has active dropout).",
    )
    max_off_policy_steps: int = Field(
        0,
        ge=0,
        le=1000,
        description="Asynchronous off-policy training (docs/async.md): the rollout processes "
        "(distributed.rollout_processes) generate ahead of the learner, and step t trains on a batch sampled by "
        "the policy of step t-1-k or newer (k = this value). 0 = no generating ahead: the synchronous loop's "
        "batches, also with dedicated rollout processes.",
    )
    seed: Seed = Field(0, description="Seed of model-independent randomness (sampling, dropout).")


class DistributedConfig(Section):
    nproc_per_node: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto", description="Processes per node; 'auto' = number of local GPUs, or 1 on CPU."
    )
    nnodes: int = Field(1, ge=1, le=MAX_PROCESSES, description="Number of nodes (multi-node runs use launch/ scripts).")
    rollout_processes: int = Field(
        0,
        ge=0,
        le=MAX_PROCESSES,
        description="Processes of the launch that only generate (the last global ranks; docs/async.md): they host "
        "the rollout engine and score rewards, the others train. 0 = every process trains and hosts its own "
        "engine (the synchronous loop).",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage of the learner.")
    single_process_zero_stage: Optional[Literal[0, 1, 2, 3]] = Field(
        0,
        description="ZeRO stage when the run has ONE process and no optimizer offload: partitioning over one rank "
        "shards nothing and only adds gather/release hooks (2.4x slower steps on the tiny CPU job). "
        "null = use zero_stage regardless.",
    )
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state on CPU (saves GPU memory).")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Process-group backend; auto = nccl on GPU.")
    deepspeed_config: Optional[str] = Field(None, description="A DeepSpeed JSON whose keys override ours.")


class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled"] = Field(
        "disabled", description="online falls back to offline (one message) when no key or network."
    )
    project: str = Field("drpo-trainer", description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B entity (team or user).")
    name: Optional[str] = Field(None, description="Run name; default = output_dir's name.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    connect_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="online: seconds to reach the W&B server before logging offline instead."
    )
    init_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="online: seconds wandb.init may take once the server answered; then offline."
    )


class TrackingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    progress_bar: bool = Field(True, description="Console progress bar with reward and step time.")
    samples_per_step: int = Field(
        4,
        ge=0,
        le=10000,
        description="Completions written to output_dir/samples.jsonl (and a W&B Table) per sampled training step "
        "and per eval set at every eval: prompt, completion, extracted and gold answer, reward, advantage. "
        "Spread evenly over rank 0's batch. 0 = no samples.",
    )
    samples_every_steps: int = Field(
        10, ge=0, le=MAX_STEPS, description="Write training samples every N steps (0 = only eval samples)."
    )


class EvalConfig(Section):
    files: dict[str, str] = Field(
        default_factory=lambda: {"synthetic": "data/synthetic_math_eval.jsonl"},
        description="Eval sets: name -> JSONL/parquet file (same schema as training data).",
    )
    every_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Evaluate every N steps (0 = only at start and end).")
    samples_per_prompt: int = Field(
        4,
        ge=1,
        le=1024,
        description="n: completions sampled per eval problem (was eval.k). Each set reports avg@n, pass@j for j = "
        "1, 2, 4, ... below n and n itself (unbiased estimator), and maj@n (docs/evaluation.md).",
    )
    samples_per_prompt_by_set: dict[str, Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=dict,
        description="Per-set n overriding samples_per_prompt, e.g. {aime24: 32}; every name must be a set of "
        "eval.files.",
    )
    max_problems: Optional[int] = Field(
        None, gt=0, le=10**9, description="Evaluate only the first N problems of each set."
    )
    temperature: Optional[Temperature] = Field(None, description="Eval temperature; default rollout.temperature.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Eval nucleus sampling; default rollout.top_p.")
    max_new_tokens: Optional[int] = Field(
        None, gt=0, le=MAX_TOKENS, description="Eval response length in tokens; default rollout.max_new_tokens."
    )
    at_start: bool = Field(True, description="Also evaluate before the first update (step 0).")

    @model_validator(mode="after")
    def _known_sets(self) -> "EvalConfig":
        unknown = sorted(set(self.samples_per_prompt_by_set) - set(self.files))
        if unknown and self.files:  # no eval sets (eval.files={}): nothing is evaluated, nothing to check
            raise ValueError(
                f"eval.samples_per_prompt_by_set names {', '.join(unknown)}, not a set of eval.files "
                f"({', '.join(sorted(self.files))}). Fix: use the names of eval.files"
            )
        return self

    def samples_per_prompt_of(self, name: str) -> int:
        """n of eval set `name`."""
        return self.samples_per_prompt_by_set.get(name, self.samples_per_prompt)


class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, le=10000, description="Keep the newest K checkpoints.")
    export_final: bool = Field(True, description="Export the final model as HF safetensors to output_dir/final.")
