"""code-generation: write a function's body from its signature and docstring, HumanEval-style, from the stdlib.

Built from the functions of :mod:`deltatune.tasks.code` (same corpus, same split by module, same
removal of valid/test near-copies of earlier splits and of identical bodies, 3+ word docstring
summaries). For each function the module is parsed again to cut its source in two:

- prompt: the ``def`` line(s) and the whole docstring as written, ending with a newline (what a
  HumanEval prompt is), the ``def`` indentation removed;
- target: the rest of the body (its original indentation, comments included), ending with a newline.

Kept: bodies of 1 to :data:`MAX_TARGET_LINES` lines and at most :data:`MAX_CHARS` characters, every
line indented (a commented-out line at column 0 would read as the end of the function), prompts
of at most :data:`MAX_CHARS` characters. Left out, so that HumanEval stays unseen: a
function named like a HumanEval entry point, or whose identifier set has Jaccard >= 0.8 with
that of a HumanEval problem's prompt + canonical solution (the rule used across splits).

Rows carry ``prompt_format: "completion"``: the model continues the prompt as plain text (no chat
template), as HumanEval is evaluated. Score on valid/test: smoothed BLEU-4 and exact match of the
body (the real test is ``deltatune eval --task humaneval``).
"""
from __future__ import annotations

import ast
import hashlib
import re
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

from deltatune.tasks import code
from deltatune.tasks.registry import REGISTRY, TaskData, task

NAME = "code-generation"
MAX_TARGET_LINES = 30
MAX_CHARS = 1500


def split_function(lines: list[str], node) -> tuple[str, str] | None:
    """(prompt, target) of a function whose first statement is a docstring on lines of its own, else None."""
    body = node.body
    if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)) or len(body) < 2 or body[1].lineno <= body[0].end_lineno:
        return None
    first, doc_end = node.lineno - 1, body[0].end_lineno
    own = lines[first:node.end_lineno]
    indent = own[0][: len(own[0]) - len(own[0].lstrip())]

    def dedent(chunk):
        return "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in chunk).rstrip()

    prompt = dedent(lines[first:doc_end]) + "\n"
    target = dedent(lines[doc_end:node.end_lineno]).strip("\n") + "\n"
    if not target.strip():
        return None
    return prompt, target


def _humaneval_signatures() -> list[tuple[str, frozenset]]:
    """(entry point, identifier set of prompt + canonical solution) of every HumanEval problem."""
    from deltatune.tasks.humaneval import load_problems

    out = []
    for p in load_problems():
        tree = ast.parse(p["prompt"] + p.get("canonical_solution", ""))
        fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and n.name == p["entry_point"]), None)
        out.append((p["entry_point"], frozenset(code.identifiers(fn)) if fn else frozenset()))
    return out


def _overlaps_humaneval(name: str, ids: frozenset, humaneval) -> bool:
    for entry, he_ids in humaneval:
        if name == entry:
            return True
        common = len(ids & he_ids)
        if common and common >= code.NEAR_DUP_JACCARD * (len(ids) + len(he_ids) - common):
            return True
    return False


def _build(corpus: dict) -> dict:
    root = Path(corpus["root"])
    documented = code._documented(corpus)
    humaneval = _humaneval_signatures()
    by_path = {}
    for f in documented:
        by_path.setdefault(f["path"], []).append(f)
    rows = {"train": [], "valid": [], "test": []}
    dropped = Counter()
    for path, fs in by_path.items():
        try:
            source = code._read_source(root / path)
            tree = ast.parse(source)
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError, LookupError, RecursionError):
            dropped["unreadable"] += len(fs)
            continue
        lines = re.split(r"\r\n|\r|\n", source)
        nodes = {(n.lineno, n.name): n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for f in fs:
            node = nodes.get((f["line"], f["name"]))
            cut = split_function(lines, node) if node is not None else None
            if cut is None:
                dropped["no separate docstring"] += 1
                continue
            prompt, target = cut
            if any(ln[:1] not in ("", " ", "\t") for ln in target.splitlines()):
                dropped["body line at column 0 (a commented-out line)"] += 1
                continue
            if target.count("\n") > MAX_TARGET_LINES or len(target) > MAX_CHARS or len(prompt) > MAX_CHARS:
                dropped["too long"] += 1
                continue
            if _overlaps_humaneval(f["name"], frozenset(f["ids"]), humaneval):
                dropped["like a HumanEval problem"] += 1
                continue
            rows[code.split_of(path)].append({"prompt": prompt, "target": target, "prompt_format": "completion",
                                              "path": path, "line": f["line"], "name": f["name"]})
    for split in rows:
        rows[split].sort(key=lambda r: (r["path"], r["line"]))
    notes = code._COMMON_NOTES + [
        code._near_copy_note(corpus),
        "prompt = the def line(s) and the whole docstring as written; target = the rest of the body; "
        "the model continues the prompt as plain text (prompt_format completion, no chat template), as in HumanEval",
        f"kept: bodies of 1-{MAX_TARGET_LINES} lines and <= {MAX_CHARS} chars, prompts <= {MAX_CHARS} chars; "
        "left out: " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())),
        "no overlap with HumanEval: functions named like one of its 164 entry points or with identifier-set Jaccard "
        f">= {code.NEAR_DUP_JACCARD} with a problem's prompt + canonical solution are left out",
        "score: smoothed sentence BLEU-4 x100 of the body (CodeXGLUE tokenisation) and exact match; "
        "the functional test is `deltatune eval --task humaneval`",
    ]
    return {"labels": None, "train": rows["train"], "valid": rows["valid"], "test": rows["test"],
            "source": code._source(corpus), "notes": notes, "retrieval_pool": None}


def _cache_file(root: str | None) -> Path:
    stdlib = Path(root) if root else code.stdlib_root()
    key = hashlib.sha256(str(stdlib.resolve()).encode() + Path(code.__file__).read_bytes()
                         + Path(__file__).read_bytes()).hexdigest()[:10]
    return code.cache_dir() / f"stdlib-py{sys.version.split()[0]}-v{code.TASKS_VERSION}-{key}-{NAME}.json"


@lru_cache(maxsize=None)
def _built(root: str | None) -> dict:
    return code._json_cached(_cache_file(root), lambda: _build(code.load_corpus(root)))


@task(NAME, kind="generation", metric="bleu4", metrics=("bleu4", "exact_match"),
      description="write a function's body from its signature and docstring, HumanEval-style "
                  "(smoothed BLEU-4; the functional test is `deltatune eval --task humaneval`)")
def build_task(root: str | None = None) -> TaskData:
    """A fresh copy of the code-generation task (cached as JSON next to the corpus, memoized per process)."""
    fields = dict(_built(root))
    for split in ("train", "valid", "test"):
        fields[split] = [dict(r) for r in fields[split]]
    fields["notes"] = list(fields["notes"])
    return REGISTRY[NAME].data(**fields)


if __name__ == "__main__":
    print(build_task().card())
