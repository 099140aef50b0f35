"""Names, values and places as deltatune reads and writes them: file-name-safe short names (the
engine's default out_dir, the CLI's bench run folders), numbers typed as text (`--set r=16`, CSV
cells), and the one cache folder (converted weights, built tasks, analyses)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path, PurePath

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


def cache_dir() -> Path:
    """``$DELTATUNE_CACHE``, else the platform's cache folder (``~/.cache/deltatune`` on Linux)."""
    if os.environ.get("DELTATUNE_CACHE"):
        return Path(os.environ["DELTATUNE_CACHE"])
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "deltatune"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "deltatune"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltatune"


def number_or_text(text: str):
    """'16' -> 16, '1e-3' -> 0.001, anything else stays the string (the CLI's --set, report CSV cells)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
