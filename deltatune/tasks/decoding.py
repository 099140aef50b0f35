"""Rows decoding together over one key/value cache, joining and leaving at every step.

Two users share this core: the server's continuous batching (:mod:`deltatune.serve.scheduler`, which adds
queues, adapters per row, sampling, stop strings and streaming) and the scoring of generation tasks
(:func:`greedy`, called by :meth:`deltatune.tasks.kinds.generation.Generation.predict`).

The key/value cache. A :class:`CacheBatch` keeps one buffer pair per layer, ``(rows, kv_heads, length,
head_dim)`` with room to grow in both, every row left-padded to the batch's length: ``[padding | the row's own
keys]``. A prompt is prefilled without padding (alone, or in one pass with prompts of its exact length: the
pass each gets alone), and its cache joins the batch padded on the left to the batch's length (or the batch
to the row's, when the row is longer); a decode pass writes its keys into the next free column in place, a
leaving row's slot takes the last row, and the left padding every row shares is trimmed by moving where the
live columns start. Each decode pass gets a 2-D attention mask (0 over a row's
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
import functools
from collections import deque

import torch

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


@functools.cache
def _slots():
    """The cache layer class a decode pass runs on (made at first use: transformers loads only when a model
    decodes, so that bad input is refused before it)."""
    from transformers.cache_utils import DynamicLayer

    class Slots(DynamicLayer):
        """One layer's cache inside a :class:`CacheBatch`'s buffers for one decode pass: ``update`` writes the
        new keys/values into the buffer's next free column in place and hands attention the live view, so a
        pass copies nothing (``DynamicLayer`` concatenates the whole cache at every pass)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, start: int, end: int):
            super().__init__()
            self.buf_k, self.buf_v, self.n, self.start, self.end = keys, values, rows, start, end
            self.keys, self.values = keys[:rows, :, start:end], values[:rows, :, start:end]
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            step = key_states.shape[2]
            self.buf_k[:self.n, :, self.end:self.end + step] = key_states
            self.buf_v[:self.n, :, self.end:self.end + step] = value_states
            self.end += step
            self.keys = self.buf_k[:self.n, :, self.start:self.end]
            self.values = self.buf_v[:self.n, :, self.start:self.end]
            return self.keys, self.values

    return Slots


class CacheBatch:
    """The rows decoding together and their key/value cache (see the module docstring).

    ``rows`` are the caller's objects, in batch order; each has ``length`` (the keys it holds in the cache:
    its next token's position), which :meth:`decode` advances, and ``last`` (the token fed at the next
    decode pass), which the caller sets. Every pass runs inside the context the caller hands in (the
    server's per-row adapter routing; none for scoring, where the model's active adapters apply).

    The cache lives in buffers with room to grow, per layer ``(row capacity, kv_heads, column capacity,
    head_dim)``: the live rows are the first ``len(rows)``, the live columns ``[start, end)``, row i's own
    keys its last ``end - start - pads[i]`` columns. A decode pass writes its column in place, a joining row
    is written into the next row slot, a leaving row's slot is refilled by moving the last row into it, and
    the padding every row shares is trimmed by moving ``start``: the buffers are copied only when they are
    full (then with twice the room)."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.rows: list = []
        self.pads: list[int] = []  # each row's left padding inside the live columns
        self.keys: list[torch.Tensor] = []  # per layer
        self.values: list[torch.Tensor] = []
        self.start = self.end = 0

    def __len__(self) -> int:
        return len(self.rows)

    def prefill(self, prompt: list[int], context=None):
        """One prompt's pass alone: (its last position's logits (V,) in float32, its cache: per layer
        (keys, values) of shape (1, kv_heads, n, head_dim), n counting a soft prompt's tokens too)."""
        logits, cache = self.prefill_same_length([prompt], context)
        return logits[0], cache

    def prefill_same_length(self, prompts: list[list[int]], context=None):
        """Prompts of one length in one pass (no padding: each row's pass is the one it has alone, up to
        the rounding of a bigger matmul): (logits (n, V) in float32, per layer (keys, values) (n, heads,
        length, dim))."""
        from transformers.cache_utils import DynamicCache

        if len({len(p) for p in prompts}) != 1:
            raise ValueError("prefill_same_length takes prompts of one length")
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor(prompts, device=self.device)
        with context if context is not None else contextlib.nullcontext():
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[:, -1].float(), [(layer.keys, layer.values) for layer in cache.layers]

    def _grow(self, rows: int, left: int) -> None:
        """New buffers with room for ``rows`` rows (at least twice those here), ``left`` free columns before
        the live ones (copied over, then starting at ``left``) and as many after them as they hold (at least
        32) to decode into."""
        live, have = self.end - self.start, len(self.rows)
        cols, cap = 2 * (left + live) + 32, max(rows, 2 * have, 8)
        keys, values = [], []
        for old_k, old_v in zip(self.keys, self.values):
            k, v = (old.new_zeros((cap, old.shape[1], cols, old.shape[3])) for old in (old_k, old_v))
            k[:have, :, left:left + live] = old_k[:have, :, self.start:self.end]
            v[:have, :, left:left + live] = old_v[:have, :, self.start:self.end]
            keys.append(k)
            values.append(v)
        self.keys, self.values, self.start, self.end = keys, values, left, left + live

    def add(self, rows: list, cache: list) -> None:
        """Append rows to the batch: ``cache`` per layer (keys, values) of shape (1, heads, n, dim), shared by
        every row (the server's samples of one prompt), or (len(rows), heads, n, dim), one per row."""
        n, have = cache[0][0].shape[2], len(self.rows)
        if not self.keys:  # the first rows: buffers shaped like their cache
            self.keys = [k.new_zeros((0, k.shape[1], 0, k.shape[3])) for k, _ in cache]
            self.values = [v.new_zeros((0, v.shape[1], 0, v.shape[3])) for _, v in cache]
        if not have:  # an empty batch: its rows will start at column 0
            self.start = self.end = min(n, self.keys[0].shape[2])
        extra = max(0, n - (self.end - self.start))  # columns the live region grows by on the left
        count = have + len(rows)
        if count > self.keys[0].shape[0] or extra > self.start:
            self._grow(count, extra)
        if extra:  # the rows already here get that much more padding (zeros: the buffers start zeroed)
            self.start -= extra
            for k, v in zip(self.keys, self.values):
                k[:have, :, self.start:self.start + extra] = 0
                v[:have, :, self.start:self.start + extra] = 0
            self.pads = [p + extra for p in self.pads]
        width = self.end - self.start
        for (k, v), buf_k, buf_v in zip(cache, self.keys, self.values):
            buf_k[have:count, :, self.start:self.end - n] = 0
            buf_v[have:count, :, self.start:self.end - n] = 0
            buf_k[have:count, :, self.end - n:self.end] = k
            buf_v[have:count, :, self.end - n:self.end] = v
        self.pads = self.pads + [width - n] * len(rows)
        self.rows = self.rows + list(rows)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (their order in the batch may change: a kept row from the end moves into a
        leaving row's slot) and trim the left padding they all share."""
        if not indices:  # the buffers go too: an idle server holds no cache
            self.rows, self.pads, self.keys, self.values, self.start, self.end = [], [], [], [], 0, 0
            return
        count, kept = len(indices), set(indices)
        holes = [i for i in range(count) if i not in kept]  # slots that leave and get a row from the end
        movers = [i for i in indices if i >= count]
        order = [i for i in range(count) if i in kept]
        if holes:
            to = torch.tensor(holes, device=self.device)
            source = torch.tensor(movers, device=self.device)
            for buf in (*self.keys, *self.values):
                buf[to, :, self.start:self.end] = buf[source, :, self.start:self.end]
            slot = dict(zip(holes, movers))
            order = [slot.get(i, i) for i in range(count)]
        self.rows = [self.rows[i] for i in order]
        self.pads = [self.pads[i] for i in order]
        trim = min(self.pads)
        self.start += trim
        self.pads = [p - trim for p in self.pads]

    def decode(self, context=None) -> torch.Tensor:
        """ONE forward pass of one token per row (each row's ``last``): the logits (rows, V) in float32."""
        from transformers.cache_utils import DynamicCache

        if self.end >= self.keys[0].shape[2]:  # no free column left: copy into buffers with room
            self._grow(len(self.rows), 0)
        width, count = self.end - self.start, len(self.rows)
        cache = DynamicCache(config=self.model.config)
        cache.layers = [_slots()(k, v, count, self.start, self.end) for k, v in zip(self.keys, self.values)]
        pads = torch.tensor(self.pads, device=self.device)
        mask = (torch.arange(width + 1, device=self.device)[None, :] >= pads[:, None]).long()  # 0 over padding
        ids = torch.tensor([[row.last] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.length] for row in self.rows], device=self.device)
        with context if context is not None else contextlib.nullcontext():
            positions_are_complete(self.model)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        self.end += 1
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


PREFILL_TOKENS = 4096  # at most this many prompt tokens in one prefill pass (its activations' memory)


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
                group = [waiting.popleft()]  # with the next prompts of its length: one pass, no padding
                while (waiting and len(batch) + len(group) < rows and len(prompts[waiting[0]]) == len(prompts[group[0]])
                       and (len(group) + 1) * len(prompts[group[0]]) <= PREFILL_TOKENS):
                    group.append(waiting.popleft())
                if not prompts[group[0]]:
                    raise ValueError(f"prompt {group[0]} is empty; generation needs at least one token to continue")
                logits, cache = batch.prefill_same_length([list(prompts[i]) for i in group])
                length = cache[0][0].shape[2]  # the prompt's tokens, and a soft prompt's in front of them
                made = [_Row(i, length) for i in group]
                going = [j for j, row in enumerate(made) if accept(row, int(logits[j].argmax()))]
                if going:
                    kept = cache if len(going) == len(group) else [tuple(t[going] for t in kv) for kv in cache]
                    batch.add([made[j] for j in going], kept)
            if len(batch):
                tokens = batch.decode().argmax(-1).tolist()
                batch.keep([j for j, (row, token) in enumerate(zip(batch.rows, tokens)) if accept(row, token)])
    return done


__all__ = ["CacheBatch", "greedy", "greedy_differs", "positions_are_complete", "supported"]
