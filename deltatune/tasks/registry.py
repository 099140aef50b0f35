"""What a task is (:class:`TaskData`) and the registry of named tasks, filled by :func:`task` beside each builder.

    @task("code-search", kind="retrieval", description="retrieve a stdlib function from its docstring summary ...")
    def build() -> TaskData: ...

A dataset task's function builds its :class:`TaskData` (no arguments); a functional evaluation's
(a kind with ``functional``, HumanEval) is its runner, called by its kind's ``evaluate``.
:func:`deltatune.tasks.load_task` and ``deltatune tasks`` read the registry.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import mean
from typing import Callable

from deltatune.errors import DataError

from .kinds import get_kind


@dataclass
class TaskData:
    """One task's splits plus what is needed to describe and score it.

    ``kind`` names the task kind (:mod:`deltatune.tasks.kinds`), which decides the row shape, the
    model and the scoring. ``metric`` is the main metric (a key of the dict :meth:`score` returns);
    ``metrics`` lists every metric :meth:`score` returns; ``source`` and ``notes`` feed the dataset
    card. ``retrieval_pool`` is how many candidates a retrieval query is ranked against: 1000 (its
    code + 999 seeded distractors from the split, CodeSearchNet) where the split is larger, else the
    whole split; None ranks against the whole split always.
    """

    name: str
    kind: str  # a registered kind's name: saved as it is in run.json, cards and the task caches
    metric: str
    labels: list[str] | None
    train: list[dict]
    valid: list[dict]
    test: list[dict]
    source: str = ""
    notes: list[str] = field(default_factory=list)
    metrics: tuple[str, ...] = ()
    retrieval_pool: int | None = 1000

    def split(self, split: str) -> list[dict]:
        """The examples of ``split`` ("train", "valid" or "test"; "validation" is accepted)."""
        split = {"validation": "valid", "dev": "valid"}.get(split, split)
        if split not in ("train", "valid", "test"):
            raise DataError(f"unknown split {split!r}; use 'train', 'valid' or 'test'")
        return getattr(self, split)

    def score(self, predictions, split: str = "test") -> dict[str, float]:
        """Score predictions for every example of ``split``, in order; what predictions are is the
        kind's (retrieval: ``(query_emb, code_emb)`` arrays of shape (N, D); classification: N class
        ids or (N, K) logits; generation: N strings)."""
        return get_kind(self.kind).score(self, predictions, split)

    def card(self) -> str:
        """A dataset card: source, split rule, counts per split, label balance, average lengths."""
        kind = get_kind(self.kind)
        lines = [f"# {self.name}  ({self.kind}, main metric: {self.metric})"]
        if self.name in REGISTRY:
            lines.append(REGISTRY[self.name].description)
        if self.source:
            lines.append(f"source: {self.source}")
        lines += [f"- {n}" for n in self.notes]
        fields = [f for f in kind.text_fields if any(f in r for r in self.train + self.valid + self.test)]
        lines.append("split    examples  " + "  ".join(f"avg {f} chars/lines" for f in fields))
        for split in ("train", "valid", "test"):
            rows = self.split(split)
            cols = []
            for f in fields:
                vals = [r[f] for r in rows if f in r]
                chars = mean(len(v) for v in vals) if vals else 0
                nlines = mean(v.count("\n") + 1 for v in vals) if vals else 0
                cols.append(f"{chars:>8.0f} / {nlines:<5.1f}".ljust(len(f"avg {f} chars/lines")))
            lines.append(f"{split:<8} {len(rows):>8}  " + "  ".join(cols))
        lines += kind.card_lines(self)
        if self.labels:
            lines.append("label balance:")
            for split in ("train", "valid", "test"):
                rows = self.split(split)
                counts = [sum(r["label"] == k for r in rows) for k in range(len(self.labels))]
                parts = [f"{lab} {c} ({100 * c / max(len(rows), 1):.1f}%)" for lab, c in zip(self.labels, counts)]
                if len(parts) > 8:
                    top = sorted(zip(counts, self.labels), reverse=True)
                    parts = [f"{lab} {c}" for c, lab in top[:8]] + [f"... {len(parts) - 8} more"]
                lines.append(f"  {split}: " + ", ".join(parts))
        return "\n".join(lines)


@dataclass(frozen=True)
class Task:
    """A registered task: its name, kind, one-line description, metrics and the function behind it."""

    name: str
    kind: str
    description: str
    metric: str
    metrics: tuple[str, ...]
    build: Callable

    @property
    def functional(self) -> bool:
        """Scored by running what the model writes (HumanEval), not on splits: :meth:`evaluate`."""
        return get_kind(self.kind).functional

    def data(self, labels: list[str] | None, train: list[dict], valid: list[dict], test: list[dict], **fields) -> TaskData:
        """A TaskData of this task: the name, kind and metrics as registered, the rest from the builder."""
        return TaskData(self.name, self.kind, self.metric, labels, train, valid, test,
                        **{"metrics": self.metrics, **fields})

    def evaluate(self, adapter, **settings) -> dict:
        return get_kind(self.kind).evaluate(self.build, adapter, **settings)


REGISTRY: dict[str, Task] = {}


def task(name: str, *, kind: str, description: str, metric: str | None = None, metrics: tuple[str, ...] | None = None):
    """Decorator: register the function below as the task ``name`` of ``kind`` (its builder, or a functional
    evaluation's runner). ``metric``/``metrics`` default to the kind's."""
    spec = get_kind(kind)  # an unknown kind fails here, naming the known ones

    def register(build: Callable) -> Callable:
        if not name or name in REGISTRY:
            raise ValueError(f"task name {name!r} is empty or already registered")
        REGISTRY[name] = Task(name, spec.name, description, metric or spec.metric,
                              tuple(metrics) if metrics is not None else spec.metrics, build)
        return build

    return register


class _Descriptions(Mapping):
    """name -> description of every registered task that can be trained on (what ``deltatune tasks`` lists),
    in the order they were registered; read live from :data:`REGISTRY`."""

    def _trainable(self):
        return [t for t in REGISTRY.values() if get_kind(t.kind).trains]

    def __getitem__(self, name: str) -> str:
        entry = REGISTRY.get(name)
        if entry is None or not get_kind(entry.kind).trains:
            raise KeyError(name)
        return entry.description

    def __iter__(self):
        return iter([t.name for t in self._trainable()])

    def __len__(self) -> int:
        return len(self._trainable())

    def __repr__(self) -> str:
        return repr(dict(self))


TASKS: Mapping[str, str] = _Descriptions()
