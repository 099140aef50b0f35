"""User data: JSONL/CSV/TSV files or directories, and Hugging Face ``datasets``.

The kind of task follows from the columns:

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
import hashlib
import io
import json
import random
from pathlib import Path

from deltatune.errors import DataError
from deltatune.tasks import TaskData

SUFFIXES = (".jsonl", ".csv", ".tsv")
KINDS = {  # kind -> (required columns, optional columns, main metric, all metrics)
    "classification": (("text", "label"), ("text_pair",), "accuracy", ("accuracy", "macro_f1")),
    "retrieval": (("query", "code"), (), "mrr", ("mrr", "recall@1", "recall@5", "recall@10")),
    "generation": (("prompt", "target"), (), "bleu4", ("bleu4", "exact_match")),
}
ACCEPTED = "text,label[,text_pair] (classification); query,code (retrieval); prompt,target (generation)"


# ---------------------------------------------------------------------------------------------
# Reading one file
# ---------------------------------------------------------------------------------------------

def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass a .jsonl/.csv/.tsv file, a directory with train/valid/test "
                        f"files, a built-in task name or hf:<dataset>") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
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
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno}); "
                                f"each line must hold one JSON object") from None
            except RecursionError:
                raise DataError(f"{path}, line {n}: JSON nested too deeply to read; each line must hold one flat "
                                f"JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object with columns {ACCEPTED}, "
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
        raise DataError(f"{path} is empty: no records found; expected rows with columns {ACCEPTED}")
    return rows


def infer_kind(columns: set[str], where: str) -> str:
    """The task kind for a set of column names, or a DataError listing what was found and what is accepted."""
    for kind, (required, _, _, _) in KINDS.items():
        if set(required) <= columns:
            return kind
    found = ", ".join(sorted(columns)) or "none"
    for kind, (required, _, _, _) in KINDS.items():
        missing = [c for c in required if c not in columns]
        if len(missing) < len(required):
            raise DataError(f"{where}: missing column {missing[0]!r} for {kind} data (found columns: {found}); "
                            f"accepted column sets: {ACCEPTED}")
    raise DataError(f"{where}: no usable columns (found columns: {found}); accepted column sets: {ACCEPTED}")


def _clean(rows: list[tuple[int, dict]], kind: str, path: Path) -> list[dict]:
    """Keep the task's columns; check every row has them and that text columns are strings."""
    required, optional, _, _ = KINDS[kind]
    has_pair = any("text_pair" in r for _, r in rows)
    out = []
    for n, row in rows:
        for col in required + (optional if has_pair else ()):
            if col not in row:
                raise DataError(f"{path}, line {n}: missing column {col!r} (found columns: "
                                f"{', '.join(sorted(row))}); every row needs {', '.join(required)}")
            if row[col] is None:
                raise DataError(f"{path}, line {n}: column {col!r} is null; give every row a value")
            if col != "label" and not isinstance(row[col], str):
                raise DataError(f"{path}, line {n}: column {col!r} must be a string, got {type(row[col]).__name__}")
        out.append({c: row[c] for c in required + optional if c in row} | {"_where": f"{path}, line {n}"})
    return out


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

def _as_int(value) -> int | None:
    """An int for 3, True, 3.0 or "3"; None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def map_labels(splits: dict[str, list[dict]], labels: list[str] | None) -> list[str]:
    """Turn every row's label into an int in 0..K-1 (in place) and return the K class names.

    With ``labels`` given, a label may be a class name or an int index. Without, all-int labels
    name classes "0".."max", and string labels become ints in sorted order.
    """
    rows = [r for split in splits.values() for r in split]
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
                raise DataError(f"{r['_where']}: unknown label {value!r}; the labels are {labels} "
                                f"(give one of those names or an int in 0..{len(labels) - 1})")
            if not 0 <= as_int < len(labels):
                raise DataError(f"{r['_where']}: label {value!r} is out of range: with labels {labels} a label must be "
                                f"one of those names or an int in 0..{len(labels) - 1}")
            r["label"] = as_int
        return labels
    ints = [_as_int(r["label"]) for r in rows]
    if all(i is not None for i in ints):
        for r, i in zip(rows, ints):
            if i < 0:
                raise DataError(f"{r['_where']}: label {r['label']!r} is out of range: int labels must be "
                                f"0..K-1 (or use class-name strings)")
            r["label"] = i
        return [str(k) for k in range(max(ints) + 1)]
    odd = next((r for r, i in zip(rows, ints) if i is None and not isinstance(r["label"], str)), None)
    if odd is not None:
        raise DataError(f"{odd['_where']}: label {odd['label']!r} is neither an int class index nor a class name; "
                        f"use ints 0..K-1 or class-name strings")
    bad = next((r for r in rows if not isinstance(r["label"], str)), None)
    if bad is not None:
        raise DataError(f"{bad['_where']}: label {bad['label']!r} mixes with string labels; use either class-name "
                        f"strings or ints 0..K-1 throughout")
    names = sorted({r["label"] for r in rows})
    index = {name: i for i, name in enumerate(names)}
    for r in rows:
        r["label"] = index[r["label"]]
    return names


# ---------------------------------------------------------------------------------------------
# Splits and assembly
# ---------------------------------------------------------------------------------------------

def split_rows(rows: list[dict], fractions=(0.8, 0.1, 0.1)) -> tuple[list[dict], list[dict], list[dict]]:
    """Deterministic 80/10/10 split: order by content hash, cut by counts, restore file order."""
    n = len(rows)
    n_eval = max(1, round(n * fractions[1])) if n >= 3 else 0
    key = [hashlib.sha256(json.dumps({k: v for k, v in r.items() if k != "_where"}, sort_keys=True).encode())
           .hexdigest() for r in rows]
    order = sorted(range(n), key=lambda i: (key[i], i))
    valid, test = set(order[:n_eval]), set(order[n_eval:2 * n_eval])
    return ([r for i, r in enumerate(rows) if i not in valid and i not in test],
            [r for i, r in enumerate(rows) if i in valid], [r for i, r in enumerate(rows) if i in test])


def carve(rows: list[dict], fraction: float = 0.1, seed: str = "carve") -> tuple[list[dict], list[dict]]:
    """(rest, carved): a seeded ``fraction`` of ``rows`` (at least 1 when there are 2+ rows), file order kept."""
    n_out = max(1, round(len(rows) * fraction)) if len(rows) >= 2 else 0
    out = set(random.Random(seed).sample(range(len(rows)), n_out))
    return [r for i, r in enumerate(rows) if i not in out], [r for i, r in enumerate(rows) if i in out]


def assemble(name: str, kind: str, splits: dict[str, list[dict]], labels: list[str] | None,
             source: str, notes: list[str]) -> TaskData:
    """A TaskData from clean splits (labels mapped for classification, bookkeeping keys removed)."""
    _, _, metric, metrics = KINDS[kind]
    if kind == "classification":
        labels = map_labels(splits, labels)
    else:
        labels = None
    for rows in splits.values():
        for r in rows:
            r.pop("_where", None)
    return TaskData(name, kind, metric, labels, splits["train"], splits["valid"], splits["test"],
                    source, notes, metrics)


def _find(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in SUFFIXES:
            if (directory / f"{stem}{suffix}").is_file():
                return directory / f"{stem}{suffix}"
    return None


def load_path(path: str | Path, labels: list[str] | None = None) -> TaskData:
    """A task from a .jsonl/.csv/.tsv file (split 80/10/10) or a directory of split files."""
    path = Path(path)
    if not path.exists():
        from deltatune.tasks import TASKS
        raise DataError(f"{path}: no such file or directory, and not a built-in task ({', '.join(TASKS)}); pass a "
                        f".jsonl/.csv/.tsv file, a directory with train/valid/test files, or hf:<dataset>[/<config>]")
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
    if {"query", "code"} <= cols or {"prompt", "target"} <= cols:
        kind = "retrieval" if {"query", "code"} <= cols else "generation"
        keep = KINDS[kind][0]
        return kind, [{k: row[k] for k in keep} | {"_where": f"{where}, row {i}"} for i, row in enumerate(ds)], None
    if "label" not in cols:
        raise DataError(f"{where}: no 'label' column (found columns: {', '.join(sorted(cols))}); "
                        f"accepted column sets: {ACCEPTED}, or GLUE-style sentence / sentence1+sentence2 / "
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
    return "classification", rows, names


def load_hf(spec: str, labels: list[str] | None = None) -> TaskData:
    """``<dataset>[/<config>]`` through ``datasets.load_dataset``, or a local ``save_to_disk`` directory.

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
            name, _, config = spec.partition("/")
            dd = datasets.load_dataset(name, config or None)
    except DataError:
        raise
    except Exception as e:  # network, unknown name, missing config: name them
        raise DataError(f"hf:{spec}: cannot load ({type(e).__name__}: {e}); check the dataset name and config, "
                        f"e.g. hf:glue/sst2, or pass a local directory saved with save_to_disk") from None
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
    name = local.name if local.exists() else spec.replace("/", "-")
    return assemble(name, kind, splits, names if labels is None else labels, f"Hugging Face dataset {spec}", notes)
