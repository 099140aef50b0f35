"""Durable storage: atomic file writes, directory swaps, the folders deltatune owns, and its cache entries.

Every rule about what deltatune writes, replaces or removes on disk lives here:

- a file is written to a temporary file beside it, flushed, fsynced and renamed over the old one
  (``atomic_write_bytes``); a directory is built beside its place and swapped in by renames
  (``replace_dir``), and removed by a rename first (``remove_dir``); so a kill at any moment leaves
  the old version or the new one, and a failed write raises :class:`StorageError` naming the path
  and the cause in words;
- every command that writes a folder (``train``'s run folder, ``bench``, ``eval``, ``analyze``, ``sweep``)
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

The rules live in three modules: :mod:`.files` (durable writes and reads), :mod:`.folders` (owned folders)
and :mod:`.caches` (cache entries); everything is importable from ``deltatune.storage``.
"""
from .files import *  # noqa: F401,F403
from .files import _MAX_READ, _NOFOLLOW  # noqa: F401
from .folders import *  # noqa: F401,F403
from .folders import _is_leftover, _regular  # noqa: F401
from .caches import *  # noqa: F401,F403
