"""Scoring: a saved adapter on a split (``evaluate``), the pretrained model before training (the
zero-shot score, cached across runs), and the predictions of every scoring.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
from functools import lru_cache
from pathlib import Path

import torch

import deltatune as dt
from .. import tasks
from ..errors import ConfigError, DataError
from ..names import cache_dir
from ..storage import EVAL, CacheEntry, owned
from ..store import hash_tensors
from .config import TrainConfig, resolved
from .memory import autocast, check_positions, longest_input
from ..tasks.kinds import get_kind
from . import runs
from .runs import config_from, find_run_json, read_run_json, resolve_adapter, write_predictions


def evaluate(adapter_dir, task=None, split: str = "test", *, model: str | None = None, max_eval: int | None = None,
             max_len: int | None = None, batch_size: int | None = None, out_dir=None, recycle: bool | None = None,
             quantize: str | None = None) -> dict:
    """Score an adapter, or the bare model, on ``split`` of a task, the same way in every case.

    ``adapter_dir`` is one of: a run folder of ``train`` (its ``best`` adapter) or an adapter inside one, whose
    ``run.json`` gives the model and by default the task (``task``: another task's name, path or TaskData);
    an adapter folder outside a run, in deltatune's or the PEFT format (then ``model`` and ``task`` are
    required); or None, the zero-shot score of ``model`` on ``task`` (a classifier's head is the untrained one
    ``train`` draws with the same seed). The whole split is scored unless ``max_eval`` is given (a fixed data
    seed picks the examples, the same for every run: see :func:`load_task`). ``max_len`` defaults to the length
    the run trained at for a run's adapter, else to the model's own configured maximum (``max_seq_length`` of
    its sentence-transformers config, MiniLM: 256), else to the longest input its positions take;
    ``max_len_source`` says which applied, ``run_max_len`` is the run's (None outside a run). ``batch_size``
    defaults to the run's (32 outside a run). With ``out_dir``, ``metrics-<split>.json`` and
    ``predictions-<split>.jsonl`` are written there. Returns the metrics plus what was used: examples,
    max_len, max_len_source, run_max_len, batch_size, truncated, adapter (None: zero-shot), model.
    A functional evaluation task (``task="humaneval"``) is scored by its kind instead: pass@1 of greedy
    completions (``deltatune.tasks.humaneval``; ``max_eval``: the first N problems).
    ``recycle`` (default: as the run was trained) scores from the cache of the frozen lower blocks.
    ``quantize`` ("nf4", "fp4", "int8"; "none": float32; default: as the run was trained, float32 outside a run)
    scores on a quantized base (``deltatune.quantize``), the adapter unmerged on top.
    """
    registered = tasks.REGISTRY.get(task) if isinstance(task, str) else None
    if registered is not None and registered.functional:  # scored by running programs (HumanEval), not on a split
        if adapter_dir is not None:
            adapter_dir, model = runs.adapter_and_model(adapter_dir, model)
        return registered.evaluate(adapter_dir, model=model, max_eval=max_eval, batch_size=batch_size, out_dir=out_dir)
    folder = owned(out_dir, EVAL) if out_dir is not None else None
    if folder is not None:  # before any work: a folder deltatune may write (no user's files, no links in it)
        folder.check()
    adapter_dir, cfg, run_max_len = scoring_config(adapter_dir, task, model, max_eval, max_len, batch_size)
    if quantize is not None:  # "none": the float base, whatever the run trained on
        from ..quantize import check_scheme
        cfg = dataclasses.replace(cfg, quantize=None if quantize == "none" else check_scheme(quantize))
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
    if max_len is None:
        length, source = default_max_len(cfg, model, task.kind, tokenizer, run_max_len)
        cfg = dataclasses.replace(cfg, max_len=length)
    objective = get_kind(task.kind)(tokenizer, cfg)
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
              "truncated": truncated, "adapter": None if adapter_dir is None else str(adapter_dir), "model": cfg.model,
              "quantize": cfg.quantize}
    if folder is not None:
        with folder:
            result["predictions_file"] = str(folder.open() / f"predictions-{split}.jsonl")
            write_predictions(folder.file(f"predictions-{split}.jsonl"), records)
            folder.write_json(f"metrics-{split}.json", result)
    return result


def scoring_config(adapter_dir, task, model: str | None, max_eval, max_len, batch_size) -> tuple:
    """(the adapter folder or None, the TrainConfig to score with, the run's max_len or None) for
    :func:`evaluate`: from the run's ``run.json``, or from ``model`` and ``task`` outside a run."""
    run_json = None
    if adapter_dir is not None:
        adapter_dir = resolve_adapter(adapter_dir)
        run_json = find_run_json(adapter_dir)
    if run_json is not None:
        cfg = config_from(read_run_json(run_json), run_json)
        if model is not None and model != cfg.model:
            raise ConfigError(f"{adapter_dir} was trained on {cfg.model} (its {run_json}); leave the model out, or "
                              f"give {cfg.model}")
        return adapter_dir, resolved(dataclasses.replace(
            cfg, max_eval=max_eval, max_len=cfg.max_len if max_len is None else max_len,
            batch_size=cfg.batch_size if batch_size is None else batch_size), None), cfg.max_len
    what = (f"{adapter_dir} is an adapter folder outside a run (no run.json in it or its parents)"
            if adapter_dir is not None else "without an adapter the bare model is scored (zero-shot)")
    missing = [name for name, value in (("--model", model), ("--task", task)) if value is None]
    if missing:
        which = " and ".join(name[2:] for name in missing)
        raise ConfigError(f"{what}: {' and '.join(missing)} must say which {which} to score it on, "
                          "e.g. --model minilm --task code-search")
    options = {"max_eval": max_eval, "max_len": max_len or 2,  # 2 until the default is known (evaluate)
               "batch_size": batch_size or TrainConfig.batch_size}
    task_name = task.name if hasattr(task, "name") else str(task)
    return adapter_dir, resolved(TrainConfig(model=model, task=task_name, **options), None), None


def default_max_len(cfg: TrainConfig, model, kind, tokenizer, run_max_len: int | None) -> tuple[int, str]:
    """(max_len, where it came from) when none is given: the run's training length, else the model's own
    configured maximum (``max_seq_length`` of its sentence-transformers config), else its longest input;
    never longer than the model's positions take."""
    from ..models import configured_max_len

    longest, limit_source = longest_input(cfg, model, kind, tokenizer)
    if run_max_len is not None:
        return run_max_len, "the run's training length"
    configured = configured_max_len(cfg.model)
    if configured is not None and configured <= longest:
        return configured, f"{cfg.model}'s configured maximum (max_seq_length in its sentence_bert_config.json)"
    return max(2, longest), limit_source


def restore(cfg: TrainConfig, task, adapter_dir: Path | None):
    """A fresh task model with the adapter at ``adapter_dir`` loaded (None: the bare model, a classifier's head
    drawn with the run's seed): (model, tokenizer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, tokenizer = get_kind(task.kind).build_model(cfg.model, len(task.labels or []))
    if cfg.quantize is not None:  # scored on the quantized base the run trained on (or evaluate(quantize=...))
        from ..quantize import quantize_base
        quantize_base(model, cfg.quantize)
    if adapter_dir is not None:
        dt.load_adapter(model, adapter_dir)
    return check_positions(cfg, model, task.kind), tokenizer


@torch.no_grad()
def score(model, objective, examples, task, split, cfg) -> tuple[dict, list[dict]]:
    """(the task's metrics, one prediction record per example) for ``split``."""
    model.eval()
    with autocast(cfg), progress(model, examples, f"scoring {task.name} {split}", cfg.progress):
        predictions = objective.predict(model, examples, cfg.batch_size, cfg.device)
    metrics = task.score(predictions, split)
    return metrics, objective.records(task.split(split), predictions, task)


@contextlib.contextmanager
def progress(model, examples, desc: str, enabled: bool = True):
    """A progress bar (stderr) over the inputs ``model`` is run on inside the block: each call of the model (or of
    its ``generate``, whose own steps are not counted again) advances it by its batch's rows. The total is
    the inputs the examples hold (a retrieval pair: two), counted from their structure."""
    from tqdm.auto import tqdm

    def inputs(example) -> int:
        return 1 if isinstance(example, dict) else sum(isinstance(part, dict) for part in example) \
            if isinstance(example, (tuple, list)) else 0
    total = sum(inputs(e) for e in examples) or None
    bar = tqdm(total=total, desc=desc, unit="input", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
               leave=False)
    generating = [False]

    def rows(args, kwargs) -> int:
        first = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v)), None)
        return int(first.shape[0]) if first is not None and first.dim() else 0

    def on_call(_module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        continues = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if not generating[0] and not continues:  # a pass over a key/value cache that holds keys: no new input
            bar.update(rows(args, kwargs))

    handle = model.register_forward_pre_hook(on_call, with_kwargs=True)
    own_generate = "generate" in vars(model)
    if callable(getattr(model, "generate", None)) and not own_generate:
        method = model.generate

        def generate(*args, **kwargs):  # one advance per batch, however many tokens it generates
            bar.update(rows(args, kwargs))
            generating[0] = True
            try:
                return method(*args, **kwargs)
            finally:
                generating[0] = False
        model.generate = generate
    try:
        yield bar
    finally:
        handle.remove()
        if callable(getattr(model, "generate", None)) and not own_generate and "generate" in vars(model):
            del model.generate
        bar.close()


def zero_shot(cfg: TrainConfig, model, objective, examples, task) -> tuple[dict, list[dict], bool]:
    """The pretrained model's test score and predictions, and whether they came from the cache.

    A sweep scores the same pretrained model on the same test split in every run: the score is kept in
    ``cache_dir()/zero-shot/`` under a hash of everything it depends on (every parameter and buffer of
    the model, a classifier's seeded head included; the test examples; the tokenizer; max_len,
    max_new_tokens, batch_size, bf16 and the device type), so a hit is the score the run would compute.
    An entry is untrusted input (:class:`deltatune.storage.CacheEntry`): one that is not a regular file of
    this user, holds another key, or is not a score of this task's test split (its main metric a finite
    number, one record per test example) is scored again, with a warning.
    ``DELTATUNE_ZERO_SHOT_CACHE=0`` turns the cache off; an entry that cannot be written only costs the
    time of scoring.
    """
    use = os.environ.get("DELTATUNE_ZERO_SHOT_CACHE", "1") != "0"
    key = zero_shot_key(cfg, model, objective, task) if use else None
    entry = CacheEntry(cache_dir() / "zero-shot" / f"{key}.json", key, "zero-shot score", root=cache_dir()) if use else None
    hit = entry.read_json(lambda value: _check_zero_shot(value, task)) if entry is not None else None
    if hit is not None:
        return hit["metrics"], hit["records"], True
    with torch.random.fork_rng(devices=[]):  # scoring leaves the run's random stream as it was, hit or miss
        metrics, records = score(model, objective, examples, task, "test", cfg)
    if entry is not None:
        entry.write_json({"metrics": metrics, "records": records, "model": cfg.model, "task": task.name})
    return metrics, records, False


def _check_zero_shot(value, task) -> None:
    """A cached zero-shot score of ``task``'s test split: ValueError (or TypeError, KeyError) otherwise."""
    metrics, records = value["metrics"], value["records"]
    if not isinstance(metrics, dict) or not isinstance(records, list):
        raise TypeError("metrics must be an object and records a list")
    for name, number in metrics.items():
        if not (number is None or isinstance(number, str)
                or (isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number))):
            raise ValueError(f"metric {name!r} is {number!r}, not a finite number")
    if isinstance(metrics[task.metric], bool) or not isinstance(metrics[task.metric], (int, float)):
        raise ValueError(f"the main metric {task.metric!r} is {metrics[task.metric]!r}")
    if len(records) != len(task.split("test")):
        raise ValueError(f"{len(records)} records for {len(task.split('test'))} test examples")
    if any(not isinstance(r, dict) or r.get("index") != i for i, r in enumerate(records)):
        raise ValueError("the records are not one per test example, in order")


def zero_shot_key(cfg: TrainConfig, model, objective, task) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    tok = objective.tokenizer
    digest.update(scoring_code())
    digest.update(json.dumps(["zero-shot/1", task.name, task.metric, task.kind, getattr(task, "retrieval_pool", None),
                              type(tok).__name__, len(tok), cfg.max_len, cfg.max_new_tokens, cfg.batch_size, cfg.score_rows,
                              bool(cfg.bf16),
                              torch.device(cfg.device).type, task.split("test")],
                             sort_keys=True, default=str).encode())
    hash_tensors(digest, {**dict(model.named_parameters()), **dict(model.named_buffers())})
    return digest.hexdigest()


@lru_cache(maxsize=1)
def scoring_code() -> bytes:
    """The source of what turns a model into a score (the task kinds' objectives, metrics, tasks): a change
    to it is a change of the score, so cached zero-shot scores from older code are not reused."""
    import hashlib

    root = Path(__file__).resolve().parent.parent  # the deltatune package
    files = [root / "metrics.py", root / "lengths.py", *sorted((root / "tasks").rglob("*.py"))]
    return hashlib.blake2b(b"".join(f.read_bytes() for f in files if f.is_file()), digest_size=16).digest()


# The seed that picks the max_eval validation and test examples: fixed, so that every run seed of a sweep
# (and `deltatune eval --max-eval`) is scored on the same examples, and a spread over seeds is the
# runs' own, not that of different test subsets.
EVAL_SUBSET_SEED = 0


def load_task(cfg: TrainConfig):
    """The run's task: its max_train training examples picked with the run's seed, its max_eval validation and
    test examples with :data:`EVAL_SUBSET_SEED` (the same for every run)."""
    data = tasks.load_task(cfg.task, seed=cfg.seed, max_train=cfg.max_train)
    if cfg.max_eval is not None:
        subset = random.Random(f"eval-subset:{EVAL_SUBSET_SEED}")
        data.valid, data.test = (_pick(data.valid, cfg.max_eval, subset), _pick(data.test, cfg.max_eval, subset))
        data.notes = data.notes + [f"valid and test subsampled with the fixed data seed {EVAL_SUBSET_SEED}: "
                                   f"max_eval={cfg.max_eval} (the same examples for every run seed)"]
    return data


def _pick(rows: list, n: int, rng: random.Random) -> list:
    """At most ``n`` of ``rows``, drawn with ``rng``, in their order."""
    return rows if n >= len(rows) else [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]

