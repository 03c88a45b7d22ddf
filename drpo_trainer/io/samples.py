"""Completion samples: which completions earned which reward, in `<output_dir>/samples.jsonl`.

At every eval (each eval set) and every `tracking.samples_every_steps` training steps, rank 0
writes `tracking.samples_per_step` of its own completions, evenly spread over its batch (all of
them when there are fewer), one JSON object each:

    step, kind ("train" or "eval:<set>"), index (position in rank 0's batch; a prompt's group is
    index // samples_per_prompt), prompt, completion, extracted_answer (reward.extraction applied
    to the completion; null when it has none), gold_answer, reward (the score the step used),
    advantage and train_index (train rows only: the prompt's position in the training set as
    loaded, over-long prompts dropped); overlong_penalty (train rows, only with reward.overlong_penalty > 0:
    the length penalty the step added to `reward` before the advantages)

With W&B on, the same rows are logged as Tables (`samples/train`, `samples/eval/<set>`).
A resumed run keeps the rows up to its checkpoint's step and appends (the steps after it run
again); a run that starts at step 0 starts the file anew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from drpo_trainer.algorithms.overlong import completion_penalties
from drpo_trainer.config import Config
from drpo_trainer.rewards.extract import extract_final_answer

SAMPLES_FILE = "samples.jsonl"


def pick(total: int, n: int) -> list[int]:
    """n indices spread evenly over range(total), first one 0; all of them when n >= total."""
    if n >= total:
        return list(range(total))
    return [i * total // n for i in range(n)]


def sample_rows(
    step: int,
    kind: str,
    prompts: Sequence,
    completions: Sequence,
    rewards: Sequence[float],
    n: int,
    *,
    extraction: str,
    advantages: Optional[Sequence[float]] = None,
    train_indices: Optional[Sequence[int]] = None,
    penalties: Optional[Sequence[float]] = None,
) -> list[dict]:
    """The rows of n completions; `prompts` are the Problems the completions' prompt_index points into
    (`train_indices`: their positions in the training set)."""
    rows = []
    for i in pick(len(completions), n):
        c = completions[i]
        problem = prompts[c.prompt_index]
        row = {
            "step": step,
            "kind": kind,
            "index": i,
            "prompt": problem.prompt_text,
            "completion": c.text,
            "extracted_answer": extract_final_answer(c.text, extraction),
            "gold_answer": problem.answer,
            "reward": float(rewards[i]),
        }
        if advantages is not None:
            row["advantage"] = float(advantages[i])
        if train_indices is not None:
            row["train_index"] = int(train_indices[c.prompt_index])
        if penalties is not None:
            row["overlong_penalty"] = float(penalties[i])
        rows.append(row)
    return rows


class SampleLog:
    """Appends sample rows to samples.jsonl and hands them to the tracker's W&B Table (rank 0 only)."""

    def __init__(self, cfg: Config, *, start_step: int = 0, tracker=None) -> None:
        self.cfg = cfg
        self.n = cfg.tracking.samples_per_step
        self.every = cfg.tracking.samples_every_steps
        self.extraction = cfg.reward.extraction
        self.tracker = tracker
        self.path = Path(cfg.output_dir) / SAMPLES_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _keep_until(self.path, start_step)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")

    def train(self, step: int, prompts, completions, rewards, advantages, train_indices=None) -> None:
        if self.every and step % self.every == 0:
            advantages = [float(a) for a in advantages]
            penalised = completion_penalties(self.cfg, completions)
            penalties = penalised[0] if penalised is not None else None
            self._write(
                step, "train", "samples/train", prompts, completions, rewards, advantages, train_indices, penalties
            )

    def eval(self, step: int, name: str, problems, completions, rewards) -> None:
        self._write(step, f"eval:{name}", f"samples/eval/{name}", problems, completions, rewards, None)

    def _write(
        self, step, kind, table, prompts, completions, rewards, advantages, train_indices=None, penalties=None
    ) -> None:
        rows = sample_rows(
            step,
            kind,
            prompts,
            completions,
            rewards,
            self.n,
            extraction=self.extraction,
            advantages=advantages,
            train_indices=train_indices,
            penalties=penalties,
        )
        self.file.write("".join(json.dumps(r) + "\n" for r in rows))
        if self.tracker is not None:
            self.tracker.log_table(step, table, rows)

    def close(self) -> None:
        self.file.close()


def _keep_until(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` (all rows when step is 0): they are written again."""
    if not path.exists():
        return
    keep = []
    if step > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


def open_sample_log(cfg: Config, *, is_main: bool, start_step: int, tracker=None) -> Optional[SampleLog]:
    """The run's SampleLog on rank 0, None elsewhere or with tracking.samples_per_step = 0."""
    if not is_main or cfg.tracking.samples_per_step == 0:
        return None
    return SampleLog(cfg, start_step=start_step, tracker=tracker)
