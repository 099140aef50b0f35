"""The Hugging Face PEFT adapter format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

``dt.save_adapter(model, dir, format="peft")`` writes an adapter that ``peft.PeftModel.from_pretrained``
loads, and ``dt.load_adapter(model, dir)`` reads a PEFT directory as well as a deltatune one. Only
exact conversions are made: the converted adapter computes the same function (to float rounding);
where the two libraries compute different things, the conversion is refused and the error says why.
Nothing here imports peft: the format is plain safetensors and JSON.

Which method maps to which PEFT type, and how, is the method's own business: a method with a PEFT
counterpart declares ``peft_type`` and converts its tensors in ``to_peft`` / ``from_peft``, in its
own file under ``deltatune/methods`` (``peft_types()`` lists them). This module holds what
every conversion shares, and hands it to the method as a :class:`Bridge`: the Hugging Face model
inside a deltatune model and peft's names relative to it, peft's rules for target names and
``modules_to_save``, the task head, the deltatune sites that select a set of modules, rotary keys,
and the fields of an untrusted config (patterns matched under a time limit, sizes checked).
"""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .. import registry, sites
from . import native as io
from ..errors import AdapterFileError, ConfigError, SiteError

CONFIG, WEIGHTS, PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_MAX_CONFIG_BYTES = 1 << 20
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Task types whose peft forward prepends prompts and prefixes (prompt learning runs through them).
_PROMPT_TASKS = ("SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# peft wraps these heads by itself for the task types (PeftModelFor*): they are never adapted.
_AUTO_SAVED = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}
# peft's prompt-learning types (PromptLearningConfig): their tensors are saved at the top level
# ('prompt_embeddings') and the head under 'base_model.'; every other type's under 'base_model.model.'.
_PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")


def peft_types() -> dict[str, str]:
    """Registered method -> its PEFT type, for every method that declares one (``Method.peft_type``)."""
    return {name: cls.peft_type for name, cls in registry.REGISTRY.items() if cls.peft_type}


def _method_of(peft_type) -> type[registry.Method] | None:
    return next((registry.REGISTRY[name] for name, t in peft_types().items() if t == peft_type), None)


def _where(peft_type: str) -> str:
    """The key prefix of the model's own modules (and the head) in a saved adapter of ``peft_type``."""
    return "base_model." if peft_type in _PROMPT_LEARNING else "base_model.model."


# ------------------------------------------------------------------ shared helpers

def hf_root(model):
    """(dotted path, module) of the outermost Hugging Face PreTrainedModel in ``model``: what a peft
    user passes to ``PeftModel``, and what peft's module names are relative to."""
    from transformers import PreTrainedModel

    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    raise ConfigError(f"{type(model).__name__} holds no Hugging Face PreTrainedModel; the PEFT format needs one")


def task_type(root) -> str | None:
    """peft's task type for a transformers model class (None: peft's plain PeftModel)."""
    name = type(root).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if getattr(root.config, "is_encoder_decoder", False) and name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if root.base_model is root:
        return "FEATURE_EXTRACTION"
    return None


def _rel(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if not name.startswith(prefix + "."):
        raise ConfigError(f"'{name}' lies outside the Hugging Face model '{prefix}'; the PEFT format cannot hold it")
    return name[len(prefix) + 1:]


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear(module):
    """(in, out) of a Linear or GPT-2 Conv1D, else None."""
    return sites._linear_features(module)


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


def _peft_list_match(name: str, targets) -> bool:
    """peft's rule for a list of target_modules: the name itself, or a name ending in '.target'."""
    return name in targets or any(name.endswith("." + t) for t in targets)


def _saved_match(name: str, saved) -> bool:
    """peft's rule for excluding modules_to_save from the targets."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved)


def _suffixes(names, depth: int) -> list[str]:
    return sorted({".".join(n.split(".")[-depth:]) for n in names})


def _target_lists(root, chosen: set[str], saved, subset: set[str] | None = None):
    """Short target_modules names (and for (IA)^3 the feedforward subset's) that select exactly
    ``chosen`` (and ``subset``) under peft's matching rules: the shortest suffixes that do."""
    names = [n for n, _ in root.named_modules() if n]
    for depth in range(1, max(n.count(".") + 1 for n in chosen) + 1):
        targets = _suffixes(chosen, depth)
        found = {n for n in names if _peft_list_match(n, targets) and not _saved_match(n, saved)}
        if found != chosen:
            continue
        if subset is None:
            return targets, None
        ff = _suffixes(subset, depth) if subset else []
        if {n for n in chosen if any(n.endswith(t) for t in ff)} == subset:  # peft's feedforward rule
            return targets, ff
    raise ConfigError("cannot name the adapted modules in a way peft selects exactly; "
                      f"modules: {sorted(chosen)[:4]}...")


def _deltas(tensors: dict) -> list[tuple[str, tuple, dict]]:
    """(module name, key marks, {param: tensor}) per deltatune delta: key 'a:b:c~q~in' -> 'a.b.c', ('q', 'in')."""
    grouped: dict[str, dict] = defaultdict(dict)
    for k, t in tensors.items():
        if k.startswith("delta."):
            key, pname = k[len("delta."):].split(".", 1)
            grouped[key][pname] = t
    out = []
    for key, params in sorted(grouped.items()):
        module, *marks = key.split("~")
        out.append((module.replace(":", "."), tuple(marks), params))
    return out


def _dt_key(module: str, *marks: str) -> str:
    """deltatune's key of a delta at ``module`` (the inverse of ``_deltas``)."""
    return "~".join([module.replace(".", ":"), *marks])


def _head_modules(root, prefix: str, head: dict) -> tuple[list[str], dict]:
    """The smallest modules whose parameters are exactly the head's: peft's modules_to_save."""
    rel = {_rel(prefix, n): t for n, t in head.items()}
    chosen: list[str] = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if params and all(p in rel for p in params):
            chosen.append(name)
    covered = {f"{c}.{p}" for c in chosen for p, _ in root.get_submodule(c).named_parameters()}
    if covered != set(rel):
        raise ConfigError(f"the trained head parameters {sorted(set(rel) - covered)[:4]} are part of modules "
                          "whose other parameters are frozen; peft's modules_to_save trains whole modules")
    return chosen, rel


def _rope_rotate(model, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate keys (..., head_dim) by ``shift`` positions (negative: back) with the model's own rotary embedding."""
    _, backbone = sites.find_backbone(model)
    rope = getattr(backbone, "rotary_emb", None)
    if rope is None:
        raise ConfigError(f"{type(backbone).__name__} has no rotary_emb; cannot convert prefix keys exactly")
    head_dim = keys.shape[-1]
    p = next(backbone.parameters())
    probe = torch.zeros(1, 1, head_dim, device=p.device, dtype=torch.float64)  # cos, sin come back in its dtype
    with torch.no_grad():
        cos, sin = rope(probe, torch.tensor([[abs(shift)]], device=p.device))
    if cos.shape[-1] != head_dim:
        raise ConfigError(f"partial rotary embeddings ({cos.shape[-1]} of {head_dim} dims) are not supported here")
    scale = float(getattr(rope, "attention_scaling", 1.0) or 1.0)
    cos, sin = (cos[0, 0].double() / scale), (sin[0, 0].double() / scale)
    k = keys.double()
    half = head_dim // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)  # transformers' rotate_half
    sign = 1.0 if shift >= 0 else -1.0
    return (k * cos.to(k.device) + sign * rotated * sin.to(k.device)).to(keys.dtype)


def _layer_of(model, name: str) -> int | None:
    """The block index of a module (full name), from the family's block pattern."""
    prefix, _ = sites.find_backbone(model)
    table = sites.SITE_MAP.get(sites.family_of(model), {})
    rel = name[len(prefix) + 1:] if prefix else name
    m = re.match(table.get("block", r"$^") + r"\.", rel)
    return int(m.group("layer")) if m else None


def _choose_sites(model, groups: list[set[str]]) -> tuple[list[list[str]], list[int] | None]:
    """deltatune sites (one list per group of full module names) and a shared ``layers`` option that
    resolve to exactly those modules: named sites where they fit, else patterns over module names."""
    prefix, _ = sites.find_backbone(model)
    family = sites.family_of(model)
    all_layers = sorted({t.layer for t in sites.resolve(model, "block")})
    used = sorted({_layer_of(model, n) for g in groups for n in g}, key=lambda x: -1 if x is None else x)
    layers = None if (None in used or used == all_layers) else used

    def resolved(site):
        try:
            targets = sites.resolve(model, site, layers)
        except Exception:  # SiteError: matches nothing
            return None
        if any(t.out_slice is not None for t in targets):
            return None
        return {t.name for t in targets}

    def named(group):
        chosen, covered = [], set()
        for site in sites.SITE_MAP[family]:
            if site in ("block", "attn.kv", "ln", "embed"):
                continue
            found = resolved(site)
            if found and found <= group and not found & covered:
                chosen.append(site)
                covered |= found
        return chosen if covered == group else None

    def patterns(group):
        chosen = set()
        for n in group:
            rel = n[len(prefix) + 1:] if prefix else n
            m = re.match(sites.SITE_MAP[family]["block"] + r"\.", rel)
            if m:
                a, b = m.span("layer")
                chosen.add("re:" + re.escape(rel[:a]) + r"(?P<layer>\d+)" + re.escape(rel[b:]))
            else:
                chosen.add("re:" + re.escape(rel))
        found = [resolved(s) for s in sorted(chosen)]
        if any(f is None for f in found) or sum(len(f) for f in found) != len(group) or set().union(*found) != group:
            return None
        return sorted(chosen)

    result = []
    for group in groups:
        if not group:
            result.append([])
            continue
        choice = named(group) or patterns(group)
        if choice is None:
            break
        result.append(choice)
    else:
        return result, layers
    exact = []
    for group in groups:
        rels = sorted(n[len(prefix) + 1:] if prefix else n for n in group)
        exact.append(["re:(?:" + "|".join(re.escape(r) for r in rels) + ")"] if rels else [])
    return exact, None


def _pattern_error(field: str, pattern, reason: str) -> ConfigError:
    shown = repr(pattern) if len(repr(pattern)) <= 80 else repr(pattern)[:60] + "..."
    return ConfigError(f"{field}: the pattern {shown} cannot be used ({reason})")


class Bridge:
    """What every PEFT conversion shares, handed to a method's ``to_peft`` / ``from_peft``.

    ``model``: the deltatune model; ``prefix``/``root``: where the Hugging Face model sits in it (peft's
    module names are relative to ``root``); ``task``: peft's task type for it; ``file``: the config
    being read (for messages); ``excluded``: modules peft must not adapt (modules_to_save, heads).
    Patterns from a config run under one time budget per file (``sites.MATCH_SECONDS``), with the
    engine ``re:`` sites use, which gives up after its timeout and lets other threads run meanwhile.
    ``base``: the base parameters a selection method trains (LN tuning), by their name in ``model``: what
    the adapter holds when writing (``to_peft`` reads it with :meth:`trained_base`), what ``from_peft``
    puts there when reading.
    """

    def __init__(self, model, file: str = "", excluded=(), base: dict | None = None):
        self.model = model
        self.prefix, self.root = hf_root(model)
        self.task = task_type(self.root)
        self.file = file
        self.excluded = list(excluded)
        self.base: dict[str, torch.Tensor] = dict(base or {})
        self.base_taken = False
        self._deadline = None

    def trained_base(self) -> dict[str, dict]:
        """{module name in ``model``: {parameter: tensor}} of the trained base parameters. A method that asks
        says its PEFT type holds them; the adapters of any other are refused (the format would drop them)."""
        self.base_taken = True
        grouped: dict[str, dict] = defaultdict(dict)
        for name, t in self.base.items():
            module, _, pname = name.rpartition(".")
            grouped[module][pname] = t
        return dict(grouped)

    # -- names and shapes
    def rel(self, name: str) -> str:
        """peft's name (relative to the Hugging Face model) of the module ``name`` of ``model``."""
        return _rel(self.prefix, name)

    def full(self, name: str) -> str:
        """The name in ``model`` of peft's module ``name``."""
        return _full(self.prefix, name)

    def features(self, name: str) -> tuple[int, int] | None:
        """(in, out) of the Linear or GPT-2 Conv1D ``name`` of ``model``, else None."""
        return _linear(self.model.get_submodule(name))

    def module(self, name: str) -> tuple[str, torch.nn.Module]:
        """(the full name, the module) a file names ``name`` (peft's name); a name this model lacks is refused."""
        full = self.full(name)
        try:
            return full, self.model.get_submodule(full)
        except AttributeError:
            raise ConfigError(f"the adapter targets '{name}', which this model does not have; load it onto "
                              "the model it was trained on") from None

    def projection(self, name: str) -> tuple[str, tuple[int, int]]:
        """(the full name, (in, out)) of the linear projection a file names ``name`` (peft's name); a name this model
        does not have, or a module that is no linear projection, is refused naming it."""
        full, module = self.module(name)
        feats = _linear(module)
        if feats is None:
            raise ConfigError(f"the adapter targets '{name}', not a linear projection")
        return full, feats

    def fused_rows(self, name: str, mark: str) -> tuple[int, int]:
        """The output rows of module ``name`` that a slice delta (key mark 'q', 'k' or 'v') owns:
        GPT-2's c_attn holds q, k and v in thirds of its output."""
        width = self.features(name)[1] // 3
        i = "qkv".index(mark)
        return i * width, (i + 1) * width

    def fan_in_fan_out(self, names) -> bool:
        """peft's fan_in_fan_out: whether any of the modules (peft names) stores its weight (in, out)."""
        return any(_is_conv1d(self.root.get_submodule(n)) for n in names)

    def target_modules(self, chosen: set[str], subset: set[str] | None = None):
        """Short target_modules names (and the feedforward subset's) that select exactly ``chosen``
        (and ``subset``), peft names, under peft's matching rules."""
        return _target_lists(self.root, chosen, self.excluded, subset)

    def key(self, module: str, *marks: str) -> str:
        """deltatune's key of a delta at ``module`` (its name in ``model``)."""
        return _dt_key(module, *marks)

    def choose_sites(self, groups: list[set[str]]) -> tuple[list[list[str]], list[int] | None]:
        """deltatune sites (one list per group of module names of ``model``) and a shared ``layers``
        option that resolve to exactly those modules."""
        return _choose_sites(self.model, groups)

    def rotate_keys(self, keys: torch.Tensor, shift: int) -> torch.Tensor:
        """Keys (..., head_dim) rotated by ``shift`` positions with the model's own rotary embedding."""
        return _rope_rotate(self.model, keys, shift)

    # -- prompt learning
    def prompt_fields(self, length: int) -> dict:
        """The config fields every prompt-learning type has, for ``length`` virtual tokens."""
        d_model, heads, _, _ = sites.attention_shape(self.model)
        return {"task_type": self.task, "num_virtual_tokens": length, "token_dim": d_model,
                "num_transformer_submodules": 1, "num_attention_heads": heads,
                "num_layers": sites.num_layers(self.model)}

    def require_prompt_task(self, what: str) -> None:
        if self.task not in _PROMPT_TASKS:
            raise ConfigError(f"peft applies {what} only through a task-specific PeftModel ({', '.join(_PROMPT_TASKS)}); "
                              f"this model's class maps to task type {self.task}, where peft would ignore the {what}")

    # -- tuners with one set of named tensors per adapted module (LoHa, LoKr, OFT, BOFT, HRA, FourierFT)
    def tuner_tensors(self, deltas, names: dict, what: str, conv1d: bool) -> dict:
        """{'<peft module name>.<peft tensor>': tensor} of deltas at whole modules, ``names``: deltatune's
        parameter -> peft's tensor. Refused: slices of a fused projection (peft adapts GPT-2's c_attn whole),
        and GPT-2's Conv1D where peft's tuner (``conv1d=False``) adapts only torch's Linear and convolutions."""
        out = {}
        for module_name, marks, params in deltas:
            if not conv1d and _is_conv1d(self.model.get_submodule(module_name)):
                raise ConfigError(f"peft's {what} adapts torch Linear and convolution layers only; {module_name} is "
                                  "GPT-2's Conv1D, which peft's get_peft_model refuses, so the adapter cannot be written "
                                  "for peft (save it with format='deltatune')")
            if marks:
                raise ConfigError(f"{what} on {'attn.' + marks[0]}, a slice of GPT-2's fused {module_name}: peft adapts "
                                  "c_attn whole; train with sites ['re:h\\.(?P<layer>\\d+)\\.attn\\.c_attn'] to export it")
            for pname, t in params.items():
                out[f"{self.rel(module_name)}.{names[pname]}"] = t
        return out

    def tuner_modules(self, tensors: dict, names: dict, what: str, conv1d: bool = False) -> dict[str, dict]:
        """{module name in ``model``: {deltatune's parameter: tensor}} of a tuner's '<module>.<peft tensor>'
        tensors, ``names``: peft's tensor -> deltatune's parameter; every module a Linear of this model (or
        GPT-2's Conv1D, where peft's tuner adapts it: ``conv1d``)."""
        pattern = re.compile(r"(.+)\.(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + ")")
        out: dict[str, dict] = defaultdict(dict)
        for k, t in tensors.items():
            m = pattern.fullmatch(k)
            if m is None:
                what_is = "a bias (bias='all' or a tuner-only bias)" if k.endswith(".bias") else f"not a {what} tensor"
                raise ConfigError(f"tensor '{k}' is {what_is}; deltatune's {what} holds {', '.join(names)} only")
            full, module = self.module(m.group(1))
            if not (isinstance(module, torch.nn.Linear) or (conv1d and _is_conv1d(module))):
                raise ConfigError(f"the adapter targets '{m.group(1)}' ({type(module).__name__}); deltatune's {what} "
                                  "reads peft's adapters of Linear projections only")
            out[full][names[m.group(2)]] = t
        if not out:
            raise ConfigError(f"the adapter holds no {what} tensors")
        return dict(out)

    def check_shapes(self, full: str, got: dict, want: dict, what: str) -> None:
        """The tensors of module ``full`` are exactly ``want`` (deltatune's parameter -> shape); else the error."""
        if set(got) != set(want):
            raise ConfigError(f"'{self.rel(full)}' holds {sorted(got)}, where {what} has {sorted(want)}; "
                              "the adapter is damaged")
        for k, shape in want.items():
            if tuple(got[k].shape) != tuple(shape):
                raise ConfigError(f"'{self.rel(full)}': {k} is {tuple(got[k].shape)}, where {what} has {tuple(shape)}")

    @staticmethod
    def refuse_patterns(config: dict, what: str) -> None:
        for field in ("rank_pattern", "alpha_pattern", "n_frequency_pattern"):
            if config.get(field):
                raise ConfigError(f"{field}={config[field]!r}: deltatune's {what} takes one value for every module; "
                                  f"save the adapter without {field}")

    @staticmethod
    def number(value: float):
        """An integral float as an int (peft's configs write alpha as an int)."""
        return int(value) if float(value).is_integer() else float(value)

    # -- fields of an untrusted config
    def get(self, config: dict, key: str, types, default):
        """``config[key]`` if it is of ``types`` (None or missing: ``default``), else an AdapterFileError."""
        return _get(config, key, types, default, self.file)

    def pattern_value(self, field: str, patterns: dict, name: str, default):
        """peft's get_pattern_key: the value of the first pattern of ``field`` (rank_pattern,
        alpha_pattern) that matches the end of module ``name`` (a peft name)."""
        for pattern, value in patterns.items():
            if self._match(field, pattern, rf"(.*\.)?({pattern})$", name, full=False):
                return value
        return default

    def is_feedforward(self, config: dict, name: str) -> bool | None:
        """peft's rule for (IA)^3's feedforward_modules: a pattern matching the whole name, or a list of
        name endings; None when the config has neither."""
        ff = config.get("feedforward_modules")
        if isinstance(ff, str):
            return self._match("feedforward_modules", ff, ff, name, full=True)
        if isinstance(ff, list):
            return any(isinstance(t, str) and name.endswith(t) for t in ff)
        return None

    def selects(self, config: dict, name: str) -> bool:
        """peft's check_target_module_exists for module ``name`` (a peft name): not excluded (exclude_modules),
        selected by target_modules (a pattern matching the whole name, a list of name endings, 'all-linear'),
        and where a list selects it, in layers_to_transform (the layer index found after layers_pattern).
        A config without target_modules selects every module (peft's per-architecture defaults are not known here)."""
        targets, exclude = config.get("target_modules"), config.get("exclude_modules")
        layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
        for field, value, items in (("target_modules", targets, str), ("exclude_modules", exclude, str),
                                    ("layers_to_transform", layers, int), ("layers_pattern", pattern, str)):
            one = isinstance(value, items) and not isinstance(value, bool)
            if not (value is None or one or isinstance(value, list) and all(
                    isinstance(v, items) and not isinstance(v, bool) for v in value)):
                raise AdapterFileError(f"{self.file}: field '{field}' must be a {items.__name__} or a list of them, "
                                       f"got {value!r}")
        if isinstance(exclude, str) and self._match("exclude_modules", exclude, exclude, name, full=True) \
                or isinstance(exclude, list) and _peft_list_match(name, exclude):
            return False
        if targets is None:
            return True
        if targets == "all-linear":
            out = getattr(self.root, "get_output_embeddings", lambda: None)()
            module = self.root.get_submodule(name)
            return _linear(module) is not None and module is not out
        if isinstance(targets, str):
            return self._match("target_modules", targets, targets, name, full=True)
        if name in targets:
            return True
        if not _peft_list_match(name, targets):
            return False
        if layers is None or layers == []:
            return True
        found = None
        for p in ([pattern] if isinstance(pattern, str) else pattern) if pattern else [None]:
            regex = r".*?\.[^.]*\.(?P<idx>\d+)\." if p is None else rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\."
            found = self._match("layers_pattern", p, regex, name, full=False, want_match=True)
            if found is not None:
                break
        if found is None:
            return False
        index = int(found.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def _match(self, field: str, pattern, compiled_from: str, name: str, full: bool, want_match: bool = False):
        try:
            compiled = sites._regex(compiled_from, compiled_from)  # length, syntax and repeat limits of re: sites
        except SiteError as err:
            raise _pattern_error(field, pattern, str(err)) from None
        if self._deadline is None:
            self._deadline = time.monotonic() + sites.MATCH_SECONDS
        timeout = max(self._deadline - time.monotonic(), 1e-3)
        try:
            found = (compiled.fullmatch if full else compiled.match)(name, timeout=timeout)
        except TimeoutError:
            raise _pattern_error(field, pattern, f"matching the module names took over {sites.MATCH_SECONDS:g} s, "
                                 "as a pattern that backtracks without end does, like (.|.)*x; the config is "
                                 "damaged or hostile") from None
        return found if want_match else found is not None


# ------------------------------------------------------------------ deltatune -> PEFT

def peft_state(model, adapter: str | None = None) -> tuple[dict, dict]:
    """(tensors, config) of one deltatune adapter in the PEFT format, as :func:`save` writes them."""
    tensors, config = io.adapter_tensors(model, adapter, fold=True)
    method, options = config["method"], config["options"]
    cls = registry.REGISTRY.get(method)
    if cls is None or not cls.peft_type:
        raise ConfigError(f"method '{method}' has no PEFT counterpart; the PEFT format holds "
                          f"{', '.join(peft_types())} adapters (save this one with format='deltatune')")
    prefix, root = hf_root(model)
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    base = {k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")}
    saved, head_rel = _head_modules(root, prefix, head) if head else ([], {})
    bridge = Bridge(model, excluded=saved + _AUTO_SAVED.get(task_type(root), []), base=base)
    out_cfg = {
        "peft_type": cls.peft_type,
        "task_type": bridge.task,
        "base_model_name_or_path": getattr(root.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": saved or None,
    }
    out_t, extra = registry.build_method(method, options).to_peft(bridge, _deltas(tensors))
    if base and not bridge.base_taken:
        raise ConfigError(f"this {method} adapter also trains base parameters, which the PEFT format cannot hold")
    out_cfg.update(extra)
    where = _where(cls.peft_type)
    if cls.peft_type not in _PROMPT_LEARNING:  # a tuner's tensors sit at the model's own modules (or on the tuner)
        out_t = {("base_model." if n in cls.peft_shared else where) + n: t for n, t in out_t.items()}
    out_t.update({where + n: t for n, t in head_rel.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out_t.items()}, out_cfg


def save(model, path, adapter: str | None = None, fold: bool = True) -> Path:
    """Write ``adapter`` of ``model`` to directory ``path`` in the PEFT format (atomically, file by file).
    PEFT files hold folded adapters only (``fold`` is accepted for the common signature)."""
    path = Path(path)
    if (path / io.WEIGHTS).exists():
        raise ConfigError(f"{path} holds a deltatune adapter ({io.WEIGHTS}); write the PEFT export to another "
                          "directory (both formats name their config adapter_config.json)")
    tensors, config = peft_state(model, adapter)
    io.atomic_write_bytes(path / WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    io.atomic_write_json(path / CONFIG, config)
    return path


# ------------------------------------------------------------------ PEFT -> deltatune

def recognises(path) -> bool:
    """A directory written by peft (or by :func:`save`) rather than by deltatune's own format."""
    path = Path(path)
    return path.is_dir() and not (path / io.WEIGHTS).exists() and (
        (path / WEIGHTS).is_file() or (path / PICKLE).is_file())


def read(path) -> tuple[dict, dict]:
    """(config, tensors) of a PEFT adapter directory, validated as data; tensor names as peft saved them."""
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        if (path / PICKLE).is_file():
            raise AdapterFileError(f"{path} holds {PICKLE}, a pickle, which deltatune never loads; re-save the "
                                   "adapter with peft's save_pretrained(..., safe_serialization=True)")
        raise AdapterFileError(f"no PEFT adapter at {path}: expected {WEIGHTS} and {CONFIG}")
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise AdapterFileError(f"{path} has {WEIGHTS} but no {CONFIG}")
    if cfg_file.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{cfg_file} is larger than {_MAX_CONFIG_BYTES} bytes; not a PEFT adapter config")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{cfg_file} is not valid JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cfg_file} must hold a JSON object")
    peft_type = config.get("peft_type")
    if _method_of(peft_type) is None:
        raise AdapterFileError(f"{cfg_file}: peft_type {peft_type!r} has no deltatune counterpart; deltatune reads "
                               f"{', '.join(sorted(peft_types().values()))}")
    io._check_file(path / WEIGHTS)  # a regular file within DELTATUNE_MAX_ADAPTER_MB, checked before it is read
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise AdapterFileError(f"{path / WEIGHTS} is not a readable safetensors file: {str(err)[:200]}") from None
    for k, t in tensors.items():
        if t.dtype not in _FLOATS:
            raise AdapterFileError(f"{path / WEIGHTS}: tensor '{k}' is {t.dtype}, not a floating-point weight")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{path / WEIGHTS}: tensor '{k}' holds NaN or Inf values; the adapter is damaged")
    return config, tensors


def _get(cfg, key, types, default, file):
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, types):
        raise AdapterFileError(f"{file}: field '{key}' has an unexpected value {value!r}")
    return value


def to_deltatune(model, path) -> tuple[dict, dict]:
    """(config, tensors) in deltatune's format (what ``io.read_adapter`` returns) for the PEFT adapter at
    ``path`` on ``model``; ``io.load_adapter`` then attaches and fills it like any deltatune adapter."""
    path = Path(path)
    config, raw = read(path)
    file = str(path / CONFIG)
    cls = _method_of(config["peft_type"])
    bridge = Bridge(model, file)
    where = _where(config["peft_type"])
    tensors = {}
    for k, t in raw.items():
        if not k.startswith(where):
            if k in ("prompt_embeddings",):
                tensors[k] = t
                continue
            if k.startswith("base_model.") and k[len("base_model."):] in cls.peft_shared:  # on the tuner (VeRA's vera_A)
                tensors[k[len("base_model."):]] = t
                continue
            raise AdapterFileError(f"{file}: unexpected tensor '{k}' in a {config['peft_type']} adapter")
        tensors[k[len(where):]] = t
    saved = _get(config, "modules_to_save", list, [], file) or []
    head, rest = {}, {}
    for k, t in tensors.items():
        parts = k.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]  # peft's rule: a module name ending in m
        if any(isinstance(m, str) and o.endswith(m) for o in owners for m in saved):
            head[k] = t
        else:
            rest[k] = t
    try:
        if cls.peft_target_rule:
            _check_selected(bridge, rest, config)
        options, deltas = cls.from_peft(bridge, config, rest)
    except ConfigError as err:
        raise AdapterFileError(f"{path}: {err}") from None
    out = {f"delta.{k}": v for k, v in deltas.items()}
    out.update({f"base.{k}": v for k, v in bridge.base.items()})  # a selection's base parameters (LN tuning)
    out.update(_head_in(model, bridge.prefix, head, file))
    dt_config = {
        "format": io.FORMAT, "format_version": io.VERSION, "adapter": "default", "method": cls.name,
        "options": options, "folded": True, "base": {**io.base_identity(model), "fingerprint": None},
        "tensors": {k: list(v.shape) for k, v in out.items()}, "source": "peft",
    }
    return dt_config, out


def _check_selected(bridge: Bridge, tensors: dict, config: dict) -> None:
    """Every tensor sits on a module the config selects (:meth:`Bridge.selects`): peft loads a tensor of any other
    module nowhere, so the adapter it computes would not be the one the file's tensors describe."""
    modules = {n for n, _ in bridge.root.named_modules() if n}
    for k in tensors:
        parts = k.split(".")
        i = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None)
        # a tuner's tensor: the module, then the tuner's own part, whose first name holds an underscore (peft's
        # prefixes lora_, hada_, ia3_, ..., ln_tuning_layers, base_layer); any other name is the method's to refuse
        if i is None or "_" not in parts[i]:
            continue
        name = ".".join(parts[:i])
        if not bridge.selects(config, name):
            fields = ", ".join(f"{f}={config[f]!r}" for f in ("target_modules", "exclude_modules", "layers_to_transform",
                                                              "layers_pattern") if config.get(f) is not None)
            raise AdapterFileError(f"{bridge.file}: tensor '{k}' sits on module '{name}', which the config ({fields}) "
                                   f"does not select: peft would leave it out, and the {config['peft_type']} adapter it loads "
                                   "would differ from these tensors; the config or the tensors are damaged")


def _head_in(model, prefix, head: dict, file: str) -> dict:
    """head.<param> for every trainable head parameter of ``model``: peft's modules_to_save where it saved
    them, else the model's own values (peft left those modules as they were)."""
    _, backbone = sites.find_backbone(model)
    inside = {id(p) for _, p in sites.backbone_parameters(model)}
    out_emb = None
    get = getattr(model, "get_output_embeddings", None)
    try:
        out_emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        out_emb = None
    skip = inside | ({id(p) for p in out_emb.parameters()} if out_emb is not None else set())
    names = [n for n, p in model.named_parameters() if not n.startswith("deltatune.") and id(p) not in skip]
    given = {_full(prefix, k): t for k, t in head.items()}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise AdapterFileError(f"{file}: modules_to_save holds {unknown[:3]}, which are not this model's head "
                               "(deltatune trains the head outside the backbone, the adapter's deltas, nothing else)")
    params = dict(model.named_parameters())
    return {f"head.{n}": (given[n] if n in given else params[n].detach().to("cpu")) for n in names}


