"""The builtin tiny model: tokenizer, random model, cache/lock behaviour and the warm start's accuracy."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from drpo_trainer.builtin import tiny_model as tm
from drpo_trainer.builtin.arithmetic import ArithmeticProblem


@pytest.fixture(scope="module")
def tokenizer():
    return tm.build_tokenizer(tm._tokenizer_texts(), vocab_size=512)


def test_problem_rendering_and_answers():
    p = ArithmeticProblem(17, "+", 25)
    assert p.answer == 42  # 17 + 25
    assert ArithmeticProblem(91, "-", 38).answer == 53  # 91 - 38
    assert ArithmeticProblem(7, "*", 13).answer == 91  # 7 * 13
    assert p.prompt == "Compute 17 + 25. Put the final answer in \\boxed{}."
    assert p.solution == "17 + 25 = 42. \\boxed{42}"
    assert ArithmeticProblem.from_prompt(p.prompt) == p
    with pytest.raises(ValueError, match="not a synthetic"):
        ArithmeticProblem.from_prompt("What is 2 + 2?")


def test_tokenizer_round_trips_through_save_and_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["17 + 25 = 42. \\boxed{42}", "\\boxed{\\frac{3}{4}} and 0123456789", "π ≈ 3.14159\n  x^2"]:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    # One token per digit: "12345" -> 5 tokens.
    assert len(loaded("12345", add_special_tokens=False)["input_ids"]) == 5
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert loaded.eos_token_id != loaded.pad_token_id
    assert loaded.padding_side == "left"


def test_chat_template_renders_user_message(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute 1 + 2."}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nCompute 1 + 2.<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids, completion_ids = tm.encode_example(tokenizer, "Compute 1 + 2.", "\\boxed{3}")
    assert tokenizer.decode(prompt_ids) == text
    assert completion_ids[-1] == tokenizer.eos_token_id


def test_random_model_has_expected_size(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("qwen3", 64, 2)
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    v, h, kv, f, hd = len(tok), 64, 2 * 16, 256, 16  # 4 heads of 16, 2 kv heads, MLP 4 * 64
    per_layer = h * h + 2 * h * kv + h * h + 2 * hd + 3 * h * f + 2 * h  # q,k,v,o + q/k norms + MLP + 2 norms
    assert sum(p.numel() for p in model.parameters()) == v * h + 2 * per_layer + h  # tied embeddings + final norm


def test_resolve_passes_directories_through_and_rejects_unknown_builtins(tmp_path):
    assert tm.resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="builtin:tiny-math"):
        tm.resolve_model_path("builtin:huge-math")


def test_resolve_builds_once_under_concurrent_callers(tmp_path, monkeypatch):
    calls = []

    def fake_build(out_dir, recipe=None, progress=True):
        calls.append(out_dir)
        time.sleep(0.3)  # long enough that the other callers arrive while the build runs
        (Path(out_dir) / tm.INFO_FILE).write_text(json.dumps({"parameters": 1, "build_seconds": 0}))
        return {"parameters": 1, "build_seconds": 0}

    monkeypatch.setattr(tm, "build_tiny_math", fake_build)
    monkeypatch.setenv("DRPO_CACHE_DIR", str(tmp_path))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tm.resolve_model_path("builtin:tiny-math"))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [str(tmp_path / tm.BUILD_VERSION)] * 4
    assert (tmp_path / tm.BUILD_VERSION / tm.INFO_FILE).is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the temp dir was renamed away


def test_failed_build_leaves_no_partial_cache(tmp_path, monkeypatch):
    def broken_build(out_dir, recipe=None, progress=True):
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tm, "build_tiny_math", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        tm.ensure_built(tmp_path / tm.BUILD_VERSION, progress=False)
    assert not (tmp_path / tm.BUILD_VERSION).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_warm_model_solves_part_of_the_eval_set(warm_model_dir):
    """Teacher-forced, so no sampled token decides it: the probability the warm start gives the exact
    worked solution ("17 + 25 = 42. \\boxed{42}") of each of 64 eval problems. It was 0.093 on average
    when measured (0.006 to 0.25 per problem); the step-0 eval's avg@4 of ~0.08 is the same skill. A
    random model gives ~1e-20, a model that had learned the task would give far more than 0.3."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype="float32")
    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    rows = [json.loads(line) for line in open(Path(__file__).resolve().parents[1] / "data/synthetic_math_eval.jsonl")]
    probs = []
    for row in rows[:64]:
        problem = ArithmeticProblem.from_prompt(row["prompt"])
        assert problem.answer == int(row["answer"])
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + tok(problem.solution, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        targets = ids[0, 1:]
        solution_logp = logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].sum()
        probs.append(float(solution_logp.exp()))
    mean = sum(probs) / len(probs)
    assert 0.03 <= mean <= 0.3, (mean, probs)
    assert min(probs) > 1e-4, probs  # every problem's solution is within reach of sampling


def test_build_is_bit_reproducible_whatever_the_ambient_thread_count(tmp_path):
    import torch

    recipe = tm.WarmStartRecipe(steps=4, batch_size=8, warmup_steps=2)
    before = torch.get_num_threads()
    info_a = tm.build_tiny_math(tmp_path / "a", recipe, progress=False)
    torch.set_num_threads(2 if before != 2 else 1)  # the build pins one thread, so this must not matter
    try:
        tm.build_tiny_math(tmp_path / "b", recipe, progress=False)
        assert torch.get_num_threads() == (2 if before != 2 else 1)  # restored after the build
    finally:
        torch.set_num_threads(before)
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert info_a["recipe"]["steps"] == 4 and info_a["version"] == tm.BUILD_VERSION


def test_builtin_names_resolve_to_their_own_cached_builds(monkeypatch, tmp_path):
    """builtin:tiny-math-moe goes to the MoE build (its own cache folder), builtin:tiny-math to the dense one;
    an unknown builtin names both."""
    from drpo_trainer.builtin import resolve, tiny_moe

    monkeypatch.setenv("DRPO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiny_moe, "ensure_built", lambda target: Path(target))
    monkeypatch.setattr(tm, "ensure_built", lambda target: Path(target) / "dense")
    assert resolve.resolve_model_path("builtin:tiny-math-moe") == str(tmp_path / "tiny-math-moe-v1")
    assert resolve.resolve_model_path("builtin:tiny-math") == str(tmp_path / tm.BUILD_VERSION / "dense")
    assert resolve.resolve_model_path("/models/x") == "/models/x"
    with pytest.raises(ValueError, match="'builtin:tiny-math' and 'builtin:tiny-math-moe'"):
        resolve.resolve_model_path("builtin:tiny")
