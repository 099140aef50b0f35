"""Combines: how a delta's result meets the hidden state.

Each combine names the class of the mechanism that runs it (``mechanisms.py``): ``Hooks`` (forward
hooks on the site's module: output combines after it, input combines before it), ``PrefixAttention``
(keys/values concatenated inside attention) or ``PromptTokens`` (tokens concatenated at the input
embeddings).

``merge`` folds a delta into the module's weight in place. There is no arithmetic inverse: the
store keeps the weights a merge changed and ``unmerge`` copies them back, so unmerging is exact
(bitwise) and cannot divide by a zero scale. A combine is mergeable when its fold is exact up to
rounding for every delta it may carry; ``can_merge(entry)`` refines that per delta (a parallel
delta must be linear: have ``delta_weight``).
"""
from __future__ import annotations

import torch

from .mechanisms import Hooks, PrefixAttention, PromptTokens
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


PARALLEL = Parallel(mergeable=True)
ADD = Parallel(mergeable=False)  # an input-dependent or nonlinear delta beside the site (TARP)
DECOMPOSE = Decompose(mergeable=True)
SEQUENTIAL, AROUND_NORM, PARALLEL_SPAN = Sequential(), AroundNorm(), ParallelSpan()
SPAN_AROUND_NORM = SpanAroundNorm()
MULTIPLY, MULTIPLY_INPUT = Multiply(mergeable=True), MultiplyInput(mergeable=True)
PREFIX_KV, PREPEND_PROMPT = PrefixKV(), PrependPrompt()
