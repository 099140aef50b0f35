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
from deltatune import privacy, storage, updates
from deltatune.storage import RunFolder, atomic_write_bytes, atomic_write_json, storage_error
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
    overwrite: bool = False  # a fresh run may replace the previous run in out_dir (else: resume, or another out_dir)
    recycle: bool = False  # run the frozen lower blocks once and start from their cached output (deltatune.analysis.recycle)
    recycle_dtype: str = "float32"  # the cache's dtype: float32 (exact), float16 or bfloat16
    dp_epsilon: float | None = None  # differentially private training to this epsilon (deltatune.privacy); None: off
    dp_delta: float | None = None  # None: 1/N rounded down to a power of ten (N training examples)
    dp_clip: float | None = None  # per-example gradient norm bound C; None: 1.0


# Fields that may differ between a run and its resumption without changing the result.
# lr and max_grad_norm may change too: the way to go on after a NaN loss.
_RESUMABLE_CHANGES = {"resume", "stop_after", "log_every", "json_log", "progress", "out_dir", "device", "lr", "max_grad_norm",
                      "overwrite"}


# ------------------------------------------------------------------------------------ train


def train(cfg: TrainConfig, task=None) -> dict:
    """Train ``cfg.method`` on ``cfg.task`` (or on ``task``, an already loaded TaskData); returns the summary.

    The summary is also written to ``out_dir/metrics.json``. A run cut short by ``stop_after``
    returns ``{"stopped_at": step, ...}`` instead; ``resume=True`` then finishes it with the same result.
    """
    cfg = _resolved(cfg, task)
    from deltatune.analysis.freeze import resolve_options
    cfg = resolve_options(cfg, task)  # telly k="auto": the freeze depth from a layer analysis (cached)
    with _deterministic(cfg.deterministic), RunFolder(cfg.out_dir) as folder:
        return _train(cfg, task, folder)


def _train(cfg: TrainConfig, task, folder: RunFolder) -> dict:
    # Data, model, method, and what they ask of the machine, are all checked before out_dir is
    # touched: a bad input leaves the previous run in out_dir as it was.
    out = Path(cfg.out_dir)
    checkpoint, restart = _check_out_dir(folder, cfg)
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
            dt.detach(_check_positions(cfg, dt.attach(model, cfg.method, **cfg.options), task.kind))
        zero_shot, zero_shot_records = _score(model.to(cfg.device), objective, data["test"], task, "test", cfg)
        state["zero_shot_value"] = zero_shot[task.metric]
    if checkpoint is None:
        dt.attach(model, cfg.method, **cfg.options)
    else:
        dt.load_adapter(model, checkpoint / "adapter")
    _check_positions(cfg, model, task.kind)
    if cfg.grad_checkpointing:
        _enable_checkpointing(model)
    model.to(cfg.device)
    if cfg.recycle:  # the frozen lower part runs once; training and evaluation start from its cached output
        from deltatune.analysis import recycle
        objective, data = recycle.prepare(cfg, model, objective, data)
    _check_batch_fits(cfg, model, objective, data["train"])
    trainable, total = dt.count_parameters(model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    private = privacy.rule_for(cfg, task.kind, len(data["train"]), dict(zip(names, params)),
                               lambda b: _to(b, cfg.device), lambda: _autocast(cfg))
    rule = updates.build(model, dict(zip(names, params)), max_steps=cfg.max_steps, private=private)  # None: no hooks
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, optimizer, names, cfg, rule)
    _prepare_out_dir(folder, cfg, checkpoint, restart)
    log = _Log(out / "log.jsonl" if cfg.json_log else None, keep_until=_step_of(checkpoint))
    if zero_shot is not None:
        for stale in PREDICTIONS.values():  # a fresh run: the previous run's predictions go with its metrics
            (out / stale).unlink(missing_ok=True)
        _write_predictions(out / PREDICTIONS["zero-shot"], zero_shot_records)
        log.write({"step": 0, "split": "test", "zero_shot": True, **zero_shot})

    if _loop(cfg, model, optimizer, names, objective, data, task, state, log, out, rule) == "interrupted":
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
    summary.update(rule.metrics() if rule is not None else {})  # e.g. the privacy budget spent
    summary.update({k: v for k, v in test.items() if k not in summary})
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _loop(cfg, model, optimizer, names, objective, data, task, state, log, out, rule=None) -> str:
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
            loss = _step(cfg, model, optimizer, params, objective, data["train"], order, rule, step)
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
                _save_checkpoint(out, model, optimizer, names, state, rule)
            if cfg.early_stop_patience is not None and state["bad_evals"] >= cfg.early_stop_patience:
                return "early-stop"
    return "done" if state["step"] == cfg.max_steps else "interrupted"


def _step(cfg, model, optimizer, params, objective, examples, order, rule=None, step=0) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; the loss stays on the device (no sync).

    ``rule`` (deltatune.updates): a method's or training mode's hooks around the step; a rule that
    computes the gradients itself (private training) replaces the backward passes and the clipping."""
    if rule is not None:
        rule.before_step(step)
    if rule is not None and rule.computes_grads:
        loss = rule.backward(model, objective, examples, order, step)
    else:
        loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = _to(objective.collate([examples[i] for i in order.take(cfg.batch_size)]), cfg.device)
            with _autocast(cfg):
                micro = objective.loss(model, batch) / cfg.grad_accum
            micro.backward()
            loss = loss + micro.detach()
    if rule is not None:
        rule.after_backward(step)
    if cfg.max_grad_norm and not (rule is not None and rule.replaces_clipping):
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    if rule is not None:
        rule.after_step(step)
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
            storage.replace_dir(out / "best", lambda tmp: dt.save_adapter(model, tmp))
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
    return _check_positions(cfg, dt.load_adapter(model, adapter_dir), task.kind), tokenizer


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


CHARS_PER_TOKEN = 128  # above the longest token of a BPE or WordPiece vocabulary (a WordPiece word is cut at 100)


class _Objective:
    """Tokenising is shared: inputs longer than max_len are truncated and counted for one warning."""

    def __init__(self, tokenizer, cfg: TrainConfig):
        self.tokenizer, self.max_len, self.cfg = tokenizer, cfg.max_len, cfg
        self.truncated = self.seen = 0

    def tokens(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """One dict of token lists per text (input_ids, attention_mask, and token_type_ids if used)."""
        if not texts:
            return []
        texts, pairs = [self.clip(t) for t in texts], (pairs and [self.clip(t) for t in pairs])
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

    def clip(self, text: str, keep_end: bool = False) -> str:
        """At most CHARS_PER_TOKEN x max_len characters: a text that long is over max_len tokens anyway, and
        the tokenizer's memory grows with the whole text (a 5 MB line alone took 2.3 GB)."""
        limit = CHARS_PER_TOKEN * self.max_len
        return text if len(text) <= limit else text[-limit:] if keep_end else text[:limit]

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
        prompts = [tok(format_prompt(tok, self.clip(r["prompt"], keep_end=True)), add_special_tokens=False, verbose=False)["input_ids"] for r in rows]
        if not train:  # the prompt alone, keeping its end when it is too long
            self.count(sum(len(p) > self.max_len for p in prompts), len(prompts))
            return [{"input_ids": p[-self.max_len:], "attention_mask": [1] * len(p[-self.max_len:])} for p in prompts]
        out, truncated = [], 0
        for prompt, row in zip(prompts, rows):
            target = tok(self.clip(row["target"]), add_special_tokens=False, verbose=False)["input_ids"] + [eos]
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


def _save_checkpoint(out: Path, model, optimizer, names, state, rule=None) -> None:
    """checkpoints/step-N/: adapter (unfolded), optimizer + RNG tensors (safetensors), the rest as JSON."""
    optim = optimizer.state_dict()
    tensors = {f"optim/{names[i]}/{k}": v for i, s in optim["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    tensors["rng/torch"] = torch.get_rng_state()
    tensors.update({f"rule/{k}": v for k, v in (rule.state_dict() if rule is not None else {}).items()})
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
        path = storage.replace_dir(out / "checkpoints" / f"step-{state['step']:06d}", write)
    except StorageError as err:
        kept = _latest_checkpoint(out)
        where = f"the last good checkpoint is kept at {kept}" if kept else "no earlier checkpoint exists"
        raise StorageError(f"the checkpoint of step {state['step']} was not saved: {err}. {where}; once that is "
                           "fixed, run again with resume") from None
    for old in _checkpoints(out):  # only once the new one is complete
        if old != path:
            storage.remove_dir(old)


def _load_checkpoint(path: Path, optimizer, names, cfg: TrainConfig, rule=None) -> dict:
    """Restore the optimizer and every RNG from ``path``; returns the loop state saved with them.

    The files are data (safetensors and JSON, never pickle), checked field by field before use;
    anything malformed in them is an AdapterFileError naming the checkpoint.
    """
    try:
        meta = json.loads(storage.read_text(path / "trainer.json"))
        tensors = load_file(path / "trainer.safetensors")
    except (OSError, ValueError, RecursionError, SafetensorError) as err:
        raise AdapterFileError(f"checkpoint {path} cannot be read ({err}); delete it to resume from an older one") from None
    try:
        _check_trainer_json(meta, _step_of(path), cfg, optimizer.param_groups[0])
        saved = {k[len("rule/"):]: v for k, v in tensors.items() if k.startswith("rule/")}
        if rule is not None:  # the update rule's masks, accumulators, counters (deltatune.updates)
            rule.load_state_dict(saved)
        elif saved:
            raise ValueError(f"it holds update-rule state ({sorted(saved)[0]}, ...) that this run has no rule for")
        return _restore_trainer(path, meta, tensors, optimizer, names)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); delete it to resume "
                               "from an older one, or train again without resume") from None


def _check_trainer_json(meta, step: int, cfg: TrainConfig, group: dict) -> None:
    """Every field of trainer.json that the loop reads: of its type, finite, in its range (ValueError)."""
    def number(value, low=-math.inf):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low

    def whole(value, low, high):
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    if not isinstance(meta, dict):
        raise ValueError(f"trainer.json must hold a JSON object, got {type(meta).__name__}")
    rules = {  # field -> (check, what it must be)
        "step": (lambda v: v == step and whole(v, 1, _COUNT), f"{step}, the step of its directory"),
        "consumed": (lambda v: whole(v, 0, _COUNT) and v == step * cfg.batch_size * cfg.grad_accum,
                     f"{step} steps x batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum}"),
        "best_value": (lambda v: v is None or number(v), "a finite number or null"),
        "best_step": (lambda v: v is None or whole(v, 1, step), f"a step in [1, {step}] or null"),
        "bad_evals": (lambda v: whole(v, 0, step), f"a whole number in [0, {step}]"),
        "zero_shot_value": (lambda v: v is None or number(v), "a finite number or null"),
        "train_seconds": (lambda v: number(v, 0), "a finite number >= 0"),
        "step_seconds": (lambda v: isinstance(v, list) and len(v) == step and all(number(x, 0) for x in v),
                         f"a list of {step} finite numbers >= 0"),
        "params": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of parameter names"),
        "optim_scalars": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and "/" in k and number(x, 0)
                                                                for k, x in v.items()), "a mapping of names to numbers >= 0"),
        "param_groups": (lambda v: isinstance(v, list) and len(v) == 1 and _valid_group(v[0], group),
                         "one optimizer parameter group like the optimizer's own"),
        "rng_python": (lambda v: isinstance(v, list) and len(v) == 3, "Python's RNG state"),
        "rng_numpy": (lambda v: isinstance(v, list) and len(v) == 5, "NumPy's RNG state"),
    }
    for key, (check, want) in rules.items():
        if key not in meta:
            raise ValueError(f"trainer.json has no field '{key}'")
        if not check(meta[key]):
            shown = repr(meta[key]) if len(repr(meta[key])) <= 60 else repr(meta[key])[:57] + "..."
            raise ValueError(f"trainer.json field '{key}' must be {want}, got {shown}")


def _valid_group(saved, live: dict) -> bool:
    """An AdamW parameter group as saved: the keys of the live one only, each of the same kind, in range."""
    if not isinstance(saved, dict) or not {"lr", "betas", "eps", "weight_decay"} <= set(saved) <= set(live):
        return False
    for key, value in saved.items():
        have = live[key]
        if isinstance(have, bool) or have is None:
            ok = value is None or isinstance(value, bool)
        elif isinstance(have, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        elif isinstance(have, (tuple, list)):
            ok = isinstance(value, list) and len(value) == len(have) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in value)
        else:
            ok = False
        if not ok:
            return False
    return saved["eps"] > 0


def _restore_trainer(path: Path, meta: dict, tensors: dict, optimizer, names) -> dict:
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
    folder = out / "checkpoints"  # real folders only: a link is never followed (RunFolder refuses them anyway)
    found = [p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name) and storage.is_dir(p)] if storage.is_dir(folder) else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[1]) if checkpoint else 0


# ------------------------------------------------------------------------------------ setup


def _resolved(cfg: TrainConfig, task) -> TrainConfig:
    """The config with its defaults filled in: lr, out_dir, device, and the task name of a TaskData."""
    _check_settings(cfg)
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


# The type and range of every TrainConfig field, checked in one place for a config from the API or the
# CLI and for one read back from run.json: (types, lowest, highest); None in types: may be None.
_COUNT = 2**53  # counts stay exact in JSON (a double)
_SETTINGS = {
    "model": ((str,),), "task": ((str,),), "method": ((str,),), "options": ((dict,),),
    "max_steps": ((int,), 1, _COUNT), "batch_size": ((int,), 1, _COUNT), "grad_accum": ((int,), 1, _COUNT),
    "eval_every": ((int,), 1, _COUNT), "log_every": ((int,), 1, _COUNT), "max_len": ((int,), 2, _COUNT),
    "max_new_tokens": ((int,), 1, _COUNT), "seed": ((int,), 0, 2**32 - 1),  # NumPy's seeds
    "early_stop_patience": ((int, None), 1, _COUNT), "max_train": ((int, None), 1, _COUNT),
    "max_eval": ((int, None), 1, _COUNT), "stop_after": ((int, None), 1, _COUNT),
    # The largest default lr of a method is 0.3 (prompt); 10 leaves room for any sweep, and refuses
    # values that can only overflow (1e308).
    "lr": ((float, None), 0.0, 10.0), "weight_decay": ((float,), 0.0, 1e6), "warmup_ratio": ((float,), 0.0, 1.0),
    "max_grad_norm": ((float, None), 0.0, 1e12),
    "dp_epsilon": ((float, None), 1e-6, 1e6), "dp_delta": ((float, None), 1e-300, 0.999999),
    "dp_clip": ((float, None), 1e-12, 1e12),
    "bf16": ((bool,),), "grad_checkpointing": ((bool,),), "deterministic": ((bool,),), "resume": ((bool,),),
    "json_log": ((bool,),), "progress": ((bool,),), "overwrite": ((bool,),),
    "out_dir": ((str, None),), "device": ((str, None),),
    "recycle": ((bool,),), "recycle_dtype": ((str,),),
}


def _check_settings(cfg: TrainConfig) -> None:
    """Every field of ``cfg`` of its type and in its range (finite numbers); a ConfigError naming the first that is not."""
    for name, (types, *bounds) in _SETTINGS.items():
        value = getattr(cfg, name)
        if value is None and None in types:
            continue
        if float in types:  # an int is a float here, a bool is neither
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            kind = "a finite number"
        elif int in types:
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        else:
            typ = types[0]
            ok = isinstance(value, typ) and (typ is not int or not isinstance(value, bool))
            kind = {str: "a string", dict: "a mapping of options", bool: "true or false"}[typ]
        if ok and bounds and not bounds[0] <= value <= bounds[1]:
            ok = False
        if not ok:
            where = f" in [{bounds[0]}, {bounds[1]}]" if bounds else ""
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ConfigError(f"{name} must be {kind}{where}{' or None' if None in types else ''}, got {shown}")


def _read_run_json(path: Path) -> dict:
    try:
        saved = json.loads(storage.read_text(path))
    except (OSError, ValueError, RecursionError) as err:  # malformed or too deeply nested JSON, not UTF-8, a link
        raise ConfigError(f"{path} cannot be read ({err}); it is written by deltatune.train") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} must hold a JSON object (a TrainConfig), got {type(saved).__name__}")
    return saved


def _config_from(saved: dict, path: Path) -> TrainConfig:
    """The TrainConfig of a run.json, on this machine's device; every field checked as for a new run."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return _resolved(TrainConfig(**{k: v for k, v in saved.items() if k in names and k != "device"}), None)
    except (TypeError, ValueError) as err:  # ConfigError is a ValueError
        raise ConfigError(f"{path} holds invalid settings ({err}); it is written by deltatune.train") from None


def _check_out_dir(folder: RunFolder, cfg: TrainConfig) -> tuple[Path | None, bool]:
    """May this run use out_dir? Returns the checkpoint it goes on from (None: step 0), and whether
    it restarts a run of its own settings that wrote no checkpoint yet. Writes nothing.

    A folder deltatune did not write is refused unless empty; a previous run there is continued
    (``resume``), replaced only when asked (``overwrite``), and otherwise left alone. A run folder
    is locked from here on, so nothing else changes it while it is read.
    """
    folder.check()
    out, run_json = folder.path, folder.path / "run.json"
    if not (cfg.resume and folder.is_run()):
        if cfg.resume:
            warnings.warn(f"resume=True but {out} holds no run; starting from step 0", stacklevel=5)
        _refuse_to_replace(folder, cfg)
        return None, False
    checkpoint = _latest_checkpoint(out)
    if os.path.lexists(run_json):  # the run it continues had these settings
        saved = _read_run_json(run_json)
        _config_from(saved, run_json)
        now = json.loads(json.dumps(dataclasses.asdict(cfg)))
        changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
        if changed:
            raise ConfigError(f"cannot resume {out}: {', '.join(f'{k} was {saved.get(k)!r}, now {now[k]!r}' for k in changed)}; "
                              "use the original settings, or a new out_dir without resume")
    elif checkpoint is None:
        _refuse_to_replace(folder, cfg)
    if checkpoint is None:  # what it wrote before its first checkpoint is recomputed the same way
        warnings.warn(f"resume=True but {out} holds no checkpoint yet; starting from step 0", stacklevel=5)
    return checkpoint, checkpoint is None


def _refuse_to_replace(folder: RunFolder, cfg: TrainConfig) -> None:
    """A fresh run never replaces a previous one unless asked to (overwrite)."""
    if cfg.overwrite or not folder.holds_run():
        return
    out = folder.path
    kept = _latest_checkpoint(out)
    what = ("a finished run" if os.path.lexists(out / "metrics.json") else
            f"a run with its last checkpoint at step {_step_of(kept)}" if kept else "a run that wrote no checkpoint")
    raise StorageError(f"--out {out} holds {what}; pass --resume to continue it (resume=True), --overwrite to "
                       "replace it (overwrite=True), or choose another --out")


def _prepare_out_dir(folder: RunFolder, cfg: TrainConfig, checkpoint: Path | None, restart: bool) -> None:
    """Take out_dir (created, marked and locked), tidy what a crash left, clear a replaced run; run.json records cfg."""
    out = folder.path
    try:
        folder.open()
        if checkpoint is None and not restart:
            _refuse_to_replace(folder, cfg)  # again under the lock: another run may have written here meanwhile
        storage.recover_dir(out / "best")
        folder.clear_leftovers()
        folder.clear_leftovers(out / "checkpoints")
        for old in _checkpoints(out) if checkpoint is not None else ():  # superseded, when a crash struck first
            if old != checkpoint:
                storage.remove_dir(old)
        if checkpoint is None:  # allowed by now: a resumed run that wrote no checkpoint yet, or overwrite
            for stale in ("checkpoints", "best", "log.jsonl", "metrics.json", *PREDICTIONS.values()):
                storage.remove(out / stale)
    except OSError as err:
        raise storage_error(err, out, "prepare") from err
    atomic_write_json(out / "run.json", dataclasses.asdict(cfg))


def _check_positions(cfg: TrainConfig, model, kind: str):
    """The longest input (max_len tokens, then max_new_tokens more when generating) plus the prompt
    tokens a method prepends fits in the model's positions; returns ``model``."""
    from deltatune.deltas import SoftPrompt
    from deltatune.sites import find_backbone

    _, backbone = find_backbone(model)
    limit = next((v for k in ("max_position_embeddings", "n_positions")
                  if isinstance(v := getattr(backbone.config, k, None), int) and not isinstance(v, bool)), None)
    if limit is None:  # relative positions (T5): no table to run off
        return model
    offset = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    if isinstance(offset, int):  # RoBERTa-style position ids start after the padding index
        limit -= offset + 1
    prompt = sum(m.prompt.shape[0] for m in model.modules() if isinstance(m, SoftPrompt))
    new = cfg.max_new_tokens if kind == "generation" else 0
    if cfg.max_len + new + prompt > limit:
        parts = f"max_len {cfg.max_len}" + (f" + max_new_tokens {new}" if new else "") + (
            f" + {prompt} prompt tokens of {cfg.method}" if prompt else "")
        total = f" = {cfg.max_len + new + prompt}" if new or prompt else ""
        fix = f"lower max_len (--max-len) to {limit - new - prompt}" if limit - new - prompt >= 2 else "shorten the prompt"
        raise ConfigError(f"{parts}{total} positions are more than the {limit} that {cfg.model} has; {fix}")
    return model


def _n_tokens(example) -> int:
    """Tokens in one encoded example (a dict of token lists, or a tuple holding such dicts)."""
    if isinstance(example, dict):
        return len(example.get("input_ids", ()))
    if isinstance(example, (tuple, list)):
        return sum(_n_tokens(part) for part in example if isinstance(part, (dict, tuple, list)))
    return 0


def _check_batch_fits(cfg: TrainConfig, model, objective, examples) -> None:
    """The largest micro-batch the run can meet (batch_size copies of its longest example) fits in
    memory and gives a finite loss, checked before out_dir changes and leaving the parameters, their
    gradients and every RNG as they were.

    First the memory it needs is predicted without building it: the tensors autograd keeps for the
    backward pass, measured on batches of one and two copies, grow linearly with the batch. A batch
    that cannot fit is refused there; one that may fit then runs one forward and backward pass.
    """
    longest = max(examples, key=_n_tokens)
    device = torch.device(cfg.device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    fix = "lower batch_size (--batch-size; grad_accum keeps the effective batch) or max_len (--max-len)"
    what = f"a batch of {cfg.batch_size} examples of up to {_n_tokens(longest)} tokens"

    def kept_for_backward(n: int) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            batch = _to(objective.collate([longest] * n), cfg.device)
            with _autocast(cfg):
                objective.loss(model, batch)
        return total[0]

    model.train()
    one, two = kept_for_backward(1), kept_for_backward(2)
    need = one + (cfg.batch_size - 1) * max(two - one, 0)
    free = _free_memory(cfg.device)
    if free is not None and need > free:
        raise ConfigError(f"{what} needs about {need / 2**30:.3g} GiB for its activations, more than the "
                          f"{free / 2**30:.3g} GiB free on {cfg.device}; {fix}")
    try:
        with torch.random.fork_rng(devices=devices):
            batch = _to(objective.collate([longest] * cfg.batch_size), cfg.device)
            with _autocast(cfg):
                loss = objective.loss(model, batch)
            loss.backward()
            value = loss.item()
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, MemoryError) or "memory" in text.lower():
            raise ConfigError(f"{what} does not fit in memory on {cfg.device} ({text[:120]}); {fix}") from None
        raise
    finally:
        batch = loss = None
        for p in model.parameters():
            p.grad = None
    if not math.isfinite(value):
        raise ConfigError(f"the first batch gives a loss of {value} before any training: the method's options "
                          f"({cfg.method} {cfg.options}) make the model's outputs non-finite; choose smaller values")


def _free_memory(device: str) -> int | None:
    """Bytes free for tensors on ``device``: the GPU's free memory, or the memory available to this
    process on Linux (within its cgroup's limit); None where it cannot be told."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


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
        if path is not None and os.path.lexists(path) and keep_until:
            try:  # bytes that are not UTF-8 (a damaged line) do not parse, and so are dropped
                text = storage.read_bytes(path).decode("utf-8", errors="replace")
            except OSError as err:
                raise storage_error(err, path, "read") from None
            kept = [line for line in text.split("\n") if line and _logged_step(line) <= keep_until]
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict) -> None:
        if self.path is not None:
            storage.append_text(self.path, json.dumps(record) + "\n")


def _logged_step(line: str) -> float:
    """When a log line was written, as a step: the final test score (written after the last checkpoint,
    with its step) and a line cut short by a crash mid-append count as after every checkpoint."""
    try:
        record = json.loads(line)
        final = record.get("split") == "test" and not record.get("zero_shot")
        return math.inf if final else record.get("step", 0)
    except (ValueError, AttributeError):
        return math.inf
