"""Saving and loading adapters: safetensors plus JSON, never pickle, validated before the model is touched.

An adapter directory holds ``adapter.safetensors`` (the tensors, with the full config in its
metadata, so one atomic file is the source of truth) and ``adapter_config.json`` (the same config,
for people and other tools). Tensor names: ``delta.<site key>.<param>`` for delta modules,
``base.<param>`` for base parameters a selection method trained, ``head.<param>`` for the head.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .. import registry, sites, store as core
from ..errors import AdapterFileError, ConfigError, DeltatuneError
# The durable-storage helpers live in storage.py; imported here so that io.atomic_write_* keep working.
from ..storage import atomic_write_bytes, atomic_write_json, fsync_dir, storage_error  # noqa: F401

FORMAT, VERSION = "deltatune.adapter", 1
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"


def base_identity(model) -> dict:
    _, backbone = sites.find_backbone(model)
    d_model, *_ = sites.attention_shape(model)
    return {
        "class": type(backbone).__name__,
        "model_type": getattr(backbone.config, "model_type", None),
        "family": sites.family_of(model),
        "hidden_size": d_model,
        "num_layers": sites.num_layers(model),
        "dtype": _name(next(backbone.parameters()).dtype),
    }


def _one_adapter(store, adapter):
    if adapter is not None:
        if adapter not in store.records:
            raise ConfigError(f"no adapter named '{adapter}'; attached adapters: {sorted(store.records)}")
        return adapter
    if len(store.active) != 1:
        raise ConfigError(f"{len(store.active)} adapters are active ({sorted(store.active)}); pass adapter=NAME")
    return next(iter(store.active))


def adapter_tensors(model, adapter: str | None = None, fold: bool = True) -> tuple[dict, dict]:
    """(tensors, config) of one adapter, as they are saved."""
    store = core.require_store(model)
    name = _one_adapter(store, adapter)
    info = store.records[name]
    tensors = {}
    for key, delta in store.adapters[name].items():
        state = delta.folded_state() if fold and hasattr(delta, "folded_state") else delta.state_dict()
        for pname, t in state.items():
            tensors[f"delta.{key}.{pname}"] = t
    params = dict(model.named_parameters(remove_duplicate=False))
    seen = set()  # tied weights (T5's shared/embed_tokens, GPT-2's wte/lm_head) are saved once, under the first name
    for kind, names in (("base", info.selected), ("head", info.head)):
        for pname in names:
            if id(params[pname]) not in seen:
                seen.add(id(params[pname]))
                tensors[f"{kind}.{pname}"] = params[pname]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    options = info.method.folded_options() if fold else info.method.options()
    config = {
        "format": FORMAT,
        "format_version": VERSION,
        "adapter": name,
        "method": info.method.name,
        "options": options,
        "folded": fold,
        "base": {**base_identity(model), "fingerprint": info.fingerprint},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    labels = getattr(model, "label_names", None)  # a classifier's class names (train sets them from the task)
    if info.head and labels:
        config["labels"] = [str(x) for x in labels]
    return tensors, config


def save(model, path, adapter: str | None = None, fold: bool = True) -> Path:
    """Save one adapter to directory ``path`` (atomically) in deltatune's format. ``fold=False`` keeps
    training-only parts."""
    tensors, config = adapter_tensors(model, adapter, fold)
    path = Path(path)
    blob = st_save(tensors, metadata={"deltatune": json.dumps(config, sort_keys=True)})
    atomic_write_bytes(path / WEIGHTS, blob)
    atomic_write_json(path / CONFIG, config)
    return path


# What deltatune writes: the parameters of floating-point models. Anything else (complex, integer, bool,
# float8) is refused before it is read, so the finiteness check below covers every tensor loaded.
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
INDEX_SUFFIX = ".indices"  # int64 positions of a sparse delta (deltas.Sparse): the one integer tensor written
MAX_MB_ENV, MAX_MB_DEFAULT = "DELTATUNE_MAX_ADAPTER_MB", 16384


def _max_bytes(file) -> tuple[int, float]:
    text = os.environ.get(MAX_MB_ENV, "")
    try:
        mb = float(text) if text.strip() else MAX_MB_DEFAULT
    except ValueError:
        mb = float("nan")
    if not mb > 0:
        raise AdapterFileError(f"{MAX_MB_ENV}={text!r} must be a positive size in megabytes (reading {file})")
    return (int(mb * 2**20) if math.isfinite(mb) else 2**62), mb


def _check_file(file: Path) -> None:
    """A regular file of bounded size: a FIFO would block the open, /dev/zero would never end."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise AdapterFileError(f"no adapter at {file}: expected a directory written by dt.save_adapter") from None
    except OSError as err:
        raise AdapterFileError(f"{file}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise AdapterFileError(f"{file} is not a regular file (a device, FIFO, socket or directory); an adapter is "
                               f"the file {WEIGHTS} written by dt.save_adapter")
    limit, mb = _max_bytes(file)
    if st.st_size > limit:
        raise AdapterFileError(f"{file} is {st.st_size / 2**20:.3g} MB, more than the {mb:g} MB limit for adapter "
                               f"files; set {MAX_MB_ENV} to a larger number of megabytes to read it")


def read_adapter(path) -> tuple[dict, dict]:
    """(config, tensors) from an adapter directory or file, validated as data (not against a model)."""
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    _check_file(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            config = _read_config(file, f.metadata() or {})
            expected = config["tensors"]
            keys = list(f.keys())
            missing, extra = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
            if missing or extra:
                raise AdapterFileError(f"{file}: tensors do not match its config (missing {missing[:5]}, extra {extra[:5]})")
            for k in keys:  # dtype and shape from the header, before any tensor is read
                piece = f.get_slice(k)
                if piece.get_dtype() not in DTYPES and not (k.endswith(INDEX_SUFFIX) and piece.get_dtype() == "I64"):
                    raise AdapterFileError(f"{file}: tensor '{k}' is stored as {piece.get_dtype()}; deltatune writes "
                                           f"only {', '.join(DTYPES)} tensors")
                if list(piece.get_shape()) != list(expected[k]):
                    raise AdapterFileError(f"{file}: tensor '{k}' has shape {list(piece.get_shape())}, its config "
                                           f"says {expected[k]}")
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{file} is not a readable safetensors file (truncated or corrupted?): {err}") from None
    for k, t in tensors.items():
        if t.dtype == torch.int64 and k.endswith(INDEX_SUFFIX):  # a sparse delta's flat positions
            if t.dim() != 1 or (t.numel() and int(t.min()) < 0) or t.unique().numel() != t.numel():
                raise AdapterFileError(f"{file}: tensor '{k}' must hold distinct non-negative positions; "
                                       "the adapter is damaged")
            continue
        if t.dtype not in DTYPES.values() or not torch.isfinite(t).all():
            raise AdapterFileError(f"{file}: tensor '{k}' holds NaN or Inf values; the adapter is damaged")
    return config, tensors


def _read_config(file, meta: dict) -> dict:
    try:
        config = json.loads(meta["deltatune"])
    except KeyError:
        raise AdapterFileError(f"{file} carries no deltatune config in its metadata; was it written by dt.save_adapter?") from None
    except (ValueError, RecursionError) as err:  # malformed JSON, or nested deeper than the parser goes
        raise AdapterFileError(f"{file}: the deltatune config in its metadata is not valid JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file}: the deltatune config in its metadata must be a JSON object")
    _check_config(file, config)
    return config


def _check_config(file, config) -> None:
    def need(key, typ):
        if not isinstance(config.get(key), typ):
            raise AdapterFileError(f"{file}: config field '{key}' must be {typ.__name__}, got {config.get(key)!r}")

    if config.get("format") != FORMAT:
        raise AdapterFileError(f"{file}: not a deltatune adapter (format {config.get('format')!r})")
    need("format_version", int)
    if config["format_version"] > VERSION:
        raise AdapterFileError(
            f"{file}: format version {config['format_version']} is newer than this deltatune reads ({VERSION}); upgrade deltatune"
        )
    for key, typ in (("method", str), ("adapter", str), ("options", dict), ("base", dict), ("tensors", dict)):
        need(key, typ)
    if config["method"] not in registry.REGISTRY:
        raise AdapterFileError(
            f"{file}: method '{config['method']}' is not registered here; known: {', '.join(sorted(registry.REGISTRY))}"
        )
    for key in registry.LEGACY_OPTIONS:  # written by earlier versions; no longer a method option
        config["options"].pop(key, None)
    try:  # the name comes from the file: a plain word, never a path
        core.check_adapter_name(config["adapter"])
    except ConfigError as err:
        raise AdapterFileError(f"{file}: config field 'adapter': {err}") from None
    try:  # options are checked as data here, so that none can clash with attach()'s own arguments
        registry.build_method(config["method"], config["options"])
    except ConfigError as err:
        raise AdapterFileError(f"{file}: cannot rebuild the adapter: {err}") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as err:  # an option no check foresaw
        raise AdapterFileError(f"{file}: cannot rebuild the adapter from its options: {_brief(err)}") from None
    for key, shape in config["tensors"].items():
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
            raise AdapterFileError(f"{file}: config field 'tensors' must map names to shapes (lists of ints), "
                                   f"got {key!r}: {shape!r}")


def attach_loaded(model, path, config: dict, tensors: dict, adapter: str | None = None, check_base: bool = True,
                  heads: dict | None = None):
    """Attach the adapter described by ``(config, tensors)`` (as :func:`read_adapter` returns them, or as a
    format converts them) to ``model`` and load its weights; ``path`` names the source in errors.
    See :func:`deltatune.formats.load_adapter`."""
    if heads is not None:  # the caller keeps the task head (one per adapter in deltatune.serve), not the model
        heads.update({k: tensors.pop(k) for k in [k for k in tensors if k.startswith("head.")]})
    name = adapter or config["adapter"]
    if check_base:
        want, have = config["base"], base_identity(model)
        for key in ("family", "hidden_size", "num_layers"):
            if want.get(key) != have[key]:
                raise AdapterFileError(
                    f"{path}: adapter was trained on a {want.get('class')} with {key}={want.get(key)}, "
                    f"this model has {key}={have[key]}; load it onto the model it was trained on"
                )
    try:
        core.attach(model, config["method"], adapter=name, **config["options"])
    except DeltatuneError as err:
        raise AdapterFileError(f"{path}: cannot rebuild the adapter: {err}") from None
    except Exception as err:  # options no check foresaw, or that ask for more memory than there is (r=2**40)
        raise AdapterFileError(f"{path}: cannot rebuild the adapter from its options {_short(config['options'])}: "
                               f"{_brief(err)}") from None
    try:
        store = core.store_of(model)
        info = store.records[name]
        if check_base:
            _check_fingerprint(path, model, config["base"], info)
        live, _ = adapter_tensors(model, name, fold=config.get("folded", True))
        if heads is not None:  # the model's own head (if any) is not the adapter's
            live = {k: v for k, v in live.items() if not k.startswith("head.")}
        missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        if missing or extra:
            raise AdapterFileError(f"{path}: tensors do not fit this model (missing {missing[:5]}, unexpected {extra[:5]})")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(live[k].shape):
                raise AdapterFileError(f"{path}: '{k}' has shape {tuple(t.shape)}, this model needs {tuple(live[k].shape)}")
            if live[k].dtype != t.dtype and not torch.isfinite(t.to(live[k].dtype)).all():
                raise AdapterFileError(f"{path}: '{k}' holds values beyond the range of this model's {_name(live[k].dtype)} "
                                       f"weights (it is stored as {_name(t.dtype)}); the adapter is damaged or was "
                                       "trained at another precision")
        _copy_in(model, store, name, tensors)
        for key, part in store.adapters[name].named_modules():  # sparse positions must fall inside their weight
            size, idx = getattr(part, "shape", None), getattr(part, "indices", None)
            if isinstance(size, tuple) and torch.is_tensor(idx) and idx.numel() and int(idx.max()) >= size[0] * size[1]:
                raise AdapterFileError(f"{path}: '{key}' has sparse positions beyond its {size[0]}x{size[1]} weight; "
                                       "the adapter is damaged or belongs to another model")
    except BaseException as err:
        core.detach(model, name)
        if isinstance(err, Exception) and not isinstance(err, DeltatuneError):
            raise AdapterFileError(f"{path}: cannot load the adapter: {_brief(err)}") from None
        raise
    return model


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _short(options: dict) -> str:
    text = repr(options)
    return text if len(text) <= 300 else text[:300] + "...}"


# Which precision holds another exactly: a float32 model cast to float16 gives the float16 copy's weights.
_WIDER = {"float64": {"float32", "float16", "bfloat16"}, "float32": {"float16", "bfloat16"}}


def _check_fingerprint(path, model, base: dict, info) -> None:
    """The base weights are those the adapter was trained on, compared at the precision it was trained at."""
    want = base.get("fingerprint")
    if want is None or want == info.fingerprint:
        return
    saved, have = base.get("dtype"), base_identity(model)["dtype"]
    fix = "load onto the same pretrained model, or pass check_base=False"
    if not isinstance(saved, str) or saved == have:
        raise AdapterFileError(f"{path}: the base weights differ from those the adapter was trained on (fingerprint "
                               f"{info.fingerprint} vs {want}{', both ' + have if saved == have else ''}); {fix}")
    if saved in _WIDER.get(have, ()):
        if core.fingerprint(model, set(info.selected), dtype=getattr(torch, saved)) == want:
            return
        raise AdapterFileError(f"{path}: the base weights differ from those the adapter was trained on, even "
                               f"compared at {saved}, the precision it was trained at (this model holds {have} "
                               f"weights); {fix}")
    raise AdapterFileError(f"{path}: the adapter was trained on {saved} base weights and this model holds {have} "
                           f"weights, which cannot be compared with them; load it onto the {saved} model (then "
                           f"convert with .to(torch.{have})), or pass check_base=False")


@torch.no_grad()
def _copy_in(model, store, name, tensors):
    modules = store.adapters[name]
    params = dict(model.named_parameters(remove_duplicate=False))
    for k, t in tensors.items():
        kind, rest = k.split(".", 1)
        if kind == "delta":
            key, pname = rest.split(".", 1)
            target = modules[key].get_parameter(pname) if pname in dict(modules[key].named_parameters()) else modules[key].get_buffer(pname)
        else:
            target = params[rest]
        target.copy_(t.to(dtype=target.dtype, device=target.device))
