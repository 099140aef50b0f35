"""The update seam: what a method or a training mode does to a training step besides the forward pass.

An ``UpdateRule`` is a small object the loop calls at four points of every optimizer step::

    rule.before_step(step)        # before the forward passes (resample a mask, probe a gradient)
    loss = rule.backward(...)     # only when rule.computes_grads: the rule fills .grad itself (DP-SGD)
    rule.after_backward(step)     # transform the gradients in place (mask, accumulate a score)
    optimizer.step()
    rule.after_step(step)         # after the update (re-apply a mask, drop a probe)

and it keeps its state (masks, accumulators, flags) as a flat dict of tensors in
``state_dict()``/``load_state_dict()``, which the checkpoint saves beside the optimizer's, so a
resumed run continues bitwise. Steps count from 1, as in the loop. ``bind(max_steps)`` tells a
rule the length of the run once, before the first step (DPS's stages are a share of it).

A method returns its rule from ``Method.update_rule(model, params)``; a training mode (private
training, ``privacy.py``) adds its own; ``Chain`` composes them: hooks run in order, state keys
are prefixed by each part's ``name``, and at most one part may compute the gradients. A run
without any rule calls none of this (``build`` returns None).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


class UpdateRule:
    """Base: every hook does nothing. Subclasses override what they need."""

    name = "rule"
    computes_grads = False  # True: backward() replaces the loop's loss.backward() (per-example gradients)
    replaces_clipping = False  # True: the loop's max_grad_norm clipping is not applied (DP clips per example)
    private = False  # True: a differentially private mode; rules that read raw gradients must refuse it
    # Why this rule cannot run under private training, or across several processes ('': it can).
    # The engine asks the rule (privacy in ``build``, data-parallel training in training.distributed)
    # instead of knowing which methods' rules are which.
    refuses_private = ""
    refuses_processes = ""

    def bind(self, max_steps: int) -> None:
        """Called once before the first step with the run's length."""

    def before_step(self, step: int) -> None:
        pass

    def backward(self, model: nn.Module, objective, examples: list, order, step: int) -> torch.Tensor:
        """Fill ``.grad`` of the trainable parameters for this step; returns the step's mean loss."""
        raise NotImplementedError

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"update rule '{self.name}' keeps no state, got {sorted(state)[:3]}")

    def metrics(self) -> dict:
        """Numbers for the run's summary (e.g. the privacy budget spent)."""
        return {}


class Chain(UpdateRule):
    """Several rules as one: a method's rule plus a training mode's rule (e.g. DPS under DP-SGD)."""

    name = "chain"

    def __init__(self, rules: list[UpdateRule]):
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ConfigError(f"two update rules share a name: {names}")
        makers = [r for r in rules if r.computes_grads]
        if len(makers) > 1:
            raise ConfigError(f"update rules {[r.name for r in makers]} both compute the gradients; only one may")
        self.rules = rules
        self.maker = makers[0] if makers else None
        self.computes_grads = self.maker is not None
        self.replaces_clipping = any(r.replaces_clipping for r in rules)
        self.private = any(r.private for r in rules)

    def bind(self, max_steps):
        for r in self.rules:
            r.bind(max_steps)

    def before_step(self, step):
        for r in self.rules:
            r.before_step(step)

    def backward(self, model, objective, examples, order, step):
        return self.maker.backward(model, objective, examples, order, step)

    def after_backward(self, step):
        for r in self.rules:
            r.after_backward(step)

    def after_step(self, step):
        for r in self.rules:
            r.after_step(step)

    def state_dict(self):
        return {f"{r.name}/{k}": v for r in self.rules for k, v in r.state_dict().items()}

    def load_state_dict(self, state):
        parts = {r.name: {} for r in self.rules}
        for key, value in state.items():
            part, _, rest = key.partition("/")
            if part not in parts or not rest:
                raise ValueError(f"update-rule state '{key}' belongs to no rule of this run ({sorted(parts)})")
            parts[part][rest] = value
        for r in self.rules:
            r.load_state_dict(parts[r.name])

    def metrics(self):
        out = {}
        for r in self.rules:
            out.update(r.metrics())
        return out


def build(model: nn.Module, params: dict, *, max_steps: int, private: UpdateRule | None = None) -> Chain | None:
    """The rule of a training run: the active adapters' methods' rules plus ``private`` (or None).

    ``params``: the trainable parameters by name, in the optimizer's order."""
    from .store import require_store

    store = require_store(model)
    rules = []
    for name in sorted(store.active):
        rule = store.records[name].method.update_rule(model, params)
        if rule is not None:
            rules.append(rule)
    if private is not None:
        refusing = [r for r in rules if r.refuses_private]
        if refusing:
            raise ConfigError(refusing[0].refuses_private)
        rules.append(private)
    if not rules:
        return None
    chain = Chain(rules)
    chain.bind(max_steps)
    return chain


def lr_ratios(model: nn.Module, ratio: float) -> dict[int, float]:
    """LoRA+ (Hayou et al. 2024, §3): {id(parameter): ratio} for the parameters the active adapters' methods
    name as their faster ones (``Method.faster_parameters``: LoRA's B); {} when ``ratio`` is 1. A ConfigError
    when an active adapter's method has none, since the setting would then change nothing."""
    if ratio == 1.0:
        return {}
    from .registry import REGISTRY, Method
    from .store import require_store

    store = require_store(model)
    out = {}
    for name in sorted(store.active):
        method = store.records[name].method
        params = method.faster_parameters(dict(store.adapters[name].items()))
        if not params:
            takers = ", ".join(n for n, c in sorted(REGISTRY.items()) if c.faster_parameters is not Method.faster_parameters)
            raise ConfigError(f"lora_plus_ratio={ratio:g}: method '{method.name}' has no factor that LoRA+ trains "
                              f"faster (methods that have one: {takers}); leave lora_plus_ratio at 1")
        out.update({id(p): float(ratio) for p in params})
    return out


def load_tensor(state: dict, key: str, like: torch.Tensor, rule: str) -> torch.Tensor:
    """``state[key]`` checked against the shape and dtype of ``like`` (a rule's own tensor); ValueError if not."""
    if key not in state:
        raise ValueError(f"update rule '{rule}': the checkpoint has no '{key}'")
    value = state[key]
    if value.shape != like.shape or value.dtype != like.dtype:
        raise ValueError(f"update rule '{rule}': '{key}' is {value.dtype} {list(value.shape)}, "
                         f"this run's is {like.dtype} {list(like.shape)}")
    return value.to(like.device)
