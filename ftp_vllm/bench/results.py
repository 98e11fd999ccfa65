"""Benchmark results files: the newest record of a kind (for `ftp-vllm report`), and the
end of a benchmark command (its table on stdout, the record as JSON if asked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def latest(results: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The most recently created record of ``kind``; None when there is none."""
    rows = [r for r in results if r.get("kind") == kind]
    return max(rows, key=lambda r: r.get("created", "")) if rows else None


def emit(record: dict[str, Any], table: str, path: Path | None) -> int:
    """Print the benchmark's table and write its record to ``path`` (if given); exit 0."""
    print(table)
    if path:
        path.write_text(json.dumps(record, indent=2) + "\n")
    return 0
