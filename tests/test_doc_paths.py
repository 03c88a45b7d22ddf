"""Every repository path and every `drpo_trainer.<module>` that README.md and the docs name exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    "data/README.md",
    "benchmarks/README.md",
    *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")),
]
TOP = ("drpo_trainer/", "configs/", "data/", "launch/", "tests/", "benchmarks/", "experiments/", "docs/", ".ci/")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP) + r")[\w./{},*-]*[\w/}*])")
# files the documented commands write (data/convert_hub_datasets.py, a copy of launch/hostfile.example)
PRODUCED = {"data/aime.jsonl", "data/aime24.jsonl", "data/aime25.jsonl", "data/dapo_math_17k.jsonl", "launch/hostfile"}
MODULE = re.compile(r"(?<![\w./-])(drpo_trainer(?:\.\w+)+)")


def _named_paths(text: str) -> set[str]:
    return {m.group(1).rstrip("/.") for m in PATH.finditer(text)}


def _expand(name: str) -> list[str]:
    """`a_{train,eval}.jsonl` -> both names."""
    m = re.search(r"\{([^}]*)\}", name)
    if not m:
        return [name]
    return [n for alt in m.group(1).split(",") for n in _expand(name[: m.start()] + alt + name[m.end() :])]


def _exists(name: str, base: Path) -> bool:
    """A path relative to the repository, or to the document's own folder (links inside docs/); a glob
    matches at least one file; `{a,b}` alternatives all exist."""
    if name in PRODUCED:
        return True
    return all(any((root / n).exists() or list(root.glob(n)) for root in (REPO, base)) for n in _expand(name))


def _resolves(dotted: str) -> bool:
    """`drpo_trainer.a.b.c`: a module, or an attribute path under the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            if i == len(parts):
                return True
            mod = importlib.import_module(module)
            obj = mod
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


def test_the_path_finder_sees_paths_in_code_spans_and_links():
    text = "see `drpo_trainer/runtime/loop.py` and [x](docs/async.md), not drpo_trainer/nowhere.py."
    assert _named_paths(text) == {"drpo_trainer/runtime/loop.py", "docs/async.md", "drpo_trainer/nowhere.py"}
    assert not _exists("drpo_trainer/nowhere.py", REPO)
    assert _exists("data/synthetic_math_{train,eval}.jsonl", REPO)
    assert not _exists("data/synthetic_math_{train,test}.jsonl", REPO)
    assert not _resolves("drpo_trainer.trainer")  # the loop's module before it moved to runtime/loop.py
    assert _resolves("drpo_trainer.runtime.loop.run_step")


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_path_exists(doc):
    text = (REPO / doc).read_text()
    missing = sorted(p for p in _named_paths(text) if not _exists(p, (REPO / doc).parent))
    assert not missing, f"{doc} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_module_exists(doc):
    text = (REPO / doc).read_text()
    missing = sorted(m for m in set(MODULE.findall(text)) if not _resolves(m))
    assert not missing, f"{doc} names modules or attributes that do not exist: {missing}"
