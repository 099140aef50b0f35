"""Scoring: a saved adapter on a split (``evaluate``), the pretrained model before training (the
zero-shot score, cached across runs), and the predictions of every scoring.
"""
from __future__ import annotations

import dataclasses
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

import deltatune as dt
from .. import tasks
from ..errors import ConfigError, DataError, StorageError
from ..models import build_task_model
from ..names import cache_dir
from ..storage import atomic_write_json, storage_error
from ..store import hash_tensors
from .config import TrainConfig, resolved
from .memory import autocast, check_positions, longest_input
from .objectives import OBJECTIVES
from .runs import config_from, read_run_json, resolve_adapter, run_json_of, write_predictions


def evaluate(adapter_dir, task=None, split: str = "test", *, max_eval: int | None = None,
             max_len: int | None = None, batch_size: int | None = None, out_dir=None, recycle: bool | None = None) -> dict:
    """Score a saved adapter on ``split`` of its training task (or of ``task``: a name, path or TaskData).

    The model (and by default the task) come from the ``run.json`` that ``train`` wrote next to the
    adapter; an ``out_dir`` of ``train`` stands for its ``best`` adapter. The whole split is scored
    unless ``max_eval`` is given (the run's seed then picks the examples, so the run's own max_eval
    reproduces the subset it was tested on). ``max_len`` defaults to the longest input the model takes
    (its position table, less the prompt tokens and, when generating, max_new_tokens; the tokenizer's
    model_max_length where there is no table), not to the length the run trained at: inputs are
    scored whole unless the model cannot take them; ``max_len_source`` says which applied, and
    ``run_max_len`` is the run's (pass it to reproduce the run's own metrics.json). ``batch_size``
    defaults to the run's. With ``out_dir``, ``metrics-<split>.json`` and ``predictions-<split>.jsonl``
    are written there. Returns the metrics plus what was used: examples, max_len, max_len_source,
    run_max_len, batch_size, truncated, adapter.
    ``task="humaneval"`` scores pass@1 of greedy completions instead (``deltatune.tasks.humaneval``;
    ``max_eval``: the first N problems).
    ``recycle`` (default: as the run was trained) scores from the cache of the frozen lower blocks.
    """
    if task == "humaneval":
        from deltatune.tasks import humaneval
        return humaneval.evaluate(model=None, adapter=adapter_dir, limit=max_eval, batch_size=batch_size or 8,
                                  out_dir=out_dir)
    adapter_dir = resolve_adapter(adapter_dir)
    run_json = run_json_of(adapter_dir)
    cfg = config_from(read_run_json(run_json), run_json)
    run_max_len = cfg.max_len
    cfg = resolved(dataclasses.replace(cfg, max_eval=max_eval, max_len=cfg.max_len if max_len is None else max_len,
                                        batch_size=cfg.batch_size if batch_size is None else batch_size), None)
    if max_eval is not None and max_eval < 1:
        raise ConfigError(f"max_eval must be >= 1 or None (the whole split), got {max_eval}")
    if task is None or isinstance(task, (str, os.PathLike)):
        task = load_task(dataclasses.replace(cfg, task=str(task or cfg.task)))
    elif max_eval is not None:
        raise ConfigError("max_eval applies to a task loaded by name or path; subsample a TaskData before passing it")
    rows = task.split(split)
    if not rows:
        raise DataError(f"task {task.name} has no {split} examples to evaluate")
    model, tokenizer = restore(cfg, task, adapter_dir)
    source = "--max-len"
    if max_len is None:  # the whole input: as long as the model takes (dynamic padding: short inputs cost no more)
        longest, source = longest_input(cfg, model, task.kind, tokenizer)
        cfg = dataclasses.replace(cfg, max_len=max(2, longest))
    objective = OBJECTIVES[task.kind](tokenizer, cfg)
    examples = objective.encode(rows, train=False)
    truncated = objective.truncated
    objective.warn_truncated(stacklevel=2)
    model.to(cfg.device)
    if cfg.recycle if recycle is None else recycle:  # the frozen lower blocks' output from the cache (built once)
        from . import recycle as recycling
        objective, examples = recycling.prepare(dataclasses.replace(cfg, recycle=True), model, objective, {split: examples})
        examples = examples[split]
    metrics, records = score(model, objective, examples, task, split, cfg)
    result = {"task": task.name, "split": split, "metric": task.metric, "value": metrics[task.metric], **metrics,
              "examples": len(rows), "max_eval": max_eval, "max_len": cfg.max_len, "max_len_source": source,
              "run_max_len": run_max_len, "batch_size": cfg.batch_size,
              "truncated": truncated, "adapter": str(adapter_dir)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(err, out_dir) from err
        result["predictions_file"] = str(out_dir / f"predictions-{split}.jsonl")
        write_predictions(out_dir / f"predictions-{split}.jsonl", records)
        atomic_write_json(out_dir / f"metrics-{split}.json", result)
    return result


def restore(cfg: TrainConfig, task, adapter_dir: Path):
    """A fresh task model with the adapter at ``adapter_dir`` loaded: (model, tokenizer)."""
    model, tokenizer = build_task_model(cfg.model, task.kind, len(task.labels or []))
    return check_positions(cfg, dt.load_adapter(model, adapter_dir), task.kind), tokenizer


@torch.no_grad()
def score(model, objective, examples, task, split, cfg) -> tuple[dict, list[dict]]:
    """(the task's metrics, one prediction record per example) for ``split``."""
    model.eval()
    with autocast(cfg):
        predictions = objective.predict(model, examples, cfg.batch_size, cfg.device)
    metrics = task.score(predictions, split)
    return metrics, objective.records(task.split(split), predictions, task)


def zero_shot(cfg: TrainConfig, model, objective, examples, task) -> tuple[dict, list[dict], bool]:
    """The pretrained model's test score and predictions, and whether they came from the cache.

    A sweep scores the same pretrained model on the same test split in every run: the score is kept in
    ``cache_dir()/zero-shot/`` under a hash of everything it depends on (every parameter and buffer of
    the model, a classifier's seeded head included; the test examples; the tokenizer; max_len,
    max_new_tokens, batch_size, bf16 and the device type), so a hit is the score the run would compute.
    ``DELTATUNE_ZERO_SHOT_CACHE=0`` turns the cache off; an entry that cannot be read or written only
    costs the time of scoring.
    """
    use = os.environ.get("DELTATUNE_ZERO_SHOT_CACHE", "1") != "0"
    path = cache_dir() / "zero-shot" / f"{zero_shot_key(cfg, model, objective, task)}.json" if use else None
    if path is not None:
        try:
            hit = json.loads(path.read_text())
            return hit["metrics"], hit["records"], True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    with torch.random.fork_rng(devices=[]):  # scoring leaves the run's random stream as it was, hit or miss
        metrics, records = score(model, objective, examples, task, "test", cfg)
    if path is not None:
        try:
            atomic_write_json(path, {"metrics": metrics, "records": records, "model": cfg.model, "task": task.name})
        except (OSError, StorageError, TypeError, ValueError):
            pass
    return metrics, records, False


def zero_shot_key(cfg: TrainConfig, model, objective, task) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    tok = objective.tokenizer
    digest.update(scoring_code())
    digest.update(json.dumps(["zero-shot/1", task.name, task.metric, task.kind, getattr(task, "retrieval_pool", None),
                              type(tok).__name__, len(tok), cfg.max_len, cfg.max_new_tokens, cfg.batch_size,
                              bool(cfg.bf16),
                              torch.device(cfg.device).type, task.split("test")],
                             sort_keys=True, default=str).encode())
    hash_tensors(digest, {**dict(model.named_parameters()), **dict(model.named_buffers())})
    return digest.hexdigest()


@lru_cache(maxsize=1)
def scoring_code() -> bytes:
    """The source of what turns a model into a score (objectives, metrics, tasks): a change to it is
    a change of the score, so cached zero-shot scores from older code are not reused."""
    import hashlib

    root = Path(__file__).resolve().parent
    files = [root / "objectives.py", root / "metrics.py", root / "lengths.py", *sorted((root / "tasks").glob("*.py"))]
    return hashlib.blake2b(b"".join(f.read_bytes() for f in files if f.is_file()), digest_size=16).digest()


def load_task(cfg: TrainConfig):
    return tasks.load_task(cfg.task, seed=cfg.seed, max_train=cfg.max_train, max_eval=cfg.max_eval)

