"""Classification: one class per text, or per pair of texts (GLUE-style; CuBERT's code tasks).

Rows ``{"text", "label"}`` (+ ``"text_pair"``), labels ints 0..K-1 naming ``task.labels``. The model
is :class:`deltatune.models.Classifier` (pooled hidden state -> Linear head); cross-entropy loss;
accuracy and macro-F1.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from deltatune.metrics import accuracy, macro_f1
from deltatune.models import Classifier, load_backbone
from deltatune.tensors import to_device

from .base import TaskKind, register_kind, traceable


@register_kind
class Classification(TaskKind):
    name = "classification"
    columns = (("text", "label"), ("text_pair",))
    columns_rank = 0
    text_fields = ("text", "text_pair")
    metric, metrics = "accuracy", ("accuracy", "macro_f1")
    text_field = "text"
    labelled = True
    endpoints = ("classify",)

    @classmethod
    def model(cls, model_name, num_labels):
        backbone, tokenizer = load_backbone(model_name, cls.model_form)
        return Classifier(backbone, num_labels), tokenizer

    @classmethod
    def score(cls, task, predictions, split):
        """``predictions``: N class ids, or (N, K) logits."""
        rows = task.split(split)
        cls.check_count(task, predictions, rows, split)
        gold = [r["label"] for r in rows]
        return {"accuracy": accuracy(predictions, gold), "macro_f1": macro_f1(predictions, gold, len(task.labels or []) or None)}

    def encode(self, rows, train):
        pairs = [r.get("text_pair", "") for r in rows] if any("text_pair" in r for r in rows) else None
        return list(zip(self.tokens([r["text"] for r in rows], pairs), [r["label"] for r in rows]))

    def collate(self, examples):
        return self.pad([x for x, _ in examples]), torch.tensor([y for _, y in examples])

    def loss(self, model, batch):
        inputs, labels = batch
        return F.cross_entropy(model(**inputs).float(), labels)

    def predict(self, model, examples, batch_size, device):
        rows = [x for x, _ in examples]
        return [int(i) for start in range(0, len(rows), batch_size)
                for i in model(**to_device(self.pad(rows[start:start + batch_size]), device)).argmax(-1).tolist()]

    def records(self, rows, predictions, task):
        names = task.labels or []

        def name(label):
            return names[label] if isinstance(label, int) and 0 <= label < len(names) else label

        return [{"index": i, **traceable(row), "input": row["text"],
                 **({"input_pair": row["text_pair"]} if "text_pair" in row else {}),
                 "reference": name(row["label"]), "prediction": name(int(p))}
                for i, (row, p) in enumerate(zip(rows, predictions))]
