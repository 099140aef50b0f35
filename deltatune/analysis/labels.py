"""What the probes predict, read from Python source with the standard library only.

- lexical: the type of each token from :mod:`tokenize`: keyword, name, number, string, operator
  (other tokens -- newlines, indents, comments -- carry no label and are not probed);
- syntactic: the type of the smallest AST node that strictly encloses the token (``x`` in ``x = 1``
  -> ``Assign``, ``(`` in ``f(x)`` -> ``Call``), the rarer types pooled as ``other``; and that node's
  depth in the tree (``syntactic-depth``, 1..7 and ``>7``);
- structural: the function's McCabe cyclomatic complexity, bucketed 1..5 and ``>5`` (Shi et al.'s
  six classes): 1 + one per ``if``/``elif``, loop, ``except``, conditional expression,
  comprehension ``for`` and ``if``, ``case``, and each extra operand of ``and``/``or``.

Positions are character offsets into the function's code, which is what a fast tokenizer's
``offset_mapping`` gives, so model tokens can be matched to them.
"""
from __future__ import annotations

import ast
import bisect
import io
import keyword
import tokenize

# The probed properties, named here (a light module) so that `deltatune analyze --help` imports no model code.
PROPERTIES = ("lexical", "syntactic", "syntactic-depth", "structural", "semantic")

TOKEN_TYPES = ("keyword", "name", "number", "string", "operator")
COMPLEXITY_BUCKETS = ("1", "2", "3", "4", "5", ">5")
DEPTH_BUCKETS = ("1", "2", "3", "4", "5", "6", "7", ">7")


def _line_starts(code: str) -> list[int]:
    starts, pos = [0], 0
    for line in code.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def python_tokens(code: str) -> list[dict]:
    """Tokens with a lexical label: ``{"start", "end" (character offsets), "text", "type"}``."""
    starts = _line_starts(code)
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.NAME:
                kind = "keyword" if keyword.iskeyword(tok.string) else "name"
            elif tok.type == tokenize.NUMBER:
                kind = "number"
            elif tok.type == tokenize.STRING:
                kind = "string"
            elif tok.type == tokenize.OP:
                kind = "operator"
            else:
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            out.append({"start": starts[r0 - 1] + c0, "end": starts[r1 - 1] + c1, "text": tok.string, "type": kind})
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    return out


def _char_offset(lines: list[str], starts: list[int], lineno: int, byte_col: int) -> int:
    """ast positions are UTF-8 byte columns; convert to a character offset into the code."""
    line = lines[lineno - 1]
    return starts[lineno - 1] + len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def enclosing_nodes(code: str, tokens: list[dict]) -> list[tuple[str, int] | None]:
    """For each token: (type name, depth) of the smallest AST node strictly enclosing it; None if none."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError):
        return [None] * len(tokens)
    lines = code.splitlines(keepends=True) or [""]
    starts = _line_starts(code)
    order = sorted(range(len(tokens)), key=lambda i: tokens[i]["start"])
    token_starts = [tokens[i]["start"] for i in order]
    out: list = [None] * len(tokens)
    stack = [(tree, 0)]
    while stack:  # parents before children: the deepest strictly enclosing node is written last
        node, depth = stack.pop()
        if hasattr(node, "lineno") and getattr(node, "end_lineno", None) is not None:
            s = _char_offset(lines, starts, node.lineno, node.col_offset)
            e = _char_offset(lines, starts, node.end_lineno, node.end_col_offset)
            for j in range(bisect.bisect_left(token_starts, s), bisect.bisect_left(token_starts, e)):
                tok = tokens[order[j]]
                if tok["end"] <= e and (s, e) != (tok["start"], tok["end"]):
                    out[order[j]] = (type(node).__name__, depth)
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + 1))
    return out


def depth_bucket(depth: int) -> str:
    return str(depth) if depth <= 7 else ">7"


def cyclomatic_complexity(code: str) -> int | None:
    """McCabe complexity of the code (all functions in it counted together); None if it does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError):
        return None
    cc = 1
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.match_case)):
            cc += 1
        elif isinstance(node, ast.comprehension):
            cc += 1 + len(node.ifs)
        elif isinstance(node, ast.BoolOp):
            cc += len(node.values) - 1
    return cc


def complexity_bucket(cc: int) -> str:
    return str(cc) if cc <= 5 else ">5"
