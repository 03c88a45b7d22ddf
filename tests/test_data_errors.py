"""Data files: gold answers keep the text they were written with, and broken rows (non-UTF-8 bytes,
JSON nested past the recursion limit) are one line naming the file and line, exit code 2 from the CLI."""

import json
from pathlib import Path

import pytest
from job_helpers import refused_in_one_line

from drpo_trainer.io.data import DataError, check_data_file, load_problems
from drpo_trainer.rewards import math_reward

REPO = Path(__file__).resolve().parents[1]
GOOD = json.dumps({"prompt": "Compute 1 + 1.", "answer": "2"})


class Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def _answers(path) -> list[str]:
    return [p.answer for p in load_problems([str(path)], Tokenizer(), apply_chat_template=False)[0]]


# JSON source text of the answer -> the gold answer the verifier sees (the same text).
NUMBERS = ["0.30000000000000004", "0.1", "2.50", "1e20", "1E+20", "12345678901234567890123", "5", "-0.0", "007"]


def test_json_numbers_keep_their_source_text(tmp_path):
    jsonl = tmp_path / "numbers.jsonl"
    # '007' is not valid JSON; written as a string it stays a string
    rows = [f'{{"prompt": "q{i}", "answer": {n if n != "007" else json.dumps(n)}}}' for i, n in enumerate(NUMBERS)]
    jsonl.write_text("\n".join(rows) + "\n")
    assert _answers(jsonl) == NUMBERS
    array = tmp_path / "numbers.json"
    array.write_text("[\n" + ",\n".join(rows) + "\n]\n")
    assert _answers(array) == NUMBERS


def test_a_1e20_gold_answer_is_ten_to_the_twenty(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"prompt": "How many?", "answer": 1e20}\n{"prompt": "Sum?", "answer": 0.1}\n')
    big, tenth = _answers(path)
    assert math_reward(r"\boxed{10^{20}}", big) == 1.0
    assert math_reward(r"\boxed{100000000000000000000}", big) == 1.0
    assert math_reward(r"\boxed{e + 20}", big) == 0.0
    assert math_reward(r"\boxed{0.1}", tenth) == 1.0 and math_reward(r"\boxed{0.30000000000000004}", tenth) == 0.0


def test_parquet_numbers_become_their_shortest_exact_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "answer": [1e20, 0.1, 2.5]}), path)
    big, tenth, half = _answers(path)
    assert (big, tenth, half) == ("1e+20", "0.1", "2.5")
    assert math_reward(r"\boxed{10^{20}}", big) == 1.0 and math_reward(r"\boxed{e + 20}", big) == 0.0


def _bad_utf8(path: Path) -> Path:
    path.write_bytes((GOOD + "\n").encode() + b'{"prompt": "Compute \xff\xfe", "answer": "2"}\n')
    return path


def _deep(path: Path) -> Path:
    path.write_text(GOOD + "\n" + '{"prompt": "x", "answer": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (_bad_utf8, "line 2: not UTF-8 text (byte 0xff at column 21). Fix: re-encode the file as UTF-8"),
        (_deep, "line 2: JSON nested too deeply to read (past Python's recursion limit). Fix: "),
    ],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_broken_rows_name_file_and_line(tmp_path, make, expected, suffix):
    path = make(tmp_path / f"rows{suffix}")
    for load in (lambda: load_problems([str(path)], Tokenizer()), lambda: check_data_file(str(path))):
        with pytest.raises(DataError) as e:
            load()
        assert str(e.value).startswith(f"{path}, {expected}")


@pytest.mark.parametrize("make, expected", [(_bad_utf8, "not UTF-8 text"), (_deep, "JSON nested too deeply")])
def test_cli_reports_a_broken_row_in_one_line_and_exit_2_before_anything_loads(tmp_path, make, expected):
    data = make(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    line = refused_in_one_line(f"output_dir={out}", f"data.train_files=[{data}]", "eval.files={}")
    assert line.startswith(f"drpo-train: {data}, line 2: {expected}") and "Fix: " in line
    assert not out.exists()  # refused before the run directory (or the model) was touched
