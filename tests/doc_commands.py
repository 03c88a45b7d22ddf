"""Collect the shell commands that README.md, docs/*.md, data/README.md and benchmarks/README.md
show, and turn each into a short run that proves it works (tests/test_doc_commands.py).

Collected: `drpo-train ...` (also inside `torchrun`/`deepspeed`/`accelerate` launch lines and
`&&` chains, and as `-m drpo_trainer.cli`), `python -m drpo_trainer...`, and `python data/...`,
`python benchmarks/...`, `python experiments/...`, `python docs/figures/...` scripts, from
fenced shell blocks and from inline code spans. A trailing comment with `needs ...`
(`# needs GPUs`, `# needs the network`) marks a command that
cannot run on a CPU machine without network: it is only parsed (`--print-config` / `--help`).
A trailing `# takes ~N min` (or `h`) marks one that runs on a CPU but too long for the suite (the
full loss comparison); it is parsed the same way.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [
    "README.md",
    "data/README.md",
    "benchmarks/README.md",
    *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")),
]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
NEEDS = re.compile(r"#.*?\bneeds (.+)$")  # "# needs GPUs", "# needs the network", "# offline; needs your own ..."
TAKES = re.compile(r"#.*?\btakes (~?\d+(?:\.\d+)? ?(?:min|h)\w*)")  # "# takes ~40 min on 2 cores"
SCRIPT_DIRS = ("data/", "benchmarks/", "experiments/", "docs/figures/")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    argv: tuple[str, ...]  # ("drpo-train", ...) or ("python", ...)
    needs: str = ""  # what the docs say it needs beyond a CPU machine ("GPUs", "the network", ...)

    @property
    def kind(self) -> str:
        if self.argv[0] == "drpo-train":
            sub = self.argv[1] if len(self.argv) > 1 else ""
            return sub if sub in ("eval", "export", "plot") else "train"
        if self.argv[1] == "-m":
            return "module"
        return "script"


def _strip_comment(line: str) -> tuple[str, str]:
    """'cmd  # note' -> ('cmd', '# note'); a '#' inside a word (e.g. a URL anchor) is kept."""
    m = re.search(r"(^|\s)#", line)
    return (line[: m.start()].rstrip(), line[m.start() :].strip()) if m else (line.rstrip(), "")


def _commands_in(text: str) -> list[tuple[str, str]]:
    """One shell line -> the commands of interest in it, as (command text, '')."""
    found = []
    for part in re.split(r"&&|;|\|\|", text):
        part = part.strip().rstrip("&").strip()
        part = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", part)  # VAR=value prefixes
        part = re.sub(r"^\.?[\w./-]*venv[\w-]*/bin/", "", part)  # .venv/bin/drpo-train -> drpo-train
        launched = re.search(r"(?:--no-python\s+)(drpo-train\b.*)$", part) or re.search(
            r"(?:-m|--module)\s+drpo_trainer\.cli\b(.*)$", part
        )
        if launched and not part.startswith("drpo-train"):
            rest = launched.group(1)
            part = rest if rest.startswith("drpo-train") else "drpo-train" + rest
        part = re.sub(r"^python3?\s+-m\s+drpo_trainer\.cli\b", "drpo-train", part)
        if part.startswith("drpo-train") or re.match(r"python3?\s+-m\s+drpo_trainer\b", part):
            found.append(part)
        elif re.match(r"python3?\s+(" + "|".join(map(re.escape, SCRIPT_DIRS)) + r")\S+\.py\b", part):
            found.append(part)
    return [(c, "") for c in found]


def _to_command(text: str, where: str, comment: str) -> DocCommand:
    argv = shlex.split(text)
    if argv[0] == "python3":
        argv[0] = "python"
    needs, takes = NEEDS.search(comment), TAKES.search(comment)
    what = needs.group(1).strip() if needs else (f"{takes.group(1)} of CPU time" if takes else "")
    return DocCommand(where, tuple(argv), what)


def collect(path: Path, text: str | None = None) -> list[DocCommand]:
    """Every command of interest in one Markdown file, in order."""
    text = path.read_text(encoding="utf-8") if text is None else text
    rel = path.relative_to(REPO) if path.is_absolute() and REPO in path.parents else path
    out: list[DocCommand] = []
    lines = text.splitlines()
    i, fence = 0, None
    prose: list[tuple[int, str]] = []
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^\s*```(\w*)", line)
        if m:
            fence = None if fence is not None else m.group(1).lower()
            i += 1
            continue
        if fence is None:
            prose.append((i + 1, line))
            i += 1
            continue
        start = i + 1
        joined = line.strip()
        while joined.endswith("\\") and i + 1 < len(lines):  # continuation lines
            i += 1
            joined = joined[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        if fence not in SHELL_FENCES or not joined or joined.startswith("#"):
            continue
        body, comment = _strip_comment(joined)
        for cmd, _ in _commands_in(body):
            out.append(_to_command(cmd, f"{rel}:{start}", comment))
    for lineno, line in prose:  # inline code spans outside fences
        for span in re.findall(r"`([^`]+)`", line):
            if "<" in span or re.search(r"\sX(\s|$)", span):
                continue  # a template in prose (`drpo-train export <ckpt> <dir>`), not a command to copy
            for cmd, _ in _commands_in(span.strip()):
                argv = shlex.split(cmd)
                if argv[1:] in (["eval"], ["export"], ["plot"]):
                    continue  # the name of a command in prose (`drpo-train eval`), not one to run
                if len(argv) > 1 or cmd.startswith("python"):
                    out.append(_to_command(cmd, f"{rel}:{lineno}", ""))
    return out


def collect_all() -> list[DocCommand]:
    return [c for f in DOC_FILES for c in collect(REPO / f)]
