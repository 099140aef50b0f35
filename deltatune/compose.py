"""Composing adapters that are loaded into one model: stack, weighted average, fold into the base.

    import deltatune as dt
    dt.load_adapter(model, "runs/a/best", adapter="a"); dt.load_adapter(model, "runs/b/best", adapter="b")
    dt.compose.stack(model, ["a", "b"], adapter="ab")            # one adapter: a's and b's deltas together
    report = dt.compose.average(model, ["a", "b"], [0.7, 0.3], adapter="avg", rank=8)   # LoRA: SVD to rank 8
    dt.save_adapter(model, "out/avg", adapter="avg")             # saved and loaded like any adapter
    dt.compose.fold_into_base(model, "a")                        # zero-overhead single-task model
    dt.compose.save_folded(model, "out/a-merged", tokenizer)     # a plain transformers model folder

What is composed are the adapters' deltas. A task head (the classification layer of a Classifier)
is one module of the model, not part of any adapter in the model; servers keep one head per
adapter (see deltatune.serve), and composed adapters leave the model's head as it is.

* ``stack``: the new adapter runs the parts' deltas together, as if all parts were active at once
  (``dt.set_active(model, "a", "b")``), but as one adapter: it can be routed per row, merged, saved.
  It is the registered method ``stack``, whose ``parts`` option lists each part's method and options.
* ``average``: a weighted average of adapters of one method, computed by the method
  (``Method.average``). By default parameter by parameter (same options, same shapes): exact for
  deltas linear in their parameters at a fixed input ((IA)^3 scales, BitFit-like offsets), a
  parameter-space interpolation otherwise (bottleneck adapters, prefixes, prompts). LoRA averages
  where it acts, on the weight updates dW_i = (alpha_i / r_i) B_i A_i, re-factorised by SVD to the
  chosen rank (default: the sum of the ranks, which is exact), and reports the relative Frobenius
  error of each site and of the whole.
* ``fold_into_base``: the adapter's deltas are added to the base weights and the adapter is removed
  without the copies ``dt.merge`` keeps for an exact unmerge: the model is a plain transformers model
  again, with no hook and no extra memory. Only for adapters whose every delta merges (LoRA, (IA)^3).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from . import registry
from . import store as core
from .deltas import folded_state
from .errors import ConfigError
from .registry import Composite, option, register


# ------------------------------------------------------------------------------------------- stack


def _all_combines() -> tuple:
    seen = []
    for cls in registry.REGISTRY.values():
        for c in getattr(cls, "combines", ()):
            if c not in seen:
                seen.append(c)
    return tuple(seen)


@register
class Stack(Composite):
    """Several adapters' deltas in one adapter: the parts run together, as if all were active.

    ``parts``: a list of ``{"method": NAME, "options": {...}}``, each a registered delta method
    (not a stack); part i's deltas are installed with the suffix ``~p<i>``. The default, one LoRA
    part, exists so that the method can be built without options; ``dt.compose.stack`` fills it.
    """

    name = "stack"
    paper = "deltatune composition (AdapterHub's Stack, with every part additive at its own site)"
    summary = "several adapters' deltas run together as one adapter (dt.compose.stack)"
    lr = 5e-4
    combines = _all_combines()
    honours_layers = False

    parts: list = option([{"method": "lora", "options": {}}])

    def __post_init__(self):
        self.part_configs()  # the parts are checked when the config is built, before any model is touched

    def part_configs(self) -> dict:
        if not self.parts:
            raise ConfigError("stack: option 'parts' is empty; give at least one {'method': NAME, 'options': {...}}")
        out = {}
        for i, part in enumerate(self.parts):
            if not isinstance(part, dict) or set(part) - {"method", "options"} or not isinstance(part.get("method"), str) \
                    or not isinstance(part.get("options", {}), dict):
                raise ConfigError(f"stack: option 'parts': part {i} must be {{'method': NAME, 'options': {{...}}}}, "
                                  f"got {part!r}")
            method = part["method"]
            if method == self.name:
                raise ConfigError("stack: option 'parts': a part cannot itself be a stack; list the inner stack's parts instead")
            cls = registry.REGISTRY.get(method)
            if cls is not None and cls.kind != "delta":
                raise ConfigError(f"stack: option 'parts': part {i} ({method}) trains base weights in place; only delta "
                                  "methods stack")
            out[f"p{i}"] = registry.build_method(method, part.get("options", {}))
        return out

    def folded_options(self) -> dict:
        return {"parts": [{"method": cfg.name, "options": cfg.folded_options()} for cfg in self.part_configs().values()]}

    @classmethod
    def paths_named(cls, options: dict) -> list[str]:
        parts = options.get("parts")
        return [f"parts[{i}].options.{k}" for i, part in enumerate(parts if isinstance(parts, list) else [])
                if isinstance(part, dict) and isinstance(part.get("options"), dict)
                and part.get("method") in registry.REGISTRY
                for k in registry.REGISTRY[part["method"]].paths_named(part["options"])]


def _check_names(store, names, what: str) -> list:
    if isinstance(names, str) or not names:
        raise ConfigError(f"{what} needs a list of adapter names, got {names!r}")
    for n in names:
        core.record(store, n)
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}: adapter names repeat in {names}")
    return list(names)


def _new_name(store, adapter: str) -> str:
    core.check_adapter_name(adapter)
    if adapter in store.records:
        raise ConfigError(f"adapter '{adapter}' is already attached; detach it first or pick another name")
    return adapter


def _deltas(store, name: str) -> dict:
    """{module key: delta module} of one adapter, without the training-only shared modules (their
    part is folded into each delta's state)."""
    return {key: delta for key, delta in store.adapters[name].items() if not key.startswith("shared~")}


def _delta_state(model, name: str) -> tuple[dict, dict]:
    """(options after folding, {module key: folded state}) of one adapter."""
    store = core.require_store(model)
    states = {key: folded_state(delta) for key, delta in _deltas(store, name).items()}
    return store.records[name].method.folded_options(), states


@torch.no_grad()
def _fill(model, adapter: str, states: dict) -> None:
    """Copy ``{module key: state}`` into the new adapter's modules; every module must be covered."""
    modules = core.require_store(model).adapters[adapter]
    keys = {k for k in modules if not k.startswith("shared~")}
    if set(states) != keys:
        missing, extra = sorted(keys - set(states)), sorted(set(states) - keys)
        raise ConfigError(f"the composed adapter does not fit its parts (missing {missing[:3]}, extra {extra[:3]})")
    for key, state in states.items():
        live = modules[key].state_dict()
        for pname, t in state.items():
            if pname not in live or live[pname].shape != t.shape:
                raise ConfigError(f"the composed adapter's {key}.{pname} does not fit its part's tensor {tuple(t.shape)}")
            live[pname].copy_(t.to(live[pname].dtype))


def _attach_filled(model, method: str, options: dict, adapter: str, states: dict) -> None:
    """Attach ``adapter`` and fill it, all or nothing; the previous active set is kept."""
    store = core.require_store(model)
    active = sorted(store.active)
    core.attach(model, method, adapter=adapter, **options)
    try:
        _fill(model, adapter, states)
    except BaseException:
        core.detach(model, adapter)
        raise
    finally:
        if core.store_of(model) is not None:
            core.set_active(model, *[a for a in active if a in store.records])


def stack(model: nn.Module, names: list[str], adapter: str) -> nn.Module:
    """Attach ``adapter``: one adapter whose deltas are the deltas of ``names`` (copied), run together.

    Its outputs equal those of the model with all of ``names`` active; it can be routed per row,
    merged where its parts merge, and saved and loaded like any adapter. The active set is unchanged.
    """
    store = core.require_store(model)
    names = _check_names(store, names, "stack")
    _new_name(store, adapter)
    parts, states = [], {}
    for i, name in enumerate(names):
        rec = store.records[name]
        if rec.selected:
            raise ConfigError(f"stack: adapter '{name}' ({rec.method.name}) trains base weights in place; "
                              "only adapters whose deltas sit beside the base stack")
        options, part_states = _delta_state(model, name)
        if isinstance(rec.method, Stack):  # a stack of stacks is flattened
            inner = options["parts"]
            for key, state in part_states.items():
                head, _, tail = key.rpartition("~p")
                states[f"{head}~p{len(parts) + int(tail)}"] = state
            parts += inner
            continue
        parts.append({"method": rec.method.name, "options": options})
        states.update({f"{key}~p{len(parts) - 1}": state for key, state in part_states.items()})
    _attach_filled(model, Stack.name, {"parts": parts}, adapter, states)
    return model


# ----------------------------------------------------------------------------------------- average


def _weights(names: list[str], weights) -> list[float]:
    if weights is None:
        return [1.0 / len(names)] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"average: need one finite weight per adapter ({len(names)}), got {weights}")
    if abs(sum(weights)) < 1e-12:
        raise ConfigError(f"average: the weights {weights} sum to 0; a weighted average needs a non-zero sum")
    return weights


@torch.no_grad()
def average(model: nn.Module, names: list[str], weights=None, adapter: str = "average", rank: int | None = None,
            normalize: bool = True) -> dict:
    """Attach ``adapter``, the weighted average of the adapters ``names`` (all of one method).

    ``weights`` default to equal; with ``normalize`` they are divided by their sum (a task-arithmetic
    sum: ``normalize=False``). The method computes the average (``Method.average``); for methods that
    re-factorise it (LoRA: by SVD), ``rank`` (default: the sum of the ranks, exact) sets the rank.
    Returns a report: method, adapters, weights, rank, and the relative Frobenius error ``error``
    (over all sites) and ``site_errors`` (per site) of the re-factorisation (0 where there is none).
    """
    store = core.require_store(model)
    names = _check_names(store, names, "average")
    _new_name(store, adapter)
    weights = _weights(names, weights)
    if normalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    methods = {store.records[n].method.name for n in names}
    if len(methods) != 1:
        raise ConfigError(f"average needs adapters of one method, got {sorted(methods)}; stack adapters of "
                          "different methods instead (dt.compose.stack)")
    method = methods.pop()
    if store.records[names[0]].selected:
        raise ConfigError(f"average: {method} trains base weights in place, which one model cannot hold twice")
    cls = type(store.records[names[0]].method)
    adapters = {n: (store.records[n].method, _deltas(store, n)) for n in names}
    options, states, report = cls.average(adapters, weights, rank)
    _attach_filled(model, cls.name, options, adapter, states)
    return {"method": cls.name, "adapters": names, "weights": weights, **report}


# ------------------------------------------------------------------------------------ deployment


@torch.no_grad()
def fold_into_base(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Add ``adapter``'s deltas to the base weights for good and remove the adapter: the model is a
    plain transformers model again (no hooks, no copies for unmerge). Its outputs are what they
    were with the adapter active. Refused for adapters with a delta that cannot merge (prefixes,
    prompts, sequential adapters) and while other adapters are attached (their base would change).
    """
    store = core.require_store(model)
    if adapter is None:
        if len(store.records) != 1:
            raise ConfigError(f"fold_into_base: {len(store.records)} adapters are attached ({sorted(store.records)}); "
                              "pass adapter=NAME")
        adapter = next(iter(store.records))
    rec = core.record(store, adapter)
    others = sorted(set(store.records) - {adapter})
    if others:
        raise ConfigError(f"fold_into_base changes the base weights that adapters {others} were trained on; "
                          "detach them first (or fold on a model that holds this adapter alone)")
    stuck = [e.key for e in rec.entries if not e.combine.can_merge(e)]
    if stuck:
        raise ConfigError(f"fold_into_base: adapter '{adapter}' ({rec.method.name}) has deltas that cannot be folded "
                          f"into weights ({stuck[0]}, ...); deploy it with the adapter attached instead")
    core.merge(model, adapter)
    store.merged[:] = [e for e in store.merged if e.adapter != adapter]
    store.originals.clear()  # the copies for an exact unmerge: not wanted in a deployed model
    rec.snapshot.clear()  # keep the trained head and selected parameters as they are
    core.detach(model, adapter)
    return model


def save_folded(model: nn.Module, path, tokenizer=None) -> Path:
    """Save a model that ``fold_into_base`` made plain as a transformers folder (``load_backbone(path)``
    reads it); a task model's head (e.g. ``Classifier.head``) goes to ``head.safetensors`` beside it."""
    from safetensors.torch import save_file

    from . import sites

    if core.store_of(model) is not None:
        raise ConfigError("save_folded: the model still has adapters attached; call dt.compose.fold_into_base first")
    path = Path(path)
    name, backbone = sites.find_backbone(model)
    target = model if hasattr(model, "save_pretrained") else backbone
    target.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if target is not model:
        inside = {id(p) for p in backbone.parameters()}
        head = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if id(p) not in inside}
        if head:
            save_file(head, str(path / "head.safetensors"))
    return path
