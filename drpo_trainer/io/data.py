"""Prompt data: loading, validation, chat formatting, and the resumable per-epoch sampler.

Rows come from local JSONL/JSON files (read here, line by line) or parquet files (through
`datasets`) with two fields: `prompt` (text, or a list of chat messages {role, content}) and
`answer` (the gold answer, kept as text: a JSON number keeps the digits it was written with).
Bad rows (invalid JSON or UTF-8, nesting past the recursion limit, missing fields) raise
DataError naming the file and line, which the CLI reports in one line with exit code 2.

Every step draws `prompts_per_step` prompts from a permutation of the data fixed by (seed, epoch);
rank r of W takes the r-th contiguous slice of that draw. The sampler's whole state is
(epoch, index), so a resume neither skips nor repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np


class DataError(ValueError):
    """A malformed data file or row, reported with the file, row number and field."""


@dataclass
class Problem:
    prompt_ids: list[int]
    prompt_text: str
    answer: str


class _JsonNumber(str):
    """A number from a JSON data file, kept as its source text: no float round trip, so a gold
    answer written 0.1 stays '0.1', 2.50 stays '2.50' and 1e20 stays '1e20' (not '1e+20')."""


def _load_rows(path: str) -> list[dict]:
    """The rows of one local file. JSON and JSONL are read here (line by line, so every error names
    its line, and numbers keep their text); parquet through `datasets` (local files need no network
    and no process-wide offline switch)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"data file not found: {path}. Fix: check data.train_files / eval.files "
            "(paths are relative to the working directory)"
        )
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(p)
    if suffix == ".json":
        return _json_rows(p)
    if suffix == ".parquet":
        return _parquet_rows(p)
    raise DataError(f"{path}: unsupported file type '{suffix}'. Fix: use .jsonl, .json or .parquet")


def _parse_json(text: str, where: str) -> Any:
    import json

    try:
        return json.loads(text, parse_float=_JsonNumber, parse_int=_JsonNumber)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno}). Fix: one JSON object per line"
        ) from None
    except RecursionError:
        raise DataError(
            f"{where}: JSON nested too deeply to read (past Python's recursion limit). Fix: a row holds a "
            "prompt and an answer; remove or flatten the deeply nested value"
        ) from None


def _not_utf8(path: Path, line: int, column: int, byte: int) -> DataError:
    return DataError(
        f"{path}, line {line}: not UTF-8 text (byte 0x{byte:02x} at column {column}). "
        f"Fix: re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.jsonl"
    )


def _jsonl_rows(path: Path) -> list[dict]:
    """Every non-blank line is one JSON object; else DataError naming the line and the problem."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, n, err.start + 1, raw[err.start]) from None
            if n == 1:
                line = line.lstrip("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            value = _parse_json(line, f"{path}, line {n}")
            if not isinstance(value, dict):
                raise DataError(f"{path}, line {n}: a JSON {_json_type(value)}, not an object with fields")
            rows.append(value)
    if not rows:
        raise DataError(f"{path}: the file is empty (no rows). Fix: give a file with one problem per line")
    return rows


def _json_rows(path: Path) -> list[dict]:
    """A .json file: a list of row objects, or JSON lines."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise _not_utf8(
            path, data.count(b"\n", 0, err.start) + 1, err.start - line_start + 1, data[err.start]
        ) from None
    if not text.lstrip().startswith("["):
        return _jsonl_rows(path)
    value = _parse_json(text, str(path))
    for i, row in enumerate(value):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i + 1} of the list is a JSON {_json_type(row)}, not an object with fields")
    if not value:
        raise DataError(f"{path}: the list holds no rows. Fix: give a file with one problem per row")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, _JsonNumber):
        return "number"
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def _parquet_rows(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        rows = ds.to_list()
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: a text column is not valid UTF-8 ({err.reason}). Fix: re-encode the text as UTF-8"
        ) from None
    except Exception as exc:  # datasets raises many types for broken files
        raise DataError(f"{path}: could not be read as parquet: {exc}") from None
    if not rows:
        raise DataError(f"{path}: the file holds no rows. Fix: give a file with one problem per row")
    return rows


def _answer_text(answer: Any) -> Any:
    """A gold answer as text: JSON numbers as written, parquet numbers in their shortest exact form."""
    if isinstance(answer, _JsonNumber):
        return str(answer)
    if isinstance(answer, bool):
        return answer
    if isinstance(answer, int):
        return str(answer)
    if isinstance(answer, float) and math.isfinite(answer):
        return repr(answer)  # shortest text that reads back as this float: 0.1 -> '0.1', 1e20 -> '1e+20'
    return answer


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and not isinstance(value, _JsonNumber)


def check_data_file(path: str, *, prompt_field: str = "prompt", answer_field: str = "answer") -> int:
    """Read and check every row of a JSON/JSONL data file without a tokenizer; the number of rows.

    Cheap enough to run before any model loads, so that a broken row fails the start in seconds.
    Parquet files are checked when they load (reading them needs `datasets`)."""
    if Path(path).suffix.lower() == ".parquet":
        return 0
    rows = _load_rows(path)
    for i, row in enumerate(rows):
        _check_row(row, path, i, prompt_field, answer_field)
    return len(rows)


def _check_row(row: dict, path: str, i: int, prompt_field: str, answer_field: str) -> tuple[Any, str]:
    where = f"{path}, row {i + 1}"
    if prompt_field not in row or row[prompt_field] is None:
        raise DataError(
            f"{where}: missing field '{prompt_field}'. Fix: every row needs '{prompt_field}' and "
            f"'{answer_field}' (or set data.prompt_field)"
        )
    if answer_field not in row or row[answer_field] is None:
        raise DataError(
            f"{where}: missing field '{answer_field}'. Fix: every row needs a gold answer (or set data.answer_field)"
        )
    prompt = row[prompt_field]
    if _is_text(prompt):
        if not prompt.strip():
            raise DataError(f"{where}: field '{prompt_field}' is empty")
    elif isinstance(prompt, list):
        for j, m in enumerate(prompt):
            if not isinstance(m, dict) or not _is_text(m.get("role")) or not _is_text(m.get("content")):
                raise DataError(
                    f"{where}: field '{prompt_field}' message {j} must be {{'role': str, 'content': str}}, "
                    f"got {m!r:.80}"
                )
    else:
        raise DataError(
            f"{where}: field '{prompt_field}' must be text or a list of chat messages, got {_json_type(prompt)}"
        )
    answer = _answer_text(row[answer_field])
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: field '{answer_field}' must be a non-empty string, got {answer!r:.80}")
    return prompt, answer.strip()


def format_prompt(prompt: Any, tokenizer, *, system_prompt: Optional[str], apply_chat_template: bool) -> str:
    if not apply_chat_template:
        if not isinstance(prompt, str):
            raise DataError("chat-message prompts need data.apply_chat_template=true")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class LoadStats:
    rows: int = 0
    dropped_too_long: int = 0


def load_problems(
    files: list[str],
    tokenizer,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    system_prompt: Optional[str] = None,
    apply_chat_template: bool = True,
    max_prompt_tokens: int = 1 << 30,
) -> tuple[list[Problem], LoadStats]:
    """Read, validate, format and tokenize every row; drop (and count) over-long prompts."""
    problems: list[Problem] = []
    stats = LoadStats()
    for path in files:
        for i, row in enumerate(_load_rows(path)):
            prompt, answer = _check_row(row, path, i, prompt_field, answer_field)
            text = format_prompt(
                prompt, tokenizer, system_prompt=system_prompt, apply_chat_template=apply_chat_template
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            stats.rows += 1
            if len(ids) > max_prompt_tokens:
                stats.dropped_too_long += 1
                continue
            problems.append(Problem(prompt_ids=ids, prompt_text=text, answer=answer))
    if not problems:
        raise DataError(
            f"no usable prompts in {files} ({stats.rows} rows, {stats.dropped_too_long} longer than "
            f"data.max_prompt_tokens). Fix: check the files or raise data.max_prompt_tokens"
        )
    return problems, stats


@dataclass
class SamplerState:
    epoch: int = 0
    index: int = 0  # position in this epoch's permutation of the next prompt to draw


@dataclass
class PromptSampler:
    """Draws `prompts_per_step` global prompts per step; rank r keeps its contiguous slice.

    An epoch's leftover that cannot fill a step is skipped (every step is full), and the
    next epoch starts from a fresh permutation seeded by (seed, epoch).
    """

    num_problems: int
    prompts_per_step: int
    seed: int = 0
    shuffle: bool = True
    state: SamplerState = field(default_factory=SamplerState)

    def __post_init__(self) -> None:
        if self.prompts_per_step > self.num_problems:
            raise DataError(
                f"trainer.prompts_per_step={self.prompts_per_step} exceeds the {self.num_problems} usable training "
                f"prompts. Fix: lower trainer.prompts_per_step or add data"
            )

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_problems)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_problems)

    def next_indices(self) -> list[int]:
        """Global indices of the next step's prompts (all ranks); advances the state."""
        if self.state.index + self.prompts_per_step > self.num_problems:
            self.state = SamplerState(epoch=self.state.epoch + 1, index=0)
        order = self._order(self.state.epoch)
        out = order[self.state.index : self.state.index + self.prompts_per_step].tolist()
        self.state = SamplerState(epoch=self.state.epoch, index=self.state.index + self.prompts_per_step)
        return out

    @staticmethod
    def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
        per = len(indices) // world_size
        return indices[rank * per : (rank + 1) * per]
