"""Adapters on demand (``serve --adapter-dir DIR --max-adapters N``): a request whose model id names an
adapter folder in DIR loads it on first use, as LoRAX's dynamic adapter loading does.

* **Only DIR.** A model id is a folder name directly in DIR (letters, digits, ``_``, ``-``: the adapter
  name rules, so never a path, ``..`` or ``/``). The folder, its ``best/`` (a ``train`` out_dir) and
  every file in the adapter folder must lie inside DIR once links are resolved: a link out of DIR is
  refused (400), and so is an id that is a path. The files are validated as ``dt.load_adapter``
  validates them (``Engine.load``); errors name the folder relative to DIR, never the server's paths.
* **At most N in memory.** N counts every adapter the engine holds (those named with ``--adapter`` too,
  which are never evicted). Loading one more evicts the least recently used adapter loaded from DIR that
  no request holds (a request holds its adapter from the moment its model id is resolved until its answer
  or stream ends). When every slot is held, the request gets 429 with Retry-After.
* **Loading never blocks the others.** Reading and validating the file runs in a thread; the worker
  only attaches it between two decode steps. Requests for loaded adapters never wait for a load;
  requests for the adapter being loaded wait for that one load.

All bookkeeping runs on the server's event loop (the endpoints' coroutines), so it needs no lock.
"""
from __future__ import annotations

import asyncio
import os
from collections import Counter, OrderedDict
from pathlib import Path

from ..errors import ConfigError, DeltatuneError
from ..storage import user_path
from ..store import check_adapter_name
from ..training.runs import resolve_adapter
from .engine import ServeError

MAX_LISTED = 1000  # adapter folders GET /v1/models lists
_MARKERS = ("adapter.safetensors", "adapter_config.json", "adapter_model.safetensors", "best")


class AdapterDir:
    """The adapter folders of ``root``, loaded into an engine on first use (see the module docstring)."""

    def __init__(self, root, max_adapters: int):
        given = user_path(root, "--adapter-dir")
        if not given.is_dir():
            raise ConfigError(f"--adapter-dir {root}: not a directory; give the folder that holds adapter folders")
        self.root = given.resolve()  # the operator's folder, its own links resolved once
        self.shown = str(given)
        self.max_adapters = max_adapters
        self.loaded: OrderedDict[str, None] = OrderedDict()  # loaded from here; least recently used first
        self.holds: Counter = Counter()  # requests holding each adapter
        self._loading: dict[str, asyncio.Future] = {}
        self._evicting: dict[str, asyncio.Future] = {}

    # ------------------------------------------------------------------------------ folders

    def names(self) -> list[str]:
        """Adapter folders in the directory (by name; links out of it are left out)."""
        out = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return out
        for entry in entries:
            if len(out) >= MAX_LISTED:
                break
            try:
                folder = self.folder(entry.name)  # the checks a request's load makes
            except (ServeError, OSError):
                continue
            if any((folder / m).exists() for m in _MARKERS):
                out.append(entry.name)
        return out

    def folder(self, name: str) -> Path:
        """The adapter folder model id ``name`` names, checked to lie inside the directory: 400 for an id
        that is a path or a link out of it, 404 for no such folder."""
        try:
            check_adapter_name(name)
        except ConfigError:
            raise ServeError(400, f"'model': {name!r} is not a model id this server loads: an adapter is named by "
                                  "its folder in the adapter directory (letters, digits, '_' or '-'), never by a path") from None
        path = self.root / name
        if not os.path.lexists(path):
            raise ServeError(404, f"'model': no model {name!r}: not the base, a loaded adapter, or an adapter folder "
                                  "in the adapter directory")
        folder = self._inside(path)
        if not folder.is_dir():
            raise ServeError(404, f"'model': {name!r} in the adapter directory is not a folder")
        try:
            adapter = self._inside(resolve_adapter(folder))  # a train out_dir: its best/
        except DeltatuneError as err:
            raise ServeError(400, f"'model': {name!r}: {self.hide(str(err))}") from None
        for entry in os.scandir(adapter):  # the files the loader reads: none may lead out of the directory
            self._inside(Path(entry.path), name)
        return adapter

    def _inside(self, path: Path, name: str | None = None) -> Path:
        real = Path(os.path.realpath(path))
        if real != self.root and self.root not in real.parents:
            shown = name or path.name
            raise ServeError(400, f"'model': {shown!r} leads out of the adapter directory through a link; refused "
                                  "(an adapter is served from the adapter directory only)")
        return real

    def hide(self, message: str) -> str:
        """A message without the server's paths: the directory shown as $ADAPTER_DIR."""
        for path in sorted({str(self.root), self.shown}, key=len, reverse=True):
            message = message.replace(path, "$ADAPTER_DIR")
        return message

    # ------------------------------------------------------------------------------ holding and loading

    def pinned(self, engine, name: str) -> bool:
        """A loaded adapter that did not come from here (--adapter, POST /v1/adapters): never evicted."""
        return name in engine.adapters and name not in self.loaded and name not in self._evicting

    async def acquire(self, engine, name: str):
        """Hold adapter ``name`` for a request, loading it from the directory first if it is not in memory;
        returns the function that releases the hold."""
        while True:
            if name in self._evicting:
                await asyncio.shield(self._evicting[name])
                continue
            if name in self._loading:
                await asyncio.shield(self._loading[name])  # the loader's error is this request's too
                continue
            if name in engine.adapters:
                if name in self.loaded:
                    self.loaded.move_to_end(name)
                self.holds[name] += 1
                return lambda: self._release(name)
            folder = self.folder(name)  # 400 or 404 before anything is read
            # one load per adapter, in a task of its own: a requester that leaves does not stop it
            task = self._loading[name] = asyncio.ensure_future(self._load(engine, name, folder))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # waiters re-raise its error

    def _release(self, name: str) -> None:
        self.holds[name] -= 1
        if self.holds[name] <= 0:
            del self.holds[name]

    async def _load(self, engine, name: str, folder: Path) -> None:
        try:
            await self._make_room(engine)
            try:
                await asyncio.to_thread(engine.load, name, folder)
            except ServeError as err:
                if err.status != 409:  # 409: loaded meanwhile under this name (POST /v1/adapters): use it
                    raise ServeError(err.status, self.hide(err.message), err.retry_after) from None
            except DeltatuneError as err:  # the file failed validation
                raise ServeError(400, f"'model': {name!r}: {self.hide(' '.join(str(err).split()))}") from None
            else:
                self.loaded[name] = None
        finally:
            del self._loading[name]

    async def _make_room(self, engine) -> None:
        """Evict least recently used adapters from here until the one being loaded fits in max_adapters."""
        while len(engine.adapters) - len(self._evicting) + len(self._loading) > self.max_adapters:
            victim = next((n for n in self.loaded if not self.holds[n] and n not in self._evicting), None)
            if victim is None:
                raise ServeError(429, f"all {self.max_adapters} adapter slots (--max-adapters) hold adapters that "
                                      "requests are using; retry shortly", retry_after=1)
            gone = asyncio.get_running_loop().create_future()
            self._evicting[victim] = gone
            try:
                await asyncio.to_thread(engine.unload, victim)
            except ServeError as err:
                if err.status != 404:  # 404: unloaded meanwhile (DELETE /v1/adapters/{name})
                    raise
            finally:
                self.loaded.pop(victim, None)
                del self._evicting[victim]
                gone.set_result(None)


__all__ = ["AdapterDir"]
