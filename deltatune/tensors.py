"""Small tensor helpers shared by the engine, the analysis and the server."""
from __future__ import annotations

import torch


def to_device(batch, device):
    """``batch`` (a tensor, or dicts/tuples/lists of them, nested) with every tensor moved to ``device``;
    anything else is passed through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast(cfg):
    """bfloat16 autocast on ``cfg.device`` when ``cfg.bf16`` is on (else a no-op context)."""
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)
