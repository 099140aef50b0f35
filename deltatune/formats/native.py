"""Saving and loading adapters: safetensors plus JSON, never pickle, validated before the model is touched.

An adapter directory holds ``adapter.safetensors`` (the tensors, with the full config in its
metadata, so one atomic file is the source of truth) and ``adapter_config.json`` (the same config,
for people and other tools). Tensor names: ``delta.<site key>.<param>`` for delta modules,
``base.<param>`` for base parameters a selection method trained, ``head.<param>`` for the head.

Delta and base names are written relative to the pretrained backbone (``config["keys"] == "backbone"``;
``base.backbone_path`` records where it sat in the saved model), so an adapter trained inside a task
wrapper (``deltatune.models.BiEncoder``: ``backbone.encoder...``) loads onto the plain Hugging Face model
(``encoder...``) and back; head names stay relative to the saved model. Files without ``keys`` (written
before, or converted from another format) name everything from the model they were attached to, and
their backbone's place is inferred on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .. import registry, sites, store as core
from ..deltas import folded_state
from ..errors import AdapterFileError, ConfigError, DeltatuneError
from ..settings import env_bytes
# The durable-storage helpers live in storage.py; imported here so that io.atomic_write_* keep working.
from ..storage import atomic_write_bytes, atomic_write_json, fsync_dir, storage_error  # noqa: F401

FORMAT, VERSION = "deltatune.adapter", 1
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"


def base_identity(model) -> dict:
    """What the adapter file says of its base. ``quantized`` (``{"scheme", "library", "layers"}``) records a base
    whose linear layers were quantized (deltatune.quantize); the fingerprint is then the float base's it was
    quantized from, so the adapter loads onto that float base, and a float base's adapter onto the quantized one."""
    _, backbone = sites.find_backbone(model)
    d_model, *_ = sites.attention_shape(model)
    identity = {
        "class": type(backbone).__name__,
        "model_type": getattr(backbone.config, "model_type", None),
        "family": sites.family_of(model),
        "hidden_size": d_model,
        "num_layers": sites.num_layers(model),
        "dtype": _name(next(backbone.parameters()).dtype),
    }
    quantized = sites.quantization(model)
    if quantized is not None:
        identity["quantized"] = quantized
    return identity


def _fingerprint(model, info) -> str:
    """The base fingerprint an adapter records: the one taken when it was attached (before any merge; on a
    quantized base, the float base's, read from what each quantized layer kept of it: sites.base_digest)."""
    return info.fingerprint


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
        state = folded_state(delta) if fold else delta.state_dict()
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
    options = info.method.saved_options(fold)
    config = {
        "format": FORMAT,
        "format_version": VERSION,
        "adapter": name,
        "method": info.method.name,
        "options": options,
        "folded": fold,
        "base": {**base_identity(model), "fingerprint": _fingerprint(model, info)},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    labels = getattr(model, "label_names", None)  # a classifier's class names (train sets them from the task)
    if info.head and labels:
        config["labels"] = [str(x) for x in labels]
    task_kind = getattr(model, "task_kind", None)  # the task kind the model was built for (tasks.kinds): serve reads it
    if isinstance(task_kind, str):
        config["task_kind"] = task_kind
    return tensors, config


def save(model, path, adapter: str | None = None, fold: bool = True) -> Path:
    """Save one adapter to directory ``path`` (atomically) in deltatune's format. ``fold=False`` keeps
    training-only parts."""
    tensors, config = portable(model, *adapter_tensors(model, adapter, fold))
    path = Path(path)
    blob = st_save(tensors, metadata={"deltatune": json.dumps(config, sort_keys=True)})
    atomic_write_bytes(path / WEIGHTS, blob)
    atomic_write_json(path / CONFIG, config)
    return path


KEYS = "backbone"  # config["keys"]: delta and base names are relative to the backbone


def _module_key(path: str) -> str:
    """A module path as it appears in a delta's key (dots are the key's own separator)."""
    return path.replace(".", ":")


def _rebase(name: str, old: str, new: str) -> str | None:
    """``name`` (a ``delta.``/``base.`` tensor name) with the backbone path ``old`` replaced by ``new``;
    None where it does not lie under ``old``. Head tensors and shared delta parts carry no path."""
    kind, rest = name.split(".", 1)
    if kind == "head" or rest.startswith("shared~"):
        return name
    sep = ":" if kind == "delta" else "."
    old_p, new_p = (_module_key(old), _module_key(new)) if kind == "delta" else (old, new)
    if old_p:
        if not rest.startswith(old_p + sep):
            return None
        rest = rest[len(old_p) + 1:]
    return f"{kind}.{new_p}{sep}{rest}" if new_p else f"{kind}.{rest}"


def portable(model, tensors: dict, config: dict) -> tuple[dict, dict]:
    """(tensors, config) as saved: delta and base names relative to the backbone, so that the file loads onto
    the plain Hugging Face model as well as onto the task model it was trained in. Where a trained base
    parameter lies outside the backbone (an untied LM head) the names stay relative to ``model``."""
    path, _ = sites.find_backbone(model)
    renamed = {_rebase(k, path, ""): t for k, t in tensors.items()}
    if None in renamed:
        return tensors, config
    store = core.require_store(model)
    info = store.records[config["adapter"]]
    base = {**config["base"], "backbone_path": path, "model_class": type(model).__name__}
    others = {n for r in store.records.values() if r is not info for n in r.selected}
    if not store.merged and not others:  # the frozen weights are those it was trained on: say per part
        if parts := part_digests(model, set(info.selected)):
            base["parts"] = parts
    return renamed, {**config, "keys": KEYS, "base": base, "tensors": {k: list(v.shape) for k, v in renamed.items()}}


def _as_in_model(model, path, config: dict, tensors: dict, live: set) -> tuple[dict, str]:
    """(the file's tensors under this model's names, the backbone path the file was saved with)."""
    here, _ = sites.find_backbone(model)
    if config.get("keys") == KEYS:
        saved = config["base"].get("backbone_path")
        moved = {_rebase(k, "", here): t for k, t in tensors.items()}
        return moved, saved if isinstance(saved, str) else here
    # Written from the model the adapter was attached to: where was the backbone in it? As here, or at
    # a prefix of the first delta's (or base parameter's) path, the one under which the names fit.
    if not set(tensors) - live:
        return tensors, here
    named = next((k for k in sorted(tensors) if not k.startswith(("head.", "delta.shared~"))), None)
    if named is not None:
        kind, rest = named.split(".", 1)
        parts = rest.split(":" if kind == "delta" else ".")
        for i in range(1, len(parts)):
            old = ".".join(parts[:i])
            moved = {_rebase(k, old, here): t for k, t in tensors.items()}
            if None not in moved and not set(moved) - live:
                return moved, old
    return tensors, here


def _holder(backbone, path: str):
    """``backbone`` seen at ``path`` inside a bare module: parameter names as in a model that held it there."""
    holder = backbone
    for part in reversed(path.split(".") if path else []):
        outer = torch.nn.Module()
        outer.add_module(part, holder)
        holder = outer
    return holder


def _saved_fingerprint(model, path: str, selected: list, dtype=None) -> str:
    """This model's base fingerprint as it reads with its backbone at ``path`` (where the saved model had it)."""
    here, backbone = sites.find_backbone(model)
    skip = {name for n in selected if (name := _rebase("base." + n, here, path)) is not None}
    return sites.base_digest(_holder(backbone, path), {n[len("base."):] for n in skip}, dtype=dtype)


def part_digests(model, skip: set, dtype: torch.dtype | None = None) -> dict:
    """A short digest of each part of the backbone's weights (each block, the embeddings, the final norm...),
    from a strided sample of every tensor as the fingerprint takes it (at ``dtype``, default each tensor's
    own): which parts differ, when a base does. Empty where the weights are sharded over processes (FSDP's
    DTensors: a sample of the whole tensor would need every process)."""
    prefix, backbone = sites.find_backbone(model)
    try:
        block = re.compile(sites.SITE_MAP[sites.family_of(model)]["block"] + r"(?=\.)")
    except (ConfigError, KeyError):
        block = None
    digests: dict = {}
    stand_in = sites.float_identities(backbone)  # a quantized layer reads as the float weight it was made from
    for name, p in sorted(backbone.named_parameters()):
        if name.startswith("deltatune.") or (f"{prefix}.{name}" if prefix else name) in skip:
            continue
        if name not in stand_in and type(p.data) is not torch.Tensor:
            return {}
        m = block.match(name) if block is not None else None
        part = m.group(0) if m else name.split(".")[0]
        shape, sample = stand_in.get(name) or (tuple(p.shape), sites.weight_sample(p))
        sample = (sample.to(dtype) if dtype is not None and sample.dtype.is_floating_point else sample).float().cpu()
        d = digests.setdefault(part, hashlib.blake2b(digest_size=6))
        d.update(name.encode() + str(shape).encode() + sample.numpy().tobytes())
    return {part: d.hexdigest() for part, d in digests.items()}


# What deltatune writes: the parameters of floating-point models. Anything else (complex, integer, bool,
# float8) is refused before it is read, so the finiteness check below covers every tensor loaded.
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
INDEX_SUFFIX = ".indices"  # int64 positions of a sparse delta (deltas.Sparse): the one integer tensor written
MAX_MB_ENV, MAX_MB_DEFAULT = "DELTATUNE_MAX_ADAPTER_MB", 16384


def _max_bytes(file) -> tuple[int, float]:
    return env_bytes(MAX_MB_ENV, MAX_MB_DEFAULT, AdapterFileError, reading=str(file))


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
    for key, value in registry.REGISTRY[config["method"]].old_file_options.items():
        config["options"].setdefault(key, value)  # options added after the file was written: the old layout
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
    cls = registry.REGISTRY.get(config["method"])
    named = cls.paths_named(config["options"]) if cls is not None else []
    if named:
        raise AdapterFileError(f"{path}: option {named[0]!r} names files to read ({_short(config['options'])}); a saved "
                               f"{config['method']} adapter carries what they gave and loading reads no path named in a "
                               "file: the file was edited or damaged; save the adapter again with dt.save_adapter")
    _check_built_size(model, path, config, tensors)
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
        live, _ = adapter_tensors(model, name, fold=config.get("folded", True))
        if heads is not None:  # the model's own head (if any) is not the adapter's
            live = {k: v for k, v in live.items() if not k.startswith("head.")}
        tensors, saved_path = _as_in_model(model, path, config, tensors, set(live))
        if check_base:
            _check_fingerprint(path, model, config["base"], info, saved_path)
        missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        if extra and all(k.startswith("head.") for k in extra) and not [k for k in missing if not k.startswith("head.")]:
            where = config["base"].get("model_class") or "a task model"
            raise AdapterFileError(
                f"{path}: the adapter carries a task head ({', '.join(k[5:] for k in extra[:3])}) trained in {where}, "
                f"which {type(model).__name__} has no place for; load it onto the task model "
                "(deltatune.tasks.kinds.build_task_model), or pass heads={} to take the head apart from the model")
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


BUILD_SLACK = 8, 2**20  # a saved adapter's deltas hold at most 3x its delta tensors' elements (FourierFT's indices)


def _check_built_size(model, path, config: dict, tensors: dict) -> None:
    """Refuse a file whose options would build deltas far larger than its tensors (a 6 KB LoRA file saying
    r=2**20 asks for 36 GiB on MiniLM) before they are built: the deltas are placed on the meta device
    first, which allocates nothing. A method that cannot place on it (it computes its deltas from the
    weights) is left to the build and the shape checks after it."""
    try:
        cfg = registry.build_method(config["method"], config["options"])
        with torch.device("meta"):
            placements = cfg.placements(model)
    except Exception:
        return
    need = sum(t.numel() for p in placements for t in [*p.delta.parameters(), *p.delta.buffers()])
    have = sum(t.numel() for k, t in tensors.items() if k.startswith("delta."))
    factor, slack = BUILD_SLACK
    if need > factor * have + slack:
        raise AdapterFileError(f"{path}: its options {_short(config['options'])} build deltas of {need:,} values, its "
                               f"tensors hold {have:,}: the options do not belong to these tensors; the file is damaged "
                               "or was edited (save the adapter again with dt.save_adapter)")


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


def _check_fingerprint(path, model, base: dict, info, saved_path: str) -> None:
    """The base weights are those the adapter was trained on, compared at the precision it was trained at and
    with the backbone where the saved model had it (a task wrapper's ``backbone.`` prefix, or none)."""
    want = base.get("fingerprint")
    here, _ = sites.find_backbone(model)
    have_fp = _fingerprint(model, info) if saved_path == here else _saved_fingerprint(model, saved_path, info.selected)
    if want is None or want == have_fp:
        return
    saved, have = base.get("dtype"), base_identity(model)["dtype"]
    fix = "load onto the same pretrained model, or pass check_base=False"
    if not isinstance(saved, str) or saved == have:
        raise AdapterFileError(f"{path}: the base weights differ from those the adapter was trained on: "
                               f"{_what_differs(model, base, info)}; {fix}")
    if saved in _WIDER.get(have, ()):
        if _saved_fingerprint(model, saved_path, info.selected, dtype=getattr(torch, saved)) == want:
            return
        raise AdapterFileError(f"{path}: the base weights differ from those the adapter was trained on, even "
                               f"compared at {saved}, the precision it was trained at (this model holds {have} "
                               f"weights): {_what_differs(model, base, info, getattr(torch, saved))}; {fix}")
    raise AdapterFileError(f"{path}: the adapter was trained on {saved} base weights and this model holds {have} "
                           f"weights, which cannot be compared with them; load it onto the {saved} model (then "
                           f"convert with .to(torch.{have})), or pass check_base=False")


def _what_differs(model, base: dict, info, dtype: torch.dtype | None = None) -> str:
    """Which parts of the backbone differ from the saved model's (the file's per-part digests), in words."""
    parts = base.get("parts")
    _, backbone = sites.find_backbone(model)
    if not isinstance(parts, dict) or not parts:
        return (f"same architecture ({type(backbone).__name__}), other weights (fingerprint {base.get('fingerprint')}, "
                "this model's differs; the file keeps no per-part digests to say which)")
    mine = part_digests(model, set(info.selected), dtype)
    differ = [p for p in parts if mine.get(p) != parts[p]] + [p for p in mine if p not in parts]
    if not differ:  # the same weights under other names, or another set of trained (skipped) parameters
        return ("every part of the backbone holds the saved weights, but its parameter names or the parameters the "
                "adapter trains differ from the saved model's")
    shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
    if len(differ) >= len(parts):
        return (f"every part of the {type(backbone).__name__} differs ({shown}): another checkpoint of the same "
                "architecture, not the model the adapter was trained on")
    return f"{len(differ)} of {len(parts)} parts differ ({shown}; the others match): a modified or merged copy of the model"


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
