"""The runtime store: attach / detach / merge / unmerge, the active set and per-row routing.

* all delta modules of all adapters sit in one container, ``model.deltatune`` (named adapters, so
  several can live in one model); the base model's own modules and state-dict keys never change;
* trainability is decided by structure: the base is frozen, the adapter's deltas, the task head
  (everything outside the backbone except output embeddings) and a selection method's parameters
  are trained;
* each installed delta is an ``Entry`` handed to the mechanism its combine names; the store loops
  over mechanisms and never branches on a kind of injection;
* ``merge`` folds deltas into the base weights and keeps a copy of every weight it changed, so
  ``unmerge`` and ``detach`` restore the base bitwise (memory: one extra copy of each merged
  weight, e.g. 2 x 12 x 768^2 floats = 57 MB for LoRA on q and v of BERT-base).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import sites as S
from .combine import Combine
from .errors import ConfigError
from .mechanisms import ROUTING, FrozenBelow, Hooks, Mechanism, PassClock, Routing
from .registry import Method, build_method


@dataclass
class Entry:
    """One installed delta: the runtime record of a Placement."""

    adapter: str
    key: str
    delta: nn.Module
    combine: Combine
    target_module: nn.Module
    source_module: nn.Module | None
    out_slice: tuple | None
    layer: int | None = None  # block index of the site (None: outside the blocks)
    merged: bool = False
    live: bool = True  # runs in a forward pass outside dt.routing (active and not merged)
    stash: object = None  # the source module's input, during one forward pass only


@dataclass
class AdapterRecord:
    """What the store knows about one attached adapter (its modules are in ``store.adapters[name]``)."""

    name: str
    method: Method
    entries: list = field(default_factory=list)
    selected: list = field(default_factory=list)  # base parameter names trained by a selection method
    head: list = field(default_factory=list)  # head parameter names
    snapshot: dict = field(default_factory=dict)  # original values of selected and head parameters (detach)
    fingerprint: str = ""
    dtype: str = ""  # the backbone's dtype when the adapter was attached
    lowest: int = 0  # blocks below this one hold nothing this adapter trains (see FrozenBelow)


class DeltaStore(nn.Module):
    """``model.deltatune``: the modules of every attached adapter, plus the bookkeeping."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        for name, value in (
            ("records", {}),  # adapter name -> AdapterRecord (plain python, not in the state dict)
            ("mechanisms", {}),  # mechanism class -> its one instance
            ("active", set()),
            ("requires_grad", {}),  # original requires_grad of the base parameters
            ("originals", {}),  # id(module) -> (module, {parameter name: copy before the first merge})
            ("merged", []),  # merged entries, in merge order
            ("frozen", None),  # FrozenBelow, for single-stack backbones
            ("clock", None),  # PassClock, once a delta is shared across layers
            ("frozen_dropout", False),  # True: the frozen lower part keeps training-mode dropout
        ):
            object.__setattr__(self, name, value)

    def routed(self) -> Routing | None:
        return ROUTING.get().get(id(self))


def store_of(model: nn.Module) -> DeltaStore | None:
    store = getattr(model, "deltatune", None)
    return store if isinstance(store, DeltaStore) else None


def require_store(model) -> DeltaStore:
    store = store_of(model)
    if store is None:
        raise ConfigError("this model has no deltatune adapter; call dt.attach(model, method) first")
    return store


def record(store: DeltaStore, name: str) -> AdapterRecord:
    """The record of adapter ``name``, or the one error that says which adapters there are."""
    if name not in store.records:
        raise ConfigError(f"no adapter named {name!r}; attached adapters: {sorted(store.records)}")
    return store.records[name]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters outside the backbone, except output embeddings and weights tied to the backbone."""
    inside = {id(p) for _, p in S.backbone_parameters(model)}
    out_emb = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out_emb = get()
        except (NotImplementedError, AttributeError):
            out_emb = None
    excluded = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    names = []
    for name, p in model.named_parameters():
        if name.startswith("deltatune.") or id(p) in inside or id(p) in excluded:
            continue
        names.append(name)
    return names


def hash_tensors(digest, named: dict, prefix: str = "") -> None:
    """Feed ``digest`` every tensor of ``named`` (name -> tensor) in name order: the prefixed name, the
    shape, the dtype and all of its bytes (the exact-content keys of the caches: representations,
    recycled states, zero-shot scores)."""
    for name, tensor in sorted(named.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{prefix}{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _param(model, name) -> nn.Parameter:
    return model.get_parameter(name)


def _key(target: S.Target, suffix: str) -> str:
    key = target.name.replace(".", ":")
    if target.out_slice is not None:
        key += "~" + target.site.split(".")[-1]
    return key + suffix


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def check_adapter_name(name) -> str:
    """Adapter names are plain words: they key modules and tensors, and come from files, so never a path."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ConfigError(f"adapter name must be 1 to 64 letters, digits, '_' or '-' (no '.', '/' or spaces), "
                          f"got {name!r}")
    return name


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"dt.attach needs a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ConfigError("dt.attach got a torch.compile'd model; attach to the original model first, then "
                          "compile: dt.attach(model, ...); model = torch.compile(model)")
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ConfigError(f"the model's weights are on the meta device (e.g. {meta}): load real weights first "
                          "(from_pretrained without device_map='meta', or model.to_empty() and load a state dict)")


def attach(model: nn.Module, method: str, adapter: str = "default", **options) -> nn.Module:
    """Freeze the base model and add a trainable ``method`` delta named ``adapter``; returns ``model``.

    The new adapter becomes the active one. All or nothing: on any error the model is as it was.
    """
    _check_model(model)
    config = build_method(method, options)
    check_adapter_name(adapter)
    family = S.family_of(model)
    if config.families and family not in config.families:
        raise ConfigError(
            f"method '{method}' does not support {family} models; it supports: {', '.join(config.families)}"
        )
    store = store_of(model)
    if store is not None and adapter in store.records:
        raise ConfigError(f"adapter '{adapter}' is already attached; detach it first or pick another name")
    config.check(model)
    placements = config.placements(model)  # may raise before anything is changed
    selected = config.selected(model)
    if not placements and not selected:
        raise ConfigError(f"method '{method}' placed no delta and selected no parameter; check its sites/layers options")
    if store is not None and selected and any(set(r.selected) & set(selected) for r in store.records.values()):
        raise ConfigError(
            f"method '{method}' trains base parameters that another attached adapter already trains; "
            "detach that adapter first"
        )
    fresh = store is None
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    active = set(store.active) if store is not None else set()
    try:
        return _attach(model, config, adapter, placements, selected)
    except BaseException:
        _rollback(model, adapter, fresh, flags, active)
        raise


def _rollback(model, adapter: str, fresh: bool, flags: dict, active: set) -> None:
    store = store_of(model)
    if store is None:
        return
    if adapter in store.records or adapter in store.adapters:
        store.records.setdefault(adapter, AdapterRecord(adapter, None))
        _drop(model, store, adapter)
    if fresh or not store.records:
        _teardown(model, store)
    else:
        set_active(model, *sorted(active & set(store.records)))
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _attach(model, config: Method, adapter: str, placements: list, selected: list[str]) -> nn.Module:
    store = store_of(model)
    if store is None:
        store = DeltaStore()
        store.requires_grad.update({n: p.requires_grad for n, p in model.named_parameters()})
        model.add_module("deltatune", store)
    _, backbone = S.find_backbone(model)
    device, dtype = _device_dtype(backbone)
    rec = AdapterRecord(adapter, config, selected=selected, head=head_parameter_names(model))
    rec.fingerprint = S.base_digest(model, set(selected))
    rec.dtype = str(dtype).replace("torch.", "")
    modules = nn.ModuleDict()
    store.records[adapter] = rec
    store.adapters[adapter] = modules
    for pl in placements:
        key = _key(pl.target, pl.suffix)
        if key in modules:
            raise ConfigError(f"{config.name}: two deltas at {pl.target.name}; give them distinct suffixes")
        for name, shared in getattr(pl.delta, "shared", {}).items():  # e.g. the prefix MLP of all layers
            skey = f"shared~{name}"
            if store.clock is None:
                object.__setattr__(store, "clock", PassClock(backbone, lambda: _begin_pass(store)))
            if skey not in modules:
                modules[skey] = shared.to(device=device, dtype=dtype)
            elif modules[skey] is not shared:
                raise ConfigError(f"{config.name}: two different shared modules named '{name}'")
        pl.delta.to(device=device, dtype=dtype)
        modules[key] = pl.delta
        layers = [t.layer for t in (pl.target, pl.source) if t is not None]
        entry = Entry(adapter, key, pl.delta, pl.combine, pl.target.module,
                      pl.source.module if pl.source else None, pl.target.out_slice,
                      None if None in layers else min(layers))
        rec.entries.append(entry)
        mech = _mechanism(store, pl.combine.mechanism, backbone)
        mech.add(entry)
        if entry.source_module is not None and not isinstance(mech, Hooks):
            _mechanism(store, Hooks, backbone).add(entry)  # the hooks hand the source's input to the delta
    if store.frozen is None and not getattr(backbone.config, "is_encoder_decoder", False):
        blocks = [(t.layer, t.module) for t in S.resolve(model, "block")]
        object.__setattr__(store, "frozen", FrozenBelow(backbone, blocks))
    if store.frozen is not None:
        rec.lowest = _lowest_block(store.frozen, rec.entries, [_param(model, n) for n in selected])
    for name in selected + rec.head:  # detach puts these back
        rec.snapshot[name] = _param(model, name).detach().clone()
    modules.train(model.training)  # new deltas follow the model's mode (dropout off on an eval model)
    set_active(model, adapter)
    return model


def _mechanism(store: DeltaStore, kind: type[Mechanism], backbone) -> Mechanism:
    """The store's one instance of mechanism class ``kind`` (what a combine names), made on first use."""
    mech = store.mechanisms.get(kind)
    if mech is None:
        if not (isinstance(kind, type) and issubclass(kind, Mechanism)):
            raise ConfigError(f"a combine names {kind!r} as its mechanism; it must name a Mechanism class "
                              "(deltatune.mechanisms: Hooks, PrefixAttention, PromptTokens)")
        mech = store.mechanisms[kind] = kind.create(store, backbone)
    return mech


def _begin_pass(store: DeltaStore) -> None:
    """At the start of a forward pass: let the running adapters' shared modules compute their output."""
    routing = store.routed()
    for name in (routing.adapters if routing is not None else store.active):
        for key, module in store.adapters[name].items():
            if key.startswith("shared~") and hasattr(module, "begin_pass"):
                module.begin_pass()


def _device_dtype(module):
    p = next(module.parameters())
    return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)


def set_active(model: nn.Module, *adapters: str) -> None:
    """Make exactly these adapters active (their deltas run and train); others stay loaded but idle.

    An adapter that becomes idle while merged is unmerged first, so idle adapters never change the
    outputs. Only the active adapters' deltas (and selected parameters) and the head require grad.
    """
    store = require_store(model)
    for a in adapters:
        record(store, a)
    idle = {e.adapter for e in store.merged} - set(adapters)
    if idle:
        _unmerge(store, idle)
    store.active.clear()
    store.active.update(adapters)
    _refresh(store)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapters:
        rec = store.records[name]
        for pname in rec.selected + rec.head:
            _param(model, pname).requires_grad_(True)
        for p in store.adapters[name].parameters():
            p.requires_grad_(True)


@contextlib.contextmanager
def use(model: nn.Module, *adapters: str):
    """``with dt.use(model, "search"):`` these adapters are the active set inside the block; the
    previous active set (and its merged state) is restored on exit."""
    store = require_store(model)
    before = sorted(store.active)
    set_active(model, *adapters)
    try:
        yield model
    finally:
        if store_of(model) is store:
            set_active(model, *[a for a in before if a in store.records])


@contextlib.contextmanager
def routing(model: nn.Module, names):
    """``with dt.routing(model, ["search", "bugs", None]):`` row i of every batch in the block runs
    with adapter names[i] (None: the bare base model), whatever the active set is. Thread- and
    task-local (a context variable), so concurrent requests cannot change each other's routing.
    A batch whose rows all name one adapter costs what that adapter active costs."""
    store = require_store(model)
    names = list(names)
    if not names:
        raise ConfigError("dt.routing needs one adapter name (or None) per row; got an empty list")
    for n in set(names) - {None}:
        rec = record(store, n)
        if rec.selected:
            raise ConfigError(f"adapter '{n}' ({rec.method.name}) trains base weights in place ({rec.selected[0]}, ...), "
                              "which every row shares; only adapters whose deltas sit beside the base can be routed "
                              "per row (for houlsby: train_ln=False)")
    if store.merged:
        merged = sorted({e.adapter for e in store.merged})
        raise ConfigError(f"adapters {merged} are merged into the base weights, so they would run on every row; "
                          "call dt.unmerge(model) before routing rows to adapters")
    token = ROUTING.set({**ROUTING.get(), id(store): Routing(names)})
    try:
        yield model
    finally:
        ROUTING.reset(token)


def set_frozen_dropout(model: nn.Module, keep: bool) -> None:
    """A training setting: True keeps dropout on in the frozen blocks below the lowest trained one
    (plain Hugging Face behaviour); False (default) runs them in eval mode, a fixed feature extractor."""
    store = require_store(model)
    object.__setattr__(store, "frozen_dropout", bool(keep))
    _refresh(store)


def _lowest_block(frozen: FrozenBelow, entries: list, params: list) -> int:
    """The lowest block an adapter trains; 0 when it trains anything at or below the first block."""
    layers = [e.layer for e in entries]
    for p in params:
        if id(p) in frozen.input_params:
            return 0
        layers.append(frozen.layer_of_param.get(id(p), len(frozen.blocks)))  # others sit above the blocks
    if not layers or None in layers:
        return 0
    return min(layers)


def _refresh(store: DeltaStore) -> None:
    for rec in store.records.values():
        for e in rec.entries:
            e.live = e.adapter in store.active and not e.merged
    if store.frozen is not None:
        lowest = 0 if store.frozen_dropout else min((store.records[a].lowest for a in store.active), default=0)
        store.frozen.set(lowest)
    for mech in store.mechanisms.values():
        mech.refresh()


def active_adapters(model) -> list[str]:
    return sorted(require_store(model).active)


def adapters(model) -> list[str]:
    store = store_of(model)
    return sorted(store.records) if store else []


def _chosen(store, adapter) -> list[AdapterRecord]:
    if adapter is None:
        return [store.records[a] for a in sorted(store.active)]
    return [record(store, adapter)]


@torch.no_grad()
def merge(model: nn.Module, adapter: str | None = None) -> list[str]:
    """Fold every mergeable delta of the active adapters (or ``adapter``) into the base weights.

    Deltas without a fold (sequential adapters, prefixes, prompts) keep running unmerged, so the
    model's outputs are unchanged. Each weight is copied before its first merge (see the module
    docstring); a fold that would write a non-finite value is refused and leaves the weights as
    they were. Returns the keys that were merged.
    """
    store = require_store(model)
    done = []
    for rec in _chosen(store, adapter):
        for e in rec.entries:
            if e.merged or not e.combine.can_merge(e):
                continue
            module = e.target_module
            if id(module) not in store.originals:
                store.originals[id(module)] = (module, {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)})
            e.combine.merge(module, e)
            e.merged = True
            store.merged.append(e)
            done.append(e)
            if not all(torch.isfinite(p).all() for p in module.parameters(recurse=False)):
                _unmerge(store, {e.adapter})
                raise ConfigError(f"merging adapter '{e.adapter}' into {e.key} gives non-finite weights "
                                  "(its delta holds inf/NaN or overflows the weight dtype); the base is unchanged")
    _refresh(store)
    return [e.key for e in done]


@torch.no_grad()
def unmerge(model: nn.Module, adapter: str | None = None) -> list[str]:
    """Undo ``merge``: the weights it changed are copied back (exact), the deltas run again."""
    store = require_store(model)
    names = {r.name for r in _chosen(store, adapter)}
    undone = _unmerge(store, names)
    _refresh(store)
    return undone


def _unmerge(store: DeltaStore, names: set[str]) -> list[str]:
    undo = [e for e in store.merged if e.adapter in names]
    modules = {id(e.target_module) for e in undo}
    for e in undo:
        e.merged = False
    store.merged[:] = [e for e in store.merged if not (e.adapter in names)]
    for mid in modules:
        module, original = store.originals[mid]
        for n, p in module.named_parameters(recurse=False):
            if n in original:
                p.copy_(original[n])
        rest = [e for e in store.merged if id(e.target_module) == mid]
        for e in rest:  # other adapters stay merged: fold them again, in their order
            e.combine.merge(module, e)
        if not rest:
            del store.originals[mid]
    return [e.key for e in undo]


def merged_bytes(model: nn.Module) -> int:
    """Memory held by the copies that make unmerge exact (see the module docstring)."""
    store = require_store(model)
    return sum(t.numel() * t.element_size() for _, orig in store.originals.values() for t in orig.values())


@torch.no_grad()
def detach(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Remove one adapter (or all): the base model's modules, state-dict keys and outputs come back.

    Merged weights are copied back and selection methods' parameters restored to their values at
    attach time, so the base weights are bitwise the original ones.
    """
    store = require_store(model)
    names = list(store.records) if adapter is None else [record(store, adapter).name]
    for name in names:
        _drop(model, store, name)
    _refresh(store)
    if not store.records:
        _teardown(model, store)
    return model


def _drop(model, store: DeltaStore, name: str) -> None:
    _unmerge(store, {name})
    rec = store.records.pop(name)
    for pname, value in rec.snapshot.items():
        _param(model, pname).copy_(value)
    if name in store.adapters:
        del store.adapters[name]
    store.active.discard(name)
    for mech in store.mechanisms.values():
        mech.drop(name)


def _teardown(model, store: DeltaStore) -> None:
    """The last adapter is gone: every hook off, the container removed, requires_grad restored."""
    for mech in store.mechanisms.values():
        mech.remove()
    store.mechanisms.clear()
    for part in (store.frozen, store.clock):
        if part is not None:
            part.remove()
    requires = store.requires_grad
    if store_of(model) is store:
        del model.deltatune
    for n, p in model.named_parameters():
        p.requires_grad_(requires.get(n, p.requires_grad))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; total includes the deltas. A quantized layer's weight counts as
    the float weight it holds (its packed storage has fewer, wider elements: nf4 packs two weights a byte)."""
    trainable = total = 0
    seen = set()
    for module in model.modules():
        q = S.quantized(module)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel() if q is None or name != "weight" else int(torch.Size(q["shape"]).numel())
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total


def fold(model: nn.Module) -> None:
    """Drop training-only reparameterisations (the prefix MLP), keeping what they compute."""
    store = require_store(model)
    for name, rec in store.records.items():
        for e in rec.entries:
            if hasattr(e.delta, "fold"):
                e.delta.fold()
        for key in [k for k, m in store.adapters[name].items()  # training-only shared parts (they fold away)
                    if k.startswith("shared~") and hasattr(m, "folded_state")]:
            del store.adapters[name][key]
        rec.method = build_method(rec.method.name, rec.method.folded_options())
    set_active(model, *store.active)
