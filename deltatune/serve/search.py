"""Code search over a directory of Python files: functions split with ``ast``, embedded by an adapter.

``functions(root)`` lists every function and method (qualified name, file relative to root, line,
source); ``Index`` holds their unit-length embeddings in memory and saves them to disk as
``embeddings.safetensors`` + ``index.json`` under a key made of the adapter's identity, the model,
the folder and its files' sizes and modification times, so a restart with the same adapter and files
reloads it; ``build_index`` does both for a served adapter.

A saved index is a cache, and a cache is untrusted input: it is reused only when both files are
regular files of this user (no links, FIFOs or devices, read without blocking and within a size
limit), ``index.json`` carries the key it was saved under, the folder and well-formed functions, and
the embeddings are one finite unit-length float32 row per function of the model's width. Anything
else (damaged, planted, written for another model width) is rebuilt with a warning, never used.

The walk never follows a symlink (out of the folder or in a loop), skips hidden folders, virtual
environments and caches, files that are not regular, larger than ``MAX_FILE_BYTES`` or not valid
Python, and stops at ``MAX_FILES`` files.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DeltatuneError, StorageError
from ..storage import atomic_write_bytes, atomic_write_json, read_bytes, user_path
from .engine import ServeError

MAX_FILE_BYTES = 1 << 20
MAX_FILES = 20000
MAX_CODE_CHARS = 4000  # what is embedded and returned of one function
SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "venv", ".venv", "build", "dist"}


@dataclass
class Function:
    name: str  # qualified: Class.method, outer.inner
    file: str  # relative to the indexed root
    line: int
    code: str


def python_files(root: Path) -> tuple[list[Path], dict]:
    """(regular .py files under root, sorted; what was skipped and why: counts)."""
    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        raise ConfigError(f"{root} is not a directory (symlinks are not followed); give a folder of Python files")
    found, skipped = [], {"links": 0, "large": 0, "not_regular": 0, "over_limit": 0}
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS
                         and not os.path.islink(os.path.join(folder, d)))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                skipped["links"] += 1
            elif not stat.S_ISREG(st.st_mode):
                skipped["not_regular"] += 1
            elif st.st_size > MAX_FILE_BYTES:
                skipped["large"] += 1
            elif len(found) >= MAX_FILES:
                skipped["over_limit"] += 1
            else:
                found.append(path)
    return found, skipped


def functions_in(source: str, file: str) -> list[Function]:
    """Every function and method of one module's source, outermost first, in source order."""
    tree = ast.parse(source)
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                code = ast.get_source_segment(source, child) or ""
                out.append(Function(name, file, child.lineno, code[:MAX_CODE_CHARS]))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            elif not isinstance(child, (ast.Lambda, ast.expr)):
                visit(child, prefix)

    visit(tree, "")
    return out


def functions(root) -> tuple[list[Function], dict]:
    """(functions of every Python file under root, report: files, skipped counts, unparsable files)."""
    root = Path(root)
    files, skipped = python_files(root)
    out, bad = [], 0
    for path in files:
        try:
            source = path.read_bytes().decode("utf-8")
            out += functions_in(source, str(path.relative_to(root)))
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            bad += 1
    return out, {"files": len(files), "unparsable": bad, "skipped": skipped}


def files_key(root: Path, adapter_id: str) -> str:
    """A key for what an index depends on: the adapter, the folder and every file's path, size and mtime."""
    digest = hashlib.sha256(adapter_id.encode() + b"\0" + os.fsencode(root) + b"\0")
    for path in python_files(root)[0]:
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


class StaleIndex(ValueError):
    """A saved index that must not be used (the message says why); it is rebuilt."""


_FUNCTION_TYPES = {"name": str, "file": str, "line": int, "code": str}
_REPORT_KEYS = {"files", "unparsable", "skipped"}


def _owned_bytes(path: Path) -> bytes:
    """The bytes of ``path`` when it is a regular file of this user (never through a link, never blocking)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise StaleIndex(f"{path.name} is not a regular file")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise StaleIndex(f"{path.name} belongs to another user (uid {info.st_uid})")
    return read_bytes(path)  # O_NOFOLLOW, O_NONBLOCK, regular, bounded: a swap after lstat is refused too


def _own_folder(folder: Path) -> bool:
    """True when ``folder`` exists as a real folder of this user; StaleIndex when something else is there."""
    try:
        info = os.lstat(folder)
    except (FileNotFoundError, NotADirectoryError):  # nothing saved (or the index folder cannot exist): build it
        return False
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StaleIndex(f"{folder} is not a folder (a link or another kind of file)")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise StaleIndex(f"{folder} belongs to another user (uid {info.st_uid})")
    return True


class Index:
    """Functions and their unit-length embeddings (N, d); ``query`` ranks them by cosine similarity."""

    def __init__(self, root: str, items: list[Function], embeddings: torch.Tensor, report: dict):
        self.root, self.items, self.embeddings, self.report = root, items, embeddings.float(), report

    def query(self, vector: torch.Tensor, k: int) -> list[dict]:
        if not self.items:
            return []
        scores = self.embeddings @ vector.float()
        top = torch.topk(scores, min(k, len(self.items)))
        return [{**asdict(self.items[i]), "score": round(float(s), 6)} for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def save(self, folder: Path, key: str) -> None:
        """Write the index under ``folder`` (the embeddings first, then ``index.json`` naming ``key``: a
        crash between the two leaves an index.json that does not match and is rebuilt). StorageError
        when the folder is not a real folder of this user."""
        from safetensors.torch import save as st_save

        folder.mkdir(parents=True, exist_ok=True)
        try:
            _own_folder(folder)
        except StaleIndex as err:
            raise StorageError(f"the search index was not saved: {err}") from None
        atomic_write_bytes(folder / "embeddings.safetensors", st_save({"embeddings": self.embeddings.contiguous()}))
        atomic_write_json(folder / "index.json", {"key": key, "root": self.root, "report": self.report,
                                                  "functions": [asdict(f) for f in self.items]})

    @classmethod
    def load(cls, folder: Path, *, key: str, root: str, width: int) -> "Index | None":
        """The index saved in ``folder`` for ``key``, ``root`` and embeddings of ``width``; None when none
        was saved; StaleIndex naming the first thing wrong with one that was (rebuild it)."""
        from safetensors.torch import load as st_load

        try:
            if not _own_folder(folder) or not os.path.lexists(folder / "index.json"):
                return None
            meta = json.loads(_owned_bytes(folder / "index.json"))
            tensors = st_load(_owned_bytes(folder / "embeddings.safetensors"))
        except StaleIndex:
            raise
        except Exception as err:  # unreadable, not JSON, not safetensors (its own error for a damaged header)
            raise StaleIndex(f"unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise StaleIndex("its index.json was saved under another key (another adapter, model or set of files)")
        if meta.get("root") != root:
            raise StaleIndex(f"it indexes another folder ({str(meta.get('root'))[:200]!r})")
        report = meta.get("report", {})
        if not isinstance(report, dict) or not set(report) <= _REPORT_KEYS:
            raise StaleIndex("its report is not the one an index saves")
        items = _functions_of(meta.get("functions"))
        emb = tensors.get("embeddings")
        if set(tensors) != {"embeddings"} or emb.dtype != torch.float32 or emb.dim() != 2:
            raise StaleIndex(f"its embeddings are not one float32 matrix ({sorted(tensors)[:4]})")
        if tuple(emb.shape) != (len(items), width):
            raise StaleIndex(f"its embeddings are {tuple(emb.shape)}, not ({len(items)}, {width}): one row per "
                             f"function of the model's width {width}")
        if not torch.isfinite(emb).all():
            raise StaleIndex("its embeddings hold NaN or infinite values")
        if len(items) and ((emb.norm(dim=1) - 1).abs().max() > 1e-3):
            raise StaleIndex("its embeddings are not unit length")
        return cls(root, items, emb, report)


def _functions_of(rows) -> list[Function]:
    if not isinstance(rows, list):
        raise StaleIndex("its index.json lists no functions")
    items = []
    for row in rows:
        if (not isinstance(row, dict) or set(row) != set(_FUNCTION_TYPES)
                or any(type(row[k]) is not t for k, t in _FUNCTION_TYPES.items()) or row["line"] < 1
                or os.path.isabs(row["file"]) or ".." in Path(row["file"]).parts):
            raise StaleIndex(f"its index.json holds a function entry that is not one ({str(row)[:120]})")
        items.append(Function(**row))
    return items


def build_index(engine, name: str, root) -> dict:
    """Index ``root`` with the served adapter ``name``: reuse the saved index when the adapter, the model
    and the files are the same and it passes every check; rebuild it (with a warning) when it does not.
    A save that fails (a read-only cache, a foreign folder in the way) warns and keeps the index in memory."""
    info = engine.info(name, "search")
    root_path = user_path(root, "path").resolve()
    key = files_key(root_path, info.identity + engine.model_name)
    folder = engine.index_dir / key
    try:
        index = Index.load(folder, key=key, root=str(root_path), width=engine.hidden_size)
    except StaleIndex as err:
        warnings.warn(f"the saved search index {folder} is not usable: {err}; rebuilding it", stacklevel=2)
        index = None
    cached = index is not None
    if index is None:
        items, report = functions(root_path)
        vectors = engine.encode(name, [f"{f.name}\n{f.code}" for f in items])
        index = Index(str(root_path), items, vectors, report)
        try:
            index.save(folder, key)
        except (OSError, DeltatuneError) as err:
            warnings.warn(f"the search index for {root_path} is kept in memory only: {' '.join(str(err).split())}",
                          stacklevel=2)
    info = engine.adapters.get(name)
    if info is None:
        raise ServeError(410, f"adapter {name!r} was unloaded while its index was built")
    info.index = index
    return {"adapter": name, "root": index.root, "functions": len(index.items), "cached": cached,
            "saved_to": str(folder), **index.report}
