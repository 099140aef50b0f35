"""Durable storage: atomic file writes, directory swaps, the folders deltatune owns, and its cache entries.

Every rule about what deltatune writes, replaces or removes on disk lives here:

- a file is written to a temporary file beside it, flushed, fsynced and renamed over the old one
  (``atomic_write_bytes``); a directory is built beside its place and swapped in by renames
  (``replace_dir``), and removed by a rename first (``remove_dir``); so a kill at any moment leaves
  the old version or the new one, and a failed write raises :class:`StorageError` naming the path
  and the cause in words;
- every command that writes a folder (``train``'s run folder, ``bench``, ``eval``, ``analyze``)
  owns it through a marker file of its kind (:class:`OwnedFolder`; ``.deltatune-run.json`` for a
  run), written when deltatune creates the folder. deltatune replaces and removes only what it wrote
  itself: an existing folder that is not empty and has no marker is refused, never cleared or
  written into (``report DIR``, whose folder is its input, only adds files there, never replacing one);
- the marker is also the lock: a command holds an exclusive ``flock`` on it, so a second one into the
  same folder at the same time is refused with one line;
- inside an owned folder nothing is a symbolic link, a FIFO or a device: the folder is checked
  (``lstat``, never following) before it is read, written or cleared, and files are opened with
  ``O_NOFOLLOW``; a folder inside an owned folder is never a link either;
- a cache entry (:class:`CacheEntry`) is untrusted input: used only when it is a regular file of this
  user, bounded in size, of the expected structure and carrying the key it was asked for; anything
  else is rebuilt with a :class:`CacheWarning`. Its temporary files are created with
  ``O_EXCL | O_NOFOLLOW`` at unpredictable names.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath

from .errors import StorageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here (a second run is not detected)
    fcntl = None

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_MAX_READ = 1 << 30  # run files (run.json, trainer.json, log.jsonl) larger than 1 GiB are not ours


_CAUSES = {  # errno -> the cause and its fix, in words
    errno.ENOSPC: "the disk is full (no space left on device); free some space",
    errno.EDQUOT: "the disk quota is exceeded; free some space",
    errno.EROFS: "the file system is read-only; choose another directory",
    errno.EACCES: "permission denied; choose a directory you can write to",
    errno.EPERM: "permission denied; choose a directory you can write to",
    errno.EFBIG: "the file is larger than this system allows",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another directory",
    errno.EEXIST: "a file of that name is in the way; choose another directory",
    errno.ELOOP: "it is a symbolic link, which deltatune does not follow inside its folders",
}


def storage_error(err: OSError, path, verb: str = "write") -> StorageError:
    """A StorageError naming ``path`` and the cause of ``err`` in words ("the disk is full ...")."""
    if isinstance(err, StorageError):
        return err
    return StorageError(f"cannot {verb} {path}: {_CAUSES.get(err.errno) or err.strerror or err}")


# ------------------------------------------------------------------------------------ files


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    A failed write (a full disk, say) removes its temporary file, keeps the old file and raises
    :class:`StorageError`, naming the path and the cause. A link at ``path`` is replaced itself, never
    written through. ``replace=False`` only creates: a file already at ``path`` is kept (StorageError).
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
        if replace:
            os.replace(tmp, path)  # replaces a link at ``path`` itself, never what it points to
        else:
            os.link(tmp, path)  # EEXIST when anything is there: nothing is ever replaced
            os.unlink(tmp)
    except BaseException as err:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise storage_error(err, path) from err
        raise
    fsync_dir(path.parent)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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


def read_bytes(path, limit: int = _MAX_READ) -> bytes:
    """The bytes of the regular file ``path``, never through a symbolic link (OSError otherwise).

    A link, a FIFO, a device or a file over ``limit`` bytes raises OSError: run files are data
    deltatune wrote, and none of those is.
    """
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def append_text(path, text: str) -> None:
    """Append ``text`` to the file ``path`` (created if missing), never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    except OSError as err:
        raise storage_error(err, path) from err


# ------------------------------------------------------------------------------ directories


def is_dir(path) -> bool:
    """``path`` is a directory itself, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def replace_dir(path: Path, write) -> Path:
    """Build a directory with ``write(tmp)`` next to ``path``, then swap it in by renames.

    A write that fails (a full disk) removes the partial copy and leaves ``path`` as it was. A
    crash between the two renames leaves ``.NAME.old`` and no ``NAME``; recover_dir puts it back.
    """
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    recover_dir(path)
    _remove_tree(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except BaseException as err:
        _remove_tree(tmp)
        if isinstance(err, OSError):
            raise storage_error(err, tmp) from err
        raise
    if os.path.lexists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    _remove_tree(old)
    return path


def recover_dir(path: Path) -> None:
    """Undo a crash between the two renames of replace_dir (the previous ``path`` comes back), or
    finish the removal of the previous version that a crash cut short."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not os.path.lexists(path) and is_dir(old):
        os.replace(old, path)
    elif os.path.lexists(old):
        _remove_tree(old)


def remove(path: Path) -> None:
    """Remove a file, a link (itself) or a directory (by remove_dir); nothing if there is none."""
    if is_dir(path):
        remove_dir(path)
    elif os.path.lexists(path):
        os.unlink(path)


def remove_dir(path: Path) -> None:
    """Remove a directory such that a crash midway never leaves part of it under its own name."""
    path = Path(path)
    if is_dir(path):
        doomed = path.with_name(f".{path.name}.del.tmp")
        _remove_tree(doomed)
        os.replace(path, doomed)
        _remove_tree(doomed)


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree; a link is removed itself, never what it points to."""
    _remove_tree(path)


def _remove_tree(path: Path) -> None:
    """Remove a file or a directory tree; a link is removed itself, never what it points to."""
    if is_dir(path):
        shutil.rmtree(path)  # walks by file descriptors and does not follow links inside
    elif os.path.lexists(path):
        os.unlink(path)


def make_dir(path, what: str = "--out") -> Path:
    """Create the folder ``path`` (and its parents) if needed; a StorageError in words if it cannot be."""
    path = Path(path)
    _check_creatable(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, path, "create") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StorageError(f"{what} {path} is not writable ({_why_not_writable(path)}); choose another folder")
    return path


def _check_creatable(path: Path, what: str) -> None:
    """``path`` is a folder or can become one: it, or its nearest existing parent, is a writable folder."""
    if os.path.lexists(path):
        if not os.path.isdir(path):  # --out itself may be a link to a folder: the user's own choice
            raise StorageError(f"{what} {path} is {_kind(path)}, not a folder; choose a folder (it is created if missing)")
        return
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.path.isdir(parent):
        raise StorageError(f"cannot create {what} {path}: {parent} is {_kind(parent)}, not a folder; choose another {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"cannot create {what} {path}: {parent} is not writable ({_why_not_writable(parent)}); "
                           f"choose another {what}")


def _kind(path) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a dangling symbolic link"
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a folder"


def _why_not_writable(path) -> str:
    try:
        if os.statvfs(path).f_flag & getattr(os, "ST_RDONLY", 1):
            return "the file system is read-only"
    except (OSError, AttributeError):
        pass
    return "permission denied"


# ------------------------------------------------------------------------------ owned folders


def chosen_folder(value, default, what: str = "--out") -> Path:
    """The folder a command writes: ``value`` as given, or ``default`` when none was given. An empty
    value is refused: it would silently mean the working directory (or the default)."""
    if value is None:
        return Path(default)
    if not str(value).strip():
        raise StorageError(f"{what} is empty; give a folder (it is created if missing), or leave {what} out for "
                           f"the default {default}")
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

    def inside_owned(self) -> bool:
        """The folder's parent is a folder deltatune owns (of any kind)."""
        parent = self.path.parent
        return any(_regular(parent / kind.marker) for kind in _KINDS.values())

    def check(self) -> None:
        """Refuse a folder deltatune must not write, before anything is loaded or written.

        It must be a folder or creatable as one, writable, and missing, empty or deltatune's (with
        the marker, and holding no link, FIFO or device); inside a folder deltatune owns it is not a
        link itself. A folder deltatune owns is locked here.
        """
        kind, what = self.kind, self.what
        if os.path.islink(self.path) and self.inside_owned():
            raise StorageError(f"{self.path} is a symbolic link (to {os.readlink(self.path)}) inside the deltatune "
                               f"folder {self.path.parent}; deltatune never follows links inside its folders: "
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


# ------------------------------------------------------------------------------ cache entries


class CacheWarning(UserWarning):
    """A cache entry was not trusted (not a regular file of this user, too large, damaged, another key):
    it is rebuilt."""


class _Untrusted(Exception):
    """Why a cache entry (or the folder it goes in) is not used: a reason in words."""


MAX_CACHE_ENTRY = 1 << 30  # JSON entries of deltatune's caches are megabytes at most; larger is not one of ours


class CacheEntry:
    """One entry of deltatune's cache folder, read as untrusted input and written atomically.

        entry = CacheEntry(cache_dir() / "zero-shot" / f"{key}.json", key, "zero-shot score", root=cache_dir())
        value = entry.read_json(check)   # None: no entry, or one not trusted (then a CacheWarning says why)
        if value is None:
            value = compute()
            entry.write_json(value)      # the key goes inside; a failed write costs only the speed-up

    The cache folder can be written by other programs (in a shared folder, by other users), so an
    entry is used only when it is a regular file (never a link, FIFO or device) owned by this user,
    at most ``max_bytes`` long, of the expected structure (``check`` raises ValueError, TypeError or
    KeyError otherwise) and carrying the key it was asked for. Anything else is rebuilt with a
    :class:`CacheWarning`, never trusted and never an error. A write goes to a temporary file created
    with ``O_EXCL | O_NOFOLLOW`` at an unpredictable name beside the entry, renamed over it; the
    folders below ``root`` (the cache folder, which may itself be a link: the user's choice) must be
    real folders of this user.
    """

    def __init__(self, path, key: str, what: str, *, max_bytes: int = MAX_CACHE_ENTRY, root=None):
        self.path, self.key, self.what, self.max_bytes = Path(path), str(key), what, max_bytes
        self.root = Path(root) if root is not None else self.path.parent

    # -- reading

    def reject(self, reason: str) -> None:
        """Say that the entry is not used (a CacheWarning naming the file and why); the caller rebuilds it."""
        warnings.warn(f"cache entry {self.path} {reason}; it is not trusted and is rebuilt", CacheWarning,
                      stacklevel=3)

    def _open(self) -> int | None:
        """A descriptor on the entry when it is a regular file of this user within the size bound; None when
        there is none; _Untrusted otherwise."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        except OSError as err:
            if os.path.islink(self.path):
                raise _Untrusted(f"is a symbolic link (to {os.readlink(self.path)})") from None
            raise _Untrusted(f"cannot be read ({err.strerror or err})") from None
        try:
            _check_cache_stat(os.fstat(fd), self.max_bytes, self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def usable(self) -> bool:
        """Whether the entry may be read by other means (a memory map): there, a regular file of this user
        within the size bound. False when there is none, or (with a CacheWarning) when it is not trusted."""
        try:
            fd = self._open()
        except _Untrusted as why:
            self.reject(str(why))
            return False
        if fd is None:
            return False
        os.close(fd)
        return True

    def read_bytes(self) -> bytes | None:
        """The entry's bytes; None when there is none or (with a CacheWarning) when it is not trusted."""
        try:
            fd = self._open()
        except _Untrusted as why:
            self.reject(str(why))
            return None
        if fd is None:
            return None
        try:
            chunks, size = [], 0
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_bytes:  # it grew since fstat
                    self.reject(f"is larger than {self.max_bytes} bytes")
                    return None
            return b"".join(chunks)
        except OSError as err:
            self.reject(f"cannot be read ({err.strerror or err})")
            return None
        finally:
            os.close(fd)

    def read_json(self, check=None):
        """The value stored by :meth:`write_json`, when the entry is trusted, holds this cache's kind and the
        key asked for, and ``check(value)`` (if given) passes; else None (a CacheWarning says why)."""
        data = self.read_bytes()
        if data is None:
            return None
        try:
            stored = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, nested too deeply
            self.reject(f"is not JSON ({type(err).__name__})")
            return None
        if not isinstance(stored, dict) or stored.get("cache") != self.what or "value" not in stored:
            self.reject(f"is not a {self.what} written by deltatune")
            return None
        if stored.get("key") != self.key:
            self.reject(f"holds the key {str(stored.get('key'))[:40]!r}, not the key it is stored under")
            return None
        if check is not None:
            try:
                check(stored["value"])
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
                self.reject(f"is not a valid {self.what} ({type(err).__name__}: {str(err)[:200]})")
                return None
        return stored["value"]

    # -- writing

    def _folder(self) -> Path:
        """The entry's folder, created if missing; it and every folder between it and the root are real
        folders of this user (never a link), or _Untrusted."""
        folder = self.path.parent
        try:
            parts = folder.relative_to(self.root).parts
            base = self.root
        except ValueError:
            parts, base = (), folder
        try:
            base.mkdir(parents=True, exist_ok=True)  # the root may be a link: the user's choice of cache folder
        except OSError as err:
            raise _Untrusted(f"cannot be written: {storage_error(err, base, 'create')}") from None
        current = base
        for part in parts:
            current = current / part
            try:
                os.mkdir(current)
            except FileExistsError:
                pass
            except OSError as err:
                raise _Untrusted(f"cannot be written: {storage_error(err, current, 'create')}") from None
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise _Untrusted(f"cannot be written: {current} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else _kind(current)}, "
                                 "not a folder of deltatune's cache")
            if _foreign_owner(st):
                raise _Untrusted(f"cannot be written: its folder {current} belongs to another user (uid {st.st_uid})")
        return folder

    @contextlib.contextmanager
    def temporary(self):
        """A new file beside the entry, open for writing and reading (created with O_EXCL | O_NOFOLLOW at an
        unpredictable name, ``.NAME.tmp-PID-XXXXXXXX``); renamed over the entry when the block ends without
        an error, removed otherwise. Raises StorageError when the entry's folder is not a real folder of
        this user."""
        try:
            folder = self._folder()
        except _Untrusted as why:
            raise StorageError(f"cache entry {self.path} {why}") from None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-", dir=folder)
        try:
            with os.fdopen(fd, "w+b") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # replaces whatever is at the entry's name itself (a planted link too)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(folder)

    def write_bytes(self, data: bytes) -> bool:
        """Store ``data``; False (and nothing changed) when it cannot be written: a cache only saves time."""
        try:
            with self.temporary() as f:
                f.write(data)
        except StorageError as err:
            warnings.warn(f"{err}; the result is not cached", CacheWarning, stacklevel=2)
            return False
        except OSError:  # a full disk, a read-only cache folder: only the speed-up is lost
            return False
        return True

    def write_json(self, value) -> bool:
        """Store the JSON value ``value`` with this cache's kind and the entry's key inside."""
        try:
            data = json.dumps({"cache": self.what, "key": self.key, "value": value}, allow_nan=False).encode()
        except (TypeError, ValueError):  # not JSON-able, or NaN/Infinity: not stored
            return False
        return self.write_bytes(data)


def _foreign_owner(st: os.stat_result) -> bool:
    return hasattr(os, "geteuid") and st.st_uid != os.geteuid()


def _check_cache_stat(st: os.stat_result, max_bytes: int, path) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _Untrusted(f"is {_mode_kind(st.st_mode)}, not a regular file")
    if _foreign_owner(st):
        raise _Untrusted(f"belongs to another user (uid {st.st_uid})")
    if st.st_size > max_bytes:
        raise _Untrusted(f"is {st.st_size} bytes, more than the {max_bytes} a {Path(path).suffix or 'cache'} entry may have")


def _mode_kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def untrusted_tree(folder, max_bytes: int = 1 << 34) -> str | None:
    """Why the cached folder ``folder`` (a converted model, say) cannot be trusted, or None: it must be a
    real folder of this user holding only real folders and regular files of this user, each at most
    ``max_bytes`` long; nothing in it is a link, a FIFO or a device."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return "is missing"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    paths = [(str(folder), st)]
    if stat.S_ISDIR(st.st_mode):
        for root, dirs, files in os.walk(folder, followlinks=False):
            paths += [(os.path.join(root, n), os.lstat(os.path.join(root, n))) for n in dirs + files]
    for path, st in paths:
        if stat.S_ISLNK(st.st_mode):
            return f"holds a symbolic link, {path}" if path != str(folder) else "is a symbolic link"
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) or (path == str(folder) and not stat.S_ISDIR(st.st_mode)):
            return f"holds {_mode_kind(st.st_mode)}, {path}" if path != str(folder) else f"is {_mode_kind(st.st_mode)}"
        if _foreign_owner(st):
            return f"holds {path}, which belongs to another user (uid {st.st_uid})"
        if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
            return f"holds {path}, larger than {max_bytes} bytes"
    return None
