"""Tasks: real code-intelligence benchmarks built from the CPython standard library, and user data.

>>> from deltatune.tasks import TASKS, load_task
>>> data = load_task("code-search", max_train=200, max_eval=100)
>>> print(data.card())

``load_task`` takes a task name from :data:`TASKS`, a path to a ``.jsonl``/``.csv``/``.tsv`` file
(or a directory holding ``train.*``, ``valid.*``/``validation.*``, ``test.*``), or
``"hf:<dataset>[/<config>]"`` for a Hugging Face dataset (needs ``pip install datasets``).

Every split is a list of dicts whose shape, model and scoring the task's kind decides
(:mod:`deltatune.tasks.kinds`):

- ``"retrieval"``: ``{"query", "code"}``; ``score((query_emb, code_emb))`` -> mrr, recall@1/5/10, and the
  candidate pool: ``pool`` (candidates per query) and ``pool_protocol`` ("1-in-1000" or "whole-split").
- ``"classification"``: ``{"text", "label"}`` (+ ``"text_pair"``); ``score(pred_ids or logits)`` -> accuracy, macro_f1.
- ``"generation"``: ``{"prompt", "target"}``; ``score(list_of_strings)`` -> exact_match (+ bleu4 or subtoken_f1).
  A row with ``"prompt_format": "completion"`` is continued as plain text (no chat template).
- ``"humaneval"``: the functional evaluation (``deltatune eval --task humaneval``), no splits.

Examples may carry extra keys (``"path"``, ``"name"``, ``"bug"``...) for traceability; ignore them.

A task is registered beside its builder with :func:`~deltatune.tasks.registry.task` (the stdlib tasks
in :mod:`.code` and :mod:`.codegen`, HumanEval in :mod:`.humaneval`); importing this package imports
every module in it, which registers them all, so a new task is one decorated builder (in a new file
here, or anywhere that is imported before the task is loaded).
"""

from __future__ import annotations

import importlib
import pkgutil
import random

from deltatune.errors import DataError

from .registry import REGISTRY, TASKS, Task, TaskData, task

for _info in pkgutil.iter_modules(__path__):  # in name order: code's tasks are registered (and listed) first
    importlib.import_module(f"{__name__}.{_info.name}")

from . import files  # noqa: E402  (user data files and Hugging Face datasets)

__all__ = ["TASKS", "REGISTRY", "Task", "TaskData", "task", "load_task"]


def _subsample(rows: list[dict], n: int | None, rng: random.Random) -> list[dict]:
    """At most ``n`` rows picked with ``rng``, in their original order."""
    if n is None or n >= len(rows):
        return rows
    if n < 0:
        raise DataError(f"max_train/max_eval must be >= 0, got {n}")
    keep = sorted(rng.sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def load_task(name_or_path: str, seed: int = 0, max_train: int | None = None, max_eval: int | None = None,
              labels: list[str] | None = None) -> TaskData:
    """Load a task by name (see :data:`TASKS`), a data file/directory path, or ``"hf:<dataset>[/<config>]"``.

    The splits and the examples of the built-in tasks are fixed (they do not depend on ``seed``),
    so scores are comparable across runs; ``seed`` only picks the ``max_train`` training examples
    and the ``max_eval`` validation and test examples kept for quick runs. ``labels`` optionally
    names the classes of a user classification file (integer labels must then be in 0..K-1).
    """
    name_or_path = str(name_or_path)
    entry = REGISTRY.get(name_or_path)
    if entry is not None and entry.functional:
        raise DataError(f"{name_or_path} is an evaluation that runs the model's programs against their tests, not a "
                        f"dataset to train on: score a model or an adapter with deltatune eval --task {name_or_path}")
    if entry is not None:
        data = entry.build()
    elif name_or_path.startswith("hf:"):
        data = files.load_hf(name_or_path[3:], labels=labels)
    else:
        data = files.load_path(name_or_path, labels=labels)
    if max_train is not None or max_eval is not None:
        rng = random.Random(f"subsample:{seed}")
        data.train = _subsample(data.train, max_train, rng)
        data.valid = _subsample(data.valid, max_eval, rng)
        data.test = _subsample(data.test, max_eval, rng)
        data.notes = data.notes + [f"subsampled with seed {seed}: max_train={max_train}, max_eval={max_eval}"]
    return data
