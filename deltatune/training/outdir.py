"""The out folder of a run: may this run use it, taking it (marked, locked, tidied), and ``log.jsonl``.

A folder deltatune did not write is refused unless empty; a previous run there is continued
(``resume``), replaced only when asked (``overwrite``), and otherwise left alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

from .. import storage
from ..errors import StorageError, ConfigError
from ..storage import RunFolder, atomic_write_bytes, atomic_write_json, storage_error
from .checkpoints import REPLACED, checkpoints, latest_checkpoint, step_of
from .config import RESUMABLE_CHANGES, TrainConfig
from .runs import PREDICTIONS, config_from, read_run_json


# What a run writes at the top of its folder (anything else there is the user's, and stays).
RUN_FILES = ("checkpoints", "best", "log.jsonl", "metrics.json", "run.json", *PREDICTIONS.values())
# What best/ and checkpoints/ hold (name pattern -> None for a file, the same for a folder): a run replaces them
# whole (a better adapter, a newer checkpoint, --overwrite), so anything else in them is the user's, and refused.
_ADAPTER = {r"adapter\.safetensors": None, r"adapter_config\.json": None}
_CHECKPOINT = {"adapter": _ADAPTER, r"trainer\.(json|safetensors)": None}
_REPLACED_WHOLE = {"best": _ADAPTER, "checkpoints": {r"step-\d+|\.step-\d+\.old": _CHECKPOINT}}


def check_out_dir(folder: RunFolder, cfg: TrainConfig) -> tuple[Path | None, bool]:
    """May this run use out_dir? Returns the checkpoint it goes on from (None: step 0), and whether
    it restarts a run of its own settings that wrote no checkpoint yet. Writes nothing.

    A folder deltatune did not write is refused unless empty; a previous run there is continued
    (``resume``), replaced only when asked (``overwrite``), and otherwise left alone. A run folder
    is locked from here on, so nothing else changes it while it is read.
    """
    folder.check()
    out, run_json = folder.path, folder.path / "run.json"
    restore_replaced(out, "a run that was replacing it was killed before its first checkpoint")
    if folder.is_run():
        _refuse_foreign_inside(out)
    if not (cfg.resume and folder.is_run()):
        if cfg.resume:
            warnings.warn(f"resume=True but {out} holds no run; starting from step 0", stacklevel=5)
        refuse_to_replace(folder, cfg)
        return None, False
    checkpoint = latest_checkpoint(out)
    if os.path.lexists(run_json):  # the run it continues had these settings
        saved = read_run_json(run_json)
        config_from(saved, run_json)
        now = json.loads(json.dumps(dataclasses.asdict(cfg)))
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
        if changed:
            raise ConfigError(f"cannot resume {out}: {', '.join(f'{k} was {saved.get(k)!r}, now {now[k]!r}' for k in changed)}; "
                              "use the original settings, or a new out_dir without resume")
    elif checkpoint is None:
        refuse_to_replace(folder, cfg)
    if checkpoint is None:  # what it wrote before its first checkpoint is recomputed the same way
        warnings.warn(f"resume=True but {out} holds no checkpoint yet; starting from step 0", stacklevel=5)
    return checkpoint, checkpoint is None


def _refuse_foreign_inside(out: Path) -> None:
    """best/ and checkpoints/ hold only what a run writes there (``_REPLACED_WHOLE``)."""
    for top, spec in _REPLACED_WHOLE.items():
        found = _foreign(out / top, spec) if storage.is_dir(out / top) else None
        if found is not None:
            raise StorageError(f"{found} is not what a run writes there: deltatune replaces {top}/ of a run folder whole "
                               "(a better adapter, a newer checkpoint, --overwrite), which would remove it; move it "
                               "out of the run folder first")


def _foreign(folder: Path, spec: dict) -> Path | None:
    """The first entry of ``folder`` that ``spec`` does not name (a crash's leftovers aside)."""
    for name in sorted(os.listdir(folder)):
        if storage._is_leftover(name):
            continue
        inner = next((v for pattern, v in spec.items() if re.fullmatch(pattern, name)), False)
        path = folder / name
        if inner is False or (inner is None) == storage.is_dir(path):
            return path
        found = _foreign(path, inner) if inner is not None else None
        if found is not None:
            return found
    return None


def refuse_to_replace(folder: RunFolder, cfg: TrainConfig) -> None:
    """A fresh run never replaces a previous one unless asked to (overwrite)."""
    if cfg.overwrite or not folder.holds_run():
        return
    out = folder.path
    kept = latest_checkpoint(out)
    what = ("a finished run" if os.path.lexists(out / "metrics.json") else
            f"a run with its last checkpoint at step {step_of(kept)}" if kept else "a run that wrote no checkpoint")
    raise StorageError(f"--out {out} holds {what}; pass --resume to continue it (resume=True), --overwrite to "
                       "replace it (overwrite=True), or choose another --out")


def prepare_out_dir(folder: RunFolder, cfg: TrainConfig, checkpoint: Path | None, restart: bool) -> None:
    """Take out_dir (created, marked and locked), tidy what a crash left, clear a replaced run; run.json records cfg."""
    out = folder.path
    try:
        folder.open()
        if checkpoint is None and not restart:
            refuse_to_replace(folder, cfg)  # again under the lock: another run may have written here meanwhile
        storage.recover_dir(out / "best")
        folder.clear_leftovers()
        folder.clear_leftovers(out / "checkpoints")
        for old in checkpoints(out) if checkpoint is not None else ():  # superseded, when a crash struck first
            if old != checkpoint:
                storage.remove_dir(old)
        if checkpoint is None:  # allowed by now: a resumed run that wrote no checkpoint yet, or overwrite
            stale = [name for name in RUN_FILES if os.path.lexists(out / name)]
            if stale:  # kept aside until this run's first checkpoint (checkpoints.save), brought back if it fails first
                os.mkdir(out / REPLACED)
                for name in stale:
                    os.replace(out / name, out / REPLACED / name)
                storage.fsync_dir(out)
    except OSError as err:
        raise storage_error(err, out, "prepare") from err
    atomic_write_json(out / "run.json", dataclasses.asdict(cfg))


def restore_replaced(out: Path, why: str) -> None:
    """The run an --overwrite was replacing comes back when the new one stopped (``why``) before its first
    checkpoint: the new run's files go (only the names a run writes), the kept ones return. Once the new run has
    a checkpoint it can be resumed, and the replaced run goes instead. Safe to repeat after a kill midway: the
    new run's files without a kept counterpart go first, then the kept folder is renamed to say so, then its
    entries move back one by one."""
    out = Path(out)
    kept, back = out / REPLACED, out / f"{REPLACED}-back"
    try:
        if storage.is_dir(kept):
            if latest_checkpoint(out) is not None:
                finish_replacing(out)
                return
            warnings.warn(f"{out}: {why}; the run it was replacing is back", stacklevel=2)
            saved = set(os.listdir(kept))
            for name in RUN_FILES:
                if name not in saved:
                    storage.remove(out / name)
            os.replace(kept, back)
        if storage.is_dir(back):
            for name in os.listdir(back):
                storage.remove(out / name)
                os.replace(back / name, out / name)
            os.rmdir(back)
            storage.fsync_dir(out)
    except OSError as err:
        raise storage_error(err, kept, "restore") from err


def finish_replacing(out: Path) -> None:
    """The new run can be resumed (or has finished): the run it replaced goes."""
    storage.remove_dir(Path(out) / REPLACED)


class Log:
    """log.jsonl: one JSON object per line. On resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path | None, keep_until: int):
        self.path = path
        if path is not None and os.path.lexists(path) and keep_until:
            try:  # bytes that are not UTF-8 (a damaged line) do not parse, and so are dropped
                text = storage.read_bytes(path).decode("utf-8", errors="replace")
            except OSError as err:
                raise storage_error(err, path, "read") from None
            kept = [line for line in text.split("\n") if line and logged_step(line) <= keep_until]
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict) -> None:
        if self.path is not None:
            storage.append_text(self.path, json.dumps(record) + "\n")


def logged_step(line: str) -> float:
    """When a log line was written, as a step: the final test score (written after the last checkpoint,
    with its step) and a line cut short by a crash mid-append count as after every checkpoint."""
    try:
        record = json.loads(line)
        final = record.get("split") == "test" and not record.get("zero_shot")
        return math.inf if final else record.get("step", 0)
    except (ValueError, AttributeError):
        return math.inf
