"""Methods as registered configs: the registry, option validation, and composite methods.

A method (one small file in ``deltatune/methods``) is a dataclass whose fields are its options.
It says *where* (sites), *what* (a delta module per site) and *how* (a combine), or, for selection
methods, which base parameters to train. What happens at run time (attach, merge, routing) is the
store's business (``store.py``); nothing here touches a model's state.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from . import sites as S
from .combine import Combine
from .errors import ConfigError

REGISTRY: dict[str, type["Method"]] = {}

# Options that adapters saved by earlier versions may carry and that no longer configure a method:
# io drops them when such a file is read; given to the API, they get an error saying where they went.
LEGACY_OPTIONS = {"frozen_dropout": "frozen_dropout is now a training setting: TrainConfig(frozen_dropout=True), "
                                    "`deltatune train --frozen-dropout`, or dt.set_frozen_dropout(model, True)"}

# Upper bound for any integer size option (ranks, bottlenecks, lengths): far above any real model,
# far below what would make a tensor allocation overflow or exhaust memory before it is checked.
MAX_SIZE = 1 << 20


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
    """One delta at one target: what a method asks the store to install.

    ``source``: a module whose *input* the delta reads (He et al.'s parallel adapter reads the FFN
    input and adds to the FFN output; UniPELT's prefix gate reads the attention input). The
    mechanism hands that input to the combine for the same forward pass only.
    """

    target: S.Target
    delta: nn.Module
    combine: Combine
    source: S.Target | None = None
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
    combines: ClassVar[tuple[Combine, ...]] = ()  # every combine its placements use (mergeable follows)
    honours_layers: ClassVar[bool] = True  # False: `layers` has no meaning for it and is rejected
    deviations: ClassVar[str] = ""  # where this implementation differs from the paper, and how to get the paper's

    layers: list | None = option(None, help="only these block indices (default: all)")

    # -- what a method defines
    def placements(self, model: nn.Module) -> list[Placement]:
        return []

    def selected(self, model: nn.Module) -> list[str]:
        """Names of base parameters this method trains (selection methods)."""
        return []

    def check(self, model: nn.Module) -> None:
        """Extra validation against the model; raise ConfigError."""

    def update_rule(self, model: nn.Module, params: dict):
        """An ``updates.UpdateRule`` that transforms this method's gradients and updates during
        training (masks, re-selection, clipping), or None. ``params``: trainable name -> parameter."""
        return None

    # -- helpers for methods
    def targets(self, model, sites) -> list[S.Target]:
        out = []
        for site in sites:
            out.extend(S.resolve(model, site, self.layers))
        return out

    def within_layers(self, model, names: list[str]) -> list[str]:
        """The parameter names that sit inside the blocks of ``layers`` (all names when unset)."""
        if self.layers is None:
            return names
        blocks = tuple(t.name + "." for t in S.resolve(model, "block", self.layers))
        return [n for n in names if n.startswith(blocks)]

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def folded_options(self) -> dict:
        """Options that rebuild the adapter after training-only parts are folded away."""
        return self.options()


class Composite(Method):
    """A method made of registered methods' placements (MAM = prefix + scaled parallel adapter).

    ``parts``: part name -> (registered method, options taken from this config: {part option:
    own field}, fixed options). Each part's deltas are installed with the suffix ``~<part>``, so two
    parts may use the same site; ``gate(part, placement, model)`` may wrap a part's delta (UniPELT).
    """

    parts: ClassVar[dict[str, tuple[str, dict, dict]]] = {}

    def part_configs(self) -> dict[str, Method]:
        out = {}
        for part, (method, mapped, fixed) in self.parts.items():
            opts = {**fixed, **{k: getattr(self, own) for k, own in mapped.items()}}
            if self.layers is not None and REGISTRY[method].honours_layers:
                opts["layers"] = self.layers
            out[part] = build_method(method, opts)
        return out

    def gate(self, part: str, placement: Placement, model: nn.Module) -> Placement:
        return placement

    def check(self, model):
        for cfg in self.part_configs().values():
            cfg.check(model)

    def placements(self, model):
        out = []
        for part, cfg in self.part_configs().items():
            for pl in cfg.placements(model):
                pl.suffix = f"{pl.suffix}~{part}"
                out.append(self.gate(part, pl, model))
        return out

    def selected(self, model):
        names = []
        for cfg in self.part_configs().values():
            names += [n for n in cfg.selected(model) if n not in names]
        return names


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
    if want is float and not math.isfinite(value):
        raise ConfigError(f"{method}: option '{key}' must be a finite number, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{method}: option '{key}' must be one of {meta['choices']}, got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{method}: option '{key}' must be >= {meta['min']}, got {value!r}")
    high = meta.get("max")
    if high is None and want in (int, float):
        high = MAX_SIZE if want is int else 1e6  # no option of any method is meaningful beyond these
    if high is not None and value > high:
        raise ConfigError(f"{method}: option '{key}' must be <= {high}, got {value!r}")
    if key.endswith("sites") and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{method}: option '{key}' must be a list of site names, got {value!r}")
    if key == "layers" and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_SIZE for i in value):
        raise ConfigError(f"{method}: option 'layers' must be a list of block indices >= 0, got {value!r}")
    return value


def build_method(name: str, options: dict) -> Method:
    """Validate ``options`` for method ``name`` (types, ranges, choices) and return its config."""
    if not isinstance(name, str):
        raise ConfigError(f"method must be a registered method's name (a string), got {type(name).__name__} {name!r}")
    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}'; registered methods: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    moved = [LEGACY_OPTIONS[k] for k in options if k in LEGACY_OPTIONS and k not in fields]
    if moved:
        raise ConfigError(f"method '{name}': {moved[0]}")
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in cls().options().items())
        raise ConfigError(f"method '{name}' has no option {', '.join(map(repr, unknown))}; valid options: {valid}")
    options = {key: _check_value(name, key, value, fields[key]) for key, value in options.items()}
    if options.get("layers") is not None and not cls.honours_layers:
        raise ConfigError(f"method '{name}' cannot be restricted to layers (it has no per-layer part); "
                          "drop the 'layers' option")
    return cls(**options)


def mergeable(cls: type[Method]) -> bool:
    """Whether every delta of the method can be folded into the base weights (selection methods
    change base weights directly, so they count as merged already)."""
    if cls.kind == "selection":
        return True
    return bool(cls.combines) and all(c.mergeable for c in cls.combines)


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
        "mergeable": mergeable(cls),
        "deviations": cls.deviations,
    }
