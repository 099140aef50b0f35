"""Tasks: real code-intelligence benchmarks built from the CPython standard library, and user data.

>>> from deltatune.tasks import TASKS, load_task
>>> data = load_task("code-search", max_train=200, max_eval=100)
>>> print(data.card())

``load_task`` takes a task name from :data:`TASKS`, a path to a ``.jsonl``/``.csv``/``.tsv`` file
(or a directory holding ``train.*``, ``valid.*``/``validation.*``, ``test.*``), or
``"hf:<dataset>[/<config>]"`` for a Hugging Face dataset (needs ``pip install datasets``).

Every split is a list of dicts. Shapes by ``kind``:

- ``"retrieval"``: ``{"query", "code"}``; ``score((query_emb, code_emb))`` -> mrr, recall@1/5/10, and the
  candidate pool: ``pool`` (candidates per query) and ``pool_protocol`` ("1-in-1000" or "whole-split").
- ``"classification"``: ``{"text", "label"}`` (+ ``"text_pair"``); ``score(pred_ids or logits)`` -> accuracy, macro_f1.
- ``"generation"``: ``{"prompt", "target"}``; ``score(list_of_strings)`` -> exact_match (+ bleu4 or subtoken_f1).
  A row with ``"prompt_format": "completion"`` is continued as plain text (no chat template).

Examples may carry extra keys (``"path"``, ``"name"``, ``"bug"``...) for traceability; ignore them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from statistics import mean

from deltatune import metrics as _m
from deltatune.errors import DataError

__all__ = ["TASKS", "TaskData", "load_task"]

TASKS: dict[str, str] = {
    "code-search": "retrieve a stdlib function from its docstring summary (CodeSearchNet / CodeXGLUE code search; MRR)",
    "docstring-match": "does this docstring summary belong to this function? "
                       "(CuBERT function-docstring mismatch; accuracy)",
    "exception-type": "predict the exception type masked as __HOLE__ in an except clause "
                      "(CuBERT exception classification; accuracy)",
    "bug-detect": "is this function correct or does it carry a synthetic bug: variable misuse, wrong operator, "
                  "swapped operands (CuBERT-style; accuracy)",
    "code-summarization": "write the docstring summary line of a function (CodeXGLUE code-to-text; smoothed BLEU-4)",
    "function-naming": "predict a function's name, masked as __NAME__ "
                       "(code2seq method naming; exact match, subtoken F1)",
    "code-generation": "write a function's body from its signature and docstring, HumanEval-style "
                       "(smoothed BLEU-4; the functional test is `deltatune eval --task humaneval`)",
}

_TEXT_FIELDS = {"retrieval": ("query", "code"), "classification": ("text", "text_pair"),
                "generation": ("prompt", "target")}


@dataclass
class TaskData:
    """One task's splits plus what is needed to describe and score it.

    ``metric`` is the main metric (a key of the dict :meth:`score` returns); ``metrics`` lists every
    metric :meth:`score` returns; ``source`` and ``notes`` feed the dataset card. ``retrieval_pool``
    is how many candidates a retrieval query is ranked against: 1000 (its code + 999 seeded
    distractors from the split, CodeSearchNet) where the split is larger, else the whole split;
    None ranks against the whole split always.
    """

    name: str
    kind: str  # "retrieval" | "classification" | "generation"
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
        """Score predictions for every example of ``split``, in order.

        retrieval: ``(query_emb, code_emb)`` arrays/tensors of shape (N, D); classification: N class
        ids, or (N, K) logits; generation: N strings.

        Retrieval scores say which candidate pool they used (``pool``, ``pool_protocol``, see
        :func:`deltatune.metrics.retrieval_scores`); examples with the same query text (spacing
        ignored) are each other's right answers, so a repeated query is not penalised for ranking
        its twin's code first.
        """
        rows = self.split(split)
        if self.kind == "retrieval":
            if not (isinstance(predictions, (tuple, list)) and len(predictions) == 2):
                raise DataError(f"{self.name}: retrieval predictions must be a pair (query_emb, code_emb) "
                                f"of (N, D) arrays")
            q, c = predictions
            if len(q) != len(rows) or len(c) != len(rows):
                raise DataError(f"{self.name}/{split}: got {len(q)} query and {len(c)} code embeddings "
                                f"for {len(rows)} examples")
            pool = self.retrieval_pool
            if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 2):
                raise DataError(f"{self.name}: retrieval_pool must be an int >= 2 or None (whole split), got {pool!r}")
            return _m.retrieval_scores(q, c, n_distractors=None if pool is None else pool - 1,
                                       groups=[" ".join(str(r["query"]).split()) for r in rows])
        if len(predictions) != len(rows):
            raise DataError(f"{self.name}/{split}: got {len(predictions)} predictions for {len(rows)} examples")
        if self.kind == "classification":
            gold = [r["label"] for r in rows]
            return {"accuracy": _m.accuracy(predictions, gold),
                    "macro_f1": _m.macro_f1(predictions, gold, len(self.labels or []) or None)}
        gold = [r["target"] for r in rows]
        preds = [str(p) for p in predictions]
        out = {"exact_match": _m.exact_match(gold, preds)}
        if "bleu4" in self.metrics or self.metric == "bleu4":
            out["bleu4"] = _m.smoothed_bleu4(gold, preds)
        if "subtoken_f1" in self.metrics:
            out.update(_m.subtoken_prf(gold, preds))
        return out

    def card(self) -> str:
        """A dataset card: source, split rule, counts per split, label balance, average lengths."""
        lines = [f"# {self.name}  ({self.kind}, main metric: {self.metric})"]
        if self.name in TASKS:
            lines.append(TASKS[self.name])
        if self.source:
            lines.append(f"source: {self.source}")
        lines += [f"- {n}" for n in self.notes]
        fields = [f for f in _TEXT_FIELDS[self.kind] if any(f in r for r in self.train + self.valid + self.test)]
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
        if self.kind == "retrieval":
            sizes = {s: len(self.split(s)) for s in ("valid", "test")}
            pools = {s: n if self.retrieval_pool is None or n <= self.retrieval_pool else self.retrieval_pool
                     for s, n in sizes.items()}
            rule = ("every code of the split" if self.retrieval_pool is None else
                    f"its code + {self.retrieval_pool - 1} seeded distractors from the split, or every code of a "
                    f"split of {self.retrieval_pool} or fewer")
            lines.append(f"retrieval pool: each query ranked against {rule}: valid {pools['valid']}, "
                         f"test {pools['test']} candidates; identical queries count all their codes as right")
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
    if name_or_path == "code-generation":
        from deltatune.tasks import codegen
        data = codegen.build_task()
    elif name_or_path in TASKS:
        from deltatune.tasks import code
        data = code.build_task(name_or_path)
    else:
        from deltatune.tasks import files
        if name_or_path.startswith("hf:"):
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
