"""Finding the final answer in an untrusted completion (standard library only).

Owns the extraction modes of ``reward.extraction``:

- ``boxed`` (default): the LAST top-level ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed,
  ``\\boxed 5`` accepted), with boxes nested inside it unwrapped.
- ``answer_line``: the last ``Answer: X`` line (the DAPO prompt format).
- ``auto``: ``boxed`` when the completion has a complete box, else ``answer_line``.

An answer with nothing in it (``\\boxed{}``, ``\\boxed{\\text{}}``, ``\\boxed{ }``) is no answer.

Every scan here is a single linear pass with no recursion and no backtracking regex, so a
100,000-character completion or ten thousand nested braces cost microseconds, not a hang; the
expensive part (math-verify) happens later, in a killable worker.
"""

from __future__ import annotations

import re
from typing import Optional

from drpo_trainer.rewards.answer_form import is_blank

EXTRACTION_MODES = ("boxed", "answer_line", "auto")

# A box command: not followed by a letter (``\\boxedfoo`` is another macro), and its backslash
# not escaped (``\\\\boxed`` is a line break and a word). Group 1 is the command itself.
_BOX = re.compile(r"(?<!\\)(?:\\\\)*(\\(?:boxed|fbox)(?![A-Za-z]))")
# Tokens that matter for brace matching: an escaped character (``\\{`` is a literal brace), or a brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.S)
# The same, plus box commands with their optional opening brace (for unwrapping nested boxes).
_UNWRAP_TOKEN = re.compile(r"(?P<box>\\(?:boxed|fbox)(?![A-Za-z])\s*(?P<open>\{)?)|\\.|[{}]", re.S)
# The argument of ``\\boxed 5``: everything up to whitespace or a math delimiter.
_BARE_TOKEN = re.compile(r"[^\s$]*")
_SPACES = re.compile(r"\s*")
# `Answer:` anywhere on a line, case-insensitive; `[ \t]*` cannot backtrack badly (one class, then ':').
_ANSWER_LINE = re.compile(r"answer[ \t]*:", re.IGNORECASE)
_MATH_DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))


def _braced_group(text: str, open_pos: int) -> int:
    """Index just after the `}` closing the group that opens at `open_pos`, or -1 if unclosed.

    The regex jumps over ordinary characters at C speed; only braces and escapes are visited.
    """
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, open_pos):
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return m.end()
    return -1


def _box_argument(text: str, after_name: int) -> tuple[Optional[str], int]:
    """The argument of a box command whose name ends at `after_name`: (content, end index).

    ``\\boxed{...}`` gives the group's content; ``\\boxed 5`` gives the run of characters up to
    whitespace or ``$`` (a trailing sentence ``.`` or ``,`` dropped). Content None means the box
    is not closed (a truncated completion).
    """
    i = _SPACES.match(text, after_name).end()
    n = len(text)
    if i < n and text[i] == "{":
        end = _braced_group(text, i)
        if end == -1:
            return None, n
        return text[i + 1 : end - 1], end
    j = _BARE_TOKEN.match(text, i).end()
    token = text[i:j].rstrip(".,;")
    return (token if j > i else None), j


def _top_level_boxes(text: str) -> list[tuple[Optional[str], int, int]]:
    """All top-level boxes as (content or None, start, end), left to right.

    A box inside another box's argument is not top-level: the scan resumes after each argument,
    so every character is visited once.
    """
    boxes = []
    pos = 0
    while True:
        m = _BOX.search(text, pos)
        if m is None:
            return boxes
        content, end = _box_argument(text, m.end())
        boxes.append((content, m.start(1), end))
        pos = max(end, m.end())


def _unwrap_boxes(content: str) -> str:
    """Drop every box command inside `content`, keeping its argument (one pass, any depth).

    A stack remembers which open braces belong to a box, so their closing braces are dropped too.
    """
    pieces: list[str] = []
    box_brace: list[bool] = []
    last = 0
    for m in _UNWRAP_TOKEN.finditer(content):
        token = m.group()
        if m.group("box") is not None:
            pieces.append(content[last : m.start()])
            last = m.end()
            if m.group("open") is not None:
                box_brace.append(True)
        elif token == "{":
            box_brace.append(False)
        elif token == "}" and box_brace:
            if box_brace.pop():
                pieces.append(content[last : m.start()])
                last = m.end()
    pieces.append(content[last:])
    return "".join(pieces)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last top-level box, nested boxes unwrapped; None if there is no complete box.

    When the last box is left unclosed (the completion was cut off), there is no final answer:
    an earlier box is a draft, not the answer.
    """
    boxes = _top_level_boxes(text)
    if not boxes or boxes[-1][0] is None:
        return None
    return _unwrap_boxes(boxes[-1][0]).strip()


def _strip_math_delimiters(answer: str) -> str:
    s = answer.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in _MATH_DELIMITERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
                break
    return s


def answer_line(text: str) -> Optional[str]:
    """The text after the last ``Answer:`` up to the end of its line; None if absent or empty.

    A box on that line wins over the rest of the line (``Answer: \\boxed{5}.`` gives ``5``).
    """
    last = None
    for last in _ANSWER_LINE.finditer(text):
        pass
    if last is None:
        return None
    end = text.find("\n", last.end())
    line = text[last.end() : end if end != -1 else len(text)]
    boxed = last_boxed(line)
    if boxed is not None:
        return boxed or None
    line = _strip_math_delimiters(line.strip().rstrip("."))
    return line.rstrip(".").strip() or None


def extract_final_answer(text: str, mode: str = "boxed") -> Optional[str]:
    """The final answer of `text` under extraction `mode`, or None when there is none."""
    if mode == "boxed":
        answer = last_boxed(text)
    elif mode == "answer_line":
        answer = answer_line(text)
    elif mode == "auto":
        answer = last_boxed(text)
        if answer is None:
            answer = answer_line(text)
    else:
        raise ValueError(
            f"unknown answer extraction mode {mode!r}. "
            f"Fix: set reward.extraction to one of {', '.join(EXTRACTION_MODES)}"
        )
    if answer is None:
        return None
    answer = _strip_math_delimiters(answer)
    return None if is_blank(answer) else answer


def normalize_gold(answer: str) -> str:
    """A gold answer as a bare expression: plain ('391', '1/2') or LaTeX (``$\\frac12$``, ``\\boxed{2}``)."""
    boxed = last_boxed(answer)
    return _strip_math_delimiters(boxed if boxed is not None else answer)
