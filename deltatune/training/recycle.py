"""Embedding recycling (Saad-Falcon et al., Findings EACL 2023): run the frozen lower part once.

When every active adapter trains nothing below block K (telly with k=K, any method with ``layers``
restricted to blocks >= K), the embeddings and blocks 0..K-1 are a fixed feature extractor (see
``FrozenBelow``: they run in eval mode while training). :func:`prepare` runs them once over every
example of every split and keeps block K-1's output on disk; training and evaluation then start at
block K:

- the cache is one safetensors file per split (``hidden``: the real tokens of every input, one after
  the other, (total tokens, d); ``offsets``: where each input starts), written in the dtype chosen
  (float32: exactly the uncached computation; float16 / bfloat16: half the disk and memory), and read
  back memory-mapped (pages are read when a batch needs them);
- a batch carries its inputs' cached states under the key ``recycled``; a hook on the backbone takes
  it out, the blocks below K return it instead of computing, and the backbone computes what the upper
  blocks need (the attention mask from ``attention_mask``, positions, rotary tables) as usual, so
  every architecture with one stack of blocks works unchanged;
- the cache's name is a hash of the frozen part's weights, K, the token ids of every input (so the
  data, the tokenizer and max_len), the dtype and bf16 autocast: any change builds a new one;
- a cache file is untrusted input (:class:`deltatune.storage.CacheEntry`, :meth:`Cache.verify`): it is
  used only as a regular file of this user whose bounded header names its own key, K, dtype and width,
  one row per input of the input's token count, and finite states; anything else is rebuilt with a
  warning. A build writes a new file at an unpredictable name (``O_EXCL | O_NOFOLLOW``) and renames it;
- the folder is pruned after every use (:func:`prune`): while it holds more than
  ``$DELTATUNE_RECYCLE_MAX_GB`` gigabytes (default 20) or ``$DELTATUNE_RECYCLE_MAX_FILES`` files
  (default 100), the least recently used files go first. Only regular files that carry
  deltatune's marker (``"deltatune": "recycle-cache"`` and their own key in the safetensors
  metadata) are counted or removed, never through a symbolic link, never a cache in use.

Generation (each decoding step feeds new tokens), prompt tuning (it changes the input sequence),
``frozen_dropout`` (the frozen part would change every step) and adapters that train the embeddings
or block 0 cannot be recycled; :func:`frozen_depth` says which and why.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .. import sites as S
from ..errors import ConfigError
from ..settings import env_limit
from ..storage import CacheEntry
from ..models import cache_dir
from ..store import hash_tensors, require_store

FORMAT = 1
DTYPES = {"float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"), "bfloat16": (torch.bfloat16, "BF16")}
KEY = "recycled"  # the batch key that carries the cached states
MARKER = ("deltatune", "recycle-cache")  # in every cache file's metadata: what prune() may remove
MAX_GB_ENV, MAX_GB_DEFAULT = "DELTATUNE_RECYCLE_MAX_GB", 20.0
MAX_FILES_ENV, MAX_FILES_DEFAULT = "DELTATUNE_RECYCLE_MAX_FILES", 100
_NAME = re.compile(r"^[A-Za-z0-9_.-]+-([0-9a-f]{24})\.safetensors$")
# build()'s file while it writes: .NAME.tmp-PID-XXXXXXXX (CacheEntry.temporary; without the random tail before)
_TMP = re.compile(r"^\.([A-Za-z0-9_.-]+-[0-9a-f]{24}\.safetensors)\.tmp-([0-9]+)(?:-[a-z0-9_]+)?$")
STALE_AFTER_S = 3600  # an interrupted build's file: its writer is gone and it has not changed for an hour
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class RecycleError(ConfigError):
    """This run cannot start from a cache of its frozen lower part."""


def frozen_depth(model: nn.Module) -> int:
    """K: the number of bottom blocks (with the embeddings) that no active adapter trains; >= 1, or RecycleError."""
    store = require_store(model)
    methods = ", ".join(sorted({store.records[a].method.name for a in store.active})) or "no adapter"
    if store.frozen is None:
        raise RecycleError(f"--recycle needs a backbone with one stack of blocks; {type(S.find_backbone(model)[1]).__name__} "
                           "(encoder-decoder) has two")
    if store.frozen_dropout:
        raise RecycleError("--recycle caches the frozen layers' output once, so they must run without dropout; "
                           "drop --frozen-dropout (frozen_dropout=True)")
    if any(e.combine.mechanism.extends_input for a in store.active for e in store.records[a].entries):
        raise RecycleError(f"{methods} adds tokens to the input, which changes every layer's input; it cannot be recycled")
    k = min((store.records[a].lowest for a in store.active), default=0)
    if k < 1:
        raise RecycleError(f"{methods} trains the embeddings or block 0, so no frozen lower part is left to cache; "
                           "recycle runs whose lowest trained block is above the embeddings: telly with k >= 1, or a "
                           "method with layers= restricted to the upper blocks (e.g. --set layers=6,7,8,9,10,11)")
    return k


def _blocks(model) -> list[tuple[int, nn.Module]]:
    return [(t.layer, t.module) for t in S.resolve(model, "block")]


def lower_weights_key(model: nn.Module, k: int) -> str:
    """Hash of every weight the frozen part uses: the input embeddings and blocks 0..k-1."""
    store = require_store(model)
    digest = hashlib.sha256()
    modules = list(store.frozen.inputs) + [m for layer, m in _blocks(model) if layer < k]
    for i, m in enumerate(modules):
        hash_tensors(digest, {**dict(m.named_parameters()), **dict(m.named_buffers())}, prefix=f"{i}.")
    return digest.hexdigest()[:20]


# ------------------------------------------------------------------------------------ the cache file


_CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
MAX_HEADER = 1 << 20  # a cache's header names two tensors and a few settings: kilobytes


class Cache:
    """One split's cached states, memory-mapped: ``rows(i)`` is input i's (T_i, d) hidden state.

    The file is data from the shared cache folder, so it is parsed as such: the header is bounded
    (MAX_HEADER) and must name exactly ``hidden`` (total tokens, d) and ``offsets`` (inputs + 1,) int64,
    each of a known dtype, aligned and inside the file; anything else raises RecycleError.
    :meth:`verify` then checks it against the inputs it is asked for.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= min(size - 8, MAX_HEADER):
                raise RecycleError(f"its header is {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict) or set(header) != {"__metadata__", "hidden", "offsets"}:
            raise RecycleError("its header does not name the tensors hidden and offsets only")
        self.meta = header.pop("__metadata__")
        if not isinstance(self.meta, dict) or self.meta.get(MARKER[0]) != MARKER[1]:
            raise RecycleError("it carries no recycling-cache marker")
        start = 8 + n
        storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size)
        tensors = {}
        for name, info in header.items():
            dtype, shape, (begin, end) = _CODES[info["dtype"]], info["shape"], info["data_offsets"]
            item = torch.empty(0, dtype=dtype).element_size()
            if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)
                    and all(isinstance(x, int) for x in (begin, end)) and 0 <= begin <= end <= size - start
                    and end - begin == math.prod(shape) * item and (start + begin) % item == 0):
                raise RecycleError(f"its tensor {name} has a shape or place that does not fit the file")
            tensors[name] = torch.empty(0, dtype=dtype).set_(storage, (start + begin) // item, tuple(shape))
        self.hidden, self.offsets = tensors["hidden"], tensors["offsets"]
        if self.hidden.dim() != 2 or self.offsets.dtype != torch.int64 or self.offsets.dim() != 1:
            raise RecycleError("its tensors are not hidden (tokens, d) and int64 offsets")
        self.k, self.form = int(self.meta["k"]), self.meta["form"]
        if self.form not in ("tuple", "tensor"):
            raise RecycleError(f"its block output form {self.form!r} is unknown")

    def verify(self, *, key: str, k: int, dtype: str, lengths: list[int], width: int) -> "Cache":
        """This cache holds what is asked: its key, depth, dtype and width, one row per input with the
        input's own token count, and finite states only (RecycleError otherwise)."""
        meta = self.meta
        if meta.get("key") != key or str(meta.get("format")) != str(FORMAT) or self.k != k or meta.get("dtype") != dtype:
            raise RecycleError(f"it was written for another key, depth, format or dtype ({meta.get('key')}, k={self.k}, "
                               f"{meta.get('dtype')})")
        if self.hidden.dtype != DTYPES[dtype][0] or self.hidden.shape[1] != width:
            raise RecycleError(f"its states are {self.hidden.dtype} of width {self.hidden.shape[1]}, not {dtype} of {width}")
        expected = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)
        if self.offsets.shape != expected.shape or not torch.equal(self.offsets, expected) \
                or self.hidden.shape[0] != int(expected[-1]):
            raise RecycleError(f"its rows are not these {len(lengths)} inputs' tokens")
        step = max(1, (1 << 24) // max(1, width))  # about 16M values at a time: the map is read once, never whole
        for begin in range(0, self.hidden.shape[0], step):
            if not torch.isfinite(self.hidden[begin:begin + step]).all():
                raise RecycleError("it holds NaN or infinite states")
        return self

    def row(self, i: int) -> torch.Tensor:
        return self.hidden[int(self.offsets[i]):int(self.offsets[i + 1])]


def _write_header(f, tensors: dict, meta: dict) -> int:
    header = {"__metadata__": {k: str(v) for k, v in meta.items()}}
    offset = 0
    for name, (code, shape, nbytes) in tensors.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    return 8 + len(raw)


class _Stop(Exception):
    pass


@torch.no_grad()
def build(model, objective, rows: list[dict], k: int, dtype: str, path: Path, *, batch_size: int, device: str,
          bf16: bool = False, progress: bool = True, meta: dict | None = None) -> Cache:
    """Run the embeddings and blocks 0..k-1 over ``rows`` (token dicts) and write block k-1's outputs to ``path``."""
    from tqdm.auto import tqdm

    torch_dtype, code = DTYPES[dtype]
    _, backbone = S.find_backbone(model)
    d = backbone.config.hidden_size
    lengths = [len(r["input_ids"]) for r in rows]
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    item = torch.empty(0, dtype=torch_dtype).element_size()
    total = int(offsets[-1])
    last = dict(_blocks(model))[k - 1]
    form = {}

    def grab(module, args, output):
        form["form"] = "tuple" if isinstance(output, tuple) else "tensor"
        form["out"] = output[0] if isinstance(output, tuple) else output
        raise _Stop  # nothing above block k-1 is needed

    # Written to a new file at an unpredictable name (O_EXCL | O_NOFOLLOW: a link planted there is never
    # written through), renamed into place when complete.
    entry = CacheEntry(path, (meta or {}).get("key", ""), "recycling cache", root=cache_dir())
    handle = last.register_forward_hook(grab)
    was_training = model.training
    model.eval()
    try:
        with entry.temporary() as f:
            tensors = {"hidden": (code, (total, d), total * d * item), "offsets": ("I64", (len(rows) + 1,), 8 * (len(rows) + 1))}
            start = None
            order = sorted(range(len(rows)), key=lambda i: lengths[i])
            with tqdm(total=len(rows), desc=f"recycling: caching block {k - 1}'s output", disable=not progress,
                      leave=False) as bar:
                for s in range(0, len(order), batch_size):
                    idx = order[s:s + batch_size]
                    batch = {key: v.to(device) for key, v in objective.pad([rows[i] for i in idx]).items()}
                    try:
                        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                            model(**batch)
                    except _Stop:
                        pass
                    out = form.pop("out").to(torch_dtype).cpu()
                    if start is None:  # the header names the blocks' output form, known from the first batch
                        meta = {**(meta or {}), MARKER[0]: MARKER[1], "format": FORMAT, "k": k, "form": form["form"], "rows": len(rows),
                                "dtype": dtype}
                        start = _write_header(f, tensors, meta)
                        f.truncate(start + total * d * item + 8 * (len(rows) + 1))
                    for b, i in enumerate(idx):
                        f.seek(start + int(offsets[i]) * d * item)
                        f.write(out[b, :lengths[i]].contiguous().view(torch.uint8).numpy().tobytes())
                    bar.update(len(idx))
            f.seek(start + total * d * item)
            f.write(offsets.numpy().tobytes())
    finally:
        handle.remove()
        model.train(was_training)
    return Cache(path)


# ------------------------------------------------------------------------------------ pruning


def _touch(path: Path) -> None:
    """Record a use: the access time says when a cache was last used (set explicitly: mounts with
    relatime or noatime do not), the modification time when it was written."""
    try:
        st = os.lstat(path)
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns), follow_symlinks=False)
    except (OSError, NotImplementedError):
        pass


def _limit(env: str, default: float, kind) -> float:
    return env_limit(env, default, ConfigError, "gigabytes" if kind is float else "files", kind)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # it exists (another user's), or we cannot tell: keep its file
    return True


def _stale_build(path: Path, st: os.stat_result) -> bool:
    """The file of a build that was killed before it finished (SIGKILL, power loss): named like build()'s
    temporary file, carrying our marker and the key of the cache it was becoming, its writer process
    gone and the file unchanged for STALE_AFTER_S (a live build on another machine sharing the folder
    keeps writing, so its file stays)."""
    match = _TMP.match(path.name)
    if not match or _alive(int(match.group(2))) or time.time() - st.st_mtime < STALE_AFTER_S:
        return False
    return _ours(path, st, name=match.group(1))


def _ours(path: Path, st: os.stat_result, name: str | None = None) -> bool:
    """A regular file (not a link) named like a cache (or ``name``: the cache a temporary file was
    becoming), whose metadata carries the marker and its own key."""
    match = _NAME.match(name or path.name)
    if not match or not stat.S_ISREG(st.st_mode) or st.st_size < 8:
        return False
    noatime = getattr(os, "O_NOATIME", 0)  # reading the header is not a use: the access time must not move
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | noatime)
    except PermissionError:  # O_NOATIME needs the file's owner
        noatime = 0
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return False
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > min(st.st_size - 8, 1 << 20):
                return False
            meta = json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError, AttributeError, struct.error):
        return False
    ours = meta.get(MARKER[0]) == MARKER[1] and meta.get("key") == match.group(1)
    if ours and not noatime:  # put back the access time the read may have moved
        try:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        except (OSError, NotImplementedError):
            pass
    return ours


def prune(folder=None, *, max_gb: float | None = None, max_files: int | None = None, keep=()) -> list[Path]:
    """Remove the least recently used recycling caches of ``folder`` (default ``<cache>/recycle``) until
    it holds at most ``max_gb`` gigabytes and ``max_files`` files (defaults: ``$DELTATUNE_RECYCLE_MAX_GB``,
    20; ``$DELTATUNE_RECYCLE_MAX_FILES``, 100). Only files deltatune wrote (its marker in their
    metadata) count and go; a symbolic link is never followed (a linked folder is left alone); the
    paths in ``keep`` (caches in use) stay. The files of builds that were killed before they finished
    go too (:func:`_stale_build`). Returns the paths removed."""
    folder = Path(folder) if folder is not None else cache_dir() / "recycle"
    max_bytes = (max_gb if max_gb is not None else _limit(MAX_GB_ENV, MAX_GB_DEFAULT, float)) * 2**30
    max_files = max_files if max_files is not None else int(_limit(MAX_FILES_ENV, MAX_FILES_DEFAULT, int))
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):  # absent, a file, or a link: nothing of ours to prune
            return []
        entries = list(os.scandir(folder))
    except OSError:
        return []
    keep = {os.path.abspath(p) for p in keep}
    files, removed = [], []
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if _ours(Path(entry.path), st):
            files.append((st.st_atime_ns, st.st_size, Path(entry.path)))
        elif _stale_build(Path(entry.path), st):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    files.sort()  # least recently used first
    total, count = sum(size for _, size, _ in files), len(files)
    for _, size, path in files:
        if total <= max_bytes and count <= max_files:
            break
        if os.path.abspath(path) in keep:
            continue
        try:
            os.unlink(path)  # unlinks the entry itself, never what a link points at
        except OSError:
            continue
        total, count = total - size, count - 1
        removed.append(path)
    if removed:
        print(f"recycling: removed {len(removed)} least recently used or unfinished cache file(s) from {folder} "
              f"(limits: {max_bytes / 2**30:g} GB, {max_files} files; see {MAX_GB_ENV}, {MAX_FILES_ENV})",
              file=sys.stderr)
    return removed


# ------------------------------------------------------------------------------------ replay


class _Row(dict):
    """A token dict that also points at its cached hidden state."""

    __slots__ = ("cache", "index")


class _Replay:
    def __init__(self, k: int, form: str, weights: str):
        self.k, self.form, self.weights, self.hidden = k, form, weights, None


def install(model: nn.Module, k: int, form: str, weights: str) -> None:
    """Make ``model`` accept ``recycled=`` states in its inputs (idempotent). Its frozen part must be the
    one the cache was built from."""
    _, backbone = S.find_backbone(model)
    replay = backbone.__dict__.get("_deltatune_replay")
    if replay is not None:
        if (replay.k, replay.weights) != (k, weights):
            raise RecycleError("this model was already set up to replay another recycling cache")
        return
    depth = frozen_depth(model)
    if depth < k or lower_weights_key(model, k) != weights:
        raise RecycleError(f"the recycling cache holds block {k - 1}'s output of other frozen weights than this model's "
                           f"(its lowest trained block is {depth}); rebuild the cache")
    replay = _Replay(k, form, weights)
    backbone.__dict__["_deltatune_replay"] = replay

    def take(module, args, kwargs):
        replay.hidden = kwargs.pop(KEY, None)
        return args, kwargs

    def done(module, args, output):
        replay.hidden = None

    backbone.register_forward_pre_hook(take, with_kwargs=True, prepend=True)
    backbone.register_forward_hook(done, always_call=True)
    for layer, block in _blocks(model):
        if layer < k:
            block.forward = _skipping(block.forward, layer, replay)


def _skipping(forward, layer: int, replay: _Replay):
    def run(*args, **kwargs):
        if replay.hidden is None:
            return forward(*args, **kwargs)
        hidden = replay.hidden if layer == replay.k - 1 else (args[0] if args else kwargs["hidden_states"])
        return (hidden,) if replay.form == "tuple" else hidden

    return run


def _tokens_key(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for r in rows:
        digest.update(json.dumps({k: list(v) for k, v in sorted(r.items())}).encode())
    return digest.hexdigest()


def prepare(cfg, model, objective, data: dict, progress: bool | None = None) -> tuple[object, dict]:
    """Build (or open) the cache of every split and return (objective, data) that start from it.

    ``data``: split -> the objective's encoded examples (tuples whose dict items are token rows).
    The objective's ``pad`` adds the cached states to every batch; its ``loss`` and ``predict`` set
    up any model they are given (the best adapter restored at the end, too).
    """
    import transformers

    dtype = getattr(cfg, "recycle_dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"recycle_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not objective.fixed_inputs:  # the task kind says so (generation feeds new tokens at every step)
        raise RecycleError(f"--recycle caches the frozen part's output for fixed inputs; {objective.name} feeds new "
                           "tokens at every step, so it applies to retrieval and classification tasks")
    k = frozen_depth(model)
    limits = _limit(MAX_GB_ENV, MAX_GB_DEFAULT, float), int(_limit(MAX_FILES_ENV, MAX_FILES_DEFAULT, int))  # checked first
    weights = lower_weights_key(model, k)
    device = cfg.device or "cpu"
    progress = cfg.progress if progress is None else progress
    out, form, used = {}, "tensor", []
    for split, examples in data.items():
        rows = [part for ex in examples for part in ex if isinstance(part, dict)]
        key = hashlib.sha256(json.dumps([FORMAT, weights, k, dtype, bool(cfg.bf16), cfg.max_len, type(model).__name__,
                                         transformers.__version__, _tokens_key(rows)]).encode()).hexdigest()[:24]
        path = cache_dir() / "recycle" / f"{split}-{key}.safetensors"
        cache = None
        entry = CacheEntry(path, key, "recycling cache", max_bytes=1 << 50, root=cache_dir())
        if entry.usable():  # a regular file of this user (a link, a FIFO, another user's file: rebuilt, with a warning)
            try:
                cache = Cache(path).verify(key=key, k=k, dtype=dtype, lengths=[len(r["input_ids"]) for r in rows],
                                           width=S.find_backbone(model)[1].config.hidden_size)
            except (RecycleError, OSError, ValueError, KeyError, TypeError, RuntimeError, RecursionError,
                    struct.error) as err:
                entry.reject(f"is not a recycling cache of these inputs ({err})")
                cache = None
        if cache is None and rows:
            cache = build(model, objective, rows, k, dtype, path, batch_size=cfg.batch_size, device=device,
                          bf16=cfg.bf16, progress=progress, meta={"split": split, "key": key})
        if cache is not None:
            form = cache.form
            used.append(path)
            _touch(path)
        wrapped, n = [], 0
        for ex in examples:
            parts = []
            for part in ex:
                if isinstance(part, dict):
                    row = _Row(part)
                    row.cache, row.index = cache, n
                    n += 1
                    part = row
                parts.append(part)
            wrapped.append(type(ex)(parts) if isinstance(ex, tuple) else parts)
        out[split] = wrapped
    _wrap(objective, k, form, weights, dtype=next(p.dtype for p in model.parameters() if p.is_floating_point()))
    prune(max_gb=limits[0], max_files=limits[1], keep=used)
    return objective, out


def _wrap(objective, k: int, form: str, weights: str, dtype) -> None:
    pad, loss, predict = objective.pad, objective.loss, objective.predict

    def padded(rows, left: bool = False):
        batch = pad(rows, left)
        if rows and isinstance(rows[0], _Row):
            if left:
                raise RecycleError("recycled inputs are padded on the right only")
            width = batch["input_ids"].shape[1]
            states = torch.zeros(len(rows), width, rows[0].cache.hidden.shape[1], dtype=dtype)
            for b, r in enumerate(rows):
                h = r.cache.row(r.index)
                states[b, :len(h)] = h.to(dtype)
            batch[KEY] = states
        return batch

    def ready(model):
        install(model, k, form, weights)
        return model

    objective.pad = padded
    objective.loss = lambda model, batch: loss(ready(model), batch)
    objective.predict = lambda model, *a, **kw: predict(ready(model), *a, **kw)
