"""Per-layer representations of a backbone, extracted once and cached on disk.

``extract(backbone, tokenizer, texts, spans, ...)`` runs the backbone over ``texts`` with every
hidden state (index 0: the embeddings' output; index i: block i-1's output) and returns, per layer,

- ``pooled`` (N, d): the mean over each text's real tokens (the Telly study's RSA input, and
  MiniLM's own sentence embedding before normalisation);
- ``tokens`` (M, d): for each requested character span of a text, the mean of the model tokens that
  overlap it (a Python token split into sub-words is one row).

The cache (``<cache>/representations/<model key>/<data key>/layer-<i>.safetensors``) is keyed on
the model (its name and a hash of every backbone weight, adapters included: the weights are read
after the adapter is attached), the data (texts, spans, max_len, tokenizer) and the layer.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import sites as S
from ..errors import ConfigError
from ..models import cache_dir
from ..store import hash_tensors

FORMAT = 1  # part of every key: bump when what is extracted changes


def weights_key(model: torch.nn.Module, name: str = "") -> str:
    """A hash of the name and of every parameter and buffer of the model's backbone (shape and data)."""
    _, backbone = S.find_backbone(model)
    digest = hashlib.sha256(f"{name}|{FORMAT}".encode())
    hash_tensors(digest, {**dict(backbone.named_parameters()), **dict(backbone.named_buffers())})
    # deltas of attached adapters sit outside the backbone: hash them too
    store = getattr(model, "deltatune", None)
    if store is not None:
        for key, tensor in sorted(store.state_dict().items()):
            digest.update(key.encode() + tensor.detach().cpu().float().numpy().tobytes())
        digest.update(repr(sorted(store.active)).encode())
    return digest.hexdigest()[:20]


def data_key(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]] | None, max_len: int) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT, max_len, type(tokenizer).__name__, tokenizer.vocab_size,
                                        texts, spans]).encode())
    return digest.hexdigest()[:20]


def _progress(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True)


@torch.no_grad()
def _run(backbone, tokenizer, texts, spans, max_len, batch_size, device, progress, desc):
    """(pooled per layer, tokens per layer), each a list of (n, d) float32 tensors."""
    if spans is not None and not getattr(tokenizer, "is_fast", False):
        raise ConfigError("token-level probing needs a fast tokenizer (its offset_mapping aligns model tokens "
                          "with Python tokens); this model's tokenizer is a slow one")
    was_training = backbone.training
    backbone.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    pooled: dict[int, list] = {}
    token_rows: dict[int, list] = {}
    pooled_order, token_order = [], []
    try:
        with _progress(len(texts), desc, progress) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                                return_tensors="pt", return_offsets_mapping=spans is not None)
                offsets = enc.pop("offset_mapping", None)
                inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                out = backbone(**inputs, output_hidden_states=True)
                hidden = [h.float().cpu() for h in out.hidden_states]  # L+1 x (B, T, d)
                mask = enc["attention_mask"].float()
                for layer, h in enumerate(hidden):
                    pooled.setdefault(layer, []).append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
                pooled_order += idx
                if spans is not None:
                    special = _special_mask(tokenizer, enc["input_ids"])
                    for b, i in enumerate(idx):
                        for j, (s, e) in enumerate(spans[i]):
                            cols = ((offsets[b, :, 0] < e) & (offsets[b, :, 1] > s) & (mask[b] > 0) & ~special[b]).nonzero()[:, 0]
                            if len(cols) == 0:  # cut off by max_len
                                continue
                            for layer, h in enumerate(hidden):
                                token_rows.setdefault(layer, []).append(h[b, cols].mean(0))
                            token_order.append((i, j))
                bar.update(len(idx))
    finally:
        backbone.train(was_training)
    inverse = np.argsort(pooled_order)
    pooled_out = [torch.cat(pooled[layer])[inverse] for layer in sorted(pooled)]
    if spans is None:
        return pooled_out, None, None
    ordered = sorted(range(len(token_order)), key=lambda k: token_order[k])
    tokens_out = [torch.stack(token_rows[layer])[ordered] if token_rows else torch.zeros(0) for layer in sorted(pooled)]
    return pooled_out, tokens_out, [token_order[k] for k in ordered]


def _special_mask(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in set(tokenizer.all_special_ids or []):
        special |= ids == sid
    return special


def extract(model, tokenizer, texts: list[str], spans: list[list[tuple[int, int]]] | None = None, *,
            model_name: str = "", max_len: int = 256, batch_size: int = 16, device: str = "cpu",
            cache: bool = True, progress: bool = True, desc: str = "representations") -> dict:
    """``{"pooled": [(N, d)] per layer, "tokens": [(M, d)] per layer or None, "token_index": [(text, span)]}``.

    ``model`` is a task model or a bare backbone (its backbone is found); ``spans[i]`` lists the
    character spans of text i to represent (None: pooled only). Read from the cache when present.
    """
    _, backbone = S.find_backbone(model)
    folder = cache_dir() / "representations" / weights_key(model, model_name) / data_key(tokenizer, texts, spans, max_len)
    n_layers = S.num_layers(model) + 1
    if cache:
        hit = _read(folder, n_layers)
        if hit is not None:
            return hit
    pooled, tokens, index = _run(backbone.to(device), tokenizer, texts, spans, max_len, batch_size, device, progress, desc)
    result = {"pooled": pooled, "tokens": tokens, "token_index": index}
    if cache:
        _write(folder, result)
    return result


def _read(folder: Path, n_layers: int) -> dict | None:
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "index.json").read_text())
        layers = [load_file(folder / f"layer-{i}.safetensors") for i in range(n_layers)]
    except (OSError, ValueError, RuntimeError):
        return None
    has_tokens = meta["token_index"] is not None
    return {"pooled": [t["pooled"] for t in layers], "tokens": [t["tokens"] for t in layers] if has_tokens else None,
            "token_index": [tuple(x) for x in meta["token_index"]] if has_tokens else None}


def _write(folder: Path, result: dict) -> None:
    """One file per layer, then index.json last (its presence marks a complete entry). A cache that
    cannot be written only costs the speed-up."""
    from safetensors.torch import save_file

    try:
        folder.mkdir(parents=True, exist_ok=True)
        for i, pooled in enumerate(result["pooled"]):
            tensors = {"pooled": pooled.contiguous()}
            if result["tokens"] is not None:
                tensors["tokens"] = result["tokens"][i].contiguous()
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            os.close(fd)
            save_file(tensors, tmp)
            os.replace(tmp, folder / f"layer-{i}.safetensors")
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "token_index": result["token_index"]}, f)
        os.replace(tmp, folder / "index.json")
    except OSError:
        pass
