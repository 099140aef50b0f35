"""Code-intelligence tasks built from the real CPython standard library that ships with this Python.

Extraction (:func:`extract_corpus`) walks ``sysconfig.get_paths()["stdlib"]`` in sorted order,
skipping any ``test``/``tests``/``idlelib``/``site-packages``/``__pycache__`` directory and files that
do not decode or parse, and keeps every function or method (nested ones too) whose code, without
its docstring, is at most 60 lines and 2,000 characters and has a body besides ``pass``/``...``.
Function code is the source lines of the ``def`` (what ``ast.get_source_segment(padded=True)``
returns, decorators excluded) minus the docstring lines, with the ``def`` indentation removed.
The corpus and the built tasks are cached as JSON under :func:`cache_dir`, keyed by Python version,
stdlib path, :data:`TASKS_VERSION` and this file's code.

Splits are by file: sha256 of the path relative to the stdlib, mod 10, gives train (0-7),
valid (8) and test (9), so no file contributes to two splits. The tasks are fixed datasets: every
random choice uses a seed derived from the task name and the function's location.

Near-copies do cross files (``lzma.close`` and ``bz2.close``), so a valid or test function whose
identifier set has Jaccard similarity >= 0.8 with a function of an earlier split (train before
valid before test) is dropped from every task (:func:`near_duplicates`, exact, by prefix
filtering), and a valid or test docstring summary that occurs in an earlier split is dropped from
the tasks that predict or retrieve by it (code-search, code-summarization). Identical queries
within a code-search split stay; the score counts each one's codes as right answers.

Tasks and the benchmarks they mirror:

- ``code-search``: CodeSearchNet (Husain et al. 2019) / CodeXGLUE code search: docstring summary -> code.
- ``docstring-match``: CuBERT function-docstring mismatch (Kanade et al. 2020).
- ``exception-type``: CuBERT exception classification: the masked type of an ``except`` clause.
- ``bug-detect``: CuBERT-style synthetic bugs (variable misuse, wrong binary operator, swapped
  operands; also Allamanis et al. 2018, Vasic et al. 2019).
- ``code-summarization``: CodeXGLUE code-to-text (Python): code -> docstring summary.
- ``function-naming``: code2seq method naming (Alon et al. 2019): masked body -> name.

Each task is registered with :func:`stdlib_task` beside its builder (a function of the corpus);
:func:`build_task` builds it once and caches it. Run ``python -m deltatune.tasks.code`` to print
every task's dataset card.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import os
import random
import re
import sys
import sysconfig
import time
import tokenize
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from deltatune.names import cache_dir
from deltatune.tasks.registry import REGISTRY, TaskData, task

CORPUS_VERSION = 2  # records carry "ids" (their identifier set)
TASKS_VERSION = 2  # part of every cache key: bump when extraction or any task's construction changes
NEAR_DUP_JACCARD = 0.8
MAX_LINES, MAX_CHARS = 60, 2000
MIN_DOC_WORDS = 3
N_EXCEPTION_TYPES = 20
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
HOLE, NAME_MASK = "__HOLE__", "__NAME__"
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
SPLITS = ("train", "valid", "test")  # also the precedence order: a near-copy is kept in the earliest


def stdlib_root() -> Path:
    """The standard library directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """train/valid/test for a file, from the sha256 of its stdlib-relative path (80/10/10)."""
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("valid" if bucket == 8 else "test")


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

def _walk_statements(body: list[ast.stmt], into_functions: bool):
    """Yield statements recursively through compound statements (not into nested functions unless asked)."""
    for node in body:
        yield node
        if isinstance(node, _FUNCS) and not into_functions:
            continue
        for name in ("body", "orelse", "finalbody"):
            yield from _walk_statements(getattr(node, name, None) or [], into_functions)
        for sub in getattr(node, "handlers", None) or []:
            yield sub
            yield from _walk_statements(sub.body, into_functions)
        for case in getattr(node, "cases", None) or []:
            yield from _walk_statements(case.body, into_functions)


def _dotted(node: ast.expr) -> str | None:
    """``ValueError`` or ``os.error`` for a Name or a dotted attribute chain of names, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _replace_cols(line: str, start: int, end: int, text: str) -> str:
    """Replace UTF-8 byte columns [start, end) of ``line`` (ast offsets are in bytes) by ``text``."""
    raw = line.encode()
    return raw[:start].decode() + text + raw[end:].decode()


def _function_record(node, lines: list[str], relpath: str) -> dict | None:
    """The record of one function, or None if it is out of bounds or has nothing but a docstring."""
    first, last = node.lineno - 1, node.end_lineno  # 0-based slice of the def's lines
    own = lines[first:last]
    body = node.body
    doc, drop = "", range(0)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        ds = body[0]
        before = own[ds.lineno - 1 - first].encode()[:ds.col_offset].decode(errors="replace")
        after = own[ds.end_lineno - 1 - first].encode()[ds.end_col_offset:].decode(errors="replace")
        if before.strip() or after.strip() and not after.strip().startswith("#"):
            return None  # docstring shares a line with other code: cannot cut it out cleanly
        if len(body) > 1 and body[1].lineno <= ds.end_lineno:
            return None
        text = ast.get_docstring(node) or ""
        doc = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        drop = range(ds.lineno - 1 - first, ds.end_lineno - first)
        body = body[1:]
    if not body or all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                   and s.value.value is Ellipsis) for s in body):
        return None
    # except clauses whose innermost function is this one; masked copies are built on `own` lines
    excepts = []
    for st in _walk_statements(node.body, into_functions=False):
        if isinstance(st, ast.ExceptHandler) and st.type is not None and st.type.lineno == st.type.end_lineno:
            answer = _dotted(st.type)
            if answer:
                masked = list(own)
                i = st.type.lineno - 1 - first
                masked[i] = _replace_cols(masked[i], st.type.col_offset, st.type.end_col_offset, HOLE)
                excepts.append([answer, masked])
    keep = [i for i in range(len(own)) if i not in drop]
    indent = own[0][: len(own[0]) - len(own[0].lstrip())]

    def render(src_lines: list[str]) -> str:
        out = [src_lines[i][len(indent):] if src_lines[i].startswith(indent) else src_lines[i] for i in keep]
        return "\n".join(out).rstrip() + "\n"

    code = render(own)
    if code.count("\n") > MAX_LINES or len(code) > MAX_CHARS:
        return None
    return {"path": relpath, "line": node.lineno, "name": node.name, "doc": doc, "code": code,
            "excepts": [[answer, render(m)] for answer, m in excepts]}


def identifiers(node: ast.AST) -> list[str]:
    """The sorted identifier set of a function (decorators excluded): its name, and every variable,
    attribute, parameter, keyword argument, imported name, nested def/class and ``except ... as``
    name in its signature and body. Strings, numbers and comments are not identifiers."""
    names = {node.name}
    parts = [node.args, *([node.returns] if node.returns else []), *node.body]
    for part in parts:
        for n in ast.walk(part):
            if isinstance(n, ast.Name):
                names.add(n.id)
            elif isinstance(n, ast.Attribute):
                names.add(n.attr)
            elif isinstance(n, ast.arg):
                names.add(n.arg)
            elif isinstance(n, ast.keyword) and n.arg:
                names.add(n.arg)
            elif isinstance(n, (*_FUNCS, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, ast.alias):
                names.add(n.asname or n.name)
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                names.update(n.names)
            elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and n.name:
                names.add(n.name)
    return sorted(names)


def extract_file(source: str, relpath: str) -> list[dict]:
    """Records of all in-bounds functions of one module's source (raises SyntaxError if it does not parse)."""
    tree = ast.parse(source)
    lines = re.split(r"\r\n|\r|\n", source)  # ast's line breaks only (str.splitlines also breaks on \f etc.)
    records = []
    for node in _walk_statements(tree.body, into_functions=True):
        if isinstance(node, _FUNCS):
            rec = _function_record(node, lines, relpath)
            if rec and (len(rec["doc"].split()) >= MIN_DOC_WORDS or rec["excepts"]):
                records.append({**rec, "ids": identifiers(node)})
    return records


def _read_source(path: Path) -> str:
    """Decode a module honouring its coding cookie and BOM (as the interpreter does)."""
    raw = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    return raw.decode(encoding)


def extract_corpus(root: str | Path | None = None) -> dict:
    """Extract the function corpus from a stdlib tree (default: this Python's). Deterministic."""
    root = Path(root) if root else stdlib_root()
    functions, skipped, n_files = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            rel = path.relative_to(root).as_posix()
            try:
                records = extract_file(_read_source(path), rel)
            except (OSError, SyntaxError, ValueError, UnicodeDecodeError, LookupError, RecursionError):
                skipped.append(rel)
                continue
            n_files += 1
            functions.extend(records)
    functions.sort(key=lambda r: (r["path"], r["line"]))
    return {"version": CORPUS_VERSION, "python": sys.version.split()[0], "root": str(root),
            "files": n_files, "unparsable": sorted(skipped), "functions": functions}


def cache_file(what: str, root: str | Path | None = None) -> Path:
    """Cache path for the corpus or a built task, keyed by Python version, stdlib path and this file's code."""
    root = Path(root) if root else stdlib_root()
    key = hashlib.sha256(str(root.resolve()).encode() + Path(__file__).read_bytes()).hexdigest()[:10]
    return cache_dir() / f"stdlib-py{sys.version.split()[0]}-v{TASKS_VERSION}-{key}-{what}.json"


def _json_cached(path: Path, build, check=None) -> dict:
    """``build()``'s JSON-able result, read from the cache entry ``path`` if it is there and trusted, else
    built and written atomically.

    The entry is untrusted input (:class:`deltatune.storage.CacheEntry`): one that is not a regular file of
    this user, holds another key than its name's, or fails ``check`` (the task's or the corpus's shape) is
    rebuilt with a warning; an unwritable cache dir only costs the speed-up.
    """
    from deltatune.storage import CacheEntry

    entry = CacheEntry(path, path.stem, "task data", root=cache_dir())
    value = entry.read_json(check or check_task_fields)
    if value is None:
        value = build()
        entry.write_json(value)
    return value


def _rows(value, what: str) -> None:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise TypeError(f"{what} must be a list of objects")
    for r in value:
        for k, v in r.items():
            if not isinstance(v, (str, int, float, bool, type(None), list)):
                raise TypeError(f"{what}: column {k!r} holds {type(v).__name__}")


def check_task_fields(value) -> None:
    """The cached fields of a built task: its three splits as lists of rows, notes and labels (TypeError
    or KeyError otherwise, naming what is wrong)."""
    if not isinstance(value, dict):
        raise TypeError(f"a task is an object, not {type(value).__name__}")
    for split in ("train", "valid", "test"):
        _rows(value[split], split)
    if not isinstance(value.get("notes", []), list) or not all(isinstance(n, str) for n in value.get("notes", [])):
        raise TypeError("notes must be a list of strings")
    labels = value.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise TypeError("labels must be a list of strings or null")


def check_corpus(value) -> None:
    """The cached function corpus: this CORPUS_VERSION, functions with their path, line, name, doc and code."""
    if not isinstance(value, dict) or value.get("version") != CORPUS_VERSION:
        raise ValueError(f"not a function corpus of version {CORPUS_VERSION}")
    _rows(value["functions"], "functions")
    for f in value["functions"]:
        if not (all(isinstance(f[k], str) for k in ("path", "name", "doc", "code")) and isinstance(f["line"], int)
                and isinstance(f.get("excepts", []), list) and isinstance(f.get("ids", []), list)):
            raise TypeError(f"function record {str(f)[:80]} lacks its path, line, name, doc or code")


def _timed_extract(root: Path) -> dict:
    start = time.perf_counter()
    corpus = extract_corpus(root)
    corpus["extract_seconds"] = round(time.perf_counter() - start, 2)
    return corpus


@lru_cache(maxsize=4)
def load_corpus(root: str | None = None) -> dict:
    """The function corpus, from the JSON cache, extracting and caching it on first use."""
    root_path = Path(root) if root else stdlib_root()
    return _json_cached(cache_file("corpus", root_path), lambda: _timed_extract(root_path), check_corpus)


# ---------------------------------------------------------------------------------------------
# Synthetic bugs (bug-detect)
# ---------------------------------------------------------------------------------------------

_OP_GROUPS = [
    [ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod],
    [ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift],
    [ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE],
    [ast.Is, ast.IsNot], [ast.In, ast.NotIn], [ast.And, ast.Or],
]
_NON_COMMUTATIVE = (ast.Sub, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift,
                    ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)
BUG_KINDS = ("variable-misuse", "wrong-operator", "swapped-operands")


def _alternatives(op: ast.AST) -> list[type]:
    for group in _OP_GROUPS:
        if type(op) in group:
            return [o for o in group if o is not type(op)]
    return []


def _bug_sites(fn: ast.AST) -> dict[str, list]:
    """Candidate nodes for each bug kind in a parsed function (one walk), plus its variable names."""
    args = fn.args
    variables = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    variables |= {a.arg for a in (args.vararg, args.kwarg) if a}
    loads, operators, swaps = [], [], []
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Store):
                variables.add(node.id)
            elif isinstance(node.ctx, ast.Load):
                loads.append(node)
        elif isinstance(node, (ast.BinOp, ast.BoolOp)):
            if _alternatives(node.op):
                operators.append(node)
            if isinstance(node.op, _NON_COMMUTATIVE) and ast.dump(node.left) != ast.dump(node.right):
                swaps.append(node)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1:
            if _alternatives(node.ops[0]):
                operators.append(node)
            if isinstance(node.ops[0], _NON_COMMUTATIVE) and ast.dump(node.left) != ast.dump(node.comparators[0]):
                swaps.append(node)
    uses = [n for n in loads if n.id in variables] if len(variables) >= 2 else []
    return {"variable-misuse": uses, "wrong-operator": operators, "swapped-operands": swaps,
            "_variables": sorted(variables)}


def _apply_bug(sites: dict[str, list], rng: random.Random) -> str:
    """Mutate one seeded site of a seeded applicable kind in place; return the kind."""
    kind = rng.choice([k for k in BUG_KINDS if sites[k]])
    node = rng.choice(sites[kind])
    if kind == "variable-misuse":
        node.id = rng.choice([v for v in sites["_variables"] if v != node.id])
    elif kind == "wrong-operator":
        if isinstance(node, ast.Compare):
            node.ops = [rng.choice(_alternatives(node.ops[0]))()]
        else:
            node.op = rng.choice(_alternatives(node.op))()
    elif isinstance(node, ast.BinOp):
        node.left, node.right = node.right, node.left
    else:
        node.left, node.comparators = node.comparators[0], [node.left]
    return kind


def inject_bug(code: str, rng: random.Random) -> tuple[str, str] | None:
    """(buggy code, bug kind) for one function's code, rendered with ``ast.unparse``; None if no bug applies."""
    tree = ast.parse(code)
    sites = _bug_sites(tree.body[0])
    if not any(sites[k] for k in BUG_KINDS):
        return None
    kind = _apply_bug(sites, rng)
    return ast.unparse(tree) + "\n", kind


# ---------------------------------------------------------------------------------------------
# Near-duplicates across splits
# ---------------------------------------------------------------------------------------------

def near_duplicates(functions: list[dict], threshold: float = NEAR_DUP_JACCARD) -> dict[int, int]:
    """Index of each valid/test function with a near-copy in an earlier split -> index of that copy.

    A near-copy has identifier-set Jaccard similarity >= ``threshold`` (records' ``"ids"``); the
    earlier split is train for a valid function and train or valid for a test one; among several
    copies the most similar (then the first) is named. Exact, not sampled: prefix filtering
    (Chaudhuri et al. 2006; Bayardo et al. 2007) orders identifiers from rare to common, and two
    sets with Jaccard >= t share an identifier among the first |S| - ceil(t |S|) + 1 of each, so
    only pairs sharing such a prefix identifier are compared.
    """
    num, den = Fraction(str(threshold)).as_integer_ratio()
    sets = [frozenset(f["ids"]) for f in functions]
    freq = Counter(t for s in sets for t in s)
    prefix = [sorted(s, key=lambda t: (freq[t], t))[: len(s) - -(-num * len(s) // den) + 1] for s in sets]
    rank = [SPLITS.index(split_of(f["path"])) for f in functions]
    index: dict[str, list[int]] = {}  # identifier -> earlier-split functions with it in their prefix
    found = {}
    for level in range(len(SPLITS)):
        members = [i for i, r in enumerate(rank) if r == level]
        for i in members if level else []:
            best = None
            for j in sorted({j for t in prefix[i] for j in index.get(t, ())}):
                common = len(sets[i] & sets[j])
                union = len(sets[i]) + len(sets[j]) - common
                if den * common >= num * union and (best is None or common * best[1] > best[0] * union):
                    best = (common, union, j)
            if best:
                found[i] = best[2]
        for i in members:
            for t in prefix[i]:
                index.setdefault(t, []).append(i)
    return found


def _without_near_copies(corpus: dict) -> tuple[list[dict], dict[str, str]]:
    """The corpus functions minus valid/test near-copies, and "path:line" -> "path:line" of each dropped one's copy."""
    functions = corpus["functions"]
    dups = near_duplicates(functions)
    where = {i: f"{functions[i]['path']}:{functions[i]['line']}" for i in (*dups, *dups.values())}
    return [f for i, f in enumerate(functions) if i not in dups], {where[i]: where[j] for i, j in dups.items()}


def _split_counts(before: list[dict], after: list[dict]) -> str:
    """ "valid 3, test 7": how many of ``before`` (functions or rows) per split are not in ``after``."""
    kept = Counter(split_of(r["path"]) for r in after)
    gone = Counter(split_of(r["path"]) for r in before)
    return ", ".join(f"{s} {gone[s] - kept[s]}" for s in SPLITS[1:])


# ---------------------------------------------------------------------------------------------
# Task builders
# ---------------------------------------------------------------------------------------------

_BUILDERS: dict = {}  # task name -> its builder, a function of the corpus (filled by stdlib_task)


def stdlib_task(name: str, **registration):
    """Decorator: register the task ``name`` (``registration``: :func:`deltatune.tasks.registry.task`'s
    keywords) built from the corpus by the function below; loading it goes through :func:`build_task`."""
    def register(builder):
        _BUILDERS[name] = builder
        task(name, **registration)(lambda: build_task(name))
        return builder

    return register


def _first_per_code(functions: list[dict]) -> list[dict]:
    """Documented functions (3+ word summary), one per distinct code: the copy in the earliest split, else the first."""
    documented = [f for f in functions if len(f["doc"].split()) >= MIN_DOC_WORDS]
    keep = {}
    for f in sorted(documented, key=lambda f: SPLITS.index(split_of(f["path"]))):  # stable: path order within
        keep.setdefault(f["code"], id(f))
    return [f for f in documented if keep[f["code"]] == id(f)]


def _documented(corpus: dict) -> list[dict]:
    """Functions whose docstring summary has 3+ words, without valid/test near-copies of an earlier split's
    functions, deduplicated by code (a copy in an earlier split kept first)."""
    return _first_per_code(_without_near_copies(corpus)[0])


def _near_copy_note(corpus: dict, all_fs: list[dict] | None = None, kept: list[dict] | None = None) -> str:
    """The card's line on near-duplicates: the rule, and how many functions it dropped from this task per split."""
    if all_fs is None:
        all_fs, kept = _first_per_code(corpus["functions"]), _documented(corpus)
    return (f"near-duplicates across splits dropped: a valid/test function whose identifier set (names, attributes, "
            f"parameters; no strings or comments) has Jaccard >= {NEAR_DUP_JACCARD} with a function of an earlier "
            f"split (train < valid < test) is left out; of the functions this task is built from, that dropped "
            f"{_split_counts(all_fs, kept)}")


def _origin(f: dict) -> dict:
    """Where an example comes from: stdlib-relative path, line of the def, function name."""
    return {"path": f["path"], "line": f["line"], "name": f["name"]}


def _by_split(rows: list[dict]) -> dict[str, list[dict]]:
    out = {"train": [], "valid": [], "test": []}
    for r in rows:
        out[split_of(r["path"])].append(r)
    return out


def _source(corpus: dict) -> str:
    return (f"CPython {corpus['python']} standard library at {corpus['root']} "
            f"({corpus['files']} modules parsed, {len(corpus['unparsable'])} skipped as unparsable)")


_COMMON_NOTES = [
    "split by module: sha256(stdlib-relative path) % 10 -> train 0-7 / valid 8 / test 9; no file is in two splits",
    "skipped dirs: test, tests, idlelib, site-packages; functions over 60 lines or 2000 chars "
    "(without docstring) or with an empty body are skipped; of identical function bodies one is kept (train's copy "
    "first, then valid's, then the first by path)",
]


def _query_key(text: str) -> str:
    return " ".join(text.lower().split())


def _pairs(corpus: dict) -> tuple[dict[str, list[dict]], list[str]]:
    """(functions per split, card notes) of code-search and code-summarization: (docstring summary, code
    without docstring) pairs.

    A valid or test function whose summary (lower-cased, whitespace collapsed) is also the summary
    of a function in an earlier split is dropped: its query or target was seen in training.
    """
    documented = _documented(corpus)
    splits = _by_split(documented)
    seen, dropped = set(), Counter()
    for split in SPLITS:
        keys = {_query_key(f["doc"]) for f in splits[split]}
        kept = [f for f in splits[split] if _query_key(f["doc"]) not in seen]
        dropped[split] = len(splits[split]) - len(kept)
        splits[split] = kept
        seen |= keys
    notes = _COMMON_NOTES + [
        f"docstring summary = first non-empty docstring line, {MIN_DOC_WORDS}+ words",
        _near_copy_note(corpus),
        f"a valid/test function whose summary (case and spacing ignored) is a summary in an earlier split is dropped: "
        f"valid {dropped['valid']}, test {dropped['test']}",
    ]
    return splits, notes


@stdlib_task("code-search", kind="retrieval",
             description="retrieve a stdlib function from its docstring summary (CodeSearchNet / CodeXGLUE code "
                         "search; MRR)")
def _code_search(corpus: dict) -> TaskData:
    splits, notes = _pairs(corpus)
    rows = {s: [{"query": f["doc"], "code": f["code"], **_origin(f)} for f in fs] for s, fs in splits.items()}
    repeats = {s: len(r) - len({" ".join(q["query"].split()) for q in r}) for s, r in rows.items()}
    notes.append("score: cosine ranking of each query's code among the split's codes (see retrieval pool below; "
                 "every score names its pool)")
    notes.append(f"identical queries within a split are kept (valid {repeats['valid']}, test {repeats['test']} "
                 f"repeats) and all their codes count as right answers: a query ranks by the first of them")
    return REGISTRY["code-search"].data(None, rows["train"], rows["valid"], rows["test"], source=_source(corpus),
                                        notes=notes)


@stdlib_task("docstring-match", kind="classification",
             description="does this docstring summary belong to this function? "
                         "(CuBERT function-docstring mismatch; accuracy)")
def _docstring_match(corpus: dict) -> TaskData:
    """Half of each split's functions keep their docstring (match), half get another function's (mismatch)."""
    out = {}
    for split, fs in _by_split(_documented(corpus)).items():
        rng = random.Random(f"docstring-match:{split}")
        order = list(range(len(fs)))
        rng.shuffle(order)
        negative = set(order[len(fs) // 2:]) if len(fs) > 1 else set()
        rows = []
        for i, f in enumerate(fs):
            doc, label = f["doc"], 1
            if i in negative:
                for _ in range(100):  # a random other function with a different summary
                    other = fs[rng.randrange(len(fs))]["doc"]
                    if other != f["doc"]:
                        doc, label = other, 0
                        break
            rows.append({"text": doc, "text_pair": f["code"], "label": label, **_origin(f)})
        out[split] = rows
    notes = _COMMON_NOTES + [_near_copy_note(corpus),
                             "negatives pair a function with the docstring summary of another function of the same "
                             "split (different text); labels balanced 50/50 per split (seeded)"]
    return REGISTRY["docstring-match"].data(["mismatch", "match"], out["train"], out["valid"], out["test"],
                                            source=_source(corpus), notes=notes)


def _mentions(answer: str) -> re.Pattern:
    """Whole-word mentions of an exception name (``error`` matches ``error`` but not ``os.error``)."""
    return re.compile(rf"(?<![\w.]){re.escape(answer)}(?!\w)")


@stdlib_task("exception-type", kind="classification",
             description="predict the exception type masked as __HOLE__ in an except clause "
                         "(CuBERT exception classification; accuracy)")
def _exception_type(corpus: dict) -> TaskData:
    """One example per ``except X:`` clause; the 20 most frequent types on train are the classes."""
    seen, rows, masked_more = set(), {"train": [], "valid": [], "test": []}, 0
    functions = _without_near_copies(corpus)[0]
    with_excepts = [f for f in corpus["functions"] if f["excepts"]]
    for f in functions:
        for answer, masked in f["excepts"]:
            prompt, n = _mentions(answer).subn(HOLE, masked)
            if (answer, prompt) in seen:
                continue
            seen.add((answer, prompt))
            masked_more += n > 0
            rows[split_of(f["path"])].append({"text": prompt, "answer": answer, **_origin(f)})
    counts = Counter(r["answer"] for r in rows["train"])
    labels = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:N_EXCEPTION_TYPES]]
    index = {a: i for i, a in enumerate(labels)}
    for split in rows:
        rows[split] = [{**r, "label": index[r["answer"]]} for r in rows[split] if r["answer"] in index]
    notes = _COMMON_NOTES + [
        _near_copy_note(corpus, with_excepts, [f for f in functions if f["excepts"]]),
        f"all functions with an `except X:` clause (X a name or dotted name), docstring or not; the clause's "
        f"type is replaced by {HOLE}; one example per clause; duplicates (same masked code) dropped",
        f"other mentions of the answer in the function (raise X, another except X, comments) are masked too, so the "
        f"prompt never names the answer ({masked_more} examples had such mentions)",
        f"classes: the {N_EXCEPTION_TYPES} most frequent types on train; other types dropped",
    ]
    return REGISTRY["exception-type"].data(labels, rows["train"], rows["valid"], rows["test"], source=_source(corpus),
                                           notes=notes)


@stdlib_task("bug-detect", kind="classification",
             description="is this function correct or does it carry a synthetic bug: variable misuse, wrong operator, "
                         "swapped operands (CuBERT-style; accuracy)")
def _bug_detect(corpus: dict) -> TaskData:
    """Each documented function appears once: as written (correct) or with one seeded synthetic bug (buggy)."""
    out, kinds = {}, Counter()
    for split, fs in _by_split(_documented(corpus)).items():
        candidates = []  # (function, its parsed tree, bug sites) where some bug applies
        for f in fs:
            try:
                tree = ast.parse(f["code"])
            except (SyntaxError, ValueError, RecursionError):
                continue
            sites = _bug_sites(tree.body[0])
            if any(sites[k] for k in BUG_KINDS):
                candidates.append((f, tree, sites))
        order = list(range(len(candidates)))
        random.Random(f"bug-detect:{split}").shuffle(order)
        buggy = set(order[: len(candidates) // 2])
        rows = []
        for i, (f, tree, sites) in enumerate(candidates):
            kind = _apply_bug(sites, random.Random(f"bug-detect:{f['path']}:{f['line']}")) if i in buggy else ""
            rows.append({"text": ast.unparse(tree) + "\n", "label": int(i in buggy), "bug": kind, **_origin(f)})
            kinds[kind or "correct"] += 1
        out[split] = rows
    notes = _COMMON_NOTES + [
        _near_copy_note(corpus),
        "documented functions (docstring removed) where at least one bug kind applies; half per split get one bug, "
        "chosen with a seed from the function's location among: variable misuse (a variable read replaced by another "
        "variable of the function), wrong binary operator (within arithmetic/bitwise/comparison/identity/membership/"
        "boolean groups), swapped operands (non-commutative operators)",
        "both classes rendered with ast.unparse so formatting and comments do not reveal the label",
        "bug kinds over all splits: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
    ]
    return REGISTRY["bug-detect"].data(["correct", "buggy"], out["train"], out["valid"], out["test"],
                                       source=_source(corpus), notes=notes)


@stdlib_task("code-summarization", kind="generation",
             description="write the docstring summary line of a function (CodeXGLUE code-to-text; smoothed BLEU-4)")
def _code_summarization(corpus: dict) -> TaskData:
    splits, notes = _pairs(corpus)
    rows = {s: [{"prompt": f["code"], "target": f["doc"], **_origin(f)} for f in fs] for s, fs in splits.items()}
    notes.append("score: smoothed sentence BLEU-4 x100 averaged over examples, tokenised as CodeXGLUE code-to-text's "
                 "bleu.py (with its NIST normalisation, which splits _)")
    return REGISTRY["code-summarization"].data(None, rows["train"], rows["valid"], rows["test"],
                                               source=_source(corpus), notes=notes)


@stdlib_task("function-naming", kind="generation", metric="exact_match", metrics=("exact_match", "subtoken_f1"),
             description="predict a function's name, masked as __NAME__ "
                         "(code2seq method naming; exact match, subtoken F1)")
def _function_naming(corpus: dict) -> TaskData:
    """Documented non-dunder functions; every whole-word occurrence of the name becomes ``__NAME__``."""
    rows = {"train": [], "valid": [], "test": []}
    for f in _documented(corpus):
        name = f["name"]
        if name.startswith("__") and name.endswith("__"):
            continue
        prompt = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", NAME_MASK, f["code"])
        rows[split_of(f["path"])].append({"prompt": prompt, "target": name, **_origin(f)})
    notes = _COMMON_NOTES + [
        _near_copy_note(corpus),
        f"code without docstring; every whole-word occurrence of the name (def line, recursive calls, strings, "
        f"comments) replaced by {NAME_MASK}; dunder methods (__init__, ...) skipped",
        "score: exact match, and code2seq subtoken precision/recall/F1 (snake_case/camelCase split, set membership, "
        "a prediction whose subtokens join to the reference's is fully right; micro-averaged)",
    ]
    return REGISTRY["function-naming"].data(None, rows["train"], rows["valid"], rows["test"], source=_source(corpus),
                                            notes=notes)


@lru_cache(maxsize=None)
def _built(name: str, root: str | None) -> dict:
    return _json_cached(cache_file(name, root), lambda: dataclasses.asdict(_BUILDERS[name](load_corpus(root))))


def build_task(name: str, root: str | None = None) -> TaskData:
    """A fresh copy of a built-in task (cached as JSON next to the corpus, and memoized per process)."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(_BUILDERS)}")
    fields = dict(_built(name, root))
    for split in ("train", "valid", "test"):
        fields[split] = [dict(r) for r in fields[split]]  # rows hold only str/int values
    fields["labels"] = list(fields["labels"]) if fields["labels"] is not None else None
    fields["notes"], fields["metrics"] = list(fields["notes"]), tuple(fields["metrics"])
    return TaskData(**fields)


if __name__ == "__main__":
    for name in _BUILDERS:
        print(build_task(name).card(), end="\n\n")
