"""Evaluation metrics for the deltatune tasks, each written to match the benchmark it mirrors.

- Retrieval: MRR and recall@k with CodeXGLUE/CodeSearchNet ranking (each query against its true
  code plus up to 999 distractors drawn with a fixed seed, cosine similarity, ties count against).
- Classification: accuracy and macro-F1.
- Generation: smoothed sentence BLEU-4 averaged over examples (the CodeXGLUE code-to-text score),
  exact match, and code2seq-style subtoken precision/recall/F1 for method names.

Every function takes plain Python lists or arrays (numpy or torch) and returns floats.
"""

from __future__ import annotations

import math
import re
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

def retrieval_scores(query_emb, code_emb, n_distractors: int = 999, seed: int = 0,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """MRR and recall@k of ranking each query's true code among distractors (CodeXGLUE style).

    Row i of ``query_emb`` belongs with row i of ``code_emb`` (shape (N, D) each). Query i is scored
    by cosine similarity against its true code and ``n_distractors`` other codes chosen with a
    fixed ``seed`` (all other codes when N - 1 <= n_distractors), as in the CodeSearchNet challenge
    and CodeXGLUE's 1,000-candidate setting. Rank = 1 + number of distractors scoring >= the true
    code, so ties count against the model and constant embeddings get no credit.
    Returns ``{"mrr", "recall@1", "recall@5", "recall@10"}`` (fractions in [0, 1]).
    """
    q, c = _as_array(query_emb), _as_array(code_emb)
    if q.ndim != 2 or c.ndim != 2 or q.shape != c.shape:
        raise ValueError(f"retrieval_scores needs two (N, D) arrays of the same shape, got {q.shape} and {c.shape}")
    n = q.shape[0]
    if n == 0:
        return {"mrr": 0.0, **{f"recall@{k}": 0.0 for k in ks}}
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    q, c = np.nan_to_num(q), np.nan_to_num(c)
    ranks = np.empty(n, dtype=np.int64)
    use_all = n - 1 <= n_distractors
    rng = np.random.default_rng(seed)
    for start in range(0, n, 256):  # chunks keep memory at 256 x N
        rows = np.arange(start, min(start + 256, n))
        sims = q[rows] @ c.T
        true = sims[np.arange(len(rows)), rows]
        if use_all:
            higher = (sims >= true[:, None]).sum(axis=1) - 1  # minus the true code itself
        else:
            higher = np.empty(len(rows), dtype=np.int64)
            for j, i in enumerate(rows):
                others = rng.choice(n - 1, size=n_distractors, replace=False)
                others = others + (others >= i)  # skip the true code's index
                higher[j] = int((sims[j, others] >= true[j]).sum())
        ranks[rows] = 1 + higher
    out = {"mrr": float(np.mean(1.0 / ranks))}
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


def bleu_tokens(text: str) -> list[str]:
    """CodeXGLUE code-to-text tokenization: lower-case, words and single punctuation marks."""
    return _TOKEN.findall(text.strip().lower())


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


_SUBTOKEN = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def split_subtokens(name: str) -> list[str]:
    """Split an identifier into lower-case subtokens on snake_case, camelCase and digits (code2seq).

    ``"getFileName"`` -> ``["get", "file", "name"]``; ``"HTTPServer_v2"`` -> ``["http", "server", "v", "2"]``.
    """
    return [t.lower() for t in _SUBTOKEN.findall(str(name))]


def subtoken_prf(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """code2seq method-naming precision/recall/F1 over subtokens, micro-averaged over examples.

    For each example the predicted and true names are split into subtokens; true positives are the
    multiset intersection, false positives the other predicted subtokens, false negatives the other
    true subtokens. Counts are summed over all examples before computing P, R and F1 (as code2seq
    does; it uses set membership per subtoken, here a repeated subtoken must be repeated to count).
    """
    _same_length(references, hypotheses)
    tp = fp = fn = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = Counter(split_subtokens(ref)), Counter(split_subtokens(hyp))
        hit = sum((r & h).values())
        tp, fp, fn = tp + hit, fp + sum(h.values()) - hit, fn + sum(r.values()) - hit
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"subtoken_precision": precision, "subtoken_recall": recall, "subtoken_f1": f1}


def _same_length(a: Iterable, b: Iterable) -> None:
    if len(a) != len(b):  # type: ignore[arg-type]
        raise ValueError(f"{len(b)} predictions for {len(a)} references")  # type: ignore[arg-type]
