"""Code search over a directory of Python files: functions split with ``ast``, embedded by an adapter.

``functions(root)`` lists every function and method (qualified name, file relative to root, line,
source); ``Index`` holds their unit-length embeddings in memory and saves them to disk as
``embeddings.safetensors`` + ``index.json`` under a key made of the adapter's identity and the
files' sizes and modification times, so a restart with the same adapter and files reloads it.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..storage import atomic_write_bytes, atomic_write_json

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
    """A key for what an index depends on: the adapter and every file's path, size and mtime."""
    digest = hashlib.sha256(adapter_id.encode())
    for path in python_files(root)[0]:
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


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

    def save(self, folder: Path) -> None:
        from safetensors.torch import save as st_save

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "embeddings.safetensors", st_save({"embeddings": self.embeddings.contiguous()}))
        atomic_write_json(folder / "index.json", {"root": self.root, "report": self.report,
                                                  "functions": [asdict(f) for f in self.items]})

    @classmethod
    def load(cls, folder: Path) -> "Index | None":
        """The index saved in folder, or None when there is none or it is unreadable (it is rebuilt)."""
        from safetensors.torch import load as st_load

        try:
            meta = json.loads((folder / "index.json").read_text())
            emb = st_load((folder / "embeddings.safetensors").read_bytes())["embeddings"]
            items = [Function(**f) for f in meta["functions"]]
            if emb.dim() != 2 or emb.shape[0] != len(items) or not torch.isfinite(emb).all():
                return None
            return cls(meta["root"], items, emb, meta.get("report", {}))
        except (OSError, ValueError, KeyError, TypeError):
            return None
