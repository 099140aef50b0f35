"""The folders deltatune owns: one marker file of each folder's kind, which is also its lock; nothing inside
is a link, FIFO or device; a foreign folder is refused, never cleared."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePath

from ..errors import StorageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here (a second run is not detected)
    fcntl = None

from .files import atomic_write_bytes, fsync_dir, is_dir, make_dir, storage_error
from .files import _NOFOLLOW, _MAX_READ, _CAUSES, _check_creatable, _kind, _why_not_writable, _remove_tree  # noqa: F401


# ------------------------------------------------------------------------------ owned folders


def chosen_folder(value, default, what: str = "--out") -> Path:
    """The folder a command writes: ``value`` as given, or ``default`` when none was given. An empty
    value is refused: it would silently mean the working directory (or the default)."""
    if value is None:
        return Path(default)
    if not str(value).strip():
        raise StorageError(f"{what} is empty; give a folder (it is created if missing), or leave {what} out for "
                           f"the default{f' {default}' if default is not None else ''}")
    return Path(value)


_KINDS: dict[str, FolderKind] = {}


@dataclass(frozen=True)
class FolderKind:
    """The folders one command writes: the marker that says deltatune owns one, and how messages name it.

    ``legacy``: files an earlier deltatune wrote there before its folders carried a marker (the
    refusal then says how to declare such a folder). Every kind is known here, so that a folder
    inside any folder deltatune owns is recognised as such.
    """

    name: str  # the marker is .deltatune-<name>.json
    noun: str  # "run folder"
    user: str  # what holds the lock: "run", "bench", ...
    legacy: tuple[str, ...] = ()

    def __post_init__(self):
        _KINDS[self.name] = self

    @property
    def marker(self) -> str:
        return f".deltatune-{self.name}.json"


RUN = FolderKind("run", "run folder", "run", ("run.json",))
BENCH = FolderKind("bench", "bench folder", "bench", ("results.csv", "bench.json"))
EVAL = FolderKind("eval", "eval folder", "eval", ("metrics-test.json", "metrics-valid.json", "metrics-train.json",
                                                   "generations.jsonl"))
ANALYSIS = FolderKind("analysis", "analysis folder", "analysis", ("analysis.json",))
SWEEP = FolderKind("sweep", "sweep folder", "sweep", ("sweep.json", "trials.jsonl"))  # deltatune sweep's --out
MARKER = RUN.marker


class OwnedFolder:
    """A folder one command writes, owned by deltatune through its kind's marker file, and locked while used.

        folder = OwnedFolder(out, BENCH)
        folder.check()              # before any work: a folder deltatune may write? (writes nothing)
        ...                         # every input checked, the work done
        folder.open()               # creates it and its marker if needed, and takes the lock
        folder.write_bytes("results.md", data)   # never through a link, never over a FIFO or a folder
        folder.close()              # or: with OwnedFolder(out, BENCH) as folder:

    The rule: a missing or empty folder becomes deltatune's (the marker is written); a folder with
    the marker is deltatune's, holds no symbolic links, FIFOs or devices, and its files of deltatune's
    names are replaced; any other folder is refused, never written into. With ``add=NAMES`` (``report
    DIR``, whose folder is its input) a folder without the marker is written into only by creating
    ``NAMES``, none of which may be there yet: nothing of the user's is replaced. ``check`` already
    takes the lock of a folder deltatune owns (that writes nothing), so it is not changed under a
    command while it reads it.
    """

    def __init__(self, path, kind: FolderKind = RUN, what: str = "--out", add: tuple[str, ...] | None = None):
        if path is None or not str(path).strip():
            raise StorageError(f"{what} is empty; name a folder (an empty name would be the working directory)")
        self.path = Path(path)
        self.kind, self.what, self.add = kind, what, add
        self.marker = self.path / kind.marker
        self.foreign = False  # a folder without the marker, written into by adding files only (add=...)
        self._lock_fd = None
        self._opened = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(OSError, TypeError, AttributeError):  # at interpreter shutdown, os may be gone
            self.close()

    # -- what is there

    def is_owned(self) -> bool:
        """The folder carries its kind's marker (a regular file, not a link)."""
        return _regular(self.marker)

    def entries(self) -> list[str]:
        """What the folder holds besides the marker (empty if it does not exist)."""
        return sorted(e for e in os.listdir(self.path) if e != self.kind.marker) if os.path.isdir(self.path) else []

    def check(self) -> None:
        """Refuse a folder deltatune must not write, before anything is loaded or written.

        It must be a folder or creatable as one, writable, and missing, empty or deltatune's (with
        the marker, and holding no link, FIFO or device); inside a folder deltatune owns it is not a
        link itself. A folder deltatune owns is locked here.
        """
        kind, what = self.kind, self.what
        for path in (self.path, *self.path.parents):  # a link on the way, inside a deltatune folder (run/extra -> ..)
            if os.path.islink(path) and _owned_by_deltatune(path.parent):
                raise StorageError(f"{path} is a symbolic link (to {os.readlink(path)}) inside the deltatune "
                                   f"folder {path.parent}; deltatune never follows links inside its folders: "
                                   f"remove the link, or choose another {what}")
        _check_creatable(self.path, what)
        if not os.path.isdir(self.path):
            return
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StorageError(f"{what} {self.path} is not writable ({_why_not_writable(self.path)}); choose another {what}")
        if os.path.lexists(self.marker) and not self.is_owned():
            found = "a symbolic link" if os.path.islink(self.marker) else _kind(self.marker)
            raise StorageError(f"{self.marker} is {found}, not the file deltatune writes to mark its {kind.noun}s; "
                               f"remove it, or choose another {what}")
        if not self.is_owned():
            found = self.entries()
            if found and self.add is not None:
                self._check_addable()
            elif found:
                shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
                legacy = (f" If it is a {kind.noun} of an earlier deltatune, create an empty {kind.marker} in it to "
                          "say so." if set(kind.legacy) & set(found) else "")
                raise StorageError(f"{what} {self.path} is not empty and is not a deltatune {kind.noun} (it holds "
                                   f"{shown}); deltatune never removes or replaces what it did not write: choose "
                                   f"another {what}, or empty that folder.{legacy}")
            return
        self.lock()
        self.check_links()

    def _check_addable(self) -> None:
        """A folder without the marker, written into by adding files: none of them may be there yet."""
        for name in self.add:
            path = self.path / name
            if os.path.lexists(path):
                raise StorageError(f"{path} is not deltatune's ({self.path} carries no {self.kind.marker}); deltatune "
                                   f"never replaces a file it did not write: move it away, or create an empty "
                                   f"{self.kind.marker} in {self.path} if it is a {self.kind.noun} deltatune wrote")
        self.foreign = True

    def check_links(self) -> None:
        """Only regular files and folders inside the folder: no symbolic link (checked without following
        any), and no FIFO, device or socket, which a read would wait on or never finish."""
        for root, dirs, files in os.walk(self.path, followlinks=False):
            for name in dirs + files:
                path = os.path.join(root, name)
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    raise StorageError(f"{path} is a symbolic link (to {os.readlink(path)}); deltatune never follows "
                                       f"links inside its {self.kind.noun}s: replace it with the real file or "
                                       f"folder, or choose another {self.what}")
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise StorageError(f"{path} is {_kind(path)}, where a {self.kind.noun} holds only files and "
                                       f"folders; remove it, or choose another {self.what}")

    # -- taking it

    def open(self) -> Path:
        """Check the folder, then create it and its marker if needed and lock it; returns its path."""
        if self._opened:
            return self.path
        self.check()
        if not self.foreign and self._lock_fd is None:  # missing or empty (or a platform without locks)
            make_dir(self.path, self.what)
            try:
                fd = os.open(self.marker, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
            except FileExistsError:
                fd = None
            except OSError as err:
                raise storage_error(err, self.marker) from None
            if fd is not None:
                try:
                    os.write(fd, (json.dumps({"format": f"deltatune.{self.kind.name}", "version": 1}) + "\n").encode())
                    os.fsync(fd)
                except OSError as err:
                    os.close(fd)
                    raise storage_error(err, self.marker) from None
                os.close(fd)
                fsync_dir(self.path)
            self.lock()
            self.check_links()
        self._opened = True
        return self.path

    def lock(self) -> None:
        """An exclusive lock on the marker for as long as this command goes on; a second one is refused."""
        if self._lock_fd is not None or fcntl is None:
            return
        try:
            fd = os.open(self.marker, os.O_RDONLY | _NOFOLLOW)
        except OSError as err:
            raise storage_error(err, self.marker, "open") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                user = self.kind.user
                raise StorageError(f"{self.what} {self.path} is in use by another deltatune {user} (it holds the lock "
                                   f"on {self.kind.marker}); wait for that {user} to end, or choose another "
                                   f"{self.what}") from None
            raise storage_error(err, self.marker, "lock") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None
        self._opened = False

    # -- writing in it

    def file(self, name: str) -> Path:
        """The path of ``name`` (relative, e.g. ``"results.md"`` or ``"runs/a.json"``) for a write: the
        folders on the way are created or checked, and nothing there is a link, a FIFO or a device
        (checked without following any); in a folder without the marker, ``name`` must be new."""
        self.open()
        parts = PurePath(name).parts
        if not parts or PurePath(name).is_absolute() or any(p in ("..", ".") for p in parts):
            raise ValueError(f"{name!r} is not a name inside a folder")
        path = self.path
        for i, part in enumerate(parts):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                if i < len(parts) - 1:
                    try:
                        os.mkdir(path)
                    except OSError as err:
                        raise storage_error(err, path, "create") from None
                continue
            if stat.S_ISLNK(mode):
                raise StorageError(f"{path} is a symbolic link (to {os.readlink(path)}); deltatune never writes "
                                   f"through links in its {self.kind.noun}s: remove it, or choose another {self.what}")
            if i < len(parts) - 1 and not stat.S_ISDIR(mode):
                raise StorageError(f"{path} is {_kind(path)}, where deltatune writes a folder; remove it, or choose "
                                   f"another {self.what}")
            if i == len(parts) - 1 and not stat.S_ISREG(mode):
                raise StorageError(f"{path} is {_kind(path)}, where deltatune writes a file; remove it, or choose "
                                   f"another {self.what}")
        if self.foreign and os.path.lexists(path):
            self._check_addable()  # raises, naming the file
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``name`` atomically (replacing deltatune's own file; in a folder without the marker,
        creating it only)."""
        path = self.file(name)
        atomic_write_bytes(path, data, replace=not self.foreign)
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj) -> Path:
        return self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    # -- tidying

    def clear_leftovers(self, folder: Path | None = None) -> None:
        """Remove what writes cut short by a crash left in ``folder`` (the owned folder by default):
        only names deltatune itself gives its temporary files and folders."""
        folder = Path(folder or self.path)
        if not is_dir(folder):
            return
        for name in os.listdir(folder):
            if _is_leftover(name):
                _remove_tree(folder / name)


def owned(folder, kind: FolderKind, what: str = "--out") -> OwnedFolder:
    """``folder`` itself when it is an OwnedFolder already (a caller checked and holds it), else the
    OwnedFolder of kind ``kind`` at that path."""
    return folder if isinstance(folder, OwnedFolder) else OwnedFolder(folder, kind, what)


def _owned_by_deltatune(folder: Path) -> bool:
    """``folder`` carries the marker of a folder deltatune owns (of any kind)."""
    return any(_regular(folder / kind.marker) for kind in _KINDS.values())


def _regular(path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class RunFolder(OwnedFolder):
    """The folder of one training run (``train``'s ``out_dir``): an :class:`OwnedFolder` of kind RUN.

        folder = RunFolder(out)
        folder.check()        # before anything is loaded: a folder deltatune may use? (writes nothing)
        ...                   # every input checked
        folder.open()         # creates it and its marker if needed, and takes the lock
        ...
        folder.close()        # or: with RunFolder(out) as folder:

    ``check`` takes the lock already when the folder is a run folder (that writes nothing), so a
    run that is resumed is not changed under it while it is read.
    """

    def __init__(self, path):
        super().__init__(path, RUN)

    def is_run(self) -> bool:
        """The folder carries deltatune's run marker (a regular file, not a link)."""
        return self.is_owned()

    def holds_run(self) -> bool:
        """Something a run wrote is there (more than the marker and leftovers of cut-short writes)."""
        return any(not _is_leftover(e) for e in self.entries())


# What deltatune's own writes leave when a kill cuts them short: .NAME.XXXXXXXX.tmp (atomic_write_bytes,
# for the .json, .jsonl, .safetensors, .csv, .md, .html and .png files it writes), .NAME.tmp (replace_dir:
# best, step-N) and .NAME.del.tmp (remove_dir). The .NAME.old of replace_dir is not one: recover_dir decides
# whether it comes back.
_LEFTOVER = re.compile(r"\.[\w.-]+\.(json|jsonl|safetensors|csv|md|html|png)\.[a-z0-9_]{8}\.tmp"
                       r"|\.(best|checkpoints|step-\d+)(\.del)?\.tmp")


def _is_leftover(name: str) -> bool:
    return bool(_LEFTOVER.fullmatch(name))
