"""Durable files and directories: atomic writes, bounded reads that never follow a link, directory swaps,
and StorageError messages that name the path and the cause in words."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import StorageError

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
    """Append ``text`` to the file ``path`` (created if missing), never through a symbolic link, nor to a file
    with another name elsewhere (a hard link: the append would change that file too)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            links = os.fstat(fd).st_nlink
            if links > 1:
                raise StorageError(f"{path} is a hard link ({links} names for one file): appending to it would change "
                                   "the file under its other names too; deltatune never writes to a file it shares: "
                                   "remove it (or replace it with a copy), or choose another --out")
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    except OSError as err:
        raise storage_error(err, path) from err


def user_path(value, what: str) -> Path:
    """A path a user or a client names, checked before any other use: text without a NUL character, that the
    system can look up (not too long, no loop of links, no file on the way); it need not exist. Otherwise a
    one-line StorageError naming ``what``."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip():
        raise StorageError(f"{what} must be a path, got {value!r}")
    shown = text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
    if "\0" in text:
        raise StorageError(f"{what} {shown!r} holds a NUL character, which no path can; give the path itself")
    path = Path(text)
    try:
        path = path.expanduser()  # RuntimeError for ~someone unknown
        os.stat(path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, RuntimeError) as err:
        raise StorageError(f"{what} {shown} cannot be used ({getattr(err, 'strerror', None) or err})") from None
    return path


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
