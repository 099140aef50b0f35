"""Injection mechanisms, one per kind of site; methods never touch these.

Every mechanism has the same four verbs, so the store loops over mechanisms instead of branching:
``add(entry)``, ``drop(adapter)``, ``refresh()`` (after the active set or a merge changed) and
``remove()`` (take every hook off). Which entries run is read from the store at forward time:
the active adapters, or, inside ``dt.routing``, one adapter (or none) per row of the batch.
A combine names the class of the mechanism that runs it; the store makes one of each class per
model with ``create(store, backbone)``, so a new mechanism is one class here and no branch elsewhere.

* ``Hooks``: a forward pre-hook and a forward hook per target module, applying the input and output
  combines of every live delta there; it also hands a module's input to deltas that read it
  (a placement's ``source``).
* ``MaskedHooks``: ``Hooks`` whose output combines also get the batch's 2D token mask, taken as each
  forward pass starts (LoReFT picks its positions from it).
* ``PrefixAttention``: a registered attention function that prepends each live prefix to the keys
  and values an attention module computed, extends the mask (and T5's position bias), then calls
  the model's own attention (sdpa or eager). Rows that a prefix does not apply to mask it out.
  Combines with an ``attend`` method (LLaMA-Adapter's gated prompt) add their own attention's
  output to the model's after it.
* ``PromptTokens``: hooks on the backbone (the encoder, for encoder-decoders) that prepend soft
  tokens to the input embeddings, extend mask and positions, and strip the prompt positions from
  the outputs (and recompute the pooler from the stripped states), so heads and losses see the
  original length. Rows with prompts of different lengths are laid out [own prompt | tokens |
  masked filler], so every row sees exactly the positions it would see alone.
* ``FrozenBelow`` and ``PassClock``: not deltas, but the same protocol (the store refreshes them).
"""
from __future__ import annotations

import contextvars
import inspect
import sys

import torch
from torch.nn import functional as F

# The per-row routing of the forward passes in this context: {id(store): Routing}.
ROUTING: contextvars.ContextVar[dict] = contextvars.ContextVar("deltatune_routing", default={})


class Routing:
    """One adapter name (or None: the bare base model) per row of the batch."""

    def __init__(self, names: list):
        self.names = list(names)
        self.adapters = {n for n in self.names if n is not None}
        self.uniform = len(set(self.names)) == 1
        self._rows: dict = {}

    def rows(self, adapter: str, batch: int, device):
        """None: every row uses ``adapter``; else the (possibly empty) index tensor of its rows."""
        if batch != len(self.names):
            from .errors import ConfigError
            raise ConfigError(f"dt.routing names {len(self.names)} rows but the batch has {batch}; "
                              "give one adapter name (or None) per row")
        if self.uniform:
            return None if self.names[0] == adapter else _EMPTY
        key = (adapter, device)
        if key not in self._rows:
            self._rows[key] = torch.tensor([i for i, n in enumerate(self.names) if n == adapter],
                                           dtype=torch.long, device=device)
        return self._rows[key]


_EMPTY = torch.empty(0, dtype=torch.long)


class Mechanism:
    """Base: entries of every adapter that use this mechanism, and the store they belong to."""

    # True: it adds positions to the input sequence, so the input of every layer changes and no
    # frozen lower part of the model can be cached (embedding recycling refuses it).
    extends_input = False

    def __init__(self, store):
        self.store = store
        self.entries: list = []

    @classmethod
    def create(cls, store, backbone) -> Mechanism:
        """The one instance of this mechanism for ``store``'s model (whose backbone is ``backbone``)."""
        return cls(store)

    def runs(self, entry) -> bool:
        """Whether this mechanism applies ``entry``'s combine (rather than only serving it, as the
        hooks hand a source module's input to a delta that another mechanism applies)."""
        return isinstance(self, entry.combine.mechanism)

    def add(self, entry) -> None:
        self.entries.append(entry)

    def drop(self, adapter: str) -> None:
        self.entries = [e for e in self.entries if e.adapter != adapter]

    def refresh(self) -> None:
        pass

    def remove(self) -> None:
        pass

    def live(self, entries, batch: int, device):
        """(entry, rows) for every entry that runs in this forward pass; rows None means all rows."""
        routing = ROUTING.get().get(id(self.store))
        if routing is None:
            return [(e, None) for e in entries if e.live]
        out = []
        for e in entries:
            if e.adapter in routing.adapters:
                rows = routing.rows(e.adapter, batch, device)
                if rows is None or len(rows):
                    out.append((e, rows))
        return out


def _gathered(out, x, live):
    """The rows routed to several plain low-rank adapters at one module, computed in one pass: each row gathers its
    adapter's (A, B) and two batched matmuls give every row's scale B A x (the gathered matmul S-LoRA and Punica use
    to serve many LoRA adapters in one batch), instead of a pair of matmuls, an index and a copy per adapter. Only in
    decode passes (one token a row) without a graph (serving, generation scoring); measured on SmolLM2
    (bench/lora_gather.py): 32 adapters, 32 rows, a decode pass 0.91x the per-adapter time, a 64-token prefill 1.05x,
    so prefills are not gathered; at 8 adapters and 8 rows 0.995x. Only for entries whose combine adds delta(x) to
    the output as it is (``combine.gathers``), whose delta is exactly scale B A x (``delta.lowrank_factors()``),
    without a slice, and that are their adapter's only entry here (so no order between entries changes), grouped by
    the factors' shapes; the others, and groups of one, run as before. Returns (out, the entries left to run)."""
    if x is None or torch.is_grad_enabled() or x.dim() < 2 or x.numel() != x.shape[0] * x.shape[-1]:
        return out, live  # decode passes only (one token a row): a prefill ran 1.05x slower gathered, a decode 0.91x
    adapters = [e.adapter for e, _ in live]
    groups: dict = {}  # factors of one shape and dtype stack into one gathered matmul
    for e, rows in live:
        if rows is None or not e.combine.gathers or e.out_slice is not None or adapters.count(e.adapter) != 1:
            continue
        factors = e.delta.lowrank_factors() if hasattr(e.delta, "lowrank_factors") else None
        if factors is not None:
            a, b, scale = factors
            groups.setdefault((a.shape, b.shape, a.dtype, b.dtype), []).append((e, rows, a, b, float(scale)))
    done = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        rows = torch.cat([g[1] for g in group])
        which = torch.cat([torch.full((len(g[1]),), i, dtype=torch.long, device=rows.device) for i, g in enumerate(group)])
        a = torch.stack([g[2] for g in group])[which]  # (m, r, in)
        b = torch.stack([g[3] for g in group])[which]  # (m, out, r)
        scale = torch.tensor([g[4] for g in group], dtype=a.dtype, device=a.device)[which]
        xs = x[rows].to(a.dtype)
        lead = xs.shape[:-1]
        y = torch.bmm(torch.bmm(xs.reshape(len(rows), -1, xs.shape[-1]), a.transpose(1, 2)), b.transpose(1, 2))
        out = out.index_add_(0, rows, (y * scale.view(-1, 1, 1)).reshape(*lead, -1).to(out.dtype))
        for g in group:
            g[0].stash = None
            done.add(id(g[0]))
    return out, [(e, r) for e, r in live if id(e) not in done]


def _rows_apply(fn, out, rows, *args):
    """fn(out, *args) on all rows, or only on ``rows`` (the others keep ``out`` as it is)."""
    if rows is None:
        return fn(out, *args)
    sub = fn(out[rows], *(a[rows] if torch.is_tensor(a) else a for a in args))
    return out.index_copy(0, rows, sub.to(out.dtype))  # never in place: ``out`` may be another module's tensor


# ---------------------------------------------------------------- module hooks

class _ModuleHooks:
    def __init__(self, owner, module):
        self.owner, self.module = owner, module
        self.inputs: list = []
        self.outputs: list = []
        self.sources: list = []
        self.handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        for e in self.sources:  # an activation of this forward only: taken by the combine, then dropped
            e.stash = x
        if not self.inputs:
            return None
        for e, rows in self.owner.live(self.inputs, x.shape[0], x.device):
            x = _rows_apply(lambda h, e=e: e.combine.apply(h, None, e), x, rows)
        return (x, *args[1:]), kwargs

    def _post(self, module, args, out):
        if not self.outputs:
            return None
        if isinstance(out, tuple):  # a block returns (hidden states, extras...): the combine sees the first
            return (self._post(module, args, out[0]), *out[1:])
        x = args[0] if args else None
        live = self.owner.live(self.outputs, out.shape[0], out.device)
        if len(live) > 1:
            out, live = _gathered(out, x, live)
        for e, rows in live:
            source, e.stash = e.stash, None
            if rows is None:
                out = e.combine.apply(out, x, e, source)
            else:
                sub = e.combine.apply(out[rows], None if x is None else x[rows], e,
                                      None if source is None else source[rows])
                # in place when no graph is recorded (serving): no full copy of the output per adapter
                out = out.index_copy_(0, rows, sub.to(out.dtype)) if not torch.is_grad_enabled() \
                    else out.index_copy(0, rows, sub.to(out.dtype))
        return out


class Hooks(Mechanism):
    """Forward (pre-)hooks on the target modules of the combines it runs and on every source module."""

    module_hooks = _ModuleHooks  # what it puts on each module (MaskedHooks: one that also hands out the mask)

    def __init__(self, store):
        super().__init__(store)
        self.modules: dict[int, _ModuleHooks] = {}

    def _at(self, module) -> _ModuleHooks:
        hooks = self.modules.get(id(module))
        if hooks is None:
            hooks = self.modules[id(module)] = self.module_hooks(self, module)
        return hooks

    def add(self, entry):
        super().add(entry)
        if self.runs(entry):
            self._at(entry.target_module)
        if entry.source_module is not None:
            self._at(entry.source_module)

    def refresh(self):
        for hooks in self.modules.values():
            here = [e for e in self.entries if e.target_module is hooks.module and self.runs(e)]
            hooks.inputs = [e for e in here if e.combine.where == "input"]
            hooks.outputs = [e for e in here if e.combine.where == "output"]
            hooks.sources = [e for e in self.entries if e.source_module is hooks.module]

    def remove(self):
        for hooks in self.modules.values():
            for h in hooks.handles:
                h.remove()
        self.modules.clear()


class _MaskedModuleHooks(_ModuleHooks):
    def _pre(self, module, args, kwargs):
        for e in self.outputs:  # set at every call, so a checkpointed block's recomputation sees it too
            e.stash = self.owner.mask
        return super()._pre(module, args, kwargs)


class MaskedHooks(Hooks):
    """Hooks whose output combines also read the batch's token mask, as their ``source``: the 2D attention
    mask (B, T) the backbone (the encoder, for encoder-decoders) was called with, taken as each forward pass
    starts; None where every position is a token. A continuation over a key/value cache hands a mask as long
    as the whole sequence (ones where none was given), longer than the new hidden states, so a combine can
    tell the two apart. Per-row routing slices it like any source. LoReFT reads its positions from it."""

    module_hooks = _MaskedModuleHooks

    def __init__(self, store, stack):
        super().__init__(store)
        self.mask = None  # the pass in flight's; not derived from anything trainable
        self.signature = inspect.signature(stack.forward)
        self.handle = stack.register_forward_pre_hook(self._start, with_kwargs=True)

    @classmethod
    def create(cls, store, backbone):
        encdec = getattr(backbone.config, "is_encoder_decoder", False)
        return cls(store, backbone.get_encoder() if encdec else backbone)

    def _start(self, module, args, kwargs):
        kw = self.signature.bind_partial(*args, **kwargs).arguments
        kw.update(kw.pop("kwargs", {}))
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            from .errors import ConfigError
            raise ConfigError(f"this adapter reads token positions from a 2D attention mask (batch, tokens); the "
                              f"model was called with a {mask.dim()}-D mask: pass the tokenizer's attention_mask")
        past = kw.get("cache", kw.get("past_key_values"))  # transformers 5.24 renamed past_key_values to cache
        seen = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        if seen and mask is None:
            ref = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
            mask = torch.ones(ref.shape[0], seen + ref.shape[1], dtype=torch.long, device=ref.device)
        self.mask = mask

    def remove(self):
        super().remove()
        self.handle.remove()


# ---------------------------------------------------------------- prefix keys / values

# Attention implementation names under which prefix_attention is registered, by the mask each
# needs: sdpa takes a boolean mask, or none at all when every position is visible (then its fast
# kernels run); eager attention adds a float mask.
ATTN_NAMES = {"sdpa": "deltatune", "eager": "deltatune_eager"}


def _extend_mask(mask, visible, batch, length, q_len, k_len, causal, device):
    """Let each query see the ``length`` prefix positions placed before the keys; ``visible``
    (batch, length) bool says which prefix positions each row may see (None: all)."""
    if mask is None:
        if visible is None and (not causal or q_len == 1):
            return None
        # Query i sits at key position i + (k_len - q_len) (a cache may hold earlier keys).
        i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        j = torch.arange(k_len, device=device)[None, :]
        own = (j <= i) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        mask = own[None, None].expand(batch, 1, q_len, k_len)
    if visible is None:
        fill = True if mask.dtype == torch.bool else 0.0
        return F.pad(mask, (length, 0), value=fill)
    head = visible[:, None, None, :].expand(mask.shape[0], mask.shape[1], mask.shape[2], length)
    if mask.dtype != torch.bool:
        head = torch.zeros((), dtype=mask.dtype, device=device).masked_fill(~head, torch.finfo(mask.dtype).min)
    return torch.cat([head.to(mask.dtype), mask.expand(mask.shape[0], *mask.shape[1:])], dim=-1)


class PrefixAttention(Mechanism):
    """Prefix keys/values inside every attention module that carries one."""

    def __init__(self, store, backbone):
        super().__init__(store)
        self.backbone = backbone
        self.modules: list = []
        _install_prefix_attention(backbone)

    @classmethod
    def create(cls, store, backbone):
        return cls(store, backbone)

    def add(self, entry):
        super().add(entry)
        module = entry.target_module
        if getattr(module, "_deltatune_prefix", None) is None:
            module._deltatune_prefix = (self, [])
            self.modules.append(module)
        module._deltatune_prefix[1].append(entry)

    def drop(self, adapter):
        super().drop(adapter)
        for module in self.modules:
            module._deltatune_prefix[1][:] = [e for e in module._deltatune_prefix[1] if e.adapter != adapter]

    def remove(self):
        for module in self.modules:
            del module._deltatune_prefix
        self.modules.clear()
        _uninstall_prefix_attention(self.backbone)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function registered under the name 'deltatune' (see ``_install_prefix_attention``)."""
    mech, entries = getattr(module, "_deltatune_prefix", (None, ()))
    batch = key.shape[0]
    live = mech.live(entries, batch, key.device) if entries else ()
    # Combines that attend on their own (LLaMA-Adapter's gated prompt: its own softmax) add to the output after
    # the base attention; the others are prefixes, concatenated to the keys and values before it.
    after = [(e, rows) for e, rows in live if hasattr(e.combine, "attend")]
    if after:
        live = [(e, rows) for e, rows in live if not hasattr(e.combine, "attend")]
    if live:
        q_len, k_len = query.shape[2], key.shape[2]
        keys, values, seen = [], [], []
        for e, rows in live:
            source, e.stash = e.stash, None
            pk, pv = e.delta() if source is None else e.delta(source)  # (kv_heads, L, hd) or (B, kv_heads, L, hd)
            if pk.dim() == 3:
                pk, pv = pk.unsqueeze(0).expand(batch, -1, -1, -1), pv.unsqueeze(0).expand(batch, -1, -1, -1)
            keys.append(pk.to(key.dtype))
            values.append(pv.to(value.dtype))
            if rows is not None or len(live) > 1 and any(r is not None for _, r in live):
                row_mask = torch.ones(batch, dtype=torch.bool, device=key.device)
                if rows is not None:
                    row_mask = torch.zeros_like(row_mask).index_fill(0, rows, True)
                seen.append(row_mask[:, None].expand(batch, pk.shape[2]))
            else:
                seen.append(None)
        length = sum(k.shape[2] for k in keys)
        key = torch.cat([*keys, key], dim=2)  # (B, kv_heads, length + T, head_dim)
        value = torch.cat([*values, value], dim=2)
        visible = None
        if any(s is not None for s in seen):
            visible = torch.cat([s if s is not None else torch.ones(batch, k.shape[2], dtype=torch.bool, device=key.device)
                                 for s, k in zip(seen, keys)], dim=1)
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        attention_mask = _extend_mask(attention_mask, visible, batch, length, q_len, k_len, causal, query.device)
        if attention_mask is not None:
            kwargs["is_causal"] = False
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5 adds a relative position bias: none for the prefix positions
            kwargs["position_bias"] = F.pad(bias, (length, 0))
    result = _base_attention(module)(module, query, key, value, attention_mask, **kwargs)
    if not after:
        return result
    out, *rest = result  # out: (B, T, heads, head_dim), before the output projection
    for e, rows in after:
        out = e.combine.attend(module, query, out, e, rows, kwargs.get("scaling"))
    return (out, *rest)


def _base_attention(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(module.config, "_deltatune_base_attn", "sdpa")
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _install_prefix_attention(backbone) -> None:
    """Route the backbone's attention through ``prefix_attention``; remember the original."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name, mask in ((ATTN_NAMES["sdpa"], sdpa_mask), (ATTN_NAMES["eager"], eager_mask)):
        if name not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(name, prefix_attention)
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    for cfg in _configs(backbone):
        if cfg._attn_implementation not in ATTN_NAMES.values():
            cfg._deltatune_base_attn = base = cfg._attn_implementation or "eager"
            cfg._attn_implementation = ATTN_NAMES["eager" if base == "eager" else "sdpa"]


def _uninstall_prefix_attention(backbone) -> None:
    for cfg in _configs(backbone):
        if getattr(cfg, "_deltatune_base_attn", None) is not None:
            cfg._attn_implementation = cfg._deltatune_base_attn
            del cfg._deltatune_base_attn


def _configs(backbone):
    seen = []
    for module in backbone.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not s for s in seen):
            seen.append(cfg)
    return seen


# ---------------------------------------------------------------- prompt tokens

class PromptTokens(Mechanism):
    """Prepends soft prompt tokens at the input embeddings of ``stack`` (the backbone or its encoder).

    A prompt delta is called with the batch's input embeddings and attention mask (so an
    input-dependent prompt, ATTEMPT's, can read them) and returns (length, d) or (batch, length, d).
    """

    extends_input = True

    @classmethod
    def create(cls, store, backbone):
        encdec = getattr(backbone.config, "is_encoder_decoder", False)
        stack = backbone.get_encoder() if encdec else backbone  # the prompt goes before the encoder's input
        return cls(store, stack, backbone.get_input_embeddings(), getattr(stack, "pooler", None))

    def __init__(self, store, stack, embed, pooler=None):
        super().__init__(store)
        self.stack, self.embed, self.pooler = stack, embed, pooler
        self.layout = None  # (per-row prompt lengths, total, tokens) of the pass in flight, for _post
        self.cached = None  # the same, kept for continuations that reuse a key/value cache
        self.signature = inspect.signature(stack.forward)
        self.handles = [
            stack.register_forward_pre_hook(self._pre, with_kwargs=True),
            stack.register_forward_hook(self._post),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()

    def _pre(self, module, args, kwargs):
        self.layout = None
        if not self.entries:
            return None
        kw = self.signature.bind_partial(*args, **kwargs).arguments
        kw.update(kw.pop("kwargs", {}))
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        past = kw.get("cache", kw.get("past_key_values"))  # transformers 5.24 renamed past_key_values to cache
        ref = embeds if embeds is not None else ids
        batch, device = ref.shape[0], ref.device
        live = self.live(self.entries, batch, device)
        if not live:
            return None
        if past is not None and past.get_seq_length() > 0:
            return self._continue(kw)
        if embeds is None:
            embeds = self.embed(ids)
        mask = kw.get("attention_mask")
        token_mask = mask if mask is not None and mask.dim() == 2 else torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        pieces = []  # (prompt (B or rows, L, d), rows)
        for e, rows in live:
            sub = embeds if rows is None else embeds[rows]
            p = e.delta(sub, token_mask if rows is None else token_mask[rows]).to(embeds.dtype)
            pieces.append((p if p.dim() == 3 else p.unsqueeze(0).expand(sub.shape[0], -1, -1), rows))
        if all(rows is None for _, rows in pieces):  # every row gets every prompt: one block in front
            prompt = torch.cat([p for p, _ in pieces], dim=1)
            lengths = torch.full((batch,), prompt.shape[1], dtype=torch.long, device=device)
        else:
            prompt, lengths = self._per_row(pieces, batch, embeds)
        total, tokens = prompt.shape[1], embeds.shape[1]
        uniform = bool((lengths == total).all())
        kw["input_ids"] = None
        if uniform:  # [prompt | tokens]
            kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
            new_mask = F.pad(token_mask, (total, 0), value=1)
        else:  # [own prompt | tokens | masked filler]: each row at the positions it has alone
            kw["inputs_embeds"], new_mask = self._interleave(prompt, lengths, embeds, token_mask)
        if mask is not None and mask.dim() == 2 or not uniform:
            kw["attention_mask"] = new_mask.to(mask.dtype if mask is not None else torch.long)
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = F.pad(kw["token_type_ids"], (0, total), value=0) if not uniform \
                else F.pad(kw["token_type_ids"], (total, 0))
        for key in ("position_ids", "cache_position"):
            pos = kw.get(key)
            if pos is None:
                continue
            if key == "cache_position" or uniform:
                head = torch.arange(total, device=device, dtype=pos.dtype)
                head = head.expand(*pos.shape[:-1], total) if pos.dim() > 1 else head
                kw[key] = torch.cat([head, pos + total], dim=-1)
            else:  # per-row positions: own prompt 0..n-1, the row's tokens shifted by n, filler after
                at = torch.arange(total + tokens, device=device)[None, :]
                n = lengths[:, None]
                shifted = pos.expand(batch, -1).gather(1, (at - n).clamp(0, tokens - 1)) + n
                kw[key] = torch.where(at < n, at, torch.where(at < n + tokens, shifted, at)).to(pos.dtype)
        self.layout = self.cached = (lengths, total, tokens, uniform)
        return (), kw

    def _per_row(self, pieces, batch, embeds):
        """Each row's prompts concatenated in entry order, right-padded to the longest: (B, L, d), lengths (B,)."""
        per_row = [[] for _ in range(batch)]
        for p, rows in pieces:
            idx = range(batch) if rows is None else rows.tolist()
            for j, r in enumerate(idx):
                per_row[r].append(p[j])
        lengths = torch.tensor([sum(t.shape[0] for t in ts) for ts in per_row], dtype=torch.long, device=embeds.device)
        total = int(lengths.max())
        prompt = embeds.new_zeros(batch, total, embeds.shape[-1])
        rows = [torch.cat(ts, dim=0) if ts else embeds.new_zeros(0, embeds.shape[-1]) for ts in per_row]
        prompt = torch.stack([F.pad(r, (0, 0, 0, total - r.shape[0])) for r in rows])
        return prompt, lengths

    @staticmethod
    def _interleave(prompt, lengths, embeds, token_mask):
        total, tokens = prompt.shape[1], embeds.shape[1]
        out = torch.cat([prompt, embeds], dim=1)  # then move each row's tokens right after its own prompt
        pos = torch.arange(total + tokens, device=embeds.device)[None, :]
        n = lengths[:, None]
        # the row's sequence: own prompt (pos < n), tokens (n <= pos < n + T), filler (pos >= n + T)
        src = torch.where(pos < n, pos, torch.where(pos < n + tokens, pos - n + total, pos))
        src = src.clamp(max=total + tokens - 1)
        out = out.gather(1, src[..., None].expand(-1, -1, out.shape[-1]))
        filler = pos >= n + tokens
        out = out.masked_fill(filler[..., None], 0.0)
        tok_mask = token_mask.gather(1, (pos - n).clamp(0, tokens - 1))
        mask = torch.where(pos < n, 1, torch.where(filler, 0, tok_mask))
        return out, mask

    def _continue(self, kw):
        """A continuation with a cache that already holds the prompt: shift positions, extend the mask."""
        if self.cached is None:
            return None
        lengths, total, tokens, uniform = self.cached
        mask = kw.get("attention_mask")
        if uniform:
            for key in ("position_ids", "cache_position"):
                if kw.get(key) is not None:
                    kw[key] = kw[key] + total
            if mask is not None and mask.dim() == 2:
                kw["attention_mask"] = F.pad(mask, (total, 0), value=1)
            return (), kw
        if mask is not None and mask.dim() == 2:  # cache: [own prompt | first tokens | filler], then new ones
            first, rest = mask[:, :tokens], mask[:, tokens:]
            pos = torch.arange(total + tokens, device=mask.device)[None, :]
            n = lengths[:, None]
            head = torch.where(pos < n, 1, torch.where(pos >= n + tokens, 0, first.gather(1, (pos - n).clamp(0, tokens - 1))))
            kw["attention_mask"] = torch.cat([head.to(mask.dtype), rest], dim=1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + lengths.to(kw["position_ids"].dtype)[:, None]
        elif kw.get("cache_position") is not None and "position_ids" in self.signature.parameters:
            # the model would take the (shared) cache position: each row sits after its own prompt
            kw["position_ids"] = kw["cache_position"][None, :] + lengths.to(kw["cache_position"].dtype)[:, None]
        if kw.get("cache_position") is not None:
            kw["cache_position"] = kw["cache_position"] + total
        return (), kw

    def _post(self, module, args, out):
        layout, self.layout = self.layout, None
        if layout is None:
            return None
        lengths, total, tokens, uniform = layout
        if uniform:
            strip = lambda h: h[:, total:]  # noqa: E731
        else:
            index = (lengths[:, None] + torch.arange(tokens, device=lengths.device)[None, :])
            strip = lambda h: h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))  # noqa: E731
        if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
            out.last_hidden_state = strip(out.last_hidden_state)
            if getattr(out, "pooler_output", None) is not None and self.pooler is not None:
                out.pooler_output = self.pooler(out.last_hidden_state)  # BERT pools [CLS], not a soft token
        elif isinstance(out, tuple):
            out = (strip(out[0]), *out[1:])
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(strip(h) for h in out.hidden_states)
        return out


# ---------------------------------------------------------------- shared machinery

class PassClock:
    """Numbers the backbone's forward passes and calls ``begin`` as each one starts, before any
    block runs: a delta shared by all layers (the prefix MLP) is then computed once per pass rather
    than once per layer, outside every block, so an activation checkpoint's recomputation of a
    block records exactly what its forward recorded."""

    now = 0

    def __init__(self, backbone, begin):
        self.begin = begin
        self.handle = backbone.register_forward_pre_hook(self._start)

    def _start(self, module, args):
        PassClock.now += 1
        self.begin()

    def remove(self):
        self.handle.remove()


# ---------------------------------------------------------------- frozen lower part

class FrozenBelow:
    """Runs the backbone's frozen lower part (input embeddings and every block below the lowest
    one an active adapter trains) in eval mode, also while the model trains.

    Nothing there needs a gradient, so autograd records nothing; what still costs is dropout, about
    a quarter of a training-mode forward on CPU. Without it those layers are a fixed feature
    extractor: the same features at every step, which are also the features embedding recycling
    caches. The training setting ``frozen_dropout=True`` (``dt.set_frozen_dropout``) keeps plain
    training-mode behaviour.
    """

    def __init__(self, backbone, blocks):
        self.backbone = backbone
        self.blocks = blocks  # [(layer, module)] of the backbone's one stack of blocks
        block_ids = {id(m) for _, m in blocks}
        first = next((name for name, child in backbone.named_children()
                      if any(id(m) in block_ids for m in child.modules())), None)
        self.inputs = []  # children before the stack that holds the blocks: embeddings, their dropout
        for name, child in backbone.named_children():
            if name == first:
                break
            self.inputs.append(child)
        self.input_params = {id(p) for m in self.inputs for p in m.parameters()}
        self.layer_of_param = {id(p): layer for layer, m in blocks for p in m.parameters()}
        self.modules: list = []
        self.handle = backbone.register_forward_pre_hook(self._pre)

    def set(self, lowest: int) -> None:
        """Blocks below ``lowest`` (0: none) and the input embeddings are the frozen part."""
        now = self.inputs + [m for layer, m in self.blocks if layer < lowest] if lowest > 0 else []
        keep = {id(m) for m in now}
        for m in self.modules:
            if id(m) not in keep:  # no longer frozen: back to the backbone's mode
                m.train(self.backbone.training)
        self.modules = now

    def _pre(self, module, args):
        if module.training:
            for m in self.modules:
                if m.training:
                    m.train(False)

    def remove(self) -> None:
        self.set(0)
        self.handle.remove()
