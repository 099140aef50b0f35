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


def find_run_json(adapter_dir: Path) -> Path | None:
    """The ``run.json`` of the run an adapter belongs to (in its folder, or up to 3 above: ``best/``,
    ``checkpoints/step-N/adapter``); None for an adapter folder outside a run."""
    adapter_dir = Path(adapter_dir)
    return next((p / "run.json" for p in (adapter_dir, *list(adapter_dir.parents)[:3]) if (p / "run.json").is_file()),
                None)


def run_json_of(adapter_dir: Path) -> Path:
    found = find_run_json(adapter_dir)
    if found is None:
        raise ConfigError(f"no run.json in {adapter_dir} or its parents: evaluate() needs the model and task "
                          "that deltatune.train records in out_dir/run.json")
    return found


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


def default_eval_dir(adapter_dir, task=None, model: str | None = None) -> Path:
    """Where ``deltatune eval`` writes by default: ``<run dir>/eval-<task>/`` next to the run's own files;
    ``<adapter dir>/eval-<task>/`` for an adapter folder outside a run; ``runs/<model>-<task>-zero-shot/``
    for the model without an adapter (``adapter_dir`` None)."""
    name = task.name if hasattr(task, "name") else task
    if adapter_dir is None:
        return Path("runs") / f"{slug(model or 'model')}-{slug(name or 'task')}-zero-shot"
    adapter_dir = resolve_adapter(adapter_dir)
    run_json = find_run_json(adapter_dir)
    if run_json is None:
        return adapter_dir / f"eval-{slug(name or 'task')}"
    name = name or read_run_json(run_json).get("task") or "task"
    return run_json.parent / f"eval-{slug(name)}"


def write_predictions(path: Path, records: list[dict], **extra) -> None:
    text = "".join(json.dumps({**extra, **r}, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))


def adapter_and_model(adapter, model: str | None = None) -> tuple[Path, str | None]:
    """(the adapter folder ``adapter`` stands for, the model to load it on): ``model`` if given, else the model the
    run's run.json names (None where there is none). A ``model`` other than the one the run trained on is refused."""
    adapter_dir = resolve_adapter(adapter)
    try:
        trained_on = read_run_json(run_json_of(adapter_dir)).get("model")
    except ConfigError:
        trained_on = None
    if model is not None and trained_on and trained_on != model:
        raise ConfigError(f"the adapter at {adapter_dir} was trained on {trained_on!r}, not {model!r}; "
                          f"pass --model {trained_on} (or leave --model out)")
    return adapter_dir, model or trained_on
