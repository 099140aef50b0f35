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

import torch
from torch import nn

from . import sites as S
from .combine import Combine
from .deltas import folded_state
from .errors import ConfigError

REGISTRY: dict[str, type["Method"]] = {}

# Reading a saved adapter is the formats layer's job (deltatune.formats), which sits above the methods. A method
# whose options name saved adapters (ATTEMPT's source prompts) reads them through this hook, which
# deltatune.formats installs when it is imported (as `import deltatune` does): the arrow stays pointing down.
_adapter_reader = None


def set_adapter_reader(read) -> None:
    """Install ``read(path) -> (config, tensors)``, the validated reader of saved adapters (deltatune.formats)."""
    global _adapter_reader
    _adapter_reader = read


def read_saved_adapter(path):
    """(config, tensors) of the adapter saved at ``path``, validated by the formats layer."""
    if _adapter_reader is None:
        raise ConfigError("reading a saved adapter needs deltatune.formats; `import deltatune` first")
    return _adapter_reader(path)

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
    # Options added after adapters of this method were first saved, with the values that rebuild the old layout:
    # a file that lacks one loads as it was written (formats/native.py fills them in).
    old_file_options: ClassVar[dict] = {}
    # Options that name files read when the adapter is built (ATTEMPT's source prompts): a saved adapter carries
    # what they gave and records them empty, so loading reads no path named in a file (``paths_named``).
    file_options: ClassVar[tuple[str, ...]] = ()

    layers: list | None = option(None, help="only these block indices (default: all)")

    # -- what a method defines
    def placements(self, model: nn.Module) -> list[Placement]:
        return []

    def selected(self, model: nn.Module) -> list[str]:
        """Names of base parameters this method trains (selection methods)."""
        return []

    def check(self, model: nn.Module) -> None:
        """Extra validation against the model; raise ConfigError. A method that overrides it calls
        ``super().check(model)`` first (the checks every method shares)."""
        self.check_quantized(model)

    def check_quantized(self, model: nn.Module) -> None:
        """On a quantized base (``deltatune.quantize``), refuse a method whose ``selected`` parameters belong to a
        quantized layer (its weight or bias): those layers hold 4- or 8-bit codes that take no gradient step, and
        a quantized base stays frozen there. Norms, embeddings and heads stay float32 and may be trained."""
        if S.quantization(model) is None:
            return
        names = set(self.selected(model))
        hit = next((f"{mod_name}.{p_name}" if mod_name else p_name for mod_name, module in model.named_modules()
                    if S.quantized(module) is not None
                    for p_name, _ in module.named_parameters(recurse=False)
                    if (f"{mod_name}.{p_name}" if mod_name else p_name) in names), None)
        if hit is not None:
            scheme = S.quantization(model)["scheme"]
            additive = ", ".join(n for n, c in sorted(REGISTRY.items()) if c.kind != "selection")
            raise ConfigError(f"method '{self.name}' trains the base's own weights in place ({hit}, ...), and this "
                              f"base's linear layers are {scheme}-quantized: they hold codes that take no gradient "
                              f"step. Train a method that adds to the base on it ({additive[:120]}...), or train "
                              f"{self.name} on the float base (without --quantize)")

    def update_rule(self, model: nn.Module, params: dict):
        """An ``updates.UpdateRule`` that transforms this method's gradients and updates during
        training (masks, re-selection, clipping), or None. ``params``: trainable name -> parameter."""
        return None

    def faster_parameters(self, deltas: dict) -> list:
        """The parameters a run's ``lora_plus_ratio`` trains at that multiple of the learning rate (LoRA+,
        Hayou et al. 2024, §3: of a product B A that starts at B = 0, the factor B); ``deltas``: this adapter's
        modules by key. Empty: the method has no such factor, and the setting is refused for it."""
        return []

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

    def saved_options(self, fold: bool) -> dict:
        """The options a saved adapter records: folded, or as trained (``fold=False``) where that names no file."""
        return self.folded_options() if fold or self.file_options else self.options()

    @classmethod
    def paths_named(cls, options: dict) -> list[str]:
        """The ``file_options`` that ``options`` (read from a saved adapter) set: loading refuses them."""
        return [k for k in cls.file_options if options.get(k)]

    # -- what the rest of the library asks of a method, so that no module outside methods/ names one

    # Options the engine may choose from the task's data when given as "auto": option -> the analysis
    # that chooses it ('freeze_depth': the layer analysis of deltatune.training.freeze).
    auto_options: ClassVar[dict[str, str]] = {}

    # True: ``average`` re-factorises the averaged adapter to a chosen ``rank`` (dt.compose.average).
    average_rank: ClassVar[bool] = False

    @classmethod
    def average(cls, adapters: dict, weights: list[float], rank: int | None = None) -> tuple[dict, dict, dict]:
        """The weighted average of adapters of this method (``dt.compose.average``): (options of the
        averaged adapter, {module key: state} to fill it with, report fields).

        ``adapters``: adapter name -> (its config, {module key: delta module}) without training-only
        shared modules; ``weights``: one per adapter, in the same order. Here: parameter by parameter
        over the folded states, for adapters with the same options: exact for deltas linear in their
        parameters at a fixed input (scaling vectors, offsets), a parameter-space interpolation
        otherwise (bottleneck adapters, prefixes, prompts). A method whose deltas average better in
        another form overrides it (LoRA: the weight updates, re-factorised by SVD).
        """
        if rank is not None:
            takers = " and ".join(c.__name__ for c in REGISTRY.values() if c.average_rank) or "no method"
            raise ConfigError(f"average: rank applies to {takers} only (these adapters are {cls.name})")
        names = list(adapters)
        states, options = {}, None
        for (name, (cfg, deltas)), w in zip(adapters.items(), weights):
            opts = cfg.folded_options()
            if options is None:
                options = opts
            elif opts != options:
                raise ConfigError(f"average: adapter '{name}' has options {opts}, '{names[0]}' has {options}; "
                                  f"only {cls.name} adapters with the same options average parameter by parameter")
            for key, delta in deltas.items():
                acc = states.setdefault(key, {})
                fixed = {n for n, _ in delta.named_buffers()}  # not trained: the chosen indices, fixed projections
                for pname, t in folded_state(delta).items():
                    if pname in fixed or not t.is_floating_point():
                        if pname in acc and not torch.equal(acc[pname], t):
                            raise ConfigError(f"average: '{name}' and '{names[0]}' differ in {key}.{pname}, which is "
                                              "not trained (e.g. which weights a sparse delta holds); only adapters "
                                              "that share it average parameter by parameter")
                        acc[pname] = t
                    else:
                        acc[pname] = acc.get(pname, 0) + w * t.double()
        return options, states, {"rank": None, "error": 0.0, "site_errors": {}}

    # The Hugging Face PEFT format: the peft_type of the same computation ('': none). A method that has
    # one converts its folded tensors both ways; ``peft`` is the format's shared plumbing
    # (deltatune.formats.peft.Bridge: the model, peft's names, untrusted fields read safely), handed in
    # because the formats sit above the methods.
    peft_type: ClassVar[str] = ""
    # Tensors peft keeps on the tuner itself ("base_model.<name>", e.g. VeRA's shared vera_A, vera_B) rather than
    # at a module of the model: ``to_peft`` / ``from_peft`` name them without a prefix.
    peft_shared: ClassVar[tuple[str, ...]] = ()
    # Whether peft places this type's tensors by its common target rule (target_modules, exclude_modules,
    # layers_to_transform: BaseTuner's check), which loading then enforces; False where the type reads
    # target_modules its own way (ADAPTION_PROMPT: the attention's name; TRAINABLE_TOKENS: the embedding and its ties).
    peft_target_rule: ClassVar[bool] = True

    def to_peft(self, peft, deltas: list) -> tuple[dict, dict]:
        """(tensors, config fields) of this adapter in the PEFT format. ``deltas``: (module name, key
        marks, {parameter: tensor}) per folded delta. Tensor names are relative to the Hugging Face model
        for tuner types (peft's base_model.model. is added), top-level for prompt-learning types."""
        raise ConfigError(f"method '{self.name}' has no PEFT counterpart")

    @classmethod
    def from_peft(cls, peft, config: dict, tensors: dict) -> tuple[dict, dict]:
        """(options, {delta key.parameter: tensor}) of a PEFT adapter of this method's ``peft_type``
        (``config``: its adapter_config.json, untrusted; ``tensors``: named as in ``to_peft``) on
        ``peft.model``. Raise ConfigError where deltatune cannot compute the same function."""
        raise ConfigError(f"method '{cls.name}' has no PEFT counterpart")


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
        super().check(model)
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
