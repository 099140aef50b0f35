"""The task-kind registry, and what every kind's objective shares: tokenising, truncation, padding.

A task kind is one class, registered with :func:`register_kind`. The class answers what the rest
of deltatune asks about the kind: its columns, metrics and dataset card, its model and head
(:meth:`TaskKind.build_model`), its scoring, what the server does with its adapters
(``endpoints``) and whether private training applies. An instance, made from a tokenizer and a
run's settings, is the kind's objective: how examples are tokenised (``encode``) and batched
(``collate``), the loss, the predictions its task scores and one record per prediction.
"""
from __future__ import annotations

import warnings

import torch

from deltatune.errors import ConfigError, DataError

CHARS_PER_TOKEN = 128  # above the longest token of a BPE or WordPiece vocabulary (a WordPiece word is cut at 100)


class TaskKind:
    """One task kind: class attributes and class methods describe the kind; an instance is its objective."""

    name = ""
    # Data rows: the required and optional columns of a user data file (deltatune.tasks.files; None: a kind
    # with no data files), the text columns the dataset card measures, and the main and reported metrics.
    columns: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    text_fields: tuple[str, ...] = ()
    metric = ""
    metrics: tuple[str, ...] = ()
    # A data file holding the columns of several kinds is read as the kind of lowest rank (ties: the first
    # registered): classification 0, retrieval 1, generation 2.
    columns_rank = 100
    text_field = ""  # the text the layer analysis compares representations on (training.freeze)
    labelled = False  # rows carry class labels and the model a classification head over them
    model_form = "base"  # the backbone's form (models.load_backbone): "base" (hidden states) or "lm" (*ForCausalLM)
    endpoints: tuple[str, ...] = ()  # what deltatune serve answers for an adapter of this kind
    trains = True  # False: an evaluation only (no objective, nothing to train on)
    functional = False  # scored by running what the model writes (HumanEval), through evaluate()
    # Does the loss of a row depend on the other rows of the batch (in-batch negatives)? Data-parallel
    # training then gathers every rank's rows (training.distributed).
    in_batch = False
    fixed_inputs = True  # a training example's input is the same at every step (the recycling cache needs it)
    private_refusal: str | None = None  # why private training (DP-SGD) does not apply; None: it does

    # ---------------------------------------------------------------- the kind

    @classmethod
    def build_model(cls, model_name: str, num_labels: int | None = None):
        """``(task_model, tokenizer)`` for this kind on the backbone ``model_name``. The model remembers
        its kind (``task_kind``), which is saved with its adapters: deltatune serve reads it back."""
        model, tokenizer = cls.model(model_name, num_labels)
        model.task_kind = cls.name
        return model, tokenizer

    @classmethod
    def model(cls, model_name: str, num_labels: int | None):
        raise NotImplementedError

    @classmethod
    def new_tokens(cls, cfg) -> int:
        """Positions an input needs beyond max_len while it is scored (generation: max_new_tokens)."""
        return 0

    @classmethod
    def score(cls, task, predictions, split: str) -> dict[str, float]:
        raise NotImplementedError

    @classmethod
    def evaluate(cls, run, adapter, **settings) -> dict:
        """A functional kind's score of ``adapter``, through its task's runner ``run`` (see ``functional``)."""
        raise NotImplementedError(f"{cls.name} tasks are scored on their splits (deltatune.training.evaluate)")

    @classmethod
    def card_lines(cls, task) -> list[str]:
        """Lines the dataset card adds for this kind (after the per-split lengths)."""
        return []

    @classmethod
    def check_count(cls, task, predictions, rows, split: str) -> None:
        if len(predictions) != len(rows):
            raise DataError(f"{task.name}/{split}: got {len(predictions)} predictions for {len(rows)} examples")

    # ---------------------------------------------------------------- the objective

    def __init__(self, tokenizer, cfg):
        """Tokenising is shared: inputs longer than max_len are truncated and counted for one warning."""
        self.tokenizer, self.max_len, self.cfg = tokenizer, cfg.max_len, cfg
        self.truncated = self.seen = 0

    def tokens(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """One dict of token lists per text (input_ids, attention_mask, and token_type_ids if used)."""
        if not texts:
            return []
        texts, pairs = [self.clip(t) for t in texts], (pairs and [self.clip(t) for t in pairs])
        encoded = self.tokenizer(texts, pairs, verbose=False)
        rows = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
        long = [i for i, row in enumerate(rows) if len(row["input_ids"]) > self.max_len]
        if long:  # tokenise those again with truncation, so that special tokens stay in place
            again = self.tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                                   truncation=True, max_length=self.max_len, verbose=False)
            for j, i in enumerate(long):
                rows[i] = {k: again[k][j] for k in again.keys()}
        self.count(len(long), len(rows))
        return rows

    def clip(self, text: str, keep_end: bool = False) -> str:
        """At most CHARS_PER_TOKEN x max_len characters: a text that long is over max_len tokens anyway, and
        the tokenizer's memory grows with the whole text (a 5 MB line alone took 2.3 GB)."""
        limit = CHARS_PER_TOKEN * self.max_len
        return text if len(text) <= limit else text[-limit:] if keep_end else text[:limit]

    def count(self, truncated: int, seen: int) -> None:
        self.truncated, self.seen = self.truncated + truncated, self.seen + seen

    def warn_truncated(self, stacklevel: int) -> None:
        if self.truncated:
            warnings.warn(f"{self.truncated} of {self.seen} inputs were longer than max_len={self.max_len} "
                          "tokens and were truncated; raise max_len to keep them whole", stacklevel=stacklevel + 1)
        self.truncated = self.seen = 0

    def units(self, model, examples: list) -> int:
        """What the loss is a mean over in ``examples``: one unit per example (generation: target tokens)."""
        return len(examples)

    def pad(self, rows: list[dict], left: bool = False) -> dict:
        """Stack token lists into (B, T) tensors, padding on the right (or the left, for generate)."""
        width = max(len(row["input_ids"]) for row in rows)
        fill = {"input_ids": self.tokenizer.pad_token_id, "labels": -100}
        out = {}
        for key in rows[0]:
            padded = [[fill.get(key, 0)] * (width - len(row[key])) for row in rows]
            out[key] = torch.tensor([p + row[key] if left else row[key] + p for p, row in zip(padded, rows)])
        return out

    # encode(rows, train) -> examples; collate(examples) -> batch; loss(model, batch) -> scalar;
    # predict(model, examples, batch_size, device) -> what score() takes; records(rows, predictions, task)
    # -> one dict per example (predictions-*.jsonl): each kind defines them.


def traceable(row: dict) -> dict:
    """The identifying fields an example may carry (its source path, the function's name)."""
    return {k: row[k] for k in ("id", "path", "name") if isinstance(row.get(k), (str, int))}


KINDS: dict[str, type[TaskKind]] = {}


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: make a task kind known by its ``name`` to tasks, training, scoring and the server."""
    if not cls.name or cls.name in KINDS:
        raise ValueError(f"task kind name {cls.name!r} is empty or already registered")
    KINDS[cls.name] = cls
    return cls


def get_kind(kind) -> type[TaskKind]:
    """The registered kind named ``kind`` (a TaskKind class is returned as it is)."""
    if isinstance(kind, type) and issubclass(kind, TaskKind):
        return kind
    if kind not in KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[kind]


def build_task_model(name: str, task_kind, num_labels: int | None = None):
    """``(task_model, tokenizer)`` for a task kind (a name such as "retrieval", or the kind itself)."""
    return get_kind(task_kind).build_model(name, num_labels)
