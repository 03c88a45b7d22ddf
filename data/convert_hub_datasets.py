"""Converts DAPO-Math-17k and AIME 2024/2025 into the trainer's data schema.

Schema (one JSON object per line): `prompt` (a list of chat messages {role, content}) and `answer`
(the gold answer string). Prompts are rewritten to ask for the final answer in \\boxed{}, the format
the default reward extracts; `--keep-prompt` keeps DAPO's own "Answer: X" instruction instead (then
set `reward.extraction: answer_line`).

Input columns assumed (from the dataset cards; see data/README.md):
  dapo: `prompt` = chat messages whose user turn wraps the problem in DAPO's instruction,
        `reward_model` = {ground_truth, style}
  aime: `problem` | `Problem` | `question`, and `answer` | `Answer`

Works offline on local .parquet / .jsonl / .json files; `--hub NAME[:CONFIG]` downloads with
`datasets` where a network exists:

    python data/convert_hub_datasets.py dapo --hub BytedTsinghua-SIA/DAPO-Math-17k --output data/dapo_math_17k.jsonl
    python data/convert_hub_datasets.py aime --hub HuggingFaceH4/aime_2024 --output data/aime24.jsonl
    python data/convert_hub_datasets.py aime --hub opencompass/AIME2025:AIME2025-I \\
        --hub opencompass/AIME2025:AIME2025-II --output data/aime25.jsonl
    python data/convert_hub_datasets.py aime --input aime24.parquet --output data/aime24.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Iterable

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# DAPO wraps every problem as "<instruction>\n\n<problem>\n\nRemember to put your answer on its own
# line after \"Answer:\"": peel both off so the problem can be re-wrapped with the boxed instruction.
_DAPO_HEAD = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.DOTALL)
_DAPO_TAIL = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")
PROBLEM_COLUMNS = ("problem", "Problem", "question")
ANSWER_COLUMNS = ("answer", "Answer")


def boxed_prompt(problem: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{problem.strip()}\n\n{BOXED_INSTRUCTION}"}]


def dapo_problem_text(messages: list[dict[str, str]]) -> str:
    """The bare problem from a DAPO prompt (the last user turn without DAPO's instruction)."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError(f"DAPO row has no user message: {messages!r}")
    return _DAPO_TAIL.sub("", _DAPO_HEAD.sub("", users[-1], count=1)).strip()


def convert_dapo(rows: Iterable[dict[str, Any]], keep_prompt: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        try:
            messages, truth = row["prompt"], row["reward_model"]["ground_truth"]
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"DAPO row {i} lacks `prompt` or `reward_model.ground_truth` ({e!r}); columns present: {sorted(row)}"
            ) from e
        prompt = [dict(m) for m in messages] if keep_prompt else boxed_prompt(dapo_problem_text(messages))
        out.append({"prompt": prompt, "answer": str(truth).strip()})
    return out


def _first_column(row: dict[str, Any], names: tuple[str, ...], i: int) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise ValueError(f"AIME row {i} has none of the columns {names}; columns present: {sorted(row)}")


def convert_aime(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        problem, answer = _first_column(row, PROBLEM_COLUMNS, i), _first_column(row, ANSWER_COLUMNS, i)
        out.append({"prompt": boxed_prompt(str(problem)), "answer": str(answer).strip()})
    return out


def dedup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeated (prompt, answer) rows, keeping first occurrences (the hub DAPO-Math-17k
    parquet repeats every problem many times)."""
    seen, out = set(), []
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def read_local(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else [data]
    raise ValueError(f"unsupported input {path}: use .parquet, .jsonl or .json")


def read_hub(spec: str, split: str | None) -> list[dict[str, Any]]:
    """`NAME[:CONFIG]` from the Hugging Face hub; every split when `split` is None."""
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    loaded = load_dataset(name, config or None, split=split)
    parts = [loaded] if split else [loaded[s] for s in loaded]
    return [row for part in parts for row in part]


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["dapo", "aime"], help="column layout of the input")
    ap.add_argument("--input", action="append", default=[], help="local .parquet/.jsonl/.json file (repeatable)")
    ap.add_argument("--hub", action="append", default=[], help="hub dataset NAME[:CONFIG] (repeatable; needs network)")
    ap.add_argument("--split", default=None, help="hub split (default: all splits)")
    ap.add_argument("--output", required=True, help="JSONL file to write")
    ap.add_argument("--keep-prompt", action="store_true", help="dapo: keep the original 'Answer:' instruction")
    ap.add_argument("--no-dedup", action="store_true", help="keep repeated rows")
    args = ap.parse_args(argv)
    if not args.input and not args.hub:
        ap.error("give at least one --input FILE or --hub NAME")
    raw = [r for p in args.input for r in read_local(p)] + [r for h in args.hub for r in read_hub(h, args.split)]
    rows = convert_dapo(raw, args.keep_prompt) if args.kind == "dapo" else convert_aime(raw)
    if not args.no_dedup:
        rows = dedup(rows)
    write_jsonl(rows, args.output)
    print(f"wrote {len(rows)} rows (from {len(raw)} input rows) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
