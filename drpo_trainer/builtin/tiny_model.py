"""The embedded default model `builtin:tiny-math`, trained on the synthetic task of `arithmetic`.

Owns:
- a byte-level BPE tokenizer trained offline (`build_tokenizer`) and a tiny Qwen3 (`build_random_model`);
- the warm start: a short supervised pass on synthetic solutions so the model solves part of the problems
  (RL needs a mix of right and wrong samples to learn from), built once and cached (`resolve_model_path`).

Build ahead of time: `python -m drpo_trainer.builtin.tiny_model [--out DIR] [--eval]`.

Determinism: the build runs with fixed seeds and ONE torch thread, because CPU matmul reductions can
differ with the thread count; with the same torch build the weights are then bit-identical. The cache
folder is versioned (`tiny-math-v2`): change `BUILD_VERSION` whenever the recipe changes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from drpo_trainer.builtin.arithmetic import (
    EVAL_SIZE,
    ArithmeticProblem,
    eval_problems,
    sample_problem,
)

BUILTIN_NAME = "builtin:tiny-math"
BUILD_VERSION = "tiny-math-v2"
INFO_FILE = "tiny_math_build.json"

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Qwen-style chat markup; '\n' inside the Jinja string literals is Jinja's escape, not Python's.
CHAT_TEMPLATE = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ----------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Byte-level BPE trained on `texts`; digits are split one per token so that numbers share
    digit embeddings (arithmetic is learnable) and any byte string still encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None, padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _tokenizer_texts() -> list[str]:
    """Corpus for the BPE merges: task prompts and solutions plus a line of generic math markup."""
    rng = random.Random(123)
    problems = [sample_problem(rng) for _ in range(2000)]
    extra = [r"\boxed{} \frac{1}{2} \sqrt{x} x^2 + y = z. Answer: 0123456789 ( ) [ ] , ; : ! ?"]
    return [p.prompt for p in problems] + [p.solution for p in problems] + extra


def _qwen3_config(tokenizer, hidden_size: int, num_layers: int, num_heads: int):
    from transformers import Qwen3Config

    head_dim = hidden_size // num_heads
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=head_dim,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _new_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_qwen3_config(tokenizer, hidden_size, num_layers, num_heads))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float()


def build_random_model(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
) -> str:
    """A randomly initialised tiny Qwen3 and its tokenizer, saved with save_pretrained (seconds)."""
    tokenizer = build_tokenizer(_tokenizer_texts(), vocab_size)
    model = _new_model(tokenizer, hidden_size, num_layers, num_heads, seed)
    out_dir = str(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Warm start: supervised pass on synthetic solutions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmStartRecipe:
    """Everything that determines the built weights (with the torch build); saved in the build info.
    240 steps x 32 problems take ~30 s on one thread and leave the accuracy RL needs (see above);
    more steps or layers raise it, fewer lower it.

    Only `boxed_fraction` of the supervised solutions end in `\\boxed{}`: the warm model knows many
    answers but boxes them only sometimes, whatever the problem. The reward (last box) then has
    signal in nearly every group, and what RL learns first, always boxing, carries over to the
    held-out eval problems, so eval accuracy rises with the training reward."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 512
    steps: int = 240
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    data_seed: int = 2
    boxed_fraction: float = 0.3  # share of supervised solutions that end in \boxed{}; the rest stop at "= 42."


def encode_example(tokenizer, prompt: str, completion: Optional[str] = None) -> tuple[list[int], list[int]]:
    """(prompt ids through the chat template, completion ids + EOS), tokenized separately as in RL."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if completion is None:
        return prompt_ids, []
    return prompt_ids, tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _unboxed(p: ArithmeticProblem) -> str:
    return f"{p.a} {p.op} {p.b} = {p.answer}."


def _sft_batch(tokenizer, problems: list[tuple[ArithmeticProblem, bool]]):
    """Right-padded (B, T) input ids, attention mask and labels (-100 outside the completion)."""
    import torch

    pairs = [encode_example(tokenizer, p.prompt, p.solution if boxed else _unboxed(p)) for p, boxed in problems]
    width = max(len(a) + len(b) for a, b in pairs)
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(c)
        mask[i, :n] = 1
    return ids, mask, labels


def _sft_stream(recipe: WarmStartRecipe) -> Iterable[list[tuple[ArithmeticProblem, bool]]]:
    """Batches of problems drawn from the whole family. The eval problems are NOT held out: the
    family is small, and the eval set measures how reliably the model samples right answers to
    problems of the family (what RL improves), not generalisation to unseen operand pairs."""
    rng = random.Random(recipe.data_seed)
    for _ in range(recipe.steps):
        yield [(sample_problem(rng), rng.random() < recipe.boxed_fraction) for _ in range(recipe.batch_size)]


def warm_start(model, tokenizer, recipe: WarmStartRecipe, progress: bool = True) -> float:
    """Supervised next-token training on completions only; returns the last batch loss."""
    import math

    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    loss_value = float("nan")
    bar = tqdm(_sft_stream(recipe), total=recipe.steps, desc="tiny-math warm start", disable=not progress)
    for step, problems in enumerate(bar):
        ids, mask, labels = _sft_batch(tokenizer, problems)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


def sample_accuracy(
    model,
    tokenizer,
    problems: list[ArithmeticProblem],
    *,
    temperature: float,
    seed: int = 0,
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> tuple[float, float]:
    """(fraction answered correctly, fraction with a \\boxed{}) over `problems`, one sample each;
    temperature 0 means greedy. Sampling is unrestricted (top_k=0, top_p=1)."""
    import torch

    from drpo_trainer.rewards.extract import last_boxed  # the reward's own extraction

    correct = boxed = 0
    torch.manual_seed(seed)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True
            )
            for p in chunk
        ]
        enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        kw = (
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if temperature > 0
            else dict(do_sample=False)
        )
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, **kw)
        for p, row in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            got = last_boxed(tokenizer.decode(row, skip_special_tokens=True))
            boxed += got is not None
            correct += got == str(p.answer)
    return correct / len(problems), boxed / len(problems)


# ----------------------------------------------------------------------------------------------
# Build and cache
# ----------------------------------------------------------------------------------------------


def build_tiny_math(
    out_dir: str | os.PathLike,
    recipe: WarmStartRecipe = WarmStartRecipe(),
    progress: bool = True,
    *,
    new_model=None,
    version: str = BUILD_VERSION,
) -> dict[str, Any]:
    """Train the tokenizer, warm-start the model and save both into `out_dir` (which must not exist
    yet or be empty). Runs single-threaded for bit-reproducible weights; returns the build info.
    `new_model(tokenizer, recipe)` builds another architecture (builtin:tiny-math-moe)."""
    import dataclasses

    import torch
    import transformers

    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = build_tokenizer(_tokenizer_texts(), recipe.vocab_size)
        if new_model is None:
            model = _new_model(tokenizer, recipe.hidden_size, recipe.num_layers, recipe.num_heads, recipe.seed)
        else:
            model = new_model(tokenizer, recipe)
        final_loss = warm_start(model, tokenizer, recipe, progress=progress)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info = {
        "version": version,
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_sft_loss": final_loss,
        "build_seconds": round(time.time() - start, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (Path(out_dir) / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def default_cache_dir() -> Path:
    return Path(os.environ.get("DRPO_CACHE_DIR") or Path.home() / ".cache" / "drpo-trainer")


def resolve_model_path(path: str) -> str:
    """`path` unchanged for a model directory; for 'builtin:tiny-math' the cached build, built first
    if absent. Safe to call from several ranks at once: one builds under a file lock, the others wait,
    and the build lands in a temp dir renamed into place, so a half-written cache is never seen."""
    if not path.startswith("builtin:"):
        return path
    if path != BUILTIN_NAME:  # builtin:tiny-math-moe: drpo_trainer.builtin.resolve
        raise ValueError(
            f"unknown builtin model {path!r}; the builtins are {BUILTIN_NAME!r} and 'builtin:tiny-math-moe' "
            "(or give a Hugging Face model directory)"
        )
    return str(ensure_built(default_cache_dir() / BUILD_VERSION))


def ensure_built(target: Path, progress: bool = True, build=None, name: str = BUILTIN_NAME) -> Path:
    """Build the tiny-math model (or, with `build`, another builtin) into `target` unless a finished build
    is already there."""
    from filelock import FileLock

    target = Path(target)
    if (target / INFO_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / INFO_FILE).is_file():  # another process built it while we waited
            return target
        if target.exists():
            raise FileExistsError(
                f"{target} exists but holds no finished tiny-math build ({INFO_FILE} missing); "
                "delete it or pass another --out directory"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            info = (build or build_tiny_math)(tmp, progress=progress)
            os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache may be shared by users
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            print(f"built {name} ({info['parameters']:,} parameters) in {info['build_seconds']} s -> {target}")
    return target


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m drpo_trainer.builtin.tiny_model", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", help=f"output directory (default: $DRPO_CACHE_DIR or ~/.cache/drpo-trainer, /{BUILD_VERSION})"
    )
    ap.add_argument("--eval", action="store_true", help="report eval-set accuracy at T=1 and greedy after building")
    args = ap.parse_args(argv)
    out = ensure_built(Path(args.out) if args.out else default_cache_dir() / BUILD_VERSION)
    print(out)
    if args.eval:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(out), dtype="float32")
        tok = AutoTokenizer.from_pretrained(str(out))
        for name, temp in (("T=1.0", 1.0), ("greedy", 0.0)):
            acc, boxed = sample_accuracy(model, tok, eval_problems(), temperature=temp)
            print(f"eval {name}: accuracy {acc:.3f}, boxed {boxed:.3f} over {EVAL_SIZE} problems")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
