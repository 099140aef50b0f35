"""Run folders as their readers see them: the adapter a folder stands for, its ``run.json``, and the
prediction files. Whatever needs "the adapter of a run folder" (eval, serve, HumanEval) reads it here.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import storage
from ..errors import AdapterFileError, ConfigError
from ..names import slug
from ..storage import atomic_write_bytes
from .config import TrainConfig, resolved


# The predictions of every scoring, one JSON object per example (index, input, reference, prediction),
# written next to metrics.json in out_dir: the test score of the best adapter, the zero-shot score of
# the base model, and the latest validation (with its step).
PREDICTIONS = {"test": "predictions-test.jsonl", "zero-shot": "predictions-test-zero-shot.jsonl",
               "valid": "predictions-valid.jsonl"}


def resolve_adapter(path) -> Path:
    """The adapter directory ``path`` names: itself, or for a ``train`` out_dir its ``best/`` adapter."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"no adapter directory at {path}; train one with `deltatune train ... --out DIR`")
    if not (path / "adapter.safetensors").exists() and (path / "best").is_dir():
        return path / "best"  # a run directory: its best adapter on the validation split
    return path


def run_json_of(adapter_dir: Path) -> Path:
    found = [p / "run.json" for p in (adapter_dir, *list(adapter_dir.parents)[:3]) if (p / "run.json").is_file()]
    if not found:
        raise ConfigError(f"no run.json in {adapter_dir} or its parents: evaluate() needs the model and task "
                          "that deltatune.train records in out_dir/run.json")
    return found[0]


def read_run_json(path: Path) -> dict:
    try:
        saved = json.loads(storage.read_text(path))
    except (OSError, ValueError, RecursionError) as err:  # malformed or too deeply nested JSON, not UTF-8, a link
        raise ConfigError(f"{path} cannot be read ({err}); it is written by deltatune.train") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} must hold a JSON object (a TrainConfig), got {type(saved).__name__}")
    return saved


def config_from(saved: dict, path: Path) -> TrainConfig:
    """The TrainConfig of a run.json, on this machine's device; every field checked as for a new run."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return resolved(TrainConfig(**{k: v for k, v in saved.items() if k in names and k != "device"}), None)
    except (TypeError, ValueError) as err:  # ConfigError is a ValueError
        raise ConfigError(f"{path} holds invalid settings ({err}); it is written by deltatune.train") from None


def default_eval_dir(adapter_dir, task=None) -> Path:
    """Where ``deltatune eval`` writes by default: ``<run dir>/eval-<task>/`` next to the run's own files."""
    run_json = run_json_of(resolve_adapter(adapter_dir))
    name = task.name if hasattr(task, "name") else task or read_run_json(run_json).get("task") or "task"
    return run_json.parent / f"eval-{slug(name)}"


def write_predictions(path: Path, records: list[dict], **extra) -> None:
    text = "".join(json.dumps({**extra, **r}, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))
