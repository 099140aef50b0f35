"""Evaluation metrics for the deltatune tasks, each written to match the benchmark it mirrors.

- Retrieval: MRR and recall@k with CodeSearchNet ranking (each query against its true code plus
  999 distractors drawn with a fixed seed, or every code of the split when it has 1,000 or fewer;
  cosine similarity, ties count against). The score says how many candidates each query met.
- Classification: accuracy and macro-F1.
- Generation: smoothed sentence BLEU-4 averaged over examples (the CodeXGLUE code-to-text score),
  exact match, and code2seq-style subtoken precision/recall/F1 for method names.

Every function takes plain Python lists or arrays (numpy or torch) and returns floats (the
retrieval score also returns its candidate pool: ``pool``, an int, and ``pool_protocol``, a string).
"""

from __future__ import annotations

import math
import re
import xml.sax.saxutils
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "retrieval_scores", "accuracy", "macro_f1", "bleu_tokens", "sentence_bleu4", "smoothed_bleu4",
    "exact_match", "split_subtokens", "subtoken_prf",
]


def _as_array(x) -> np.ndarray:
    """A float64 numpy array from a numpy array, a torch tensor (any device/dtype) or nested lists."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Retrieval (CodeSearchNet / CodeXGLUE code search)
# ---------------------------------------------------------------------------------------------

def retrieval_scores(query_emb, code_emb, n_distractors: int | None = 999, seed: int = 0,
                     ks: Sequence[int] = (1, 5, 10), groups: Sequence | None = None) -> dict:
    """MRR and recall@k of ranking each query's true code among distractors (CodeSearchNet style).

    Row i of ``query_emb`` belongs with row i of ``code_emb`` (shape (N, D) each). Query i is scored
    by cosine similarity against its true code and ``n_distractors`` other codes chosen with a
    fixed ``seed``, as in the CodeSearchNet challenge (999: the 1-in-1000 protocol). When the split
    has no more than ``n_distractors`` other codes, or ``n_distractors`` is None, every code of the
    split is a candidate instead (the "whole-split" protocol; CodeXGLUE's code search ranks this way).
    Rank = 1 + number of wrong candidates scoring >= the best right one, so ties count against
    the model and constant embeddings get no credit.

    ``groups`` (one hashable per row, e.g. the query text) marks rows whose queries are identical:
    the codes of a query's group are all right answers to it, so a duplicated query is scored by
    the first of its codes in the ranking and is not penalised for ranking its twin's code first.
    Without ``groups`` only row i's own code is right for query i.

    Returns ``{"mrr", "recall@1", "recall@5", "recall@10"}`` (fractions in [0, 1]) plus ``"pool"``,
    the number of candidates each query was ranked against (its own code included), and
    ``"pool_protocol"``: ``"1-in-1000"`` (``"1-in-<pool>"``) or ``"whole-split"``. MRR over a pool
    of 656 is not comparable with a 1-in-1000 MRR: report the pool beside it.
    """
    q, c = _as_array(query_emb), _as_array(code_emb)
    if q.ndim != 2 or c.ndim != 2 or q.shape != c.shape:
        raise ValueError(f"retrieval_scores needs two (N, D) arrays of the same shape, got {q.shape} and {c.shape}")
    n = q.shape[0]
    if n_distractors is not None and n_distractors < 1:
        raise ValueError(f"n_distractors must be >= 1 or None (every code of the split), got {n_distractors}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"retrieval_scores got {len(groups)} groups for {n} rows")
    use_all = n_distractors is None or n - 1 <= n_distractors
    pool = n if use_all else n_distractors + 1
    out = {"mrr": 0.0, **{f"recall@{k}": 0.0 for k in ks}, "pool": pool,
           "pool_protocol": "whole-split" if use_all else f"1-in-{pool}"}
    if n == 0:
        return out
    # one integer id per distinct group (a row without groups is its own group)
    ids = {}
    group = np.array([ids.setdefault(g, len(ids)) for g in groups] if groups is not None else range(n),
                     dtype=np.int64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    q, c = np.nan_to_num(q), np.nan_to_num(c)
    ranks = np.empty(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 256):  # chunks keep memory at 256 x N
        rows = np.arange(start, min(start + 256, n))
        sims = q[rows] @ c.T  # (rows, N)
        if use_all:
            right = group[rows][:, None] == group[None, :]  # (rows, N): codes that answer each query
            best = np.where(right, sims, -np.inf).max(axis=1)
            higher = ((sims >= best[:, None]) & ~right).sum(axis=1)
        else:
            higher = np.empty(len(rows), dtype=np.int64)
            for j, i in enumerate(rows):
                others = rng.choice(n - 1, size=n_distractors, replace=False)
                others = others + (others >= i)  # skip the true code's index
                right = group[others] == group[i]  # a distractor that answers an identical query
                best = max(sims[j, i], sims[j, others][right].max(initial=-np.inf))
                higher[j] = int((sims[j, others][~right] >= best).sum())
        ranks[rows] = 1 + higher
    out["mrr"] = float(np.mean(1.0 / ranks))
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(ranks <= k))
    return out


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

def _labels(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predictions.detach().cpu().numpy() if hasattr(predictions, "detach") else predictions)
    if p.ndim == 2:  # logits or probabilities: take the arg-max class
        p = p.argmax(axis=1)
    p, r = p.astype(np.int64).ravel(), np.asarray(references, dtype=np.int64).ravel()
    if p.shape != r.shape:
        raise ValueError(f"{len(p)} predictions for {len(r)} references")
    return p, r


def accuracy(predictions, references) -> float:
    """Fraction of predicted class ids equal to the reference ids (predictions may also be (N, K) logits)."""
    p, r = _labels(predictions, references)
    return float((p == r).mean()) if len(r) else 0.0


def macro_f1(predictions, references, n_classes: int | None = None) -> float:
    """Unweighted mean over classes of per-class F1 (classes absent from both sides are skipped)."""
    p, r = _labels(predictions, references)
    classes = range(n_classes) if n_classes else sorted(set(r.tolist()) | set(p.tolist()))
    f1s = []
    for k in classes:
        tp = int(((p == k) & (r == k)).sum())
        fp, fn = int(((p == k) & (r != k)).sum()), int(((p != k) & (r == k)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


# ---------------------------------------------------------------------------------------------
# Generation: smoothed BLEU-4 (CodeXGLUE code-to-text), exact match, code2seq subtoken F1
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\s\w]")
# CodeXGLUE's bleu.py then runs NIST mteval-v11a's normalisation on the joined tokens: join lines,
# unescape XML entities, lower-case, and pad with spaces (1) every ASCII punctuation mark except
# the apostrophe, hyphen, period and comma, so "_" splits "module_name" into three tokens; (2)
# periods and commas not preceded by a digit, (3) not followed by a digit; (4) a hyphen after a digit.
_PUNCT = re.escape("!\"#$%&()*+/:;<=>?@[\\]^_`{|}~")
_NIST_LINES = [(re.compile("<skipped>"), ""), (re.compile("-\n"), ""), (re.compile("\n"), " ")]
_NIST_TOKENS = [
    (re.compile(f"([ {_PUNCT}])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def bleu_tokens(text: str) -> list[str]:
    """CodeXGLUE code-to-text tokenisation, its ``normalize`` step included.

    Lower-case, split into words and single punctuation marks, then NIST normalisation, which also
    splits ``_`` out of words: ``"Set module_name."`` -> ``["set", "module", "_", "name", "."]``.
    """
    s = " ".join(_TOKEN.findall(text.strip().lower()))
    for pattern, repl in _NIST_LINES:
        s = pattern.sub(repl, s)
    s = " " + xml.sax.saxutils.unescape(s, {"&quot;": '"'}) + " "
    s = s.lower()
    for pattern, repl in _NIST_TOKENS:
        s = pattern.sub(repl, s)
    return s.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu4(reference: str, hypothesis: str) -> float:
    """Smoothed sentence-level BLEU-4 in [0, 1], as computed by CodeXGLUE's code-to-text evaluator.

    That evaluator (from Lin & Och 2004 smoothing, used by CodeSearchNet-based summarization work)
    adds 1 to the matched and total counts of 2-, 3- and 4-grams (not unigrams), takes the geometric
    mean of the four precisions, and uses the brevity penalty exp(min(0, 1 - (r + 1) / (c + 1)))
    where r and c are the reference and hypothesis lengths in tokens.
    """
    ref, hyp = bleu_tokens(reference), bleu_tokens(hypothesis)
    tiny = 2.2250738585072014e-308  # sys.float_info.min, keeps log() finite as the reference code does
    log_p = 0.0
    for n in range(1, 5):
        guess = max(len(hyp) - n + 1, 0)
        correct = sum((_ngrams(hyp, n) & _ngrams(ref, n)).values())
        add = 1 if n > 1 else 0
        log_p += math.log(correct + add + tiny) - math.log(guess + add + tiny)
    brevity = min(0.0, 1.0 - (len(ref) + 1) / (len(hyp) + 1))
    return math.exp(log_p / 4 + brevity)


def smoothed_bleu4(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Average of :func:`sentence_bleu4` over examples, x100 (the number CodeXGLUE code-to-text reports)."""
    _same_length(references, hypotheses)
    if not references:
        return 0.0
    return 100.0 * sum(sentence_bleu4(r, h) for r, h in zip(references, hypotheses)) / len(references)


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference after stripping surrounding whitespace."""
    _same_length(references, hypotheses)
    if not references:
        return 0.0
    return sum(str(r).strip() == str(h).strip() for r, h in zip(references, hypotheses)) / len(references)


_WORD_BREAK = re.compile(r"[\W_]+")


def split_subtokens(name: str) -> list[str]:
    """Split an identifier into lower-case subtokens as code2seq's Python extractor does.

    Blocks between underscores (and, for free-form predictions, any other non-word characters) are
    cut at camelCase boundaries: a lower-case letter followed by an upper-case one, and the last
    capital of an acronym followed by a lower-case letter. Digits stay in their block and any
    Unicode letter counts: ``"getFileName"`` -> ``["get", "file", "name"]``, ``"HTTPServer_v2"`` ->
    ``["http", "server", "v2"]``, ``"écrire_données"`` -> ``["écrire", "données"]``.
    """
    out = []
    for block in _WORD_BREAK.split(str(name)):
        start = 0
        for i in range(1, len(block)):
            prev, cur = block[i - 1], block[i]
            if (prev.islower() and cur.isupper()) or (
                    prev.isupper() and cur.isupper() and i + 1 < len(block) and block[i + 1].islower()):
                out.append(block[start:i])
                start = i
        if block:
            out.append(block[start:])
    return [t.lower() for t in out]


def subtoken_prf(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """code2seq method-naming precision/recall/F1 over subtokens, micro-averaged over examples.

    As in code2seq's evaluation: a prediction whose subtokens join to the same string as the
    reference's is fully right (``getfilename`` for ``getFileName``: all reference subtokens are
    true positives). Otherwise each predicted subtoken is a true positive if it occurs in the
    reference and a false positive if not, and each reference subtoken missing from the prediction
    is a false negative (set membership: ``get_get`` for ``get`` has precision and recall 1).
    Counts are summed over all examples before computing P, R and F1.
    """
    _same_length(references, hypotheses)
    tp = fp = fn = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = split_subtokens(ref), split_subtokens(hyp)
        if "".join(r) == "".join(h):
            tp += len(r)
            continue
        in_ref, in_hyp = set(r), set(h)
        hit = sum(t in in_ref for t in h)
        tp, fp = tp + hit, fp + len(h) - hit
        fn += sum(t not in in_hyp for t in r)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"subtoken_precision": precision, "subtoken_recall": recall, "subtoken_f1": f1}


def _same_length(a: Iterable, b: Iterable) -> None:
    if len(a) != len(b):  # type: ignore[arg-type]
        raise ValueError(f"{len(b)} predictions for {len(a)} references")  # type: ignore[arg-type]
