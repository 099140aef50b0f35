"""The core: methods as registered configs, and attach / detach / merge / unmerge for all of them.

A method (one small file in ``deltatune/methods``) is a dataclass whose fields are its options.
It says *where* (sites), *what* (a delta module per site) and *how* (a combine), or, for selection
methods, which base parameters to train. Everything else is generic and lives here:

* all delta modules of all adapters sit in one container, ``model.deltatune`` (named adapters, so
  several can live in one model); the base model's own modules and state-dict keys never change;
* trainability is decided by structure: the base is frozen, the adapter's deltas, the task head
  (everything outside the backbone except output embeddings) and a selection method's parameters
  are trained;
* merge/unmerge ask each combine for its inverse.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from . import sites as S
from .combine import Combine
from .errors import ConfigError
from .mechanisms import FrozenBelow, ModuleHooks, PassClock, PromptHooks, install_prefix_attention, uninstall_prefix_attention

REGISTRY: dict[str, type["Method"]] = {}


def register(cls):
    """Class decorator: make a Method available by its ``name`` to the API, the CLI and the tests."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = dataclass(cls)
    return REGISTRY[cls.name]


def option(default, *, min=None, max=None, choices=None, help=""):
    """A method option with its validation rule (checked when the config is built)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(min=min, max=max, choices=choices, help=help))
    return field(default=default, metadata=dict(min=min, max=max, choices=choices, help=help))


@dataclass
class Placement:
    """One delta at one target: what a method asks the core to install."""

    target: S.Target
    delta: nn.Module
    combine: Combine
    source: S.Target | None = None  # for span combines: the module whose input the delta reads
    suffix: str = ""


@dataclass
class Method:
    """Base of every method config. Subclasses are dataclasses; their fields are the options."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lr: ClassVar[float] = 1e-3  # a sensible default learning rate (paper's where known)
    identity_at_init: ClassVar[bool] = True  # the model computes exactly the base function at init
    families: ClassVar[tuple[str, ...]] = ()  # empty: every family
    kind: ClassVar[str] = "delta"  # 'delta' (adds modules) or 'selection' (trains base parameters)

    layers: list | None = option(None, help="only these block indices (default: all)")
    frozen_dropout: bool = option(False, help="keep dropout on in the frozen blocks below the lowest trained "
                                  "one (default: they run in eval mode, a fixed feature extractor)")

    # -- what a method defines
    def placements(self, model: nn.Module) -> list[Placement]:
        return []

    def selected(self, model: nn.Module) -> list[str]:
        """Names of base parameters this method trains (selection methods)."""
        return []

    def check(self, model: nn.Module) -> None:
        """Extra validation against the model; raise ConfigError."""

    # -- helpers for methods
    def targets(self, model, sites) -> list[S.Target]:
        out = []
        for site in sites:
            out.extend(S.resolve(model, site, self.layers))
        return out

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def folded_options(self) -> dict:
        """Options that rebuild the adapter after training-only parts are folded away."""
        return self.options()


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list}


def _check_value(method: str, key: str, value, f) -> object:
    """Validate one option against its annotation and metadata; returns the normalised value."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None) or str(f.type)
    names = [t.strip() for t in text.split("|")]
    if value is None:
        if "None" in names:
            return None
        raise ConfigError(f"{method}: option '{key}' cannot be None")
    want = _TYPES.get(next(t for t in names if t != "None"), object)
    if want is list and isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if want is list and isinstance(value, tuple):
        value = list(value)
    if want is list and isinstance(value, int) and not isinstance(value, bool):
        value = [value]  # layers=3 means [3]
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) if want is float
        else isinstance(value, int) and not isinstance(value, bool) if want is int
        else isinstance(value, want)
    )
    if not ok:
        raise ConfigError(f"{method}: option '{key}' must be {text}, got {type(value).__name__} {value!r}")
    if want is float and value != value:
        raise ConfigError(f"{method}: option '{key}' must be a number, got NaN")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{method}: option '{key}' must be one of {meta['choices']}, got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{method}: option '{key}' must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{method}: option '{key}' must be <= {meta['max']}, got {value!r}")
    if key.endswith("sites") and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{method}: option '{key}' must be a list of site names, got {value!r}")
    if key == "layers" and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ConfigError(f"{method}: option 'layers' must be a list of block indices >= 0, got {value!r}")
    return value


def build_method(name: str, options: dict) -> Method:
    """Validate ``options`` for method ``name`` (types, ranges, choices) and return its config."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}'; registered methods: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in cls().options().items())
        raise ConfigError(f"method '{name}' has no option {', '.join(map(repr, unknown))}; valid options: {valid}")
    options = {key: _check_value(name, key, value, fields[key]) for key, value in options.items()}
    return cls(**options)


def method_info(name: str) -> dict:
    """Name, paper, summary, default options and learning rate of a registered method."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}'; registered methods: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    defaults = cls()
    return {
        "name": name,
        "paper": cls.paper,
        "summary": cls.summary or (cls.__doc__ or "").strip().splitlines()[0],
        "options": defaults.options(),
        "lr": cls.lr,
        "kind": cls.kind,
        "identity_at_init": cls.identity_at_init,
        "families": list(cls.families) or sorted(S.SITE_MAP),
        "mergeable": getattr(cls, "mergeable", cls.kind == "selection"),
    }


# ---------------------------------------------------------------------------- state


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
    live: bool = True
    stash: object = None


@dataclass
class Adapter:
    name: str
    method: Method
    entries: list = field(default_factory=list)
    selected: list = field(default_factory=list)  # base parameter names trained by a selection method
    head: list = field(default_factory=list)  # head parameter names
    snapshot: dict = field(default_factory=dict)  # original values of selected parameters (for detach)
    fingerprint: str = ""
    lowest: int = 0  # blocks below this one hold nothing this adapter trains (see FrozenBelow)


class DeltaStore(nn.Module):
    """``model.deltatune``: the modules of every attached adapter, plus the bookkeeping."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "info", {})  # name -> Adapter (plain python, not in state_dict)
        object.__setattr__(self, "hooks", {})  # id(module) -> ModuleHooks
        object.__setattr__(self, "prompt_hooks", None)
        object.__setattr__(self, "active", set())
        object.__setattr__(self, "requires_grad", {})  # original requires_grad of base params
        object.__setattr__(self, "prefix_modules", [])
        object.__setattr__(self, "frozen", None)  # FrozenBelow, for single-stack backbones
        object.__setattr__(self, "clock", None)  # PassClock, once a delta is shared across layers


def store_of(model: nn.Module) -> DeltaStore | None:
    store = getattr(model, "deltatune", None)
    return store if isinstance(store, DeltaStore) else None


def _require_store(model) -> DeltaStore:
    store = store_of(model)
    if store is None:
        raise ConfigError("this model has no deltatune adapter; call dt.attach(model, method) first")
    return store


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


def fingerprint(model: nn.Module, skip: set[str]) -> str:
    """A cheap fingerprint of the frozen base weights: shapes plus a strided sample of each tensor."""
    digest = hashlib.sha256()
    for name, p in sorted(S.backbone_parameters(model), key=lambda kv: kv[0]):
        if name in skip:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        digest.update(name.encode() + str(tuple(p.shape)).encode())
        digest.update(flat[::step][:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


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


def attach(model: nn.Module, method: str, adapter: str = "default", **options) -> nn.Module:
    """Freeze the base model and add a trainable ``method`` delta named ``adapter``; returns ``model``.

    The new adapter becomes the active one. Options are validated before the model is touched.
    """
    config = build_method(method, options)
    check_adapter_name(adapter)
    family = S.family_of(model)
    if config.families and family not in config.families:
        raise ConfigError(
            f"method '{method}' does not support {family} models; it supports: {', '.join(config.families)}"
        )
    store = store_of(model)
    if store is not None and adapter in store.info:
        raise ConfigError(f"adapter '{adapter}' is already attached; detach it first or pick another name")
    config.check(model)
    placements = config.placements(model)  # may raise before anything is changed
    selected = config.selected(model)
    if not placements and not selected:
        raise ConfigError(f"method '{method}' placed no delta and selected no parameter; check its sites/layers options")
    if store is not None and selected and any(set(a.selected) & set(selected) for a in store.info.values()):
        raise ConfigError(
            f"method '{method}' trains base parameters that another attached adapter already trains; "
            "detach that adapter first"
        )

    if store is None:
        store = DeltaStore()
        store.requires_grad.update({n: p.requires_grad for n, p in model.named_parameters()})
        model.add_module("deltatune", store)
    head = head_parameter_names(model)
    info = Adapter(adapter, config, selected=selected, head=head)
    info.fingerprint = fingerprint(model, set(selected))
    modules = nn.ModuleDict()
    _, backbone = S.find_backbone(model)
    device, dtype = _device_dtype(backbone)
    for pl in placements:
        key = _key(pl.target, pl.suffix)
        if key in modules:
            raise ConfigError(f"{method}: two deltas at {pl.target.name}; give them distinct suffixes")
        for name, shared in getattr(pl.delta, "shared", {}).items():  # e.g. the prefix MLP of all layers
            skey = f"shared~{name}"
            if store.clock is None:
                object.__setattr__(store, "clock", PassClock(backbone, lambda: _begin_pass(store)))
            if skey not in modules:
                modules[skey] = shared.to(device=device, dtype=dtype)
            elif modules[skey] is not shared:
                raise ConfigError(f"{method}: two different shared modules named '{name}'")
        pl.delta.to(device=device, dtype=dtype)
        modules[key] = pl.delta
        layers = [t.layer for t in (pl.target, pl.source) if t is not None]
        entry = Entry(adapter, key, pl.delta, pl.combine, pl.target.module,
                      pl.source.module if pl.source else None, pl.target.out_slice,
                      None if None in layers else min(layers))
        info.entries.append(entry)
        _install(store, backbone, entry)
    store.adapters[adapter] = modules
    store.info[adapter] = info
    if store.frozen is None and not getattr(backbone.config, "is_encoder_decoder", False):
        blocks = [(t.layer, t.module) for t in S.resolve(model, "block")]
        object.__setattr__(store, "frozen", FrozenBelow(backbone, blocks))
    if store.frozen is not None:
        info.lowest = _lowest_block(store.frozen, config, info.entries, [_param(model, n) for n in selected])
    for name in selected + head:  # detach puts these back
        info.snapshot[name] = _param(model, name).detach().clone()
    set_active(model, adapter)
    return model


def _begin_pass(store: DeltaStore) -> None:
    """At the start of a forward pass: let the active adapters' shared modules compute their output."""
    for name in store.active:
        for key, module in store.adapters[name].items():
            if key.startswith("shared~") and hasattr(module, "begin_pass"):
                module.begin_pass()


def _device_dtype(module):
    p = next(module.parameters())
    return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)


def _install(store: DeltaStore, backbone, entry: Entry) -> None:
    where = entry.combine.where
    if where in ("input", "output"):
        for module in filter(None, (entry.target_module, entry.source_module)):
            hooks = store.hooks.get(id(module))
            if hooks is None:
                hooks = store.hooks[id(module)] = ModuleHooks(module)
            hooks.all.append(entry)
    elif where == "attention":
        install_prefix_attention(backbone)
        module = entry.target_module
        if getattr(module, "_deltatune_kv", None) is None:
            module._deltatune_kv = []
            store.prefix_modules.append(module)
        module._deltatune_kv.append(entry)
    elif where == "embedding":
        if store.prompt_hooks is None:
            stack = backbone.get_encoder() if getattr(backbone.config, "is_encoder_decoder", False) else backbone
            object.__setattr__(store, "prompt_hooks", PromptHooks(stack, backbone.get_input_embeddings()))
        store.prompt_hooks.entries.append(entry)


def set_active(model: nn.Module, *adapters: str) -> None:
    """Make exactly these adapters active (their deltas run and train); others stay loaded but idle.

    Only the active adapters' deltas (and selected parameters) and the head require grad.
    """
    store = _require_store(model)
    missing = [a for a in adapters if a not in store.info]
    if missing:
        raise ConfigError(f"no adapter named {missing}; attached adapters: {sorted(store.info)}")
    store.active.clear()
    store.active.update(adapters)
    _refresh(store)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapters:
        info = store.info[name]
        for pname in info.selected + info.head:
            _param(model, pname).requires_grad_(True)
        for p in store.adapters[name].parameters():
            p.requires_grad_(True)


def _lowest_block(frozen: FrozenBelow, config: Method, entries: list, params: list) -> int:
    """The lowest block an adapter trains; 0 when it trains anything at or below the first block."""
    if config.frozen_dropout:
        return 0
    layers = [e.layer for e in entries]
    for p in params:
        if id(p) in frozen.input_params:
            return 0
        layers.append(frozen.layer_of_param.get(id(p), len(frozen.blocks)))  # others sit above the blocks
    if not layers or None in layers:
        return 0
    return min(layers)


def _refresh(store: DeltaStore) -> None:
    for info in store.info.values():
        for e in info.entries:
            e.live = e.adapter in store.active and not e.merged
    if store.frozen is not None:
        store.frozen.set(min((store.info[a].lowest for a in store.active), default=0))
    for hooks in store.hooks.values():
        hooks.refresh(store.active)
    if store.prompt_hooks is not None:
        store.prompt_hooks.refresh(store.active)


def active_adapters(model) -> list[str]:
    return sorted(_require_store(model).active)


def adapters(model) -> list[str]:
    store = store_of(model)
    return sorted(store.info) if store else []


@torch.no_grad()
def merge(model: nn.Module, adapter: str | None = None) -> list[str]:
    """Fold every mergeable delta of the active adapters (or ``adapter``) into the base weights.

    Deltas without an inverse (sequential adapters, prefixes, prompts) keep running unmerged, so the
    model's outputs are unchanged. Returns the keys that were merged.
    """
    store = _require_store(model)
    merged = []
    for info in _chosen(store, adapter):
        for e in info.entries:
            if e.merged or not _mergeable(e):
                continue
            e.combine.merge(e.target_module, e)
            e.merged = True
            merged.append(e.key)
    _refresh(store)
    return merged


@torch.no_grad()
def unmerge(model: nn.Module, adapter: str | None = None) -> list[str]:
    """Undo ``merge``: subtract / divide the deltas back out of the base weights."""
    store = _require_store(model)
    undone = []
    for info in _chosen(store, adapter):
        for e in reversed(info.entries):
            if e.merged:
                e.combine.unmerge(e.target_module, e)
                e.merged = False
                undone.append(e.key)
    _refresh(store)
    return undone


def _mergeable(e: Entry) -> bool:
    if not e.combine.mergeable:
        return False
    return e.combine.name != "parallel" or hasattr(e.delta, "delta_weight")


def _chosen(store, adapter):
    if adapter is None:
        return [store.info[a] for a in sorted(store.active)]
    if adapter not in store.info:
        raise ConfigError(f"no adapter named '{adapter}'; attached adapters: {sorted(store.info)}")
    return [store.info[adapter]]


@torch.no_grad()
def detach(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Remove one adapter (or all): the base model's modules, state-dict keys and outputs come back.

    Merged deltas are unmerged first and selection methods' parameters are restored to their
    values at attach time, so the base weights are exactly the original ones.
    """
    store = _require_store(model)
    names = list(store.info) if adapter is None else [adapter]
    for name in names:
        if name not in store.info:
            raise ConfigError(f"no adapter named '{name}'; attached adapters: {sorted(store.info)}")
        unmerge(model, name)
        info = store.info.pop(name)
        for pname, value in info.snapshot.items():
            _param(model, pname).copy_(value)
        del store.adapters[name]
        store.active.discard(name)
        for hooks in store.hooks.values():
            hooks.all = [e for e in hooks.all if e.adapter != name]
        for module in store.prefix_modules:
            module._deltatune_kv = [e for e in module._deltatune_kv if e.adapter != name]
        if store.prompt_hooks is not None:
            store.prompt_hooks.entries = [e for e in store.prompt_hooks.entries if e.adapter != name]
    _refresh(store)
    if not store.info:
        for hooks in store.hooks.values():
            hooks.remove()
        for module in store.prefix_modules:
            del module._deltatune_kv
        if store.prefix_modules:
            uninstall_prefix_attention(S.find_backbone(model)[1])
        if store.prompt_hooks is not None:
            store.prompt_hooks.remove()
        for part in (store.frozen, store.clock):
            if part is not None:
                part.remove()
        requires = store.requires_grad
        del model.deltatune
        for n, p in model.named_parameters():
            p.requires_grad_(requires.get(n, p.requires_grad))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; total includes the deltas."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def fold(model: nn.Module) -> None:
    """Drop training-only reparameterisations (the prefix MLP), keeping what they compute."""
    store = _require_store(model)
    for name, info in store.info.items():
        for e in info.entries:
            if hasattr(e.delta, "fold"):
                e.delta.fold()
        for key in [k for k in store.adapters[name] if k.startswith("shared~")]:
            del store.adapters[name][key]
        info.method = build_method(info.method.name, info.method.folded_options())
    set_active(model, *store.active)
