"""Counts the reliability tests produce (kills, bad inputs tried), for docs/reliability.md.

Set $DELTATUNE_FIGURES to a JSON file and run the tests; each test merges its section into it:

    DELTATUNE_FIGURES=docs/reliability.json python -m pytest tests/test_crash.py tests/test_bad_input.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def record(section: str, value) -> None:
    path = os.environ.get("DELTATUNE_FIGURES")
    if not path:
        return
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def count(section: str, n: int = 1) -> None:
    """Add ``n`` to the counter ``section`` (bad inputs tried, hypothesis examples run)."""
    path = os.environ.get("DELTATUNE_FIGURES")
    if not path:
        return
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    counts = data.setdefault("counts", {})
    counts[section] = counts.get(section, 0) + n
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
