"""The synthetic arithmetic task of the embedded default: `Compute 17 + 25. ...` -> `17 + 25 = 42. \\boxed{42}`.

The problem family the `builtin:tiny-math` model is warm-started on (drpo_trainer.builtin.tiny_model),
and the generator data/make_synthetic.py writes the bundled train/eval JSONL files from. Standard
library only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable

EVAL_SEED, EVAL_SIZE = 1, 128
TRAIN_SEED, TRAIN_SIZE = 0, 500  # of the 736 problems of the family
PROMPT_RE = re.compile(r"^Compute (\d+) ([-+*]) (\d+)\. Put the final answer in \\boxed\{\}\.$")


@dataclass(frozen=True)
class ArithmeticProblem:
    """`a op b` with a non-negative integer result."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def prompt(self) -> str:
        return f"Compute {self.a} {self.op} {self.b}. Put the final answer in \\boxed{{}}."

    @property
    def solution(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.answer}. \\boxed{{{self.answer}}}"

    @classmethod
    def from_prompt(cls, prompt: str) -> "ArithmeticProblem":
        m = PROMPT_RE.match(prompt)
        if m is None:
            raise ValueError(f"not a synthetic arithmetic prompt: {prompt!r}")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


ADD_MAX, MUL_MAX = 20, 9  # a + b and a - b with 0 <= b, a <= ADD_MAX; a * b with 2 <= a, b <= MUL_MAX


def sample_problem(rng: random.Random) -> ArithmeticProblem:
    """Sums and non-negative differences of 0..20, products of 2..9 (736 problems in all): a short
    supervised pass learns most products and part of the sums and differences, so sampled answers
    are a mix of right and wrong."""
    op = rng.choice("+-*")
    if op == "+":
        return ArithmeticProblem(rng.randint(0, ADD_MAX), op, rng.randint(0, ADD_MAX))
    if op == "-":
        a = rng.randint(0, ADD_MAX)
        return ArithmeticProblem(a, op, rng.randint(0, a))  # no negative results
    return ArithmeticProblem(rng.randint(2, MUL_MAX), op, rng.randint(2, MUL_MAX))


def sample_problems(n: int, seed: int, exclude: Iterable[ArithmeticProblem] = ()) -> list[ArithmeticProblem]:
    """`n` distinct problems drawn in a fixed order from `seed`, none of them in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(1000 * (n + 10)):
        if len(out) == n:
            break
        p = sample_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    if len(out) < n:
        raise ValueError(
            f"asked for {n} distinct problems but found only {len(out)} outside the {len(seen) - len(out)} "
            "excluded ones: the family is too small; lower the count or widen ADD_MAX / MUL_MAX"
        )
    return out


def eval_problems() -> list[ArithmeticProblem]:
    return sample_problems(EVAL_SIZE, EVAL_SEED)


def train_problems() -> list[ArithmeticProblem]:
    return sample_problems(TRAIN_SIZE, TRAIN_SEED, exclude=eval_problems())


def problem_row(p: ArithmeticProblem) -> dict[str, str]:
    """One line of the bundled JSONL files (the data schema: `prompt`, `answer`)."""
    return {"prompt": p.prompt, "answer": str(p.answer)}
