"""Per-layer representations of a backbone, extracted once and cached on disk.

``extract(backbone, tokenizer, texts, spans, ...)`` runs the backbone over ``texts`` with every
hidden state (index 0: the embeddings' output; index i: block i-1's output) and returns, per layer,

- ``pooled`` (N, d): the mean over each text's real tokens (the Telly study's RSA input, and
  MiniLM's own sentence embedding before normalisation);
- ``tokens`` (M, d): for each requested character span of a text, the mean of the model tokens that
  overlap it (a Python token split into sub-words is one row).

The cache (``<cache>/representations/<model key>/<data key>/layer-<i>.safetensors``) is keyed on
the model (its name and a hash of every backbone weight, adapters included: the weights are read
after the adapter is attached), the data (texts, spans, max_len, tokenizer) and the layer. Its files
are untrusted input (:class:`deltatune.storage.CacheEntry`): each carries the entry's key, and is used
only as a regular file of this user with tensors of the shapes asked and finite values; anything else
is extracted again, with a warning.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .. import sites as S
from ..errors import ConfigError
from ..models import cache_dir
from ..storage import CacheEntry
from ..store import hash_tensors

FORMAT = 2  # part of every key: bump when what is extracted or how it is stored changes (2: keys inside)


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
    width = pooled_out[0].shape[1]
    tokens_out = [torch.stack(token_rows[layer])[ordered] if token_rows else torch.zeros(0, width) for layer in sorted(pooled)]
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
    weights, data = weights_key(model, model_name), data_key(tokenizer, texts, spans, max_len)
    folder, key = cache_dir() / "representations" / weights / data, f"{weights}/{data}"
    n_layers = S.num_layers(model) + 1
    if cache:
        hit = _read(folder, key, n_layers, len(texts), backbone.config.hidden_size, spans)
        if hit is not None:
            return hit
    pooled, tokens, index = _run(backbone.to(device), tokenizer, texts, spans, max_len, batch_size, device, progress, desc)
    result = {"pooled": pooled, "tokens": tokens, "token_index": index}
    if cache:
        _write(folder, key, result)
    return result


def _read(folder: Path, key: str, n_layers: int, n_texts: int, width: int, spans) -> dict | None:
    """The cached representations, when every file of the entry is trusted (see :class:`deltatune.storage.CacheEntry`):
    index.json of this key, then one safetensors file per layer with this key inside, float32 tensors of
    the shapes asked ((texts, d) pooled; (spans found, d) tokens) and finite values. None otherwise (a
    CacheWarning says why, and the caller extracts them again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    def check_index(value):
        index = value["token_index"]
        if value["format"] != FORMAT or value["layers"] != n_layers or (index is None) != (spans is None):
            raise ValueError("it is an entry of another format, depth or kind")
        if index is not None and not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) for x in p)
                and 0 <= p[0] < n_texts and 0 <= p[1] < len(spans[p[0]]) for p in index):
            raise ValueError("its token index names spans that are not these texts'")

    meta = CacheEntry(folder / "index.json", key, "layer features", root=cache_dir()).read_json(check_index)
    if meta is None:
        return None
    index = [tuple(p) for p in meta["token_index"]] if meta["token_index"] is not None else None
    shapes = {"pooled": (n_texts, width), **({"tokens": (len(index), width)} if index is not None else {})}
    layers = []
    for i in range(n_layers):
        entry = CacheEntry(folder / f"layer-{i}.safetensors", key, "layer features", root=cache_dir())
        data = entry.read_bytes()
        if data is None:
            return None
        try:
            if _metadata(data) != {"deltatune": "layer-features", "key": key, "layer": str(i)}:
                raise ValueError("it holds another key or layer")
            tensors = load(data)
            if {k: tuple(t.shape) for k, t in tensors.items()} != shapes:
                raise ValueError(f"its tensors are {({k: list(t.shape) for k, t in tensors.items()})}, not {shapes}")
            if any(t.dtype != torch.float32 or not torch.isfinite(t).all() for t in tensors.values()):
                raise ValueError("it holds values that are not finite float32")
        except (SafetensorError, ValueError, TypeError, KeyError, RecursionError) as err:
            entry.reject(f"is not a layer's features ({type(err).__name__}: {str(err)[:200]})")
            return None
        layers.append(tensors)
    return {"pooled": [t["pooled"] for t in layers], "tokens": [t["tokens"] for t in layers] if index is not None else None,
            "token_index": index}


def _metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes (their header is bounded: 8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= min(len(data) - 8, 1 << 20):
        raise ValueError("its header does not fit the file")
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__") if isinstance(header, dict) else None


def _write(folder: Path, key: str, result: dict) -> None:
    """One file per layer, then index.json last (its presence marks a complete entry); each carries the
    entry's key, and is written at an unpredictable temporary name, then renamed. A cache that cannot be
    written only costs the speed-up."""
    from safetensors.torch import save

    for i, pooled in enumerate(result["pooled"]):
        tensors = {"pooled": pooled.contiguous()}
        if result["tokens"] is not None:
            tensors["tokens"] = result["tokens"][i].contiguous()
        data = save(tensors, metadata={"deltatune": "layer-features", "key": key, "layer": str(i)})
        if not CacheEntry(folder / f"layer-{i}.safetensors", key, "layer features", root=cache_dir()).write_bytes(data):
            return
    index = [list(p) for p in result["token_index"]] if result["token_index"] is not None else None
    CacheEntry(folder / "index.json", key, "layer features", root=cache_dir()).write_json(
        {"format": FORMAT, "layers": len(result["pooled"]), "token_index": index})
