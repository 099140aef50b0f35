"""File-name-safe short names, shared by the engine (default out_dir) and the CLI (bench run folders)."""
from __future__ import annotations

import re
from pathlib import PurePath

_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def slug(text) -> str:
    """'data/my task.jsonl' -> 'my-task', 'Qwen/Qwen2.5-0.5B' -> 'Qwen2.5-0.5B', 'hf:glue/sst2' -> 'sst2'.

    The last path component, without a data-file suffix, every run of other characters than
    letters, digits, '_', '.' and '-' turned into one '-'; 'run' if nothing is left.
    """
    name = PurePath(str(text)).name or str(text)
    for suffix in _DATA_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"
