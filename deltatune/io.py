"""Saving and loading adapters: safetensors plus JSON, never pickle, validated before the model is touched.

An adapter directory holds ``adapter.safetensors`` (the tensors, with the full config in its
metadata, so one atomic file is the source of truth) and ``adapter_config.json`` (the same config,
for people and other tools). Tensor names: ``delta.<site key>.<param>`` for delta modules,
``base.<param>`` for base parameters a selection method trained, ``head.<param>`` for the head.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from . import core, sites
from .errors import AdapterFileError, ConfigError, DeltatuneError, StorageError

FORMAT, VERSION = "deltatune.adapter", 1
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"


_CAUSES = {  # errno -> the cause and its fix, in words
    errno.ENOSPC: "the disk is full (no space left on device); free some space",
    errno.EDQUOT: "the disk quota is exceeded; free some space",
    errno.EROFS: "the file system is read-only; choose another directory",
    errno.EACCES: "permission denied; choose a directory you can write to",
    errno.EPERM: "permission denied; choose a directory you can write to",
    errno.EFBIG: "the file is larger than this system allows",
}


def storage_error(err: OSError, path) -> StorageError:
    """A StorageError naming ``path`` and the cause of ``err`` in words ("the disk is full ...")."""
    if isinstance(err, StorageError):
        return err
    return StorageError(f"cannot write {path}: {_CAUSES.get(err.errno) or err.strerror or err}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    A failed write (a full disk, say) removes its temporary file, keeps the old file and raises
    :class:`StorageError`, naming the path and the cause.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise storage_error(err, path) from err
        raise
    fsync_dir(path.parent)


def fsync_dir(path) -> None:
    """Make the renames in directory ``path`` durable (a power cut after this keeps them); best effort."""
    try:
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # not possible on every platform or file system
        pass


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def base_identity(model) -> dict:
    _, backbone = sites.find_backbone(model)
    d_model, *_ = sites.attention_shape(model)
    return {
        "class": type(backbone).__name__,
        "model_type": getattr(backbone.config, "model_type", None),
        "family": sites.family_of(model),
        "hidden_size": d_model,
        "num_layers": sites.num_layers(model),
    }


def _one_adapter(store, adapter):
    if adapter is not None:
        if adapter not in store.info:
            raise ConfigError(f"no adapter named '{adapter}'; attached adapters: {sorted(store.info)}")
        return adapter
    if len(store.active) != 1:
        raise ConfigError(f"{len(store.active)} adapters are active ({sorted(store.active)}); pass adapter=NAME")
    return next(iter(store.active))


def adapter_tensors(model, adapter: str | None = None, fold: bool = True) -> tuple[dict, dict]:
    """(tensors, config) of one adapter, as they are saved."""
    store = core._require_store(model)
    name = _one_adapter(store, adapter)
    info = store.info[name]
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
    return tensors, config


def save_adapter(model, path, adapter: str | None = None, fold: bool = True) -> Path:
    """Save one adapter to directory ``path`` (atomically). ``fold=False`` keeps training-only parts."""
    tensors, config = adapter_tensors(model, adapter, fold)
    path = Path(path)
    blob = st_save(tensors, metadata={"deltatune": json.dumps(config, sort_keys=True)})
    atomic_write_bytes(path / WEIGHTS, blob)
    atomic_write_json(path / CONFIG, config)
    return path


def read_adapter(path) -> tuple[dict, dict]:
    """(config, tensors) from an adapter directory or file, validated as data (not against a model)."""
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.exists():
        raise AdapterFileError(f"no adapter at {file}: expected a directory written by dt.save_adapter")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{file} is not a readable safetensors file (truncated or corrupted?): {err}") from None
    try:
        config = json.loads(meta["deltatune"])
    except KeyError:
        raise AdapterFileError(f"{file} carries no deltatune config in its metadata; was it written by dt.save_adapter?") from None
    except (ValueError, RecursionError) as err:  # malformed JSON, or nested deeper than the parser goes
        raise AdapterFileError(f"{file}: the deltatune config in its metadata is not valid JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file}: the deltatune config in its metadata must be a JSON object")
    _check_config(file, config)
    expected = config["tensors"]
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{file}: tensors do not match its config (missing {missing[:5]}, extra {extra[:5]})")
    for k, t in tensors.items():
        if list(t.shape) != list(expected[k]):
            raise AdapterFileError(f"{file}: tensor '{k}' has shape {list(t.shape)}, its config says {expected[k]}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterFileError(f"{file}: tensor '{k}' holds NaN or Inf values; the adapter is damaged")
    return config, tensors


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
    if config["method"] not in core.REGISTRY:
        raise AdapterFileError(
            f"{file}: method '{config['method']}' is not registered here; known: {', '.join(sorted(core.REGISTRY))}"
        )
    try:  # the name comes from the file: a plain word, never a path
        core.check_adapter_name(config["adapter"])
    except ConfigError as err:
        raise AdapterFileError(f"{file}: config field 'adapter': {err}") from None
    try:  # options are checked as data here, so that none can clash with attach()'s own arguments
        core.build_method(config["method"], config["options"])
    except ConfigError as err:
        raise AdapterFileError(f"{file}: cannot rebuild the adapter: {err}") from None
    for key, shape in config["tensors"].items():
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
            raise AdapterFileError(f"{file}: config field 'tensors' must map names to shapes (lists of ints), "
                                   f"got {key!r}: {shape!r}")


def load_adapter(model, path, adapter: str | None = None, check_base: bool = True):
    """Attach the adapter saved at ``path`` to ``model`` (a fresh base) and load its weights.

    Everything is validated first (format, method, options, base architecture, shapes, finite
    values, and a fingerprint of the base weights unless ``check_base=False``); on any error the
    model is left as it was.
    """
    config, tensors = read_adapter(path)
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
    except (RuntimeError, MemoryError) as err:  # options that ask for more memory than there is (r=2**40)
        raise AdapterFileError(f"{path}: cannot rebuild the adapter from its options {config['options']}: "
                               f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}") from None
    try:
        store = core.store_of(model)
        info = store.info[name]
        if check_base and config["base"].get("fingerprint") not in (None, info.fingerprint):
            raise AdapterFileError(
                f"{path}: the base weights differ from those the adapter was trained on "
                f"(fingerprint {info.fingerprint} vs {config['base']['fingerprint']}); "
                "load onto the same pretrained model, or pass check_base=False"
            )
        live, _ = adapter_tensors(model, name, fold=config.get("folded", True))
        missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        if missing or extra:
            raise AdapterFileError(f"{path}: tensors do not fit this model (missing {missing[:5]}, unexpected {extra[:5]})")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(live[k].shape):
                raise AdapterFileError(f"{path}: '{k}' has shape {tuple(t.shape)}, this model needs {tuple(live[k].shape)}")
        _copy_in(model, store, name, tensors)
    except BaseException:
        core.detach(model, name)
        raise
    return model


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
