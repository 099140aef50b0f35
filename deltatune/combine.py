"""Combines: how a delta's result meets the hidden state, each with its inverse where one exists.

Output combines run in a forward hook on the site's module, input combines in a forward pre-hook;
``merge``/``unmerge`` fold a delta into the module's weight and back when the combine allows it, so
merging is generic rather than per method. The two sequence-level combines (prefix keys/values and
prompt tokens) need their own mechanism and live in ``mechanisms.py``.
"""
from __future__ import annotations

import torch

from .sites import weight_out_in


def _on_slice(out, sl, fn):
    """Apply fn to out[..., a:b] (a fused projection's share) or to all of out."""
    if sl is None:
        return fn(out)
    a, b = sl
    return torch.cat([out[..., :a], fn(out[..., a:b]), out[..., b:]], dim=-1)


class Combine:
    """Base: ``where`` is 'output' (forward hook) or 'input' (pre-hook)."""

    name = "combine"
    where = "output"
    mergeable = False

    def apply(self, out, x, entry):
        raise NotImplementedError

    def merge(self, module, entry) -> None:
        raise NotImplementedError

    def unmerge(self, module, entry) -> None:
        raise NotImplementedError


class Parallel(Combine):
    """h = W x + delta(x): the delta reads the site's input, its result is added (LoRA)."""

    name = "parallel"
    mergeable = True  # when the delta is linear (has delta_weight)

    def apply(self, out, x, entry):
        if hasattr(entry.delta, "add_to"):  # a delta with a fused form of out + delta(x)
            return _on_slice(out, entry.out_slice, lambda seg: entry.delta.add_to(seg, x))
        return _on_slice(out, entry.out_slice, lambda seg: seg + entry.delta(x).to(seg.dtype))

    def merge(self, module, entry):
        a, b = entry.out_slice or (0, None)
        weight_out_in(module)[a:b] += entry.delta.delta_weight().to(module.weight.dtype)

    def unmerge(self, module, entry):
        a, b = entry.out_slice or (0, None)
        weight_out_in(module)[a:b] -= entry.delta.delta_weight().to(module.weight.dtype)


class Sequential(Combine):
    """h = y + delta(y): the delta reads the site's output (Houlsby and Pfeiffer adapters). Not mergeable."""

    name = "sequential"

    def apply(self, out, x, entry):
        return _on_slice(out, entry.out_slice, lambda seg: seg + entry.delta(seg).to(seg.dtype))


class Multiply(Combine):
    """h = l * (W x + b): an output scaling vector ((IA)^3 on keys and values). Inverse: divide by l."""

    name = "multiply"
    mergeable = True

    def apply(self, out, x, entry):
        return _on_slice(out, entry.out_slice, entry.delta)

    def _fold(self, module, entry, factor):
        a, b = entry.out_slice or (0, None)
        weight_out_in(module)[a:b] *= factor.to(module.weight.dtype)[:, None]
        if getattr(module, "bias", None) is not None:
            module.bias[a:b] *= factor.to(module.bias.dtype)

    def merge(self, module, entry):
        self._fold(module, entry, entry.delta.l)

    def unmerge(self, module, entry):
        self._fold(module, entry, 1.0 / entry.delta.l)


class MultiplyInput(Combine):
    """x <- l * x before the site: an input scaling vector ((IA)^3 on the FFN activation). Inverse: divide."""

    name = "multiply_input"
    where = "input"
    mergeable = True

    def apply(self, out, x, entry):  # here ``out`` is the module input
        return entry.delta(out)

    def merge(self, module, entry):
        weight_out_in(module).mul_(entry.delta.l.to(module.weight.dtype)[None, :])

    def unmerge(self, module, entry):
        weight_out_in(module).div_(entry.delta.l.to(module.weight.dtype)[None, :])


class ParallelSpan(Combine):
    """h_B = y_B + delta(x_A): reads the input of an earlier module A, adds to the output of B.

    He et al.'s parallel adapter at the FFN: the adapter reads the FFN input (A = ffn.in) and its
    result joins the FFN output (B = ffn.out), whatever the architecture calls its FFN.
    """

    name = "parallel_span"

    def apply(self, out, x, entry):
        source = entry.stash
        entry.stash = None  # an activation of this forward only, never kept across calls
        return _on_slice(out, entry.out_slice, lambda seg: seg + entry.delta(source).to(seg.dtype))


PARALLEL, SEQUENTIAL, MULTIPLY, MULTIPLY_INPUT, PARALLEL_SPAN = (
    Parallel(), Sequential(), Multiply(), MultiplyInput(), ParallelSpan(),
)


class PrefixKV(Combine):
    """Keys/values of a prefix table concatenated before the attention's own along the sequence."""

    name = "prefix_kv"
    where = "attention"


class PrependPrompt(Combine):
    """Soft tokens concatenated before the input embeddings along the sequence."""

    name = "prepend_prompt"
    where = "embedding"


PREFIX_KV, PREPEND_PROMPT = PrefixKV(), PrependPrompt()
