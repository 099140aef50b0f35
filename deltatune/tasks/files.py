"""User data: JSONL/CSV/TSV files or directories, and Hugging Face ``datasets``.

The kind of task follows from the columns, each kind's ``columns`` (:mod:`deltatune.tasks.kinds`;
a file holding the columns of several kinds is read as the first of them here):

- ``text``, ``label`` (+ optional ``text_pair``): classification (as in GLUE single-sentence and
  sentence-pair tasks). String labels are mapped to ints in sorted order; int labels are kept.
- ``query``, ``code``: retrieval (as in CodeSearchNet).
- ``prompt``, ``target``: generation (as in CodeXGLUE code-to-text).

A single file is split 80/10/10: rows are ordered by the sha256 of their content (so duplicate rows
land in the same split), cut by counts, then kept in file order within each split. A directory uses
``train.*``, ``valid.*``/``validation.*``/``dev.*`` and ``test.*``; without a test file the
validation file becomes the test split and 10% of train becomes validation; with only a train file,
it is split like a single file. Every problem raises :class:`~deltatune.errors.DataError` naming
the file, line or column, and the fix.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import random
import stat
from pathlib import Path

from deltatune.errors import DataError
from deltatune.settings import env_bytes
from deltatune.tasks.kinds import KINDS, Classification, get_kind
from deltatune.tasks.registry import TASKS, TaskData

SUFFIXES = (".jsonl", ".csv", ".tsv")


def data_kinds() -> list:
    """The kinds a data file can hold (those with ``columns``), in the order a file's columns are matched."""
    return sorted((kind for kind in KINDS.values() if kind.columns is not None), key=lambda kind: kind.columns_rank)


def accepted() -> str:
    """The accepted column sets, for errors: ``text,label[,text_pair] (classification); query,code (retrieval); ...``."""
    return "; ".join(",".join(kind.columns[0]) + "".join(f"[,{c}]" for c in kind.columns[1]) + f" ({kind.name})"
                     for kind in data_kinds())


# ---------------------------------------------------------------------------------------------
# Reading one file
# ---------------------------------------------------------------------------------------------

MAX_MB_ENV, MAX_MB_DEFAULT = "DELTATUNE_MAX_DATA_MB", 1024


def max_data_bytes() -> int:
    """The largest data file read: $DELTATUNE_MAX_DATA_MB megabytes (default 1024)."""
    return env_bytes(MAX_MB_ENV, MAX_MB_DEFAULT, DataError)[0]


def _read_bytes(path: Path) -> bytes:
    """The bytes of a regular file of at most :func:`max_data_bytes`; devices, FIFOs and sockets are refused.

    The file is checked with ``stat`` before it is opened (opening a FIFO would wait for a writer),
    opened without blocking, checked again on the open descriptor, and read up to the limit only.
    """
    limit = max_data_bytes()
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path} is not a regular file ({_file_kind(st.st_mode)}); pass a .jsonl/.csv/.tsv file "
                            f"or a directory of them")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
                raise DataError(f"{path} is not a regular file ({_file_kind(st.st_mode)})")
            if st.st_size > limit:
                raise DataError(_too_large(path))
            raw = _read_upto(f, limit + 1)  # in pieces: read(n) would first allocate n bytes, a limit of 'inf' too
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass a .jsonl/.csv/.tsv file, a directory with train/valid/test "
                        f"files, a built-in task name or hf:<dataset>") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > limit:  # it grew after the fstat
        raise DataError(_too_large(path))
    return raw


def _too_large(path: Path) -> str:
    return (f"{path} is larger than {os.environ.get(MAX_MB_ENV) or MAX_MB_DEFAULT} MB, the limit for data files; set "
            f"{MAX_MB_ENV} to a larger number of megabytes to read it")


def _read_upto(f, n: int, piece: int = 2**24) -> bytes:
    """At most ``n`` bytes of ``f``, read in pieces."""
    chunks, got = [], 0
    while got < n:
        chunk = f.read(min(piece, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def _decode(path: Path) -> str:
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: not valid UTF-8 at byte offset {e.start} (line {line}, byte 0x{raw[e.start]:02x}); "
                        f"re-save the file as UTF-8") from None


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row dict) for every record of a .jsonl, .csv or .tsv file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    text = _decode(path)
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".jsonl":
        # Records end at "\n" only: JSON strings may hold U+2028, U+0085 or \x1c (json.dumps(ensure_ascii=False)
        # writes them raw), which str.splitlines() would take for line ends.
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip(" \t\r"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno}); "
                                f"each line must hold one JSON object") from None
            except ValueError:  # json raises it for a number of over 4300 digits (Python's int() limit)
                raise DataError(f"{path}, line {n}: a number with more digits than Python reads (4300); write "
                                "long numbers as strings") from None
            except RecursionError:
                raise DataError(f"{path}, line {n}: JSON nested too deeply to read; each line must hold one flat "
                                f"JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object with columns {accepted()}, "
                                f"got {type(row).__name__}")
            rows.append((n, row))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}, line {reader.line_num}: {len(reader.fieldnames or [])} columns in the "
                                    f"header but a different number in this row; quote fields that hold commas")
                rows.append((reader.line_num, row))
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise DataError(f"{path} is empty: no records found; expected rows with columns {accepted()}")
    return rows


def infer_kind(columns: set[str], where: str) -> str:
    """The task kind for a set of column names, or a DataError listing what was found and what is accepted."""
    for kind in data_kinds():
        if set(kind.columns[0]) <= columns:
            return kind.name
    found = ", ".join(sorted(columns)) or "none"
    for kind in data_kinds():
        required = kind.columns[0]
        missing = [c for c in required if c not in columns]
        if len(missing) < len(required):
            raise DataError(f"{where}: missing column {missing[0]!r} for {kind.name} data (found columns: {found}); "
                            f"accepted column sets: {accepted()}")
    raise DataError(f"{where}: no usable columns (found columns: {found}); accepted column sets: {accepted()}")


def _clean(rows: list[tuple[int, dict]], kind: str, path: Path) -> list[dict]:
    """Keep the task's columns; check every row has them and that text columns are strings. An optional
    column (text_pair) that some row has, every row must have."""
    spec = get_kind(kind)
    required, optional = spec.columns
    used = required + tuple(c for c in optional if any(c in r for _, r in rows))
    out = []
    for n, row in rows:
        for col in used:
            if col not in row:
                raise DataError(f"{path}, line {n}: missing column {col!r} (found columns: "
                                f"{', '.join(sorted(row))}); every row needs {', '.join(required)}")
            if row[col] is None:
                raise DataError(f"{path}, line {n}: column {col!r} is null; give every row a value")
            if col in spec.text_fields and not isinstance(row[col], str):
                raise DataError(f"{path}, line {n}: column {col!r} must be a string, got {type(row[col]).__name__}")
            if col in spec.text_fields and not _encodable(row[col]):
                raise DataError(f"{path}, line {n}: column {col!r} holds a lone surrogate (an unpaired \\ud800-"
                                "\\udfff escape), which is no text; write the character itself or its pair of escapes")
        out.append({c: row[c] for c in required + optional if c in row} | {"_where": f"{path}, line {n}"})
    return out


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_int(value) -> int | None:
    """An int for 3, True, 3.0 or "3"; None for anything else. A number of more than 30 digits stands for
    itself by 10**30 (more classes than any limit: Python refuses int() of over 4300 digits)."""
    digits = value.strip().lstrip("-") if isinstance(value, str) else ""
    if len(digits) > 30 and digits.isdecimal():
        return -(10**30) if value.strip().startswith("-") else 10**30
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdecimal():  # isdigit() also takes '²', which int() refuses
        return int(value.strip())
    return None


MAX_CLASSES = 10_000  # more is a regression target or a text column, not classes


def _check_classes(rows: list[dict], names: list[str]) -> None:
    """At least two classes occur, and no more than MAX_CLASSES exist."""
    present = {r["label"] for r in rows}
    if len(present) < 2:
        raise DataError(f"{rows[0]['_where'].rsplit(', ', 1)[0]}: every row has the label {names[rows[0]['label']]!r}; "
                        f"classification needs at least two classes")


def map_labels(splits: dict[str, list[dict]], labels: list[str] | None) -> list[str]:
    """Turn every row's label into an int in 0..K-1 (in place) and return the K class names.

    With ``labels`` given, a label may be a class name or an int index. Without, all-int labels
    name classes "0".."max", and string labels become ints in sorted order.
    """
    rows = [r for split in splits.values() for r in split]
    if not rows:
        raise DataError("no labelled rows: every row's label is missing or hidden (-1)")
    if labels is not None:
        labels = [str(x) for x in labels]
        index = {name: i for i, name in enumerate(labels)}
        for r in rows:
            value = r["label"]
            if isinstance(value, str) and value in index:
                r["label"] = index[value]
                continue
            as_int = _as_int(value)
            if as_int is None:
                raise DataError(f"{r['_where']}: unknown label {_shown(value)}; the labels are {labels} "
                                f"(give one of those names or an int in 0..{len(labels) - 1})")
            if not 0 <= as_int < len(labels):
                raise DataError(f"{r['_where']}: label {_shown(value)} is out of range: with labels {labels} a label must be "
                                f"one of those names or an int in 0..{len(labels) - 1}")
            r["label"] = as_int
        _check_classes(rows, labels)
        return labels
    ints = [_as_int(r["label"]) for r in rows]
    if all(i is not None for i in ints):
        for r, i in zip(rows, ints):
            if i < 0:
                raise DataError(f"{r['_where']}: label {_shown(r['label'])} is out of range: int labels must be "
                                f"0..K-1 (or use class-name strings)")
        top = max(range(len(rows)), key=ints.__getitem__)
        k, distinct = ints[top] + 1, len(set(ints))
        if k > MAX_CLASSES or distinct < k / 2:  # checked before a name is made for each class
            shown = k if k <= 10**18 else "over 10^18"
            raise DataError(f"{rows[top]['_where']}: label {_shown(rows[top]['label'])} would make {shown} classes (int "
                            f"labels are class indices 0..K-1), but only {distinct} distinct labels occur"
                            + (f" and at most {MAX_CLASSES} classes are supported" if k > MAX_CLASSES else "")
                            + "; number the classes 0..K-1 without gaps, or use class-name strings")
        for r, i in zip(rows, ints):
            r["label"] = i
        names = [str(c) for c in range(k)]
        _check_classes(rows, names)
        return names
    odd = next((r for r, i in zip(rows, ints) if i is None and not isinstance(r["label"], str)), None)
    if odd is not None:
        raise DataError(f"{odd['_where']}: label {odd['label']!r} is neither an int class index nor a class name; "
                        f"use ints 0..K-1 or class-name strings")
    bad = next((r for r in rows if not isinstance(r["label"], str)), None)
    if bad is not None:
        raise DataError(f"{bad['_where']}: label {bad['label']!r} mixes with string labels; use either class-name "
                        f"strings or ints 0..K-1 throughout")
    names = sorted({r["label"] for r in rows})
    if len(names) > MAX_CLASSES:
        raise DataError(f"{rows[0]['_where'].rsplit(', ', 1)[0]}: {len(names)} distinct labels, more than the "
                        f"{MAX_CLASSES} classes supported; is 'label' a text column?")
    index = {name: i for i, name in enumerate(names)}
    for r in rows:
        r["label"] = index[r["label"]]
    _check_classes(rows, names)
    return names


# ---------------------------------------------------------------------------------------------
# Splits and assembly
# ---------------------------------------------------------------------------------------------

def _row_key(row: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in row.items() if k != "_where"}, sort_keys=True).encode()).hexdigest()


def split_rows(rows: list[dict], fractions=(0.8, 0.1, 0.1)) -> tuple[list[dict], list[dict], list[dict]]:
    """Deterministic 80/10/10 split: order by content hash, cut by counts, restore file order.

    Copies of a row have the same hash, so they sit side by side in that order; the cuts move to the
    end of a group of copies, so all copies land in one split (valid and test may get a few more rows).
    """
    n = len(rows)
    n_eval = max(1, round(n * fractions[1])) if n >= 3 else 0
    key = [_row_key(r) for r in rows]
    order = sorted(range(n), key=lambda i: (key[i], i))
    cuts, at = [], 0
    for _ in range(2):  # the end of valid, then of test
        at = min(at + n_eval, n)
        while 0 < at < n and key[order[at]] == key[order[at - 1]]:
            at += 1
        cuts.append(at)
    valid, test = set(order[:cuts[0]]), set(order[cuts[0]:cuts[1]])
    return ([r for i, r in enumerate(rows) if i not in valid and i not in test],
            [r for i, r in enumerate(rows) if i in valid], [r for i, r in enumerate(rows) if i in test])


def carve(rows: list[dict], fraction: float = 0.1, seed: str = "carve") -> tuple[list[dict], list[dict]]:
    """(rest, carved): a seeded ``fraction`` of ``rows`` (at least 1 when there are 2+ rows), file order kept.

    The copies of a carved row are carved with it, so duplicates share a split.
    """
    n_out = max(1, round(len(rows) * fraction)) if len(rows) >= 2 else 0
    out = set(random.Random(seed).sample(range(len(rows)), n_out))
    if out:
        key = [_row_key(r) for r in rows]
        carved = {key[i] for i in out}
        out = {i for i, k in enumerate(key) if k in carved}
    return [r for i, r in enumerate(rows) if i not in out], [r for i, r in enumerate(rows) if i in out]


def assemble(name: str, kind: str, splits: dict[str, list[dict]], labels: list[str] | None,
             source: str, notes: list[str]) -> TaskData:
    """A TaskData from clean splits (labels mapped for classification, bookkeeping keys removed)."""
    spec = get_kind(kind)
    labels = map_labels(splits, labels) if spec.labelled else None
    for split in ("train", "valid", "test"):
        if not splits[split]:
            total = sum(len(rows) for rows in splits.values())
            raise DataError(f"{source}: the {split} split has no examples ({total} rows in all); a single file is "
                            f"split 80/10/10 by content and needs at least 3 distinct rows (a few hundred for a "
                            f"meaningful score), or give train/valid/test files")
    for rows in splits.values():
        for r in rows:
            r.pop("_where", None)
    return TaskData(name, kind, spec.metric, labels, splits["train"], splits["valid"], splits["test"],
                    source, notes, spec.metrics)


def _find(directory: Path, stems: tuple[str, ...]) -> Path | None:
    """The split file named like one of ``stems`` (first match), or None. Whatever has such a name is that
    split's file: one that is not a regular file, or a link out of the directory, is refused (naming it)
    rather than skipped, which would silently carve the split from the rest."""
    for stem in stems:
        for suffix in SUFFIXES:
            path = directory / f"{stem}{suffix}"
            if os.path.lexists(path):
                _check_split_file(directory, path)
                return path
    return None


def _check_split_file(directory: Path, path: Path) -> None:
    """A split file of a data directory is a regular file inside it (a link is followed only to a file
    in the directory itself): a FIFO would hang the read, a device (/dev/urandom) never end."""
    if os.path.islink(path):
        if Path(os.path.realpath(directory)) not in Path(os.path.realpath(path)).parents:
            raise DataError(f"{path} is a symbolic link to {os.readlink(path)!r}, outside the data directory "
                            f"{directory}; copy the file into the directory (or remove the link to have the split "
                            f"made from the other files)")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); a split file of a data directory must be a "
                        f"regular file") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is {_file_kind(mode)}, not a regular file; a split file of a data directory must be "
                        f"a regular .jsonl/.csv/.tsv file (remove it to have the split made from the other files)")


def load_path(path: str | Path, labels: list[str] | None = None) -> TaskData:
    """A task from a .jsonl/.csv/.tsv file (split 80/10/10) or a directory of split files."""
    path = Path(path)
    if not path.exists() and path.is_symlink():  # exists() is False for a link to nowhere and for a loop
        try:
            os.stat(path)
        except OSError as e:
            why = "a symlink loop" if e.errno == errno.ELOOP else "a symlink to a missing file"
            raise DataError(f"{path}: {why} ({os.readlink(path)!r}); point it at a data file or directory") from None
    if not path.exists():
        raise DataError(f"{path}: no such file or directory, and not a built-in task ({', '.join(TASKS)}); pass a "
                        f".jsonl/.csv/.tsv file, a directory with train/valid/test files, or hf:<dataset>[:<config>]")
    if path.is_dir():
        files = {"train": _find(path, ("train",)), "valid": _find(path, ("valid", "validation", "dev")),
                 "test": _find(path, ("test",))}
        if files["train"] is None:
            found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise DataError(f"{path}: no train file; a data directory needs train{{{','.join(SUFFIXES)}}} "
                            f"(and optionally valid.* / validation.* and test.*); found: {found}")
        raw = {s: read_rows(f) for s, f in files.items() if f is not None}
        kinds = {s: infer_kind(set().union(*(r.keys() for _, r in rows)), str(files[s])) for s, rows in raw.items()}
        kind = kinds["train"]
        for s, k in kinds.items():
            if k != kind:
                raise DataError(f"{files[s]}: holds {k} columns but {files['train']} holds {kind} columns; "
                                f"all split files must have the same columns")
        splits = {s: _clean(rows, kind, files[s]) for s, rows in raw.items()}
        notes = ["splits from files: " + ", ".join(f"{s}={f.name}" for s, f in files.items() if f)]
        if "valid" in splits and "test" not in splits:
            splits["test"] = splits.pop("valid")
        if "test" in splits and "valid" not in splits:
            splits["train"], splits["valid"] = carve(splits["train"], seed=f"valid:{path}")
            notes.append("one evaluation file: it is the test split; valid = seeded 10% of train")
        elif "test" not in splits:
            splits["train"], splits["valid"], splits["test"] = split_rows(splits["train"])
            notes.append("only a train file: split 80/10/10 by content hash (duplicates share a split)")
    else:
        rows = read_rows(path)
        kind = infer_kind(set().union(*(r.keys() for _, r in rows)), str(path))
        train, valid, test = split_rows(_clean(rows, kind, path))
        splits = {"train": train, "valid": valid, "test": test}
        notes = ["split 80/10/10 by content hash (duplicate rows share a split), file order kept within splits"]
    return assemble(path.stem if path.is_file() else path.name, kind, splits, labels, f"user data at {path}", notes)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------

# (columns in the dataset) -> (text, text_pair), in order of preference; GLUE, SuperGLUE-style and plain names.
HF_TEXT_COLUMNS = [
    ("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"), ("premise", "hypothesis"),
    ("question", "passage"), ("sentence", None), ("text", "text_pair"), ("text", None),
]


def _hf_rows(ds, where: str, label_names: list[str] | None) -> tuple[str, list[dict], list[str] | None]:
    """Map one ``datasets.Dataset`` onto deltatune columns: (kind, rows, label names or None)."""
    cols = set(ds.column_names)
    plain = next((kind for kind in data_kinds() if not kind.labelled and set(kind.columns[0]) <= cols), None)
    if plain is not None:  # columns named as deltatune names them (query/code, prompt/target): taken as they are
        keep = plain.columns[0]
        return plain.name, [{k: row[k] for k in keep} | {"_where": f"{where}, row {i}"} for i, row in enumerate(ds)], None
    if "label" not in cols:
        raise DataError(f"{where}: no 'label' column (found columns: {', '.join(sorted(cols))}); "
                        f"accepted column sets: {accepted()}, or GLUE-style sentence / sentence1+sentence2 / "
                        f"question+sentence")
    pair = next(((a, b) for a, b in HF_TEXT_COLUMNS if a in cols and (b is None or b in cols)), None)
    if pair is None:
        raise DataError(f"{where}: no text column (found columns: {', '.join(sorted(cols))}); expected one of "
                        + ", ".join(a if b is None else f"{a}+{b}" for a, b in HF_TEXT_COLUMNS))
    feature = ds.features.get("label")
    names = list(getattr(feature, "names", None) or []) or label_names
    rows = []
    for i, row in enumerate(ds):
        if row["label"] is None or row["label"] == -1:  # GLUE hides test labels as -1
            continue
        r = {"text": row[pair[0]], "label": row["label"], "_where": f"{where}, row {i}"}
        if pair[1]:
            r["text_pair"] = row[pair[1]]
        rows.append(r)
    return Classification.name, rows, names


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """(dataset, config) of ``<dataset>[:<config>]``: ``org/name`` is a dataset on the Hub, ``:`` names its config.

    ``imdb`` -> ("imdb", None); ``stanfordnlp/imdb`` -> ("stanfordnlp/imdb", None);
    ``nyu-mll/glue:sst2`` -> ("nyu-mll/glue", "sst2").
    """
    name, colon, config = spec.partition(":")
    name, config = name.strip(), config.strip()
    if not name or (colon and not config) or name.count("/") > 1 or name.startswith("/") or name.endswith("/") or "/" in config or ":" in config:
        raise DataError(f"hf:{spec}: expected hf:<dataset>[:<config>], where <dataset> is a name or org/name "
                        f"on the Hub (e.g. hf:imdb, hf:nyu-mll/glue:sst2), or a directory saved with save_to_disk")
    return name, config or None


def load_hf(spec: str, labels: list[str] | None = None) -> TaskData:
    """``<dataset>[:<config>]`` (``org/name`` or ``name``, see :func:`parse_hf_spec`) through ``datasets.load_dataset``, or a local ``save_to_disk`` directory.

    GLUE-style: the ``validation`` split (``validation_matched`` for MNLI) is the test split, since
    GLUE test labels are hidden, and valid is a seeded 10% of train. A test split with labels is
    used as test, with validation as valid.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{spec} needs the Hugging Face `datasets` library: pip install datasets") from None
    local = Path(spec)
    try:
        if local.exists():
            dd = datasets.load_from_disk(str(local))
        else:
            dd = datasets.load_dataset(*parse_hf_spec(spec))
    except DataError:
        raise
    except Exception as e:  # network, unknown name, missing config: name them
        raise DataError(f"hf:{spec}: cannot load ({type(e).__name__}: {e}); check the dataset name and config, "
                        f"e.g. hf:nyu-mll/glue:sst2, or pass a local directory saved with save_to_disk") from None
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    if "train" not in dd:
        raise DataError(f"hf:{spec}: no 'train' split (found splits: {', '.join(dd)})")
    valid_name = next((s for s in ("validation", "validation_matched", "valid", "dev") if s in dd), None)
    mapped, kind, names = {}, None, None
    for split in ["train", valid_name, "test"]:
        if split and split in dd:
            k, rows, n = _hf_rows(dd[split], f"hf:{spec}[{split}]", labels)
            if kind and k != kind:
                raise DataError(f"hf:{spec}: split {split} has {k} columns but train has {kind} columns")
            kind, names = kind or k, names or n
            mapped[split] = rows
    notes = []
    if mapped.get("test") and valid_name:
        splits = {"train": mapped["train"], "valid": mapped[valid_name], "test": mapped["test"]}
        notes.append(f"splits: train, {valid_name} as valid, test")
    elif valid_name:
        train, valid = carve(mapped["train"], seed=f"valid:hf:{spec}")
        splits = {"train": train, "valid": valid, "test": mapped[valid_name]}
        notes.append(f"test labels hidden or absent (GLUE): {valid_name} is the test split; "
                     f"valid = seeded 10% of train")
    else:
        train, valid, test = split_rows(mapped["train"])
        splits = {"train": train, "valid": valid, "test": test}
        notes.append("only a train split: split 80/10/10 by content hash")
    name = local.name if local.exists() else spec.replace("/", "-").replace(":", "-")
    return assemble(name, kind, splits, names if labels is None else labels, f"Hugging Face dataset {spec}", notes)
