"""The run files: one JSON per finished run, named by a hash of its whole configuration, read only after a check.

Every reader (the planner, the page) goes through :class:`Store`, so a file of the wrong shape or types is one
:class:`RunFileError` line naming the file and the field, never a traceback, and a file that is not a run of the
configuration its name stands for is refused instead of being run again over.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePath

import deltatune


def slug(text) -> str:
    """A file-name part: every run of characters other than letters, digits, '_', '.' and '-' becomes one '-'
    (the run files' names were made so; a key that changed would orphan every committed run file)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", PurePath(str(text)).name or str(text)).strip("-.") or "run"


def run_key(config: dict) -> str:
    """A stable file name for a configuration: readable prefix + hash of its canonical JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    parts = [config.get("kind", "train"), config.get("model"), config.get("task"), config.get("method"),
             f"s{config['seed']}" if "seed" in config else None]
    return "-".join(slug(str(p)) for p in parts if p) + f"-{digest}"


class RunFileError(deltatune.DataError):
    """A run file that is not what the runner writes: named, with what is wrong, in one line."""


MAX_RUN_FILE_BYTES = 64 * 2**20  # a run file is kilobytes (an analysis's, a few hundred)
_NUMBER = (int, float)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def check_record(path: Path, record) -> dict:
    """``record`` as read from ``path`` if it has the shape the runner writes, else RunFileError naming the file
    and the field; what the page and the planner read is checked here, once."""
    def bad(what: str):
        raise RunFileError(f"{path}: {what}; the run files are written by experiments/findings/run.py: restore this "
                           "one from git or delete it to run it again")

    def number(value, where, none=False):
        if value is None and none:
            return
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            bad(f"{where} must be a number, not {_kind(value)}")

    def numbers(value, where, n=None):
        if not isinstance(value, list) or any(isinstance(x, bool) or not isinstance(x, _NUMBER) for x in value):
            bad(f"{where} must be a list of numbers")
        if n is not None and len(value) != n:
            bad(f"{where} holds {len(value)} numbers, not {n}")

    if not isinstance(record, dict):
        bad(f"a run file holds a JSON object, not {_kind(record)}")
    config, result = record.get("config"), record.get("result")
    if not isinstance(config, dict):
        bad(f"'config' must be an object, not {_kind(config)}")
    if not isinstance(result, dict):
        bad(f"'result' must be an object, not {_kind(result)}")
    def obj(value, where, none=True):
        if (value is not None or not none) and not isinstance(value, dict):
            bad(f"{where} must be an object, not {_kind(value)}")
        return value or {}

    number(record.get("wall_seconds"), "wall_seconds")
    number(record.get("other_load"), "other_load", none=True)
    for key in ("machine", "versions"):
        obj(record.get(key), f"'{key}'")
    for key in ("finished", "adapter_dir"):
        if record.get(key) is not None and not isinstance(record[key], str):
            bad(f"'{key}' must be a string, not {_kind(record[key])}")
    if config.get("kind") == "analyze":
        if not isinstance(result.get("model"), str):
            bad(f"result.model must be a string, not {_kind(result.get('model'))}")
        number(result.get("blocks"), "result.blocks", none=True)
        adapters = record.get("adapters", [])
        if not isinstance(adapters, list) or any(not isinstance(u, dict) or not isinstance(u.get("group"), str)
                                                 or isinstance(u.get("lr"), bool) or not isinstance(u.get("lr"), _NUMBER)
                                                 for u in adapters):
            bad("'adapters' must be a list of objects, each naming its group and lr")
        probing = obj(result.get("probing"), "result.probing")
        if probing:
            settings = obj(result.get("settings"), "result.settings", none=False)
            for key in ("n_train", "n_valid", "n_test", "search_samples"):
                number(settings.get(key), f"result.settings.{key}")
        for name, p in probing.items():
            obj(p, f"result.probing.{name}", none=False)
            numbers(p.get("score"), f"result.probing.{name}.score")
            if not p["score"]:
                bad(f"result.probing.{name}.score is empty")
            for key in ("n_test", "peak_layer", "baseline"):
                number(p.get(key), f"result.probing.{name}.{key}", none=True)
        similarity = obj(result.get("similarity"), "result.similarity")
        models = obj(similarity.get("models"), "result.similarity.models")
        if models:
            number(similarity.get("samples"), "result.similarity.samples")
        if similarity.get("pretrained_top_dimension_share") is not None:
            numbers(similarity["pretrained_top_dimension_share"], "result.similarity.pretrained_top_dimension_share")
        for name, c in models.items():
            obj(c, f"result.similarity.models.{name}", none=False)
            numbers(c.get("rsa_spearman"), f"result.similarity.models.{name}.rsa_spearman")
            if not c["rsa_spearman"]:
                bad(f"result.similarity.models.{name}.rsa_spearman is empty")
            if c.get("rsa_spearman_std") is not None:
                numbers(c["rsa_spearman_std"], f"result.similarity.models.{name}.rsa_spearman_std")
        freeze = obj(result.get("freeze"), "result.freeze")
        if freeze:
            number(freeze.get("k"), "result.freeze.k")
        return record
    number(record.get("n_train"), "n_train", none=True)
    number(result.get("value"), "result.value", none=True)
    for key in ("valid_value", "zero_shot_value", "trainable_params", "total_params", "step_seconds_median",
                "best_step", "recall@1", "dp_epsilon", "dp_delta", "dp_noise_multiplier"):
        number(result.get(key), f"result.{key}", none=True)
    if result.get("metric") is not None and not isinstance(result["metric"], str):
        bad(f"result.metric must be a string, not {_kind(result['metric'])}")
    scores = record.get("test_scores")
    if scores is not None:
        if not isinstance(scores, dict):
            bad(f"'test_scores' must be an object, not {_kind(scores)}")
        numbers(scores.get("values"), "test_scores.values")
        if scores.get("zero_shot") is not None:
            numbers(scores["zero_shot"], "test_scores.zero_shot", len(scores["values"]))
    number(record.get("n_test"), "n_test", none=True)
    return record


class Store:
    """The run files of one output folder."""

    def __init__(self, out):
        self.out = Path(out)
        self.runs = self.out / "runs"
        self._read: dict = {}  # path -> (mtime_ns, size, record): the page reads each file many times

    def path(self, config: dict) -> Path:
        return self.runs / f"{run_key(config)}.json"

    def get(self, config: dict) -> dict | None:
        """The run file of ``config``, checked; None when there is none. A file there that is not a run of
        this configuration is a RunFileError, never silently run again over."""
        path = self.path(config)
        if not os.path.lexists(path):
            return None
        record = self.read(path)
        if record.get("config") != json.loads(json.dumps(config)):
            raise RunFileError(f"{path}: its 'config' is not the configuration its name stands for; restore it from "
                               "git or delete it to run it again")
        return record

    def read(self, path: Path) -> dict:
        """One run file, checked (:func:`check_record`); every failure is one RunFileError line naming it."""
        path = Path(path)
        try:
            st = os.lstat(path)
        except OSError as err:
            raise RunFileError(f"{path}: cannot be read ({err.strerror or err})") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise RunFileError(f"{path}: not a regular file (a link, a folder or a device); a run file is the JSON "
                               "the runner writes")
        if st.st_size > MAX_RUN_FILE_BYTES:
            raise RunFileError(f"{path}: {st.st_size / 2**20:.0f} MB, more than a run file's "
                               f"{MAX_RUN_FILE_BYTES // 2**20} MB; it is not one the runner wrote")
        seen = self._read.get(path)
        if seen is not None and seen[:2] == (st.st_mtime_ns, st.st_size):
            return seen[2]
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise RunFileError(f"{path}: not a JSON run file ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:120]}); restore it from git or delete it to run it "
                               "again") from None
        self._read[path] = (st.st_mtime_ns, st.st_size, check_record(path, record))
        return record

    def records(self) -> list[tuple[Path, dict]]:
        """Every run file of the folder, checked, in name order."""
        if not self.runs.is_dir():
            return []
        return [(path, self.read(path)) for path in sorted(self.runs.glob("*.json"))]

    def put(self, config: dict, record: dict) -> Path:
        self.runs.mkdir(parents=True, exist_ok=True)
        path = self.path(config)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": run_key(config), "config": config, **record}, indent=1, sort_keys=True))
        os.replace(tmp, path)  # a crash leaves the old file or none, never half of one
        return path
