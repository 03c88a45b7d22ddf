"""Writes the bundled synthetic arithmetic sets, data/synthetic_math_{train,eval}.jsonl.

Deterministic: the problems come from fixed seeds in drpo_trainer.builtin.arithmetic (the same generator the
builtin model is warm-started on), so re-running this script reproduces the committed files byte for
byte. The eval problems are drawn first and excluded from the train set and from the warm start.

    python data/make_synthetic.py [--out-dir data]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from drpo_trainer.builtin.arithmetic import ArithmeticProblem, eval_problems, problem_row, train_problems  # noqa: E402


def write_jsonl(path: Path, problems: list[ArithmeticProblem]) -> None:
    # Fixed key order, ASCII escapes and "\n" line ends keep the bytes identical on every platform.
    lines = [json.dumps(problem_row(p), ensure_ascii=True) + "\n" for p in problems]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent), help="where to write the two files")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, problems in (("train", train_problems()), ("eval", eval_problems())):
        write_jsonl(out / f"synthetic_math_{name}.jsonl", problems)
        print(f"wrote {len(problems)} problems to {out / f'synthetic_math_{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
