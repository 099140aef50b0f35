"""Combines: how a delta's result meets the hidden state.

Each combine names the class of the mechanism that runs it (``mechanisms.py``): ``Hooks`` (forward
hooks on the site's module: output combines after it, input combines before it; ``MaskedHooks`` also
hands them the batch's token mask), ``PrefixAttention`` (keys/values concatenated inside attention, or
an attention of the delta's own beside it) or ``PromptTokens`` (tokens concatenated at the input
embeddings).

``merge`` folds a delta into the module's weight in place. There is no arithmetic inverse: the
store keeps the weights a merge changed and ``unmerge`` copies them back, so unmerging is exact
(bitwise) and cannot divide by a zero scale. A combine is mergeable when its fold is exact up to
rounding for every delta it may carry; ``can_merge(entry)`` refines that per delta (a parallel
delta must be linear: have ``delta_weight``).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .mechanisms import Hooks, MaskedHooks, PrefixAttention, PromptTokens
from .sites import weight_out_in


def _on_slice(out, sl, fn):
    """Apply fn to out[..., a:b] (a fused projection's share) or to all of out."""
    if sl is None:
        return fn(out)
    a, b = sl
    return torch.cat([out[..., :a], fn(out[..., a:b]), out[..., b:]], dim=-1)


class Combine:
    """Base. ``mechanism``: the class of the injection mechanism that runs it; ``where``: 'output' or
    'input' (hooks)."""

    name = "combine"
    mechanism = Hooks
    where = "output"
    gathers = False  # apply is exactly out + delta(x): routed rows of several adapters may share one gathered matmul

    def __init__(self, mergeable: bool = False):
        self.mergeable = mergeable

    def apply(self, out, x, entry, source=None):
        """``out``: the module's output (its input for input combines); ``x``: the module's input;
        ``source``: the input of the placement's source module, when it has one."""
        raise NotImplementedError

    def can_merge(self, entry) -> bool:
        return self.mergeable

    def merge(self, module, entry) -> None:
        raise NotImplementedError


class Parallel(Combine):
    """h = W x + delta(x): the delta reads the site's input, its result is added (LoRA)."""

    name = "parallel"
    gathers = True

    def apply(self, out, x, entry, source=None):
        if hasattr(entry.delta, "add_to"):  # a delta with a fused form of out + delta(x)
            return _on_slice(out, entry.out_slice, lambda seg: entry.delta.add_to(seg, x))
        return _on_slice(out, entry.out_slice, lambda seg: seg + entry.delta(x).to(seg.dtype))

    def can_merge(self, entry):
        bias = getattr(entry.delta, "delta_bias", lambda: None)()  # a delta with its own bias (KAdaptation)
        return (self.mergeable and hasattr(entry.delta, "delta_weight") and getattr(entry.delta, "foldable", True)
                and (bias is None or getattr(entry.target_module, "bias", None) is not None))

    def merge(self, module, entry):
        a, b = entry.out_slice or (0, None)
        weight_out_in(module)[a:b] += entry.delta.delta_weight().to(module.weight.dtype)
        bias = getattr(entry.delta, "delta_bias", lambda: None)()
        if bias is not None:
            module.bias[a:b] += bias.to(module.bias.dtype)


class Decompose(Parallel):
    """h = g (W x + delta(x)) + b with g = m / ||W + dW|| per output row: a low-rank delta with a magnitude
    (DoRA, Liu et al. 2024, §4): the delta rescales the module's output by itself (``decomposed``), given the
    module's weight rows and bias. Folds exactly: W <- g (W + dW), the bias unchanged."""

    name = "decompose"
    gathers = False

    def apply(self, out, x, entry, source=None):
        a, b = entry.out_slice or (0, None)
        weight = weight_out_in(entry.target_module)[a:b]
        bias = getattr(entry.target_module, "bias", None)
        bias = bias[a:b] if bias is not None else None
        return _on_slice(out, entry.out_slice, lambda seg: entry.delta.decomposed(seg, x, weight, bias))

    def can_merge(self, entry):
        return self.mergeable and getattr(entry.delta, "foldable", True)

    def merge(self, module, entry):
        a, b = entry.out_slice or (0, None)
        weight = weight_out_in(module)[a:b]
        weight.copy_(entry.delta.decomposed_weight(weight))


class Sequential(Combine):
    """h = y + delta(y): the delta reads the site's output (Houlsby adapters). Not mergeable."""

    name = "sequential"

    def apply(self, out, x, entry, source=None):
        return _on_slice(out, entry.out_slice, lambda seg: seg + entry.delta(seg).to(seg.dtype))


class AroundNorm(Combine):
    """At a post-LayerNorm block output (Pfeiffer et al. 2021 as AdapterHub's seq_bn runs it):
    with s = sublayer output + residual (the norm's input) and n = LN(s), the output becomes
    LN(s + delta(n)): the adapter reads the normalised sum, its result joins the residual taken
    before the norm, and the block's own LayerNorm is applied again. Identity when delta = 0."""

    name = "around_norm"

    def apply(self, out, x, entry, source=None):
        norm = entry.target_module
        return norm.forward(x + entry.delta(out).to(out.dtype))  # forward(): not through the hooks again


class Multiply(Combine):
    """h = l * (W x + b): an output scaling vector ((IA)^3 on keys and values)."""

    name = "multiply"

    def apply(self, out, x, entry, source=None):
        return _on_slice(out, entry.out_slice, entry.delta)

    def merge(self, module, entry):
        a, b = entry.out_slice or (0, None)
        factor = entry.delta.l
        weight_out_in(module)[a:b] *= factor.to(module.weight.dtype)[:, None]
        if getattr(module, "bias", None) is not None:
            module.bias[a:b] *= factor.to(module.bias.dtype)


class MultiplyInput(Combine):
    """x <- l * x before the site: an input scaling vector ((IA)^3 on the FFN activation)."""

    name = "multiply_input"
    where = "input"

    def apply(self, out, x, entry, source=None):  # here ``out`` is the module input
        return entry.delta(out)

    def merge(self, module, entry):
        weight_out_in(module).mul_(entry.delta.l.to(module.weight.dtype)[None, :])


class TransformInput(Combine):
    """x <- delta(x) before the site: a linear map R of its input, so h = W R x + b (the orthogonal R of OFT,
    BOFT and HRA). ``delta.input_matrix()`` gives R (in, in), with delta(x) = x R^T. Folds exactly: W <- W R.
    Whole modules only: a slice of a fused projection shares its input with the other slices (``TransformSlice``)."""

    name = "transform_input"
    where = "input"

    def apply(self, out, x, entry, source=None):  # here ``out`` is the module input
        return entry.delta(out)

    def can_merge(self, entry):
        return self.mergeable and entry.out_slice is None

    def merge(self, module, entry):
        _fold_input_map(module, entry)


class TransformSlice(Combine):
    """``TransformInput`` on a slice of a fused projection (GPT-2's q in c_attn), whose input the other slices
    read as it is: the slice gets W_s (R x - x) added, h_s = W_s R x + b_s (one more matmul of the slice's
    width; exactly h_s where R x = x). Folds exactly: W_s <- W_s R."""

    name = "transform_slice"

    def apply(self, out, x, entry, source=None):
        a, b = entry.out_slice
        weight = weight_out_in(entry.target_module)[a:b]
        change = F.linear(entry.delta(x) - x, weight.to(x.dtype))  # (..., b - a)
        return _on_slice(out, entry.out_slice, lambda seg: seg + change.to(seg.dtype))

    def merge(self, module, entry):
        _fold_input_map(module, entry)


def _fold_input_map(module, entry) -> None:
    a, b = entry.out_slice or (0, None)
    weight = weight_out_in(module)[a:b]
    weight.copy_((weight.float() @ entry.delta.input_matrix().float()).to(weight.dtype))


class MultiplyWeight(Combine):
    """h = l * (W x) + b: a scale per output row of the weight, the bias left as it is (BOFT's s), computed as
    l * h + (1 - l) * b, which is h itself where l = 1. Folds exactly: W <- diag(l) W."""

    name = "multiply_weight"

    def apply(self, out, x, entry, source=None):
        a, b = entry.out_slice or (0, None)
        bias = getattr(entry.target_module, "bias", None)

        def scaled(seg):
            l = entry.delta.l.to(seg.dtype)
            return seg * l if bias is None else seg * l + (1 - l) * bias[a:b].to(seg.dtype)
        return _on_slice(out, entry.out_slice, scaled)

    def merge(self, module, entry):
        a, b = entry.out_slice or (0, None)
        weight_out_in(module)[a:b] *= entry.delta.l.to(module.weight.dtype)[:, None]


class ParallelSpan(Combine):
    """h_B = y_B + delta(x_A): reads the input of an earlier module A (the placement's source),
    adds to the output of B. He et al.'s parallel adapter: A = ffn.in, B = ffn.out."""

    name = "parallel_span"

    def apply(self, out, x, entry, source=None):
        return _on_slice(out, entry.out_slice, lambda seg: seg + entry.delta(source).to(seg.dtype))


class SpanAroundNorm(Combine):
    """At a post-LayerNorm block's FFN norm B (``ffn.ln``): LN(s + delta(x_A)), with s the norm's
    input (the FFN output after its dropout, plus the residual) and x_A the input of the source A
    (the FFN input). He et al.'s parallel adapter where the unify code adds it on BERT and BART:
    after the FFN's dropout, before the norm. Identity when delta = 0."""

    name = "span_around_norm"

    def apply(self, out, x, entry, source=None):
        norm = entry.target_module
        return norm.forward(x + entry.delta(source).to(x.dtype))  # forward(): not through the hooks again


class PrefixKV(Combine):
    """Keys/values of a prefix table concatenated before the attention's own along the sequence."""

    name = "prefix_kv"
    mechanism = PrefixAttention


class PrependPrompt(Combine):
    """Soft tokens concatenated before the input embeddings along the sequence."""

    name = "prepend_prompt"
    mechanism = PromptTokens


class GatedAttention(Combine):
    """Beside the attention, inside it: the query also attends to the delta's keys and values, with a softmax of
    its own scaled by the delta's gate g, and the result joins the attention output before the output projection,
    out + g softmax(s q K_p^T) V_p (LLaMA-Adapter, Zhang et al. 2023, §3.2: the prompt's scores apart from
    the tokens', gated). Run by ``PrefixAttention`` after the model's own attention. Not mergeable."""

    name = "gated_attention"
    mechanism = PrefixAttention

    def attend(self, module, query, out, entry, rows, scaling):
        """``query`` (B, heads, T, hd) as the attention got it (rotated where the model rotates); ``out``
        (B, T, heads, hd) the attention's output; ``rows``: the routed rows (None: all)."""
        q = query if rows is None else query[rows]
        keys, values = entry.delta()  # (kv_heads, L, hd) each
        repeat = q.shape[1] // keys.shape[0]  # grouped-query attention: each key/value head serves `repeat` heads
        keys = keys.repeat_interleave(repeat, 0).to(q.dtype)
        values = values.repeat_interleave(repeat, 0).to(q.dtype)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # (B, heads, T, L)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) * entry.delta.gate.to(q.dtype)
        extra = torch.matmul(probs, values).transpose(1, 2).to(out.dtype)  # (B, T, heads, hd)
        return out + extra if rows is None else out.index_add(0, rows, extra)


class ReplaceRows(Combine):
    """The chosen rows of the site's weight E (V, d) take the delta's values (trainable tokens). At an embedding,
    the output at those token ids is the new row (times the embedding's own scale); at a linear head that holds E
    (an LM head tied to the embedding), those ids' outputs read the new rows, as out + x (rows - W[ids])^T against
    the weight as it is now: exactly the head's own output where the rows are unchanged or already folded.
    Folds exactly: W[ids] <- rows (``foldable=False`` for the modules that share an already folded weight)."""

    name = "replace_rows"

    def apply(self, out, x, entry, source=None):
        tokens, scale = entry.delta.tokens, entry.delta.scale  # the adapter's shared TokenRows
        if not x.dtype.is_floating_point:  # an embedding looked up by ids (B, T)
            at = tokens.position[x]  # (B, T): the id's index among the chosen ones, -1 elsewhere
            new = F.embedding(at.clamp(min=0), tokens.rows) * scale  # (B, T, d)
            return torch.where((at >= 0)[..., None], new.to(out.dtype), out)
        weight = entry.target_module.weight  # (V, d)
        change = F.linear(x, (tokens.rows - weight[tokens.ids]).to(x.dtype)) * scale  # (..., n)
        return out.index_add(out.dim() - 1, tokens.ids, change.to(out.dtype))

    def can_merge(self, entry):
        return self.mergeable and getattr(entry.delta, "foldable", True)

    def merge(self, module, entry):
        tokens = entry.delta.tokens
        module.weight.index_copy_(0, tokens.ids, tokens.rows.to(module.weight.dtype))


class Intervene(Combine):
    """h <- delta(h, mask): the delta edits the site's output at positions it picks from the batch's token mask,
    which ``MaskedHooks`` hands it as the source (LoReFT at the first and last tokens). Not mergeable."""

    name = "intervene"
    mechanism = MaskedHooks

    def apply(self, out, x, entry, source=None):
        return entry.delta(out, source)


PARALLEL = Parallel(mergeable=True)
ADD = Parallel(mergeable=False)  # an input-dependent or nonlinear delta beside the site (TARP)
DECOMPOSE = Decompose(mergeable=True)
SEQUENTIAL, AROUND_NORM, PARALLEL_SPAN = Sequential(), AroundNorm(), ParallelSpan()
SPAN_AROUND_NORM = SpanAroundNorm()
MULTIPLY, MULTIPLY_INPUT = Multiply(mergeable=True), MultiplyInput(mergeable=True)
TRANSFORM_INPUT, TRANSFORM_SLICE = TransformInput(mergeable=True), TransformSlice(mergeable=True)
MULTIPLY_WEIGHT = MultiplyWeight(mergeable=True)
PREFIX_KV, PREPEND_PROMPT = PrefixKV(), PrependPrompt()
GATED_ATTENTION, REPLACE_ROWS, INTERVENE = GatedAttention(), ReplaceRows(mergeable=True), Intervene()
