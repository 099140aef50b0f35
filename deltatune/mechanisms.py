"""The three injection mechanisms, one per kind of site; methods never touch these.

* ``ModuleHooks``: one forward pre-hook and one forward hook per target module, applying the
  input and output combines of every active delta at that module (linear sites, spans).
* Prefix keys/values: a registered attention function that prepends each active prefix to the
  keys and values an attention module computed, extends the mask (and T5's position bias), then
  calls the model's own attention (sdpa or eager). Works with padding, causal masks and the
  key/value cache of ``generate()`` because the cache only ever holds real tokens.
* Prompt tokens: hooks on the backbone (the encoder, for encoder-decoders) that prepend the soft
  tokens to the input embeddings, extend the attention mask and positions, and strip the prompt
  positions from the outputs, so heads, poolers and losses see the original length.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch.nn import functional as F

# Attention implementation names under which prefix_attention is registered, by the mask each
# needs: sdpa takes a boolean mask, or none at all when every position is visible (then its fast
# kernels run); eager attention adds a float mask.
ATTN_NAMES = {"sdpa": "deltatune", "eager": "deltatune_eager"}


class ModuleHooks:
    """The hooks deltatune owns on one module; ``entries`` are updated in place when adapters change."""

    def __init__(self, module):
        self.module = module
        self.inputs: list = []  # active entries with input combines
        self.outputs: list = []  # active entries with output combines
        self.sources: list = []  # span entries that read this module's input
        self.all: list = []
        self.handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def refresh(self, active: set[str]) -> None:
        live = [e for e in self.all if e.adapter in active and not e.merged]
        self.inputs = [e for e in live if e.combine.where == "input" and e.target_module is self.module]
        self.outputs = [e for e in live if e.combine.where == "output" and e.target_module is self.module]
        self.sources = [e for e in live if e.source_module is self.module]

    def _pre(self, module, args):
        for e in self.sources:
            e.stash = args[0]
        if not self.inputs:
            return None
        x = args[0]
        for e in self.inputs:
            x = e.combine.apply(x, None, e)
        return (x, *args[1:])

    def _post(self, module, args, out):
        if not self.outputs:
            return None
        x = args[0] if args else None
        for e in self.outputs:
            out = e.combine.apply(out, x, e)
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- prefix keys / values

def _base_attention(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(module.config, "_deltatune_base_attn", "sdpa")
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _extend_mask(mask, length, q_len, k_len, causal, dtype, device):
    """Let every query see the ``length`` prefix positions placed before the keys."""
    if mask is not None:
        fill = True if mask.dtype == torch.bool else 0.0
        return F.pad(mask, (length, 0), value=fill)
    if not causal or q_len == 1:
        return None
    # No mask was materialised but attention is causal: build it. Query i sits at key position
    # i + (k_len - q_len) (a cache may hold earlier keys); it sees the prefix and keys up to itself.
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    allowed = torch.cat([torch.ones(q_len, length, dtype=torch.bool, device=device), j <= i], dim=1)
    return allowed[None, None]


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function registered under the name 'deltatune' (see ``install_prefix_attention``)."""
    entries = getattr(module, "_deltatune_kv", None)
    live = [e for e in entries if e.live] if entries else ()
    if live:
        batch, q_len, k_len = key.shape[0], query.shape[2], key.shape[2]
        keys, values = [], []
        for e in live:
            pk, pv = e.delta()  # (kv_heads, length, head_dim) each
            keys.append(pk.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1))
            values.append(pv.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1))
        length = sum(k.shape[2] for k in keys)
        key = torch.cat([*keys, key], dim=2)  # (B, kv_heads, length + T, head_dim)
        value = torch.cat([*values, value], dim=2)
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        attention_mask = _extend_mask(attention_mask, length, q_len, k_len, causal, query.dtype, query.device)
        if attention_mask is not None:
            kwargs["is_causal"] = False
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5 adds a relative position bias: none for the prefix positions
            kwargs["position_bias"] = F.pad(bias, (length, 0))
    return _base_attention(module)(module, query, key, value, attention_mask, **kwargs)


def install_prefix_attention(backbone) -> None:
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


def uninstall_prefix_attention(backbone) -> None:
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

class PromptHooks:
    """Prepends soft prompt tokens at the input embeddings of ``stack`` (the backbone or its encoder)."""

    def __init__(self, stack, embed):
        self.stack, self.embed = stack, embed
        self.entries: list = []
        self.live: list = []
        self.strip = 0
        self.signature = inspect.signature(stack.forward)
        self.handles = [
            stack.register_forward_pre_hook(self._pre, with_kwargs=True),
            stack.register_forward_hook(self._post),
        ]

    def refresh(self, active):
        self.live = [e for e in self.entries if e.adapter in active]

    def _pre(self, module, args, kwargs):
        self.strip = 0
        if not self.live:
            return None
        kw = self.signature.bind_partial(*args, **kwargs).arguments
        kw.update(kw.pop("kwargs", {}))
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        past = kw.get("past_key_values")
        first = past is None or past.get_seq_length() == 0
        length = sum(e.delta.prompt.shape[0] for e in self.live)
        ref = embeds if embeds is not None else ids
        batch, device = ref.shape[0], ref.device
        if first:
            if embeds is None:
                embeds = self.embed(ids)
            prompt = torch.cat([e.delta(batch).to(embeds.dtype) for e in self.live], dim=1)
            kw["input_ids"], kw["inputs_embeds"] = None, torch.cat([prompt, embeds], dim=1)
            if kw.get("token_type_ids") is not None:
                kw["token_type_ids"] = F.pad(kw["token_type_ids"], (length, 0))
            for key in ("position_ids", "cache_position"):
                if kw.get(key) is not None:
                    pos = kw[key]
                    head = torch.arange(length, device=device, dtype=pos.dtype)
                    head = head.expand(*pos.shape[:-1], length) if pos.dim() > 1 else head
                    kw[key] = torch.cat([head, pos + length], dim=-1)
            self.strip = length
        else:  # a continuation with a cache that already holds the prompt: only shift positions
            for key in ("position_ids", "cache_position"):
                if kw.get(key) is not None:
                    kw[key] = kw[key] + length
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kw["attention_mask"] = F.pad(mask, (length, 0), value=1)
        return (), kw

    def _post(self, module, args, out):
        n, self.strip = self.strip, 0
        if not n:
            return None
        if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
            out.last_hidden_state = out.last_hidden_state[:, n:]
        elif isinstance(out, tuple):
            out = (out[0][:, n:], *out[1:])
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, n:] for h in out.hidden_states)
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- forward passes

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
    caches. A method's ``frozen_dropout=True`` keeps plain training-mode behaviour.
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
