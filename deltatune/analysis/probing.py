"""Probing: which layer of a model holds which property of code (Shi et al. 2023, Telly, section 3).

Data: functions of the standard-library corpus (:mod:`deltatune.tasks.code`), split by module as the
tasks are (train / valid / test files never share a function). For every property and every hidden
state a linear probe (multinomial logistic regression on standardised features, L2 strength
chosen on the valid split from :data:`L2_GRID`) is trained on train and scored on test, beside
the majority-class baseline (the train split's most frequent class, scored on test). The
weighted-over-layers probe learns a softmax weight per layer and one linear classifier over the
weighted sum of the (standardised) layers, as in the paper; its weights say where it looked.

Properties (see :mod:`deltatune.analysis.labels`): ``lexical`` (token type), ``syntactic`` (type of
the smallest AST node enclosing the token), ``syntactic-depth`` (that node's depth), ``structural``
(cyclomatic-complexity bucket, from the function's mean-pooled representation) and ``semantic``
(code search from the layer's mean-pooled representation: each docstring summary ranks the codes
of the test split by cosine similarity; no probe is trained, the baseline is a random ranking's
expected MRR). The paper's semantic probe was a trained triplet probe on POJ-104; this is the
training-free retrieval reading of the same question.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch
from torch.nn import functional as F

from . import labels as LB
from .features import extract

L2_GRID = (1e-4, 1e-2, 1.0)
SYNTACTIC_CLASSES = 12  # the most frequent node types of the train split; the rest are "other"
TOKEN_PROPERTIES = ("lexical", "syntactic", "syntactic-depth")
from .labels import PROPERTIES  # noqa: E402


def probe_functions(n_train: int = 600, n_valid: int = 150, n_test: int = 300, seed: int = 0,
                    corpus: dict | None = None) -> dict[str, list[dict]]:
    """Sampled stdlib functions per split (split by file, as the tasks): ``{"code", "path", "name"}``."""
    from ..tasks import code as C

    corpus = corpus or C.load_corpus()
    by_split: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    seen = set()
    for f in corpus["functions"]:
        if f["code"] in seen:
            continue
        seen.add(f["code"])
        by_split[C.split_of(f["path"])].append(f)
    rng = random.Random(f"probe:{seed}")
    out = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        rows = by_split[split]
        pick = sorted(rng.sample(range(len(rows)), min(n, len(rows))))
        out[split] = [{"code": rows[i]["code"], "path": rows[i]["path"], "name": rows[i]["name"]} for i in pick]
    return out


def token_labels(code: str, per_function: int, rng: random.Random) -> list[dict]:
    """Up to ``per_function`` labelled tokens of one function: start, end, lexical, node, depth."""
    toks = LB.python_tokens(code)
    nodes = LB.enclosing_nodes(code, toks)
    rows = [{"start": t["start"], "end": t["end"], "lexical": t["type"], "syntactic": n[0],
             "syntactic-depth": LB.depth_bucket(n[1])} for t, n in zip(toks, nodes) if n is not None]
    if len(rows) > per_function:
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), per_function))]
    return rows


def _standardise(train: torch.Tensor, *others: torch.Tensor):
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    return [(x - mean) / std for x in (train, *others)]


class one_thread:
    """Small probes run far faster on one thread (on a busy 2-core machine: 0.13 s against 8 s)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, weighted: bool = False, iters: int = 100):
    """Logistic regression by L-BFGS; for ``weighted``, x is (n, L, d) and softmax layer weights are learned."""
    d = x.shape[-1]
    W = torch.zeros(d, n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    a = torch.zeros(x.shape[1] if weighted else 0, requires_grad=True)
    params = [W, b, a] if weighted else [W, b]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def features(inp):
        return (torch.softmax(a, 0)[None, :, None] * inp).sum(1) if weighted else inp

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(features(x) @ W + b, y) + l2 * W.pow(2).sum() / len(y)
        loss.backward()
        return loss

    opt.step(closure)

    def predict(inp):
        with torch.no_grad():
            return (features(inp) @ W + b).argmax(-1)

    return predict, (torch.softmax(a, 0).detach().tolist() if weighted else None)


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean()) if len(y) else float("nan")


def linear_probe(train, valid, test, n_classes: int) -> dict:
    """Each of train/valid/test is (x, y); l2 chosen on valid; returns test accuracy and the chosen l2."""
    (xtr, ytr), (xva, yva), (xte, yte) = train, valid, test
    xtr, xva, xte = _standardise(xtr, xva, xte)
    best = None
    for l2 in L2_GRID:
        predict, _ = _fit(xtr, ytr, n_classes, l2)
        acc = _accuracy(predict(xva), yva)
        if best is None or acc > best[0]:
            best = (acc, l2, predict)
    return {"accuracy": _accuracy(best[2](xte), yte), "valid_accuracy": best[0], "l2": best[1]}


def weighted_probe(train, valid, test, n_classes: int) -> dict:
    """The weighted-over-layers probe; each x is (n, layers, d), standardised per layer on train."""
    (xtr, ytr), (xva, yva), (xte, yte) = train, valid, test
    mean, std = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xva, xte = [(x - mean) / std for x in (xtr, xva, xte)]
    best = None
    for l2 in L2_GRID:
        predict, weights = _fit(xtr, ytr, n_classes, l2, weighted=True)
        acc = _accuracy(predict(xva), yva)
        if best is None or acc > best[0]:
            best = (acc, l2, predict, weights)
    return {"accuracy": _accuracy(best[2](xte), yte), "valid_accuracy": best[0], "l2": best[1], "layer_weights": best[3]}


def _encode_labels(train_labels: list[str], *others: list[str], keep: int | None = None):
    counts = Counter(train_labels)
    classes = [c for c, _ in counts.most_common(keep)] if keep else sorted(counts)
    if keep and len(counts) > keep:
        classes.append("other")
    index = {c: i for i, c in enumerate(classes)}
    fallback = index.get("other")

    def encode(labels):
        ids = [index.get(lab, fallback) for lab in labels]
        mask = torch.tensor([i is not None for i in ids], dtype=torch.bool)
        return torch.tensor([i if i is not None else 0 for i in ids], dtype=torch.long), mask

    return classes, [encode(x) for x in (train_labels, *others)]


def _property(name, layers_by_split, labels_by_split, keep=None, progress=None) -> dict:
    """One property: a probe per layer and the weighted probe. ``layers_by_split[s]``: list of (n, d)."""
    classes, encoded = _encode_labels(*(labels_by_split[s] for s in ("train", "valid", "test")), keep=keep)
    (ytr, mtr), (yva, mva), (yte, mte) = encoded
    per_layer = []
    n_layers = len(layers_by_split["train"])
    for layer in range(n_layers):
        split = [(layers_by_split[s][layer][m], y[m]) for s, (y, m) in zip(("train", "valid", "test"), encoded)]
        per_layer.append(linear_probe(*split, n_classes=len(classes)))
        if progress is not None:
            progress.update()
    stacked = [(torch.stack([layers_by_split[s][i] for i in range(n_layers)], 1)[m], y[m])
               for s, (y, m) in zip(("train", "valid", "test"), encoded)]
    weighted = weighted_probe(*stacked, n_classes=len(classes))
    if progress is not None:
        progress.update()
    majority = Counter(ytr[mtr].tolist()).most_common(1)[0][0]
    scores = [r["accuracy"] for r in per_layer]
    return {"metric": "accuracy", "classes": classes, "n_train": int(mtr.sum()), "n_valid": int(mva.sum()),
            "n_test": int(mte.sum()), "score": scores, "valid_score": [r["valid_accuracy"] for r in per_layer],
            "l2": [r["l2"] for r in per_layer], "baseline": _accuracy(torch.full_like(yte[mte], majority), yte[mte]),
            "baseline_kind": "majority class of train", "peak_layer": int(np.argmax(scores)),
            "weighted": weighted}


def semantic(model, tokenizer, rows: list[dict], *, model_name: str, max_len: int, batch_size: int, device: str,
             progress: bool) -> dict:
    """Code search from each layer's mean-pooled representation (cosine, whole pool of ``rows``)."""
    from ..metrics import retrieval_scores

    queries = extract(model, tokenizer, [r["query"] for r in rows], model_name=model_name, max_len=max_len,
                      batch_size=batch_size, device=device, progress=progress, desc="semantic: queries")["pooled"]
    codes = extract(model, tokenizer, [r["code"] for r in rows], model_name=model_name, max_len=max_len,
                    batch_size=batch_size, device=device, progress=progress, desc="semantic: code")["pooled"]
    groups = [" ".join(str(r["query"]).split()) for r in rows]
    scores = [retrieval_scores(q.numpy(), c.numpy(), n_distractors=None, groups=groups)["mrr"] for q, c in zip(queries, codes)]
    n = len(rows)
    return {"metric": "mrr", "n_test": n, "score": scores, "baseline": float(sum(1 / r for r in range(1, n + 1)) / n),
            "baseline_kind": f"random ranking of {n} candidates (expected MRR)", "peak_layer": int(np.argmax(scores)),
            "source": "code-search test split: docstring summary -> code, whole split as the pool"}


def probe(model, tokenizer, *, model_name: str = "", functions: dict | None = None, search_rows: list[dict] | None = None,
          tokens_per_function: int = 24, max_len: int = 256, batch_size: int = 16, device: str = "cpu",
          progress: bool = True, properties=PROPERTIES, seed: int = 0) -> dict:
    """Probe every property at every hidden state; returns ``{property: result}`` (see module doc)."""
    from tqdm.auto import tqdm

    functions = functions or probe_functions(seed=seed)
    rng = random.Random(f"probe-tokens:{seed}")
    feats, token_rows, complexity = {}, {}, {}
    for split in ("train", "valid", "test"):
        codes = [f["code"] for f in functions[split]]
        toks = [token_labels(c, tokens_per_function, rng) for c in codes]
        spans = [[(t["start"], t["end"]) for t in ts] for ts in toks]
        feats[split] = extract(model, tokenizer, codes, spans, model_name=model_name, max_len=max_len,
                               batch_size=batch_size, device=device, progress=progress, desc=f"probing: {split}")
        token_rows[split] = [toks[i][j] for i, j in feats[split]["token_index"]]
        complexity[split] = [LB.complexity_bucket(LB.cyclomatic_complexity(c) or 1) for c in codes]
    n_layers = len(feats["train"]["pooled"])
    wanted = [p for p in properties if p != "semantic"]
    out = {}
    with one_thread(), tqdm(total=len(wanted) * (n_layers + 1), desc="probes", disable=not progress, leave=False) as bar:
        for prop in wanted:
            if prop in TOKEN_PROPERTIES:
                layers = {s: feats[s]["tokens"] for s in feats}
                labels = {s: [r[prop] for r in token_rows[s]] for s in feats}
                out[prop] = _property(prop, layers, labels, keep=SYNTACTIC_CLASSES if prop == "syntactic" else None,
                                      progress=bar)
                out[prop]["unit"] = "token"
            else:
                out[prop] = _property(prop, {s: feats[s]["pooled"] for s in feats}, complexity, progress=bar)
                out[prop]["unit"] = "function"
    if "semantic" in properties and search_rows:
        out["semantic"] = semantic(model, tokenizer, search_rows, model_name=model_name, max_len=max_len,
                                   batch_size=batch_size, device=device, progress=progress)
        out["semantic"]["unit"] = "query"
    return out
