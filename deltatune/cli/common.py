"""What the commands share: parsing `--set KEY=VALUE`, seeds and lists, the checks made before anything
heavy is loaded, and printing."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.names import slug  # noqa: F401  (one slug for the engine and the CLI)

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parse_value(text: str):
    """'16' -> 16, '1e-3' -> 0.001, 'true' -> True, 'none' -> None, 'a,b' -> ['a', 'b'], else the string."""
    text = text.strip()
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    from deltatune.names import number_or_text

    return number_or_text(text)


_KEY = re.compile(r"[A-Za-z_][\w.-]*$")


def parse_sets(items: list[str] | None) -> dict:
    """The method options from repeated `--set KEY=VALUE` flags; a later KEY wins."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key) or not value.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set r=16 or --set sites=attn.q,attn.v")
        options[key] = parse_value(value)
    return options


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def seeds(text: str) -> list[int]:
    """'3' -> [0, 1, 2] (a count); '0,7,9' -> exactly those seeds."""
    try:
        values = [int(part) for part in split_list(text)]
    except ValueError:
        values = []
    if not values or (len(values) == 1 and not 1 <= values[0] <= 10_000) or (
            len(values) > 1 and not all(0 <= v < 2**63 for v in values)):
        raise ConfigError(f"--seeds {text!r}: give a count up to 10000 (--seeds 3 runs seeds 0,1,2) or a list of seeds "
                          "in [0, 2**63) (--seeds 0,7,9)")
    return list(range(values[0])) if len(values) == 1 else values


def check_method(name: str, options: dict | None = None) -> None:
    """An unknown method or a bad option fails here, before a model or a dataset is loaded."""
    from deltatune.registry import build_method

    known = dt.methods()
    if name not in known:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    build_method(name, options or {})  # raises ConfigError naming the option and the valid ones


def check_task(name: str) -> None:
    from deltatune.tasks import TASKS

    if name not in TASKS and not name.startswith("hf:") and not os.path.lexists(name):
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                          "(or a .jsonl/.csv file, a directory of train/valid/test files, or hf:<dataset>)")


def jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())
