"""The bundled synthetic JSONL files and the hub-dataset converter (offline, on fake hub-format files)."""

from __future__ import annotations

import importlib.util
import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
FILES = ("synthetic_math_train.jsonl", "synthetic_math_eval.jsonl")


def _load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_generator_reproduces_committed_files_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(DATA / "make_synthetic.py"), "--out-dir", str(tmp_path)], check=True, capture_output=True
    )
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


@pytest.mark.parametrize("name", FILES)
def test_every_row_has_schema_and_correct_answer(name):
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    rows = _rows(name)
    assert len(rows) >= 100
    for row in rows:
        assert set(row) == {"prompt", "answer"}
        assert isinstance(row["prompt"], str) and isinstance(row["answer"], str)
        assert "\\boxed{}" in row["prompt"]
        # Recompute independently of the generator: parse "Compute A op B." and evaluate.
        m = re.match(r"Compute (\d+) ([-+*]) (\d+)\.", row["prompt"])
        assert m, row
        assert row["answer"] == str(ops[m.group(2)](int(m.group(1)), int(m.group(3)))), row


def test_train_and_eval_are_disjoint_and_unique():
    train, ev = [r["prompt"] for r in _rows(FILES[0])], [r["prompt"] for r in _rows(FILES[1])]
    assert len(set(train)) == len(train) and len(set(ev)) == len(ev)
    assert not set(train) & set(ev)


def test_prompts_and_solutions_are_short(tiny_model_dir):
    from transformers import AutoTokenizer

    from drpo_trainer.builtin.arithmetic import ArithmeticProblem
    from drpo_trainer.builtin.tiny_model import encode_example

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row in _rows(FILES[1]):
        p = ArithmeticProblem.from_prompt(row["prompt"])
        prompt_ids, completion_ids = encode_example(tok, row["prompt"], p.solution)
        assert len(prompt_ids) < 64 and len(completion_ids) <= 30, row


# --- converter -------------------------------------------------------------------------------------

DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    'What is $1+2$?\n\nRemember to put your answer on its own line after "Answer:".'
)


def _fake_dapo_rows():
    row = {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PROMPT, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "3", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "a1"},
    }
    other = dict(
        row,
        prompt=[{"content": "Find $\\frac{1}{2}+\\frac{1}{2}$.", "role": "user"}],
        reward_model={"ground_truth": "1", "style": "rule"},
    )
    return [row, row, other]  # the hub file repeats problems: the converter drops the duplicate


def test_convert_dapo_rewrites_prompt_to_boxed_and_dedups(tmp_path):
    conv = _load_module("convert_hub_datasets")
    src = tmp_path / "dapo.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _fake_dapo_rows()))
    out = tmp_path / "out.jsonl"
    assert conv.main(["dapo", "--input", str(src), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    instr = "Please reason step by step, and put your final answer within \\boxed{}."
    assert rows == [
        {"prompt": [{"role": "user", "content": "What is $1+2$?\n\n" + instr}], "answer": "3"},
        {"prompt": [{"role": "user", "content": "Find $\\frac{1}{2}+\\frac{1}{2}$.\n\n" + instr}], "answer": "1"},
    ]


def test_convert_dapo_keep_prompt_keeps_original_messages():
    conv = _load_module("convert_hub_datasets")
    rows = conv.convert_dapo(_fake_dapo_rows()[:1], keep_prompt=True)
    assert rows == [{"prompt": [{"content": DAPO_PROMPT, "role": "user"}], "answer": "3"}]


def test_convert_aime_both_column_layouts_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conv = _load_module("convert_hub_datasets")
    # HuggingFaceH4/aime_2024 layout: lower-case columns, string answers.
    lower = tmp_path / "aime24.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"id": 60, "problem": "Find $x$.", "solution": "...", "answer": "204", "url": "u", "year": "2024"}]
        ),
        lower,
    )
    # Maxwell-Jia/AIME_2024 layout: capitalised columns, integer answers.
    upper = tmp_path / "aime24b.jsonl"
    upper.write_text(json.dumps({"ID": "2024-I-1", "Problem": "Find $y$. ", "Solution": "...", "Answer": 25}) + "\n")
    # opencompass/AIME2025 layout: `question`.
    q = tmp_path / "aime25.jsonl"
    q.write_text(json.dumps({"question": "Find $z$.", "answer": "070"}) + "\n")
    out = tmp_path / "aime.jsonl"
    conv.main(["aime", "--input", str(lower), "--input", str(upper), "--input", str(q), "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    instr = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert rows == [
        {"prompt": [{"role": "user", "content": "Find $x$." + instr}], "answer": "204"},
        {"prompt": [{"role": "user", "content": "Find $y$." + instr}], "answer": "25"},
        {"prompt": [{"role": "user", "content": "Find $z$." + instr}], "answer": "070"},
    ]


def test_convert_errors_name_the_missing_columns():
    conv = _load_module("convert_hub_datasets")
    with pytest.raises(ValueError, match="Problem"):
        conv.convert_aime([{"text": "x", "answer": "1"}])
    with pytest.raises(ValueError, match="ground_truth"):
        conv.convert_dapo([{"prompt": [{"role": "user", "content": "x"}]}])
