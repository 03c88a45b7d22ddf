"""Prompt data: loading, validation, chat formatting, and the resumable per-epoch sampler.

Rows come from local JSONL or parquet files through `datasets` with two fields:
`prompt` (text, or a list of chat messages {role, content}) and `answer` (the gold
answer). Every step draws `prompts_per_step` prompts from a permutation of the data
fixed by (seed, epoch); rank r of W takes the r-th contiguous slice of that draw.
The sampler's whole state is (epoch, index), so a resume neither skips nor repeats.
"""

from __future__ import annotations

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


def _load_rows(path: str) -> list[dict]:
    """The rows of one local file, through `datasets` (local files need no network and no process-wide
    offline switch: the packaged json/parquet builders read the file in place)."""
    import datasets

    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"data file not found: {path}. Fix: check data.train_files / eval.files "
            "(paths are relative to the working directory)"
        )
    suffix = p.suffix.lower()
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{suffix}'. Fix: use .jsonl or .parquet")
    if kind == "json" and suffix == ".jsonl":
        _check_jsonl_lines(p)  # datasets' own error names neither the line nor the problem
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as exc:  # datasets raises many types for broken files
        raise DataError(f"{path}: could not be read as {kind}: {exc}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: the file holds no rows. Fix: give a file with one problem per row")
    return ds.to_list()


def _check_jsonl_lines(path: Path) -> None:
    """Every non-blank line is one JSON object; else DataError naming the line and the problem."""
    import json

    rows = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {n}: not valid JSON ({err.msg} at column {err.colno}). Fix: one JSON object per line"
                ) from None
            if not isinstance(value, dict):
                raise DataError(f"{path}, line {n}: a JSON {type(value).__name__}, not an object with fields")
            rows += 1
    if rows == 0:
        raise DataError(f"{path}: the file is empty (no rows). Fix: give a file with one problem per line")


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
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field '{prompt_field}' is empty")
    elif isinstance(prompt, list):
        for j, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{where}: field '{prompt_field}' message {j} must be {{'role': str, 'content': str}}, "
                    f"got {m!r:.80}"
                )
    else:
        raise DataError(
            f"{where}: field '{prompt_field}' must be text or a list of chat messages, got {type(prompt).__name__}"
        )
    answer = row[answer_field]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
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
