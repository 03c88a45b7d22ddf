"""Are two runs the same run? Compares metrics.jsonl (every key except time/*, perf/* and */seconds,
which measure the machine) and samples.jsonl line by line, exactly.

    python tests/compare_runs.py RUN_DIR_A RUN_DIR_B     # exit 0: identical; 1: the first differences

Used to show that a change of structure left training bit for bit unchanged (docs/testing.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MACHINE_KEYS = ("time/", "perf/")


def _measures_the_machine(key: str) -> bool:
    return key.startswith(MACHINE_KEYS) or key.endswith("/seconds")


def _rows(path: Path, *, drop_machine_keys: bool) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if drop_machine_keys:
        rows = [{k: v for k, v in r.items() if not _measures_the_machine(k)} for r in rows]
    return rows


def differences(run_a: str | Path, run_b: str | Path, limit: int = 10) -> list[str]:
    """Human-readable differences between two run directories (empty: the same run)."""
    out: list[str] = []
    for name, drop in (("metrics.jsonl", True), ("samples.jsonl", False)):
        a, b = Path(run_a) / name, Path(run_b) / name
        if not a.is_file() or not b.is_file():
            out.append(f"{name}: missing in {a if not a.is_file() else b}")
            continue
        rows_a, rows_b = _rows(a, drop_machine_keys=drop), _rows(b, drop_machine_keys=drop)
        if len(rows_a) != len(rows_b):
            out.append(f"{name}: {len(rows_a)} rows vs {len(rows_b)}")
        for i, (ra, rb) in enumerate(zip(rows_a, rows_b)):
            for key in sorted(set(ra) | set(rb)):
                if ra.get(key, "<absent>") != rb.get(key, "<absent>"):
                    out.append(f"{name} row {i} ({key}): {ra.get(key, '<absent>')!r} vs {rb.get(key, '<absent>')!r}")
    return out[:limit]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    diffs = differences(*argv)
    for line in diffs:
        print(line)
    if not diffs:
        print("identical: metrics (without time/*, perf/*, */seconds) and samples")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
