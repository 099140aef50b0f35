"""Cache entries as untrusted input: used only when a regular file of this user, bounded, of the expected
structure and carrying its key; rebuilt with a CacheWarning otherwise; written with O_EXCL | O_NOFOLLOW."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path

from ..errors import StorageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here (a second run is not detected)
    fcntl = None

from .files import fsync_dir, storage_error
from .files import _NOFOLLOW, _MAX_READ, _CAUSES, _kind  # noqa: F401
from .folders import _regular  # noqa: F401


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
