"""A sweep's folder as its own files describe it: ``sweep.json`` (what defines the trials, and the settings),
``trials.jsonl`` (one record per finished trial) and ``chosen.json`` (the outcome). The driver that goes on with
a sweep and ``deltatune report`` read them here; a folder is a sweep's by its ``sweep.json``, not by its name."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import storage
from ..errors import StorageError

FORMAT = "deltatune.sweep"  # sweep.json's "format"
VERSION = 1


def read_json(path: Path) -> dict:
    """A JSON object the sweep wrote (never through a link; a damaged file is one StorageError line)."""
    try:
        data = json.loads(storage.read_text(path))
    except (OSError, ValueError) as err:
        raise StorageError(f"{path} cannot be read ({err}); it is written by deltatune sweep") from None
    if not isinstance(data, dict):
        raise StorageError(f"{path} must hold a JSON object; it is written by deltatune sweep")
    return data


def is_sweep(folder) -> bool:
    """The folder holds the ``sweep.json`` a sweep writes (a regular file of its format)."""
    path = Path(folder) / "sweep.json"
    if not os.path.lexists(path):
        return False
    try:
        return json.loads(storage.read_text(path)).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_records(folder) -> dict[int, dict]:
    """The finished trials' records by number (the baseline's is -1); a line a kill cut short is skipped."""
    path = Path(folder) / "trials.jsonl"
    records = {}
    if not os.path.lexists(path):
        return records
    try:
        text = storage.read_text(path)
    except (OSError, ValueError) as err:
        raise StorageError(f"{path} cannot be read ({err}); it is written by deltatune sweep") from None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("number"), int):
            records[record["number"]] = record
    return records
