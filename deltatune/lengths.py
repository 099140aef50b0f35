"""No wasted padding: encode a batch in groups of similar length, each cut to its own longest row.

A padded (B, T) batch costs B x T tokens whatever its rows hold; on code-search at max_len 128 a
random batch of 32 codes is padded to 1.8x its real tokens. ``forward_by_length`` sorts the rows by
length, runs the model on groups of neighbours, each group cut to its longest row, and puts the
outputs back in the batch's order. Attention masks hide padding, so each row's output is the same
as in the full batch (to float rounding: the matrix shapes differ); a loss over the whole batch
(in-batch negatives) sees the same rows. With dropout on, the masks are drawn per group, from the
same distribution. ``length_batches`` does the same for scoring: batches of neighbours in length.
"""
from __future__ import annotations

import torch


def lengths_of(batch: dict) -> torch.Tensor:
    """Real tokens per row of a right-padded batch (its attention mask)."""
    return batch["attention_mask"].sum(1)


def groups(lengths: list[int], size: int) -> list[list[int]]:
    """Row indices sorted by length (stable), cut into groups of at most ``size``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + size] for s in range(0, len(order), size)]


def forward_by_length(model, batch: dict, size: int) -> torch.Tensor:
    """``model(**batch)`` for a right-padded batch, computed in length-sorted groups of ``size`` rows,
    each cut to its longest row; rows come back in the batch's order."""
    n = batch["attention_mask"].shape[0]
    if size is None or size >= n:
        return model(**batch)
    lengths = lengths_of(batch).tolist()
    outs, order = [], []
    for idx in groups(lengths, size):
        width = max(lengths[i] for i in idx)
        rows = torch.tensor(idx, device=batch["attention_mask"].device)
        outs.append(model(**{k: v.index_select(0, rows)[:, :width] if v.dim() > 1 else v.index_select(0, rows)
                            for k, v in batch.items()}))
        order += idx
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(n)
    return torch.cat(outs).index_select(0, inverse.to(outs[0].device))
