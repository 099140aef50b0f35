"""Rows decoding together over one key/value cache, joining and leaving at every step.

Two users share this core: the server's continuous batching (:mod:`deltatune.serve.scheduler`, which adds
queues, adapters per row, sampling, stop strings and streaming) and the scoring of generation tasks
(:func:`greedy`, called by :meth:`deltatune.tasks.kinds.generation.Generation.predict`).

The key/value cache. A :class:`CacheBatch` keeps one tensor pair per layer, ``(rows, kv_heads, length,
head_dim)``, every row left-padded to the batch's length: ``[padding | the row's own keys]``. A prompt is
prefilled alone (a batch of one: exactly the pass it gets alone), and its cache joins the batch padded on
the left to the batch's length (or the batch to the row's, when the row is longer); leaving rows are cut
out with the common left padding trimmed. Each decode pass gets a 2-D attention mask (0 over a row's
padding) and explicit position ids (a row's next position is the number of keys it holds), so a row sees
exactly the keys and positions it has alone:

* additive and multiplicative deltas (LoRA, (IA)^3, adapters) act per token: nothing to do;
* prefix tuning prepends its keys/values inside attention at every pass (they never enter the cache);
* prompt tuning puts its soft tokens in front of the prompt at prefill, so they are in the row's cache
  and count in its positions (alone, ``generate`` shifts the later positions by the prompt's length in
  the same way). The prompt mechanism's own continuation layout (kept for ``generate``, which does not
  place rows itself) is cleared before each decode pass: the positions here are already complete.

So every row's tokens equal what it gives alone, up to the float rounding of a batched matmul. Models
with sliding-window or recurrent layers (whose caches cannot be padded this way) are not batched here:
:func:`supported` says why.
"""
from __future__ import annotations

import contextlib
from collections import deque

import torch
from torch.nn import functional as F

from deltatune.store import store_of


def supported(model) -> str | None:
    """None when every layer of ``model`` keeps a plain growing key/value cache (full attention), which a
    :class:`CacheBatch` can pad and join; otherwise why not."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception as err:  # an architecture without a text config the cache understands
        return f"its cache cannot be built ({type(err).__name__})"
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    return f"its cache has {', '.join(odd)} layers (sliding-window or recurrent)" if odd else None


def positions_are_complete(model) -> None:
    """Before a decode pass whose position ids and mask already count every row's soft prompt: clear the
    continuation layout the prompt mechanism kept from the last prefill (see the module docstring)."""
    store = store_of(model)
    for mech in store.mechanisms.values() if store is not None else ():
        if mech.extends_input and getattr(mech, "cached", None) is not None:
            mech.cached = None


class CacheBatch:
    """The rows decoding together and their key/value cache (see the module docstring).

    ``rows`` are the caller's objects, in batch order; each has ``length`` (the keys it holds in the cache:
    its next token's position), which :meth:`decode` advances, and ``last`` (the token fed at the next
    decode pass), which the caller sets. Every pass runs inside the context the caller hands in (the
    server's per-row adapter routing; none for scoring, where the model's active adapters apply)."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.rows: list = []
        self.pads: list[int] = []  # each row's left padding in the cache
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: keys, values (rows, heads, length, dim)

    def __len__(self) -> int:
        return len(self.rows)

    def prefill(self, prompt: list[int], context=None):
        """One prompt's pass alone: (its last position's logits (V,) in float32, its cache: per layer
        (keys, values) of shape (1, kv_heads, n, head_dim), n counting a soft prompt's tokens too)."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt], device=self.device)
        with context if context is not None else contextlib.nullcontext():
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[0, -1].float(), [(layer.keys, layer.values) for layer in cache.layers]

    def add(self, rows: list, cache: list) -> None:
        """Append rows sharing one prefilled cache (1, heads, n, dim) to the batch, padding on the left."""
        n = cache[0][0].shape[2]
        width = self.cache[0][0].shape[2] if self.rows else 0
        target = max(width, n)
        joined = []
        for i, (k, v) in enumerate(cache):
            k, v = (F.pad(t, (0, 0, target - n, 0)).expand(len(rows), -1, -1, -1) for t in (k, v))
            if self.rows:
                old_k, old_v = (F.pad(t, (0, 0, target - width, 0)) for t in self.cache[i])
                k, v = torch.cat([old_k, k]), torch.cat([old_v, v])
            joined.append((k.contiguous(), v.contiguous()))
        self.cache = joined
        self.pads = [p + target - width for p in self.pads] + [target - n] * len(rows)
        self.rows = self.rows + rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in order) and trim the left padding they all share."""
        if not indices:
            self.rows, self.pads, self.cache = [], [], []
            return
        if len(indices) == len(self.rows):
            trim = min(self.pads)
            if trim == 0:
                return
            index = None
        else:
            index = torch.tensor(indices, device=self.device)
            trim = min(self.pads[i] for i in indices)
        self.rows = [self.rows[i] for i in indices]
        self.pads = [self.pads[i] - trim for i in indices]
        self.cache = [tuple((t if index is None else t.index_select(0, index))[:, :, trim:] for t in kv)
                      for kv in self.cache]

    def decode(self, context=None) -> torch.Tensor:
        """ONE forward pass of one token per row (each row's ``last``): the logits (rows, V) in float32."""
        from transformers.cache_utils import DynamicCache

        width = self.cache[0][0].shape[2]
        cache = DynamicCache(config=self.model.config)
        for layer, (k, v) in zip(cache.layers, self.cache):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        pads = torch.tensor(self.pads, device=self.device)
        mask = (torch.arange(width + 1, device=self.device)[None, :] >= pads[:, None]).long()  # 0 over padding
        ids = torch.tensor([[row.last] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.length] for row in self.rows], device=self.device)
        with context if context is not None else contextlib.nullcontext():
            positions_are_complete(self.model)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        self.cache = [(layer.keys, layer.values) for layer in cache.layers]
        for row in self.rows:
            row.length += 1
        return out.logits[:, -1].float()


# ---------------------------------------------------------------------------------- greedy scoring

# Generation settings under which ``generate`` does more than take the argmax of the logits; a model whose
# generation config sets any of them is decoded by ``generate`` itself (see greedy_differs).
_PROCESSORS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "sequence_bias": None, "min_length": 0, "min_new_tokens": None,
               "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
               "num_beams": 1, "guidance_scale": None, "watermarking_config": None, "renormalize_logits": False,
               "stop_strings": None}


def greedy_differs(model) -> str | None:
    """None when :func:`greedy` gives what ``model.generate(do_sample=False)`` gives; otherwise why not (the
    cache cannot be batched here, or the model's generation config changes the logits before the argmax)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "it is an encoder-decoder (its decoder reads the encoder's states besides its own cache)"
    why = supported(model)
    if why is not None:
        return why
    config = getattr(model, "generation_config", None)
    changed = [name for name, plain in _PROCESSORS.items()
               if config is not None and getattr(config, name, plain) not in (plain, None, [])]
    return f"its generation config sets {', '.join(changed)}" if changed else None


class _Row:
    def __init__(self, index: int, length: int):
        self.index, self.length, self.last = index, length, -1
        self.ids: list[int] = []  # the tokens made, without the end-of-sequence token


def greedy(model, prompts: list[list[int]], *, max_new_tokens: int, eos: set[int], rows: int, device) -> list[list[int]]:
    """Greedy decoding of every prompt (token ids), at most ``rows`` of them in flight: each prompt's new
    tokens (up to ``max_new_tokens``, cut before the first ``eos`` token), in the prompts' order.

    The prompts are taken longest first, so the rows in flight hold prompts of about one length (little
    padding); a row that ends leaves the batch at once and the next prompt takes its place, so no row waits
    for a longer one. Each row's tokens are what ``model.generate`` gives it alone (module docstring).
    """
    if rows < 1 or max_new_tokens < 1:
        raise ValueError("rows and max_new_tokens must be >= 1")
    waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    done: list[list[int] | None] = [None] * len(prompts)
    batch = CacheBatch(model, device)

    def accept(row: _Row, token: int) -> bool:
        """Take the row's next token; False when the row has ended."""
        if token in eos:
            done[row.index] = row.ids
            return False
        row.ids.append(token)
        row.last = token
        if len(row.ids) >= max_new_tokens:
            done[row.index] = row.ids
            return False
        return True

    with torch.no_grad():
        while waiting or len(batch):
            while waiting and len(batch) < rows:
                i = waiting.popleft()
                if not prompts[i]:
                    raise ValueError(f"prompt {i} is empty; generation needs at least one token to continue")
                logits, cache = batch.prefill(list(prompts[i]))
                row = _Row(i, cache[0][0].shape[2])  # the prompt's tokens, and a soft prompt's in front of them
                if accept(row, int(logits.argmax())):
                    batch.add([row], cache)
            if len(batch):
                tokens = batch.decode().argmax(-1).tolist()
                batch.keep([j for j, (row, token) in enumerate(zip(batch.rows, tokens)) if accept(row, token)])
    return done


__all__ = ["CacheBatch", "greedy", "greedy_differs", "positions_are_complete", "supported"]
