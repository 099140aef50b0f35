"""Retrieval: rank code by a query (CodeSearchNet / CodeXGLUE code search), with a bi-encoder.

Rows ``{"query", "code"}``. The model is :class:`deltatune.models.BiEncoder` (mean pooling, L2
normalised); training uses in-batch negatives; scoring ranks each query's code among a pool of
candidates (:func:`deltatune.metrics.retrieval_scores`): MRR and recall@1/5/10.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from deltatune.errors import DataError
from deltatune.lengths import forward_by_length, groups
from deltatune.metrics import retrieval_scores
from deltatune.models import BiEncoder, load_backbone
from deltatune.tensors import to_device

from .base import TaskKind, register_kind, traceable


@register_kind
class Retrieval(TaskKind):
    """In-batch negatives: each query's code is the positive, the other codes of the batch are negatives."""

    name = "retrieval"
    columns = (("query", "code"), ())
    columns_rank = 1
    text_fields = ("query", "code")
    metric, metrics = "mrr", ("mrr", "recall@1", "recall@5", "recall@10")
    text_field = "code"
    endpoints = ("embed", "search")
    in_batch = True
    private_refusal = ("private training needs a loss that is a sum over examples; a retrieval task's in-batch "
                       "contrastive loss couples the examples of a batch, so per-example clipping bounds nothing. "
                       "Use a classification or generation task, or train without --dp-epsilon")

    scale = 20.0  # cosine similarity x 20, MiniLM's own training temperature (0.05)
    # Rows per forward in training: length-sorted groups, each cut to its longest row (deltatune.lengths);
    # None: the whole padded batch at once. Groups of 16 took 0.69x the padded batch's step time on a quiet
    # 2-core CPU (bench/jobs.py ab, docs/bench/jobs-ab.txt); the loss is the padded batch's to float rounding.
    group = 16

    @classmethod
    def model(cls, model_name, num_labels):
        backbone, tokenizer = load_backbone(model_name, cls.model_form)
        return BiEncoder(backbone), tokenizer

    @classmethod
    def score(cls, task, predictions, split):
        """``predictions``: ``(query_emb, code_emb)``, arrays or tensors of shape (N, D).

        The scores say which candidate pool they used (``pool``, ``pool_protocol``); examples with the
        same query text (spacing ignored) are each other's right answers, so a repeated query is not
        penalised for ranking its twin's code first."""
        rows = task.split(split)
        if not (isinstance(predictions, (tuple, list)) and len(predictions) == 2):
            raise DataError(f"{task.name}: retrieval predictions must be a pair (query_emb, code_emb) "
                            f"of (N, D) arrays")
        q, c = predictions
        if len(q) != len(rows) or len(c) != len(rows):
            raise DataError(f"{task.name}/{split}: got {len(q)} query and {len(c)} code embeddings "
                            f"for {len(rows)} examples")
        pool = task.retrieval_pool
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 2):
            raise DataError(f"{task.name}: retrieval_pool must be an int >= 2 or None (whole split), got {pool!r}")
        return retrieval_scores(q, c, n_distractors=None if pool is None else pool - 1,
                                groups=[" ".join(str(r["query"]).split()) for r in rows])

    @classmethod
    def card_lines(cls, task):
        sizes = {s: len(task.split(s)) for s in ("valid", "test")}
        pools = {s: n if task.retrieval_pool is None or n <= task.retrieval_pool else task.retrieval_pool
                 for s, n in sizes.items()}
        rule = ("every code of the split" if task.retrieval_pool is None else
                f"its code + {task.retrieval_pool - 1} seeded distractors from the split, or every code of a "
                f"split of {task.retrieval_pool} or fewer")
        return [f"retrieval pool: each query ranked against {rule}: valid {pools['valid']}, "
                f"test {pools['test']} candidates; identical queries count all their codes as right"]

    def encode(self, rows, train):
        return list(zip(self.tokens([r["query"] for r in rows]), self.tokens([r["code"] for r in rows])))

    def collate(self, examples):
        return self.pad([q for q, _ in examples]), self.pad([c for _, c in examples])

    def loss(self, model, batch):
        queries, codes = forward_by_length(model, batch[0], self.group), forward_by_length(model, batch[1], self.group)  # (B, d)
        logits = self.scale * queries @ codes.T  # (B, B): row i's positive is column i
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def predict(self, model, examples, batch_size, device):
        def embed(rows):  # batches of rows of similar length (no wasted padding), returned in the rows' order
            if not rows:
                return np.zeros((0, 0), dtype=np.float32)
            batches = groups([len(r["input_ids"]) for r in rows], batch_size)
            out = torch.cat([model(**to_device(self.pad([rows[i] for i in idx]), device)).float().cpu() for idx in batches])
            return out[torch.argsort(torch.tensor([i for idx in batches for i in idx]))].numpy()

        return embed([q for q, _ in examples]), embed([c for _, c in examples])

    def records(self, rows, predictions, task):
        """Per query: the code ranked first among all the split's codes, and the rank of the first
        right code among them (cosine similarity; ties count against; the codes of identical
        queries all count as right, as in the metric). ``candidates`` is that pool: the whole split,
        which is the metric's pool unless the split is larger than it."""
        q, c = (np.nan_to_num(np.asarray(x, dtype=np.float64)) for x in predictions)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        ids = {}
        group = np.array([ids.setdefault(r["query"], len(ids)) for r in rows], dtype=np.int64)
        out = []
        for start in range(0, len(q), 256):  # chunks keep memory at 256 x N
            sims = q[start:start + 256] @ c.T
            right = group[start:start + len(sims), None] == group[None, :]
            best = np.where(right, sims, -np.inf).max(axis=1)
            ranks, top = 1 + ((sims >= best[:, None]) & ~right).sum(axis=1), sims.argmax(axis=1)
            for j in range(len(sims)):
                row, best = rows[start + j], int(top[j])
                out.append({"index": start + j, **traceable(row), "input": row["query"], "reference": row["code"],
                            "prediction": rows[best]["code"], "prediction_index": best,
                            "rank": int(ranks[j]), "candidates": len(c)})
        return out
