"""Durable storage: atomic file writes, directory swaps, and the run folders deltatune owns.

Every rule about what deltatune writes, replaces or removes on disk lives here:

- a file is written to a temporary file beside it, flushed, fsynced and renamed over the old one
  (``atomic_write_bytes``); a directory is built beside its place and swapped in by renames
  (``replace_dir``), and removed by a rename first (``remove_dir``); so a kill at any moment leaves
  the old version or the new one, and a failed write raises :class:`StorageError` naming the path
  and the cause in words;
- a run folder (``train``'s ``out_dir``) carries a marker file, ``.deltatune-run.json``, that
  deltatune writes when it creates the folder. deltatune removes only what it wrote itself: an
  existing folder that is not empty and has no marker is refused, never cleared;
- the marker is also the lock: a run holds an exclusive ``flock`` on it, so a second run into the
  same folder at the same time is refused with one line;
- inside a run folder nothing is a symbolic link: the folder is checked (``lstat``, never
  following) before it is read, written or cleared, and files are opened with ``O_NOFOLLOW``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import StorageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here (a second run is not detected)
    fcntl = None

MARKER = ".deltatune-run.json"
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
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never what it points to
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


# ------------------------------------------------------------------------------ run folders


class RunFolder:
    """The folder of one training run, owned by deltatune through its marker file, and locked while used.

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
        self.path = Path(path)
        self.marker = self.path / MARKER
        self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what is there

    def is_run(self) -> bool:
        """The folder carries deltatune's marker (a regular file, not a link)."""
        try:
            return stat.S_ISREG(os.lstat(self.marker).st_mode)
        except OSError:
            return False

    def entries(self) -> list[str]:
        """What the folder holds besides the marker (empty if it does not exist)."""
        return sorted(e for e in os.listdir(self.path) if e != MARKER) if os.path.isdir(self.path) else []

    def check(self) -> None:
        """Refuse a folder deltatune must not use, before anything is loaded or written.

        It must be a folder or creatable as one, writable, and either empty, missing or a run
        folder (with the marker); a run folder holds no symbolic links. A run folder is locked here.
        """
        _check_creatable(self.path, "--out")
        if not os.path.isdir(self.path):
            return
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StorageError(f"--out {self.path} is not writable ({_why_not_writable(self.path)}); choose another --out")
        if os.path.lexists(self.marker) and not self.is_run():
            what = "a symbolic link" if os.path.islink(self.marker) else _kind(self.marker)
            raise StorageError(f"{self.marker} is {what}, not the file deltatune writes to mark its run folders; "
                               "remove it, or choose another --out")
        if not self.is_run():
            found = self.entries()
            if found:
                shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
                legacy = (f" If it is a run folder of an earlier deltatune, create an empty {MARKER} in it to say so."
                          if "run.json" in found else "")
                raise StorageError(f"--out {self.path} is not empty and is not a deltatune run folder (it holds {shown}); "
                                   "deltatune never removes what it did not write: choose another --out, or empty that "
                                   f"folder.{legacy}")
            return
        self.lock()
        self.check_links()

    def check_links(self) -> None:
        """Only regular files and folders inside the run folder: no symbolic link (checked without
        following any), and no FIFO, device or socket, which a read would wait on or never finish."""
        for root, dirs, files in os.walk(self.path, followlinks=False):
            for name in dirs + files:
                path = os.path.join(root, name)
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    raise StorageError(f"{path} is a symbolic link (to {os.readlink(path)}); deltatune never follows "
                                       "links inside its run folders: replace it with the real file or folder, or "
                                       "choose another --out")
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise StorageError(f"{path} is {_kind(path)}, where a run folder holds only files and folders; "
                                       "remove it, or choose another --out")

    def holds_run(self) -> bool:
        """Something a run wrote is there (more than the marker and leftovers of cut-short writes)."""
        return any(not _is_leftover(e) for e in self.entries())

    # -- taking it

    def open(self) -> None:
        """Create the folder and its marker if needed, and lock it; the folder must still be one deltatune may use."""
        if self._lock_fd is not None:
            return
        make_dir(self.path)
        try:
            fd = os.open(self.marker, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        except FileExistsError:
            fd = None
        except OSError as err:
            raise storage_error(err, self.marker) from None
        if fd is not None:
            try:
                os.write(fd, (json.dumps({"format": "deltatune.run", "version": 1}) + "\n").encode())
                os.fsync(fd)
            except OSError as err:
                os.close(fd)
                raise storage_error(err, self.marker) from None
            os.close(fd)
            fsync_dir(self.path)
        self.lock()
        self.check_links()

    def lock(self) -> None:
        """An exclusive lock on the marker for as long as this run goes on; a second run is refused."""
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
                raise StorageError(f"--out {self.path} is in use by another deltatune run (it holds the lock on "
                                   f"{MARKER}); wait for that run to end, or choose another --out") from None
            raise storage_error(err, self.marker, "lock") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # -- tidying

    def clear_leftovers(self, folder: Path | None = None) -> None:
        """Remove what writes cut short by a crash left in ``folder`` (the run folder by default):
        only names deltatune itself gives its temporary files and folders."""
        folder = Path(folder or self.path)
        if not is_dir(folder):
            return
        for name in os.listdir(folder):
            if _is_leftover(name):
                _remove_tree(folder / name)


# What deltatune's own writes leave when a kill cuts them short: .NAME.XXXXXXXX.tmp (atomic_write_bytes,
# for the .json, .jsonl and .safetensors files it writes), .NAME.tmp (replace_dir: best, step-N) and
# .NAME.del.tmp (remove_dir). The .NAME.old of replace_dir is not one: recover_dir decides whether it comes back.
_LEFTOVER = re.compile(r"\.[\w.-]+\.(json|jsonl|safetensors)\.[a-z0-9_]{8}\.tmp"
                       r"|\.(best|checkpoints|step-\d+)(\.del)?\.tmp")


def _is_leftover(name: str) -> bool:
    return bool(_LEFTOVER.fullmatch(name))
