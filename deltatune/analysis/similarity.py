"""Representational similarity per layer between a pretrained model and fine-tuned versions of it.

- RSA as in the Telly study (``RSA/run.py``): each sample's hidden state is mean-pooled over its
  real tokens and L2-normalised; the cosine-similarity matrix over the samples is built for both
  models; the score is the correlation of the two upper triangles (diagonal excluded). Both Pearson
  and Spearman are reported (the study does not say which it used).
- The same RSA on standardised representations (``rsa_spearman_std``: every dimension z-scored over
  the samples first, as Timkey & van Schijndel 2021 do against "rogue dimensions"). A model whose
  pooled vectors are dominated by one huge dimension (SmolLM2: one dimension holds 99% of the squared
  norm from block 12 on) has cosine similarities near 1 for every pair, and the plain RSA and CKA
  then mostly see how that one dimension varies (two unrelated representations sharing it score near
  1: tests/test_analysis.py); ``top_dimension_share`` measures how far that goes, layer by layer.
- Linear CKA (Kornblith et al. 2019): ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on the
  column-centred pooled representations; 1 for representations equal up to rotation and scale.
"""
from __future__ import annotations

import numpy as np
import torch


SCORES = ("rsa_spearman", "rsa_spearman_std", "rsa_pearson", "cka")  # per_layer's scores, one list per hidden state


def _as64(x) -> np.ndarray:
    return (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64))


def _rank(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's correlation needs."""
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    bounds = np.flatnonzero(np.diff(sorted_v)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(v)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e - 1) / 2.0
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def similarity_triangle(x) -> np.ndarray:
    """Upper triangle (k=1) of the cosine-similarity matrix of the rows of x (N, d)."""
    x = _as64(x)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return (x @ x.T)[np.triu_indices(len(x), k=1)]


def rsa(x, y) -> dict:
    """RSA of two representations of the same N samples: ``{"pearson", "spearman"}``."""
    a, b = similarity_triangle(x), similarity_triangle(y)
    if len(a) != len(b):
        raise ValueError(f"rsa needs the same samples in both representations, got {len(_as64(x))} and {len(_as64(y))} rows")
    return {"pearson": _pearson(a, b), "spearman": _pearson(_rank(a), _rank(b))}


def standardize(x) -> np.ndarray:
    """Each dimension of (N, d) centred and scaled to unit variance over the N samples (constant ones: 0)."""
    x = _as64(x)
    std = x.std(0)
    return (x - x.mean(0)) / np.where(std > 0, std, 1.0)


def top_dimension_share(x) -> float:
    """The mean over the samples of the share of a vector's squared norm held by its largest dimension:
    1/d for evenly spread vectors, near 1 where one dimension decides every cosine."""
    sq = np.square(_as64(x))
    return float((sq.max(1) / np.maximum(sq.sum(1), 1e-300)).mean())


def linear_cka(x, y) -> float:
    """Linear CKA of (N, d1) and (N, d2) representations of the same samples."""
    x, y = _as64(x), _as64(y)
    if len(x) != len(y):
        raise ValueError(f"linear_cka needs the same samples in both, got {len(x)} and {len(y)} rows")
    x, y = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denom) if denom > 0 else float("nan")


def per_layer(base: list, tuned: list) -> dict:
    """Scores per hidden state for two lists of pooled (N, d) representations (index 0: embeddings)."""
    if len(base) != len(tuned):
        raise ValueError(f"the two models have {len(base)} and {len(tuned)} hidden states; compare the same architecture")
    out = {name: [] for name in SCORES}
    for x, y in zip(base, tuned):
        r = rsa(x, y)
        out["rsa_pearson"].append(r["pearson"])
        out["rsa_spearman"].append(r["spearman"])
        out["rsa_spearman_std"].append(rsa(standardize(x), standardize(y))["spearman"])
        out["cka"].append(linear_cka(x, y))
    return out
