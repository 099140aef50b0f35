"""The one training loop, for every method and every task kind.

    from deltatune.train import TrainConfig, train, evaluate
    summary = train(TrainConfig(model="minilm", task="code-search", method="lora", out_dir="runs/x"))
    evaluate("runs/x/best")                    # scores the best adapter on the test split again

Methods change nothing here: ``dt.attach`` freezes the base and the optimizer takes every
parameter that requires grad. Task kinds differ in three small objectives below (how examples are
tokenised, the loss, and the predictions the task scores).

``out_dir`` holds ``run.json`` (the TrainConfig, for ``evaluate`` and ``resume``), ``log.jsonl`` (one
object per step and per evaluation), ``checkpoints/step-N/`` (the latest resumable state, no pickle),
``best/`` (the best adapter on the validation split) and ``metrics.json`` (what ``train`` returns).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.nn import functional as F

import deltatune as dt
from deltatune.errors import AdapterFileError, ConfigError, DataError, StorageError, TrainingError
from deltatune.io import atomic_write_bytes, atomic_write_json, fsync_dir, storage_error
from deltatune.models import build_task_model, format_prompt
from deltatune.names import slug


@dataclass
class TrainConfig:
    model: str = "minilm"  # minilm, smollm2, tiny-bert/-llama/-gpt2, a local folder or a cached HF id
    task: str = "code-search"  # a task name or data path, see deltatune.tasks.load_task
    method: str = "lora"
    options: dict = field(default_factory=dict)  # method options, e.g. {"r": 16, "sites": ["attn.q", "attn.v"]}
    max_steps: int = 200  # optimizer steps
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None: the method's own default (dt.method_info(method)["lr"])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1  # linear warmup over this share of the steps, then linear decay to 0
    max_grad_norm: float | None = 1.0  # gradient clipping; None or 0 turns it off
    eval_every: int = 50  # validate (and checkpoint) every N steps and at the end
    early_stop_patience: int | None = None  # stop after N validations without improvement
    seed: int = 0
    max_len: int = 128  # tokens per input; longer inputs are truncated (with one warning)
    max_new_tokens: int = 64  # generation tasks: greedy decoding length limit
    bf16: bool = False  # bfloat16 autocast
    grad_checkpointing: bool = False  # recompute activations in backward (non-reentrant)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True, warn_only=True)
    max_train: int | None = None  # passed to load_task
    max_eval: int | None = None
    out_dir: str | None = None  # None: runs/<model>-<task>-<method>-s<seed>
    resume: bool = False  # continue from the latest checkpoint in out_dir
    stop_after: int | None = None  # stop (with a checkpoint) after N steps in this call; resume continues
    log_every: int = 10  # read the loss back from the device every N steps (one sync)
    json_log: bool = True
    progress: bool = True
    device: str | None = None  # None: cuda if available, else cpu
    recycle: bool = False  # run the frozen lower blocks once and start from their cached output (deltatune.analysis.recycle)
    recycle_dtype: str = "float32"  # the cache's dtype: float32 (exact), float16 or bfloat16


# Fields that may differ between a run and its resumption without changing the result.
# lr and max_grad_norm may change too: the way to go on after a NaN loss.
_RESUMABLE_CHANGES = {"resume", "stop_after", "log_every", "json_log", "progress", "out_dir", "device", "lr", "max_grad_norm"}


# ------------------------------------------------------------------------------------ train


def train(cfg: TrainConfig, task=None) -> dict:
    """Train ``cfg.method`` on ``cfg.task`` (or on ``task``, an already loaded TaskData); returns the summary.

    The summary is also written to ``out_dir/metrics.json``. A run cut short by ``stop_after``
    returns ``{"stopped_at": step, ...}`` instead; ``resume=True`` then finishes it with the same result.
    """
    cfg = _resolved(cfg, task)
    from deltatune.analysis.freeze import resolve_options
    cfg = resolve_options(cfg, task)  # telly k="auto": the freeze depth from a layer analysis (cached)
    with _deterministic(cfg.deterministic):
        return _train(cfg, task)


def _train(cfg: TrainConfig, task) -> dict:
    # Data, model and method are all checked before out_dir is touched: a bad input leaves the
    # previous run in out_dir as it was.
    out = Path(cfg.out_dir)
    checkpoint = _latest_checkpoint(out) if cfg.resume else None
    _check_resumable(out, cfg, checkpoint)
    _seed_everything(cfg.seed)
    task = task or _load_task(cfg)
    if not task.train:
        raise DataError(f"task {task.name} has no training examples"
                        + (f" (max_train={cfg.max_train})" if cfg.max_train is not None else ""))
    model, tokenizer = build_task_model(cfg.model, task.kind, len(task.labels or []))
    objective = OBJECTIVES[task.kind](tokenizer, cfg)
    data = {split: objective.encode(task.split(split), train=split == "train") for split in ("train", "valid", "test")}
    objective.warn_truncated(stacklevel=3)  # at the caller of train()
    state = {"step": 0, "consumed": 0, "best_value": None, "best_step": None, "bad_evals": 0,
             "zero_shot_value": None, "train_seconds": 0.0, "step_seconds": []}

    zero_shot = None
    if checkpoint is None and data["test"]:  # the pretrained model before attach (a classifier: its untrained head)
        with torch.random.fork_rng(devices=[]):  # a method that does not fit fails before the scoring
            dt.detach(dt.attach(model, cfg.method, **cfg.options))
        zero_shot, zero_shot_records = _score(model.to(cfg.device), objective, data["test"], task, "test", cfg)
        state["zero_shot_value"] = zero_shot[task.metric]
    if checkpoint is None:
        dt.attach(model, cfg.method, **cfg.options)
    else:
        dt.load_adapter(model, checkpoint / "adapter")
    if cfg.grad_checkpointing:
        _enable_checkpointing(model)
    model.to(cfg.device)
    if cfg.recycle:  # the frozen lower part runs once; training and evaluation start from its cached output
        from deltatune.analysis import recycle
        objective, data = recycle.prepare(cfg, model, objective, data)
    trainable, total = dt.count_parameters(model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, optimizer, names)
    _prepare_out_dir(out, cfg, checkpoint)
    log = _Log(out / "log.jsonl" if cfg.json_log else None, keep_until=_step_of(checkpoint))
    if zero_shot is not None:
        for stale in PREDICTIONS.values():  # a fresh run: the previous run's predictions go with its metrics
            (out / stale).unlink(missing_ok=True)
        _write_predictions(out / PREDICTIONS["zero-shot"], zero_shot_records)
        log.write({"step": 0, "split": "test", "zero_shot": True, **zero_shot})

    if _loop(cfg, model, optimizer, names, objective, data, task, state, log, out) == "interrupted":
        return {"stopped_at": state["step"], "max_steps": cfg.max_steps, "out_dir": str(out),
                "checkpoint": str(_latest_checkpoint(out))}
    del model, optimizer  # the test score comes from the saved best adapter, exactly as evaluate() sees it
    best, _ = _restore(cfg, task, out / "best")
    test, records = _score(best.to(cfg.device), objective, data["test"], task, "test", cfg)
    _write_predictions(out / PREDICTIONS["test"], records)
    log.write({"step": state["step"], "split": "test", "best_step": state["best_step"], **test})
    summary = {
        "method": cfg.method, "task": task.name, "model": cfg.model, "metric": task.metric,
        "value": test[task.metric], "zero_shot_value": state["zero_shot_value"],
        "trainable_params": trainable, "total_params": total, "train_seconds": state["train_seconds"],
        "step_seconds_median": statistics.median(state["step_seconds"]), "peak_rss_mb": _peak_rss_mb(),
        "steps": state["step"], "max_steps": cfg.max_steps, "stopped_early": state["step"] < cfg.max_steps,
        "best_step": state["best_step"], "valid_value": state["best_value"], "seed": cfg.seed, "lr": cfg.lr,
        "batch_size": cfg.batch_size, "options": cfg.options, "out_dir": str(out), "adapter_dir": str(out / "best"),
        "predictions_file": str(out / PREDICTIONS["test"]),
        "zero_shot_predictions_file": str(out / PREDICTIONS["zero-shot"]) if state["zero_shot_value"] is not None else None,
    }
    summary.update({k: v for k, v in test.items() if k not in summary})
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _loop(cfg, model, optimizer, names, objective, data, task, state, log, out) -> str:
    """Optimizer steps from ``state["step"]``: returns "done", "early-stop" or "interrupted" (stop_after)."""
    order = DataOrder(len(data["train"]), cfg.seed, state["consumed"])
    stop_at = min(cfg.max_steps, state["step"] + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shown = {}  # the progress bar's postfix
    pending = []  # (step, loss tensor, lr) not read back yet: reading syncs with the device
    examples, seconds_here = 0, 0.0  # for examples/s in this call
    model.train()
    with _progress(cfg, state["step"]) as bar:
        while state["step"] < stop_at:
            step = state["step"] + 1  # steps count from 1
            lr = cfg.lr * _lr_factor(step - 1, cfg.max_steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss = _step(cfg, model, optimizer, params, objective, data["train"], order)
            seconds = time.perf_counter() - t0
            state.update(step=step, consumed=order.consumed, train_seconds=state["train_seconds"] + seconds)
            state["step_seconds"].append(seconds)
            examples, seconds_here = examples + cfg.batch_size * cfg.grad_accum, seconds_here + seconds
            pending.append((step, loss, lr))
            bar.update()

            validate = step % cfg.eval_every == 0 or step == cfg.max_steps
            if validate or step % cfg.log_every == 0 or step == stop_at:
                shown.update({"loss": f"{_read_losses(pending, log, out):.4f}",
                              "ex/s": f"{examples / seconds_here:.1f}"})
            if validate:
                value = _validate(cfg, model, objective, data, task, state, log, out)
                if value is not None:
                    shown[task.metric] = f"{value:.4f}"
                model.train()
            bar.set_postfix(shown, refresh=False)
            if validate or step == stop_at:
                _save_checkpoint(out, model, optimizer, names, state)
            if cfg.early_stop_patience is not None and state["bad_evals"] >= cfg.early_stop_patience:
                return "early-stop"
    return "done" if state["step"] == cfg.max_steps else "interrupted"


def _step(cfg, model, optimizer, params, objective, examples, order) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; the loss stays on the device (no sync)."""
    loss = 0.0
    for _ in range(cfg.grad_accum):
        batch = _to(objective.collate([examples[i] for i in order.take(cfg.batch_size)]), cfg.device)
        with _autocast(cfg):
            micro = objective.loss(model, batch) / cfg.grad_accum
        micro.backward()
        loss = loss + micro.detach()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _validate(cfg, model, objective, data, task, state, log, out) -> float | None:
    """Score the validation split and keep the best adapter in out/best; returns the metric."""
    metrics, records = _score(model, objective, data["valid"], task, "valid", cfg) if data["valid"] else ({}, [])
    _write_predictions(out / PREDICTIONS["valid"], records, step=state["step"])  # the latest validation's
    log.write({"step": state["step"], "split": "valid", **metrics})
    value = metrics.get(task.metric)
    if value is None or state["best_value"] is None or value > state["best_value"]:
        try:
            _replace_dir(out / "best", lambda tmp: dt.save_adapter(model, tmp))
        except StorageError as err:
            raise StorageError(f"the best adapter of step {state['step']} was not saved: {err}. {out / 'best'} keeps "
                               "the previous best and the last checkpoint is intact; once that is fixed, run "
                               "again with resume") from None
        state.update(best_value=value, best_step=state["step"], bad_evals=0)
    else:
        state["bad_evals"] += 1
    return value


def _read_losses(pending: list, log, out) -> float:
    """Read the pending losses back in one sync, log them, and stop on the first NaN/Inf."""
    values = torch.stack([loss for _, loss, _ in pending]).float().tolist()
    for (step, _, lr), value in zip(pending, values):
        if not math.isfinite(value):
            kept = _latest_checkpoint(out)
            where = f"the last good checkpoint is kept at {kept}" if kept else "no checkpoint was written before it"
            raise TrainingError(
                f"the loss became {value} at step {step} (lr {lr:.3g}); {where}. Lower the learning rate "
                "(lr) or clip gradients harder (max_grad_norm), then run again; with resume=True the run "
                "goes on from that checkpoint"
            )
        log.write({"step": step, "loss": value, "lr": lr})
    pending.clear()
    return values[-1]


def _lr_factor(step: int, max_steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``max_steps`` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup))


# ------------------------------------------------------------------------------- evaluation


# The predictions of every scoring, one JSON object per example (index, input, reference, prediction),
# written next to metrics.json in out_dir: the test score of the best adapter, the zero-shot score of
# the base model, and the latest validation (with its step).
PREDICTIONS = {"test": "predictions-test.jsonl", "zero-shot": "predictions-test-zero-shot.jsonl",
               "valid": "predictions-valid.jsonl"}


def resolve_adapter(path) -> Path:
    """The adapter directory ``path`` names: itself, or for a ``train`` out_dir its ``best/`` adapter."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"no adapter directory at {path}; train one with `deltatune train ... --out DIR`")
    if not (path / "adapter.safetensors").exists() and (path / "best").is_dir():
        return path / "best"  # a run directory: its best adapter on the validation split
    return path


def evaluate(adapter_dir, task=None, split: str = "test", *, max_eval: int | None = None,
             max_len: int | None = None, batch_size: int | None = None, out_dir=None) -> dict:
    """Score a saved adapter on ``split`` of its training task (or of ``task``: a name, path or TaskData).

    The model (and by default the task) come from the ``run.json`` that ``train`` wrote next to the
    adapter; an ``out_dir`` of ``train`` stands for its ``best`` adapter. The whole split is scored
    unless ``max_eval`` is given (the run's seed then picks the examples, so the run's own max_eval
    reproduces the subset it was tested on). ``max_len`` and ``batch_size`` default to the run's.
    With ``out_dir``, ``metrics-<split>.json`` and ``predictions-<split>.jsonl`` are written there.
    Returns the metrics plus what was used: examples, max_len, batch_size, truncated, adapter.
    """
    adapter_dir = resolve_adapter(adapter_dir)
    run_json = _run_json_of(adapter_dir)
    cfg = _config_from(_read_run_json(run_json), run_json)
    cfg = _resolved(dataclasses.replace(cfg, max_eval=max_eval, max_len=cfg.max_len if max_len is None else max_len,
                                        batch_size=cfg.batch_size if batch_size is None else batch_size), None)
    if max_eval is not None and max_eval < 1:
        raise ConfigError(f"max_eval must be >= 1 or None (the whole split), got {max_eval}")
    if task is None or isinstance(task, (str, os.PathLike)):
        task = _load_task(dataclasses.replace(cfg, task=str(task or cfg.task)))
    elif max_eval is not None:
        raise ConfigError("max_eval applies to a task loaded by name or path; subsample a TaskData before passing it")
    rows = task.split(split)
    if not rows:
        raise DataError(f"task {task.name} has no {split} examples to evaluate")
    model, tokenizer = _restore(cfg, task, adapter_dir)
    objective = OBJECTIVES[task.kind](tokenizer, cfg)
    examples = objective.encode(rows, train=False)
    truncated = objective.truncated
    objective.warn_truncated(stacklevel=2)
    metrics, records = _score(model.to(cfg.device), objective, examples, task, split, cfg)
    result = {"task": task.name, "split": split, "metric": task.metric, "value": metrics[task.metric], **metrics,
              "examples": len(rows), "max_eval": max_eval, "max_len": cfg.max_len, "batch_size": cfg.batch_size,
              "truncated": truncated, "adapter": str(adapter_dir)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(err, out_dir) from err
        result["predictions_file"] = str(out_dir / f"predictions-{split}.jsonl")
        _write_predictions(out_dir / f"predictions-{split}.jsonl", records)
        atomic_write_json(out_dir / f"metrics-{split}.json", result)
    return result


def _run_json_of(adapter_dir: Path) -> Path:
    found = [p / "run.json" for p in (adapter_dir, *list(adapter_dir.parents)[:3]) if (p / "run.json").is_file()]
    if not found:
        raise ConfigError(f"no run.json in {adapter_dir} or its parents: evaluate() needs the model and task "
                          "that deltatune.train records in out_dir/run.json")
    return found[0]


def default_eval_dir(adapter_dir, task=None) -> Path:
    """Where ``deltatune eval`` writes by default: ``<run dir>/eval-<task>/`` next to the run's own files."""
    run_json = _run_json_of(resolve_adapter(adapter_dir))
    name = task.name if hasattr(task, "name") else task or _read_run_json(run_json).get("task") or "task"
    return run_json.parent / f"eval-{slug(name)}"


def _restore(cfg: TrainConfig, task, adapter_dir: Path):
    """A fresh task model with the adapter at ``adapter_dir`` loaded: (model, tokenizer)."""
    model, tokenizer = build_task_model(cfg.model, task.kind, len(task.labels or []))
    return dt.load_adapter(model, adapter_dir), tokenizer


@torch.no_grad()
def _score(model, objective, examples, task, split, cfg) -> tuple[dict, list[dict]]:
    """(the task's metrics, one prediction record per example) for ``split``."""
    model.eval()
    with _autocast(cfg):
        predictions = objective.predict(model, examples, cfg.batch_size, cfg.device)
    metrics = task.score(predictions, split)
    return metrics, objective.records(task.split(split), predictions, task)


def _write_predictions(path: Path, records: list[dict], **extra) -> None:
    text = "".join(json.dumps({**extra, **r}, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))


def _traceable(row: dict) -> dict:
    """The identifying fields an example may carry (its source path, the function's name)."""
    return {k: row[k] for k in ("id", "path", "name") if isinstance(row.get(k), (str, int))}


# ------------------------------------------------------------------------------- objectives


class _Objective:
    """Tokenising is shared: inputs longer than max_len are truncated and counted for one warning."""

    def __init__(self, tokenizer, cfg: TrainConfig):
        self.tokenizer, self.max_len, self.cfg = tokenizer, cfg.max_len, cfg
        self.truncated = self.seen = 0

    def tokens(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """One dict of token lists per text (input_ids, attention_mask, and token_type_ids if used)."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, pairs, verbose=False)
        rows = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
        long = [i for i, row in enumerate(rows) if len(row["input_ids"]) > self.max_len]
        if long:  # tokenise those again with truncation, so that special tokens stay in place
            again = self.tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                                   truncation=True, max_length=self.max_len, verbose=False)
            for j, i in enumerate(long):
                rows[i] = {k: again[k][j] for k in again.keys()}
        self.count(len(long), len(rows))
        return rows

    def count(self, truncated: int, seen: int) -> None:
        self.truncated, self.seen = self.truncated + truncated, self.seen + seen

    def warn_truncated(self, stacklevel: int) -> None:
        if self.truncated:
            warnings.warn(f"{self.truncated} of {self.seen} inputs were longer than max_len={self.max_len} "
                          "tokens and were truncated; raise max_len to keep them whole", stacklevel=stacklevel + 1)
        self.truncated = self.seen = 0

    def pad(self, rows: list[dict], left: bool = False) -> dict:
        """Stack token lists into (B, T) tensors, padding on the right (or the left, for generate)."""
        width = max(len(row["input_ids"]) for row in rows)
        fill = {"input_ids": self.tokenizer.pad_token_id, "labels": -100}
        out = {}
        for key in rows[0]:
            padded = [[fill.get(key, 0)] * (width - len(row[key])) for row in rows]
            out[key] = torch.tensor([p + row[key] if left else row[key] + p for p, row in zip(padded, rows)])
        return out


class Retrieval(_Objective):
    """In-batch negatives: each query's code is the positive, the other codes of the batch are negatives."""

    scale = 20.0  # cosine similarity x 20, MiniLM's own training temperature (0.05)

    def encode(self, rows, train):
        return list(zip(self.tokens([r["query"] for r in rows]), self.tokens([r["code"] for r in rows])))

    def collate(self, examples):
        return self.pad([q for q, _ in examples]), self.pad([c for _, c in examples])

    def loss(self, model, batch):
        queries, codes = model(**batch[0]), model(**batch[1])  # (B, d) each, unit length
        logits = self.scale * queries @ codes.T  # (B, B): row i's positive is column i
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def predict(self, model, examples, batch_size, device):
        def embed(rows):
            return torch.cat([model(**_to(self.pad(rows[i:i + batch_size]), device)).float().cpu()
                              for i in range(0, len(rows), batch_size)]).numpy()

        return embed([q for q, _ in examples]), embed([c for _, c in examples])

    def records(self, rows, predictions, task):
        """Per query: the code ranked first among all the split's codes, and the rank of the first
        right code among them (cosine similarity; ties count against; the codes of identical
        queries all count as right, as in the metric). ``candidates`` is that pool: the whole split,
        which is the metric's pool unless the split is larger than it."""
        q, c = (np.nan_to_num(np.asarray(x, dtype=np.float64)) for x in predictions)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        ids = {}
        group = np.array([ids.setdefault(r["query"], len(ids)) for r in rows], dtype=np.int64)
        out = []
        for start in range(0, len(q), 256):  # chunks keep memory at 256 x N
            sims = q[start:start + 256] @ c.T
            right = group[start:start + len(sims), None] == group[None, :]
            best = np.where(right, sims, -np.inf).max(axis=1)
            ranks, top = 1 + ((sims >= best[:, None]) & ~right).sum(axis=1), sims.argmax(axis=1)
            for j in range(len(sims)):
                row, best = rows[start + j], int(top[j])
                out.append({"index": start + j, **_traceable(row), "input": row["query"], "reference": row["code"],
                            "prediction": rows[best]["code"], "prediction_index": best,
                            "rank": int(ranks[j]), "candidates": len(c)})
        return out


class Classification(_Objective):
    def encode(self, rows, train):
        pairs = [r.get("text_pair", "") for r in rows] if any("text_pair" in r for r in rows) else None
        return list(zip(self.tokens([r["text"] for r in rows], pairs), [r["label"] for r in rows]))

    def collate(self, examples):
        return self.pad([x for x, _ in examples]), torch.tensor([y for _, y in examples])

    def loss(self, model, batch):
        inputs, labels = batch
        return F.cross_entropy(model(**inputs).float(), labels)

    def predict(self, model, examples, batch_size, device):
        rows = [x for x, _ in examples]
        return [int(i) for start in range(0, len(rows), batch_size)
                for i in model(**_to(self.pad(rows[start:start + batch_size]), device)).argmax(-1).tolist()]

    def records(self, rows, predictions, task):
        names = task.labels or []

        def name(label):
            return names[label] if isinstance(label, int) and 0 <= label < len(names) else label

        return [{"index": i, **_traceable(row), "input": row["text"],
                 **({"input_pair": row["text_pair"]} if "text_pair" in row else {}),
                 "reference": name(row["label"]), "prediction": name(int(p))}
                for i, (row, p) in enumerate(zip(rows, predictions))]


class Generation(_Objective):
    """Prompt (see models.format_prompt) then target + EOS; the loss counts the target tokens only."""

    def encode(self, rows, train):
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        prompts = [tok(format_prompt(tok, r["prompt"]), add_special_tokens=False, verbose=False)["input_ids"] for r in rows]
        if not train:  # the prompt alone, keeping its end when it is too long
            self.count(sum(len(p) > self.max_len for p in prompts), len(prompts))
            return [{"input_ids": p[-self.max_len:], "attention_mask": [1] * len(p[-self.max_len:])} for p in prompts]
        out, truncated = [], 0
        for prompt, row in zip(prompts, rows):
            target = tok(row["target"], add_special_tokens=False, verbose=False)["input_ids"] + [eos]
            truncated += len(prompt) + len(target) > self.max_len
            # Over-long: the target keeps up to max_len minus (up to half of max_len) of the prompt's end.
            target = target[: self.max_len - min(len(prompt), self.max_len // 2)]
            prompt = prompt[len(prompt) - (self.max_len - len(target)):] if len(prompt) + len(target) > self.max_len else prompt
            out.append({"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
                        "labels": [-100] * len(prompt) + target})
        self.count(truncated, len(rows))
        return out

    def collate(self, examples):
        return self.pad(examples)

    def loss(self, model, batch):
        return model(**batch).loss

    def predict(self, model, examples, batch_size, device):
        texts = []
        for start in range(0, len(examples), batch_size):
            batch = _to(self.pad(examples[start:start + batch_size], left=True), device)
            out = model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
            texts += self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def records(self, rows, predictions, task):
        return [{"index": i, **_traceable(row), "input": row["prompt"], "reference": row["target"], "prediction": p}
                for i, (row, p) in enumerate(zip(rows, predictions))]


OBJECTIVES = {"retrieval": Retrieval, "classification": Classification, "generation": Generation}


# ------------------------------------------------------------------------------- data order


class DataOrder:
    """A seeded, resumable order: epoch e is a permutation drawn from a generator seeded with (seed, e).

    Batches run across epoch boundaries, so every batch is full; the position is one integer.
    """

    def __init__(self, n: int, seed: int, consumed: int = 0):
        if n == 0:
            raise ConfigError("the task has no training examples")
        self.n, self.seed, self.consumed = n, seed, consumed

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, pos = divmod(self.consumed, self.n)
            chunk = _permutation(self.n, self.seed, epoch)[pos:pos + k - len(out)]
            out += chunk
            self.consumed += len(chunk)
        return out


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


# ------------------------------------------------------------------------------ checkpoints


def _save_checkpoint(out: Path, model, optimizer, names, state) -> None:
    """checkpoints/step-N/: adapter (unfolded), optimizer + RNG tensors (safetensors), the rest as JSON."""
    optim = optimizer.state_dict()
    tensors = {f"optim/{names[i]}/{k}": v for i, s in optim["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    python, numpy = random.getstate(), np.random.get_state()
    meta = {
        **state,
        "params": list(names),
        "optim_scalars": {f"{names[i]}/{k}": v for i, s in optim["state"].items() for k, v in s.items() if not torch.is_tensor(v)},
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]],
        "rng_python": [python[0], list(python[1]), python[2]],
        "rng_numpy": [numpy[0], numpy[1].tolist(), *numpy[2:]],
    }

    def write(tmp: Path):
        dt.save_adapter(model, tmp / "adapter", fold=False)
        atomic_write_bytes(tmp / "trainer.safetensors", save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
        atomic_write_json(tmp / "trainer.json", meta)

    try:
        path = _replace_dir(out / "checkpoints" / f"step-{state['step']:06d}", write)
    except StorageError as err:
        kept = _latest_checkpoint(out)
        where = f"the last good checkpoint is kept at {kept}" if kept else "no earlier checkpoint exists"
        raise StorageError(f"the checkpoint of step {state['step']} was not saved: {err}. {where}; once that is "
                           "fixed, run again with resume") from None
    for old in _checkpoints(out):  # only once the new one is complete
        if old != path:
            _remove_dir(old)


def _load_checkpoint(path: Path, optimizer, names) -> dict:
    """Restore the optimizer and every RNG from ``path``; returns the loop state saved with them.

    The files are data (safetensors and JSON, never pickle); anything malformed in them is an
    AdapterFileError naming the checkpoint.
    """
    try:
        meta = json.loads((path / "trainer.json").read_text())
        tensors = load_file(path / "trainer.safetensors")
    except (OSError, ValueError, RecursionError, SafetensorError) as err:
        raise AdapterFileError(f"checkpoint {path} cannot be read ({err}); delete it to resume from an older one") from None
    try:
        return _restore_trainer(path, meta, tensors, optimizer, names)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); delete it to resume "
                               "from an older one, or train again without resume") from None


def _restore_trainer(path: Path, meta: dict, tensors: dict, optimizer, names) -> dict:
    if not isinstance(meta, dict) or meta.get("step") != _step_of(path) or not isinstance(meta.get("consumed"), int):
        raise ValueError(f"trainer.json does not describe step {_step_of(path)}")
    if meta["params"] != list(names):
        raise AdapterFileError(f"checkpoint {path} was written for other trainable parameters than this model has "
                               f"({len(meta['params'])} vs {len(names)}); was the method or its options changed?")
    index = {name: i for i, name in enumerate(names)}
    params = optimizer.param_groups[0]["params"]
    optim_state = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, k = key[len("optim/"):].rsplit("/", 1)
            if value.dim() and value.shape != params[index[name]].shape:  # exp_avg, exp_avg_sq; "step" is a scalar
                raise ValueError(f"'{key}' has shape {list(value.shape)}, the parameter {list(params[index[name]].shape)}")
            optim_state.setdefault(index[name], {})[k] = value
    for key, value in meta.pop("optim_scalars").items():
        name, k = key.rsplit("/", 1)
        optim_state.setdefault(index[name], {})[k] = value
    groups = meta.pop("param_groups")
    groups[0]["params"] = list(range(len(names)))  # one group, in the order of ``names``
    optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    python, numpy = meta.pop("rng_python"), meta.pop("rng_numpy")
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state((numpy[0], np.array(numpy[1], dtype=np.uint32), *numpy[2:]))
    del meta["params"]
    return meta


def _checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    found = [p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[1]) if checkpoint else 0


def _replace_dir(path: Path, write) -> Path:
    """Build a directory with ``write(tmp)`` next to ``path``, then swap it in by renames.

    A write that fails (a full disk) removes the partial copy and leaves ``path`` as it was. A
    crash between the two renames leaves ``.NAME.old`` and no ``NAME``; _recover_dir puts it back.
    """
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    _recover_dir(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise storage_error(err, tmp) from err
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _recover_dir(path: Path) -> None:
    """Undo a crash between the two renames of _replace_dir (the previous ``path`` comes back), or
    finish the removal of the previous version that a crash cut short."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old)


def _remove_dir(path: Path) -> None:
    """Remove a directory such that a crash midway never leaves part of it under its own name."""
    if path.is_dir():
        doomed = path.with_name(f".{path.name}.del.tmp")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed)


# ------------------------------------------------------------------------------------ setup


def _resolved(cfg: TrainConfig, task) -> TrainConfig:
    """The config with its defaults filled in: lr, out_dir, device, and the task name of a TaskData."""
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.eval_every < 1 or cfg.log_every < 1:
        raise ConfigError("max_steps, batch_size, grad_accum, eval_every and log_every must be >= 1, got "
                          f"{cfg.max_steps}, {cfg.batch_size}, {cfg.grad_accum}, {cfg.eval_every}, {cfg.log_every}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ConfigError(f"stop_after must be >= 1 or None, got {cfg.stop_after}")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise ConfigError(f"lr must be a finite number >= 0, got {cfg.lr}")
    if cfg.max_len < 2 or cfg.max_new_tokens < 1 or not 0 <= cfg.warmup_ratio <= 1:
        raise ConfigError(f"max_len must be >= 2, max_new_tokens >= 1 and warmup_ratio in [0, 1], got "
                          f"{cfg.max_len}, {cfg.max_new_tokens}, {cfg.warmup_ratio}")
    task_name = task.name if task is not None else cfg.task
    return dataclasses.replace(
        cfg,
        task=task_name,
        options=dict(cfg.options),
        lr=cfg.lr if cfg.lr is not None else dt.method_info(cfg.method)["lr"],
        out_dir=str(cfg.out_dir or f"runs/{_slug(cfg.model)}-{_slug(task_name)}-{_slug(cfg.method)}-s{cfg.seed}"),
        device=cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )


_slug = slug  # one definition, in deltatune.names, shared with the CLI


def _read_run_json(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # malformed or too deeply nested JSON, not UTF-8
        raise ConfigError(f"{path} cannot be read ({err}); it is written by deltatune.train") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} must hold a JSON object (a TrainConfig), got {type(saved).__name__}")
    return saved


def _config_from(saved: dict, path: Path) -> TrainConfig:
    """The TrainConfig of a run.json, on this machine's device."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return _resolved(TrainConfig(**{k: v for k, v in saved.items() if k in names and k != "device"}), None)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path} holds invalid settings ({err})") from None


def _check_resumable(out: Path, cfg: TrainConfig, checkpoint: Path | None) -> None:
    """A resumed run must have the settings of the run it continues; checked before anything is loaded."""
    if cfg.resume and checkpoint is None:
        warnings.warn(f"resume=True but {out} holds no checkpoint; starting from step 0", stacklevel=4)
    if checkpoint is not None and (out / "run.json").is_file():
        saved = _read_run_json(out / "run.json")
        now = json.loads(json.dumps(dataclasses.asdict(cfg)))
        changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
        if changed:
            raise ConfigError(f"cannot resume {out}: {', '.join(f'{k} was {saved.get(k)!r}, now {now[k]!r}' for k in changed)}; "
                              "use the original settings, or a new out_dir without resume")


def _prepare_out_dir(out: Path, cfg: TrainConfig, checkpoint: Path | None) -> None:
    """A fresh run clears the previous run's state (its inputs are checked by now); run.json records cfg."""
    out.mkdir(parents=True, exist_ok=True)
    _recover_dir(out / "best")
    for folder in (out, out / "checkpoints"):  # what writes cut short by a crash left: .NAME.tmp, .NAME.XXXX.tmp
        for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for old in _checkpoints(out) if checkpoint is not None else ():  # superseded, when a crash struck first
        if old != checkpoint:
            _remove_dir(old)
    if checkpoint is None:
        for stale in ("checkpoints", "best"):
            _remove_dir(out / stale)
        for stale in ("log.jsonl", "metrics.json"):
            (out / stale).unlink(missing_ok=True)
    atomic_write_json(out / "run.json", dataclasses.asdict(cfg))


def _load_task(cfg: TrainConfig):
    from deltatune.tasks import load_task

    return load_task(cfg.task, seed=cfg.seed, max_train=cfg.max_train, max_eval=cfg.max_eval)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device


@contextlib.contextmanager
def _deterministic(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every layer of the Hugging Face model inside ``model``.

    Non-reentrant, so that it works whatever requires grad: with a frozen embedding the reentrant
    variant would see no input requiring grad and drop the gradients of the deltas inside the layer.
    """
    from transformers import PreTrainedModel

    hf = next(m for m in model.modules() if isinstance(m, PreTrainedModel))  # the outermost one
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # its name since transformers 5.x; the old one warns
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _autocast(cfg: TrainConfig):
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch.to(device)


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _progress(cfg: TrainConfig, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, disable=not cfg.progress, file=sys.stderr,
                unit="step", dynamic_ncols=True, desc=f"{cfg.method} {cfg.task}")


class _Log:
    """log.jsonl: one JSON object per line. On resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path | None, keep_until: int):
        self.path = path
        if path is not None and path.exists() and keep_until:
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= keep_until]
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict) -> None:
        if self.path is not None:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise storage_error(err, self.path) from err


def _logged_step(line: str) -> float:
    """When a log line was written, as a step: the final test score (written after the last checkpoint,
    with its step) and a line cut short by a crash mid-append count as after every checkpoint."""
    try:
        record = json.loads(line)
        final = record.get("split") == "test" and not record.get("zero_shot")
        return math.inf if final else record.get("step", 0)
    except (ValueError, AttributeError):
        return math.inf
