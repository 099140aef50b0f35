"""How many bottom layers to freeze: the rule, the short fine-tune it reads, and ``telly k=auto``.

The rule (from the Telly study's RSA reading: layers whose representation a fine-tune barely
changes can be frozen): after a short fine-tune, K is the deepest k (at most L-1, so one block is
still trained) such that the RSA between the pretrained and the fine-tuned model stays at or above
``threshold`` at every hidden state 1..k (hidden state j is block j-1's output, so blocks 0..K-1
are the ones whose output hardly moved). With several fine-tunes the smallest K is taken.

``train(... method="telly", options={"k": "auto"})`` calls :func:`resolve_options`, which runs this
analysis on the run's own model, task (its train split for the fine-tune, its valid split for the
RSA samples), max_len and batch size, or reads it back from the cache (keyed on the model's
weights, the data, and every setting below).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys

import torch

from ..errors import ConfigError
from ..names import cache_dir
from ..storage import CacheEntry
from ..sites import num_layers
from .config import TrainConfig
from .loop import optimizer_step
from ..tasks.kinds import get_kind

THRESHOLD = 0.9
SCORE = "rsa_spearman"
AUTO_STEPS = 50  # the short fine-tune (capped by the run's own max_steps)
AUTO_SAMPLES = 500  # RSA samples from the valid split
VERSION = 1


def rule_text(threshold: float = THRESHOLD, score: str = SCORE, steps: int | None = None) -> str:
    after = f"a short fine-tune ({steps} steps)" if steps else "fine-tuning"
    return (f"K = the deepest k <= L-1 such that {score} between the pretrained model and the model after {after} "
            f"is >= {threshold} at every hidden state 1..k (hidden state j is block j-1's output); "
            "the smallest K over the fine-tunes compared. Telly-K then freezes the embeddings and blocks 0..K-1.")


def recommend_k(scores: list[float], threshold: float = THRESHOLD) -> int:
    """K from one model's per-hidden-state similarity (index 0: embeddings; len = L + 1)."""
    n_blocks = len(scores) - 1
    k = 0
    for j in range(1, n_blocks):  # hidden state j: output of block j-1; K <= L-1
        if scores[j] is None or not math.isfinite(scores[j]) or scores[j] < threshold:
            break
        k = j
    return k


def short_finetune(model, objective, examples: list, *, steps: int, batch_size: int, lr: float, seed: int,
                   device: str, progress: bool = True):
    """``steps`` AdamW steps of the attached adapter through the training loop's own step (gradient clipping
    at 1.0), on batches drawn afresh each step; the learning rate warms up linearly over the first tenth of
    the steps, then stays constant."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    cfg = TrainConfig(batch_size=batch_size, grad_accum=1, max_grad_norm=1.0, bf16=False, device=device)
    draws = _Draws(len(examples), seed)
    warm = max(1, steps // 10)
    model.to(device).train()
    with torch.random.fork_rng(devices=[]), tqdm(total=steps, desc="short fine-tune", disable=not progress, leave=False) as bar:
        torch.manual_seed(seed)
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warm)
            optimizer_step(cfg, model, opt, params, objective, examples, draws)
            bar.update()
    model.eval()
    return model


class _Draws:
    """A batch order for :func:`short_finetune`: each batch a fresh random subset (``take`` as DataOrder's)."""

    def __init__(self, n: int, seed: int):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def take(self, k: int) -> list[int]:
        return torch.randperm(self.n, generator=self.generator)[:k].tolist()


def _data_hash(task) -> str:
    rows = {s: task.split(s) for s in ("train", "valid")}
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def freeze_depth(model_name: str, task, *, method: str = "full", steps: int = AUTO_STEPS, samples: int = AUTO_SAMPLES,
                 threshold: float = THRESHOLD, score: str = SCORE, max_len: int = 128, batch_size: int = 32,
                 lr: float | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
                 cache: bool = True) -> dict:
    """Run (or read back) the short fine-tune + RSA analysis and the rule: returns a dict with ``k``,
    ``rule``, the per-layer scores, and what it was computed from."""
    import deltatune as dt
    from ..analysis.features import extract, weights_key
    from ..analysis.similarity import per_layer

    kind = get_kind(task.kind)
    with torch.random.fork_rng(devices=[]):  # a classifier's head drawn from the seed: part of what the cache key names
        torch.manual_seed(seed)
        base, tokenizer = kind.build_model(model_name, len(task.labels or []))
    lr = lr if lr is not None else dt.method_info(method)["lr"]
    settings = dict(version=VERSION, model=model_name, weights=weights_key(base, model_name), data=_data_hash(task),
                    task=task.name, method=method, steps=steps, samples=samples, threshold=threshold, score=score,
                    max_len=max_len, batch_size=batch_size, lr=lr, seed=seed)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "analysis" / f"freeze-{key}.json"
    entry = CacheEntry(path, key, "freeze-depth analysis", root=cache_dir())
    # untrusted input: used only when it is this analysis (its settings) and its K follows from its own scores
    states = num_layers(base) + 1  # the embeddings' output and each layer's
    found = entry.read_json(lambda value: _check_analysis(value, settings, score, threshold, states)) if cache else None
    if found is not None:
        return {**found, "cached": True, "cache_file": str(path)}
    field = kind.text_field
    rows = task.split("valid") if len(task.split("valid")) >= 10 else task.split("train")
    texts = [str(r[field]) for r in rows[:samples]]
    if len(texts) < 3:
        raise ConfigError(f"freeze depth: task {task.name} has {len(texts)} examples to compare representations on; "
                          "it needs at least 3 (more than 100 for a stable RSA)")
    before = extract(base, tokenizer, texts, model_name=model_name, max_len=max_len, batch_size=batch_size,
                     device=device, progress=progress, desc="RSA: pretrained")["pooled"]
    cfg = TrainConfig(model=model_name, task=task.name, method=method, max_len=max_len, batch_size=batch_size)
    objective = kind(tokenizer, cfg)
    examples = objective.encode(task.split("train"), train=True)
    objective.truncated = objective.seen = 0
    dt.attach(base, method)
    short_finetune(base, objective, examples, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                   progress=progress)
    after = extract(base, tokenizer, texts, model_name=model_name, max_len=max_len, batch_size=batch_size,
                    device=device, progress=progress, desc="RSA: fine-tuned", cache=False)["pooled"]
    scores = per_layer(before, after)
    result = {"k": recommend_k(scores[score], threshold), "rule": rule_text(threshold, score, steps),
              "scores": scores, "samples": len(texts), "settings": settings}
    if cache:
        entry.write_json(result)
    return {**result, "cached": False, "cache_file": str(path)}


def _check_analysis(value, settings: dict, score: str, threshold: float, states: int) -> None:
    """A cached analysis of these settings: per-layer scores (finite numbers, one per hidden state: ``states``)
    and the K they give by the rule (ValueError, TypeError or KeyError otherwise)."""
    if value["settings"] != settings:
        raise ValueError("it is the analysis of other settings")
    scores = value["scores"]
    lengths = {len(v) for v in scores.values()} if isinstance(scores, dict) and scores else set()
    if lengths != {states} or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for v in scores.values() for x in v):
        raise ValueError("its scores are not finite numbers, one per hidden state")
    if value["k"] != recommend_k(scores[score], threshold) or not isinstance(value["rule"], str) \
            or not isinstance(value["samples"], int):
        raise ValueError(f"its K={value['k']!r} does not follow from its scores by the rule")


def resolve_options(cfg, task=None):
    """``cfg`` with every option its method resolves by a freeze-depth analysis (``auto_options``; telly's
    ``k="auto"``) and that is set to "auto" replaced by the recommended depth (other configs unchanged)."""
    from ..registry import REGISTRY

    method = REGISTRY.get(cfg.method)
    auto = [k for k, how in (method.auto_options if method else {}).items()
            if how == "freeze_depth" and cfg.options.get(k) == "auto"]
    if not auto:
        return cfg
    from .scoring import load_task

    task = task if task is not None else load_task(cfg)
    found = freeze_depth(cfg.model, task, steps=min(AUTO_STEPS, cfg.max_steps), max_len=cfg.max_len,
                         batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device or "cpu", progress=cfg.progress)
    print(f"{cfg.method} {auto[0]}=auto: K={found['k']} ({'cached analysis' if found['cached'] else 'analysis'}: "
          f"{found['cache_file']}); rule: {found['rule']}", file=sys.stderr)
    return dataclasses.replace(cfg, options={**cfg.options, **{k: found["k"] for k in auto}})
