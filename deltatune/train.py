"""The one training loop, for every method and every task kind.

    from deltatune.train import TrainConfig, train, evaluate
    summary = train(TrainConfig(model="minilm", task="code-search", method="lora", out_dir="runs/x"))
    evaluate("runs/x/best")                    # scores the best adapter on the test split again

Methods change nothing here: ``dt.attach`` freezes the base and the optimizer takes every
parameter that requires grad. Task kinds differ in three small objectives (``objectives.py``: how
examples are tokenised, the loss, the predictions the task scores); resumable state is written and
validated by ``checkpoints.py``; run folders and durable writes are ``storage.py``'s.

``out_dir`` holds ``run.json`` (the TrainConfig, for ``evaluate`` and ``resume``), ``log.jsonl`` (one
object per step and per evaluation), ``checkpoints/step-N/`` (the latest resumable state, no pickle),
``best/`` (the best adapter on the validation split) and ``metrics.json`` (what ``train`` returns).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

import deltatune as dt
from deltatune.errors import AdapterFileError, ConfigError, DataError, StorageError, TrainingError
from deltatune import distributed, privacy, storage, updates
from deltatune.storage import RunFolder, atomic_write_bytes, atomic_write_json, storage_error
from deltatune.models import build_task_model
from deltatune.names import cache_dir, slug
from deltatune.store import hash_tensors
from deltatune.checkpoints import _COUNT, _checkpoints, _latest_checkpoint, _load_checkpoint, _save_checkpoint, _step_of
from deltatune.objectives import CHARS_PER_TOKEN, OBJECTIVES, Classification, Generation, Retrieval, _to  # noqa: F401  (re-exported)


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
    bf16: bool | str = False  # bfloat16 autocast; "auto": on where the device computes bf16 natively (native_bf16), else fp32
    grad_checkpointing: bool | str = "auto"  # recompute activations in backward (non-reentrant); "auto": when they would pass AUTO_CHECKPOINT_BYTES
    full_logits: bool = False  # generation: logits at every position (the plain path); default: the LM head in chunks where labels count
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
    nproc: int = 1  # data-parallel processes (deltatune.distributed); batch_size stays the global batch
    fsdp: bool = False  # with nproc > 1: shard the frozen base's weights over the processes (FSDP2)


# Fields that may differ between a run and its resumption without changing the result.
# lr and max_grad_norm may change too: the way to go on after a NaN loss.
_RESUMABLE_CHANGES = {"resume", "stop_after", "log_every", "json_log", "progress", "out_dir", "device", "lr", "max_grad_norm",
                      "overwrite", "nproc", "fsdp", "full_logits", "grad_checkpointing"}

# grad_checkpointing="auto" recomputes activations in backward when the largest batch's activations kept for
# it would pass this (the batch-fit check measures them: batch_size x the growth per example): the memory of big causal-LM batches (SmolLM2 at batch 32,
# max_len 128: about 4 GiB -> 1 GiB), and nothing changes for small jobs. Same losses either way.
AUTO_CHECKPOINT_BYTES = 2 * 2**30


# ------------------------------------------------------------------------------------ train


def train(cfg: TrainConfig, task=None) -> dict:
    """Train ``cfg.method`` on ``cfg.task`` (or on ``task``, an already loaded TaskData); returns the summary.

    The summary is also written to ``out_dir/metrics.json``. A run cut short by ``stop_after``
    returns ``{"stopped_at": step, ...}`` instead; ``resume=True`` then finishes it with the same result.
    """
    cfg = _resolved(cfg, task)
    from deltatune.analysis.freeze import resolve_options
    cfg = resolve_options(cfg, task)  # telly k="auto": the freeze depth from a layer analysis (cached)
    if distributed.spawns(cfg):  # nproc > 1: that many processes, each running train(); rank 0's summary
        return distributed.spawn(train, cfg, task)
    with _deterministic(cfg.deterministic), distributed.group(cfg) as cfg, distributed.folder(RunFolder, cfg.out_dir) as folder:
        return _train(cfg, task, folder)


def _train(cfg: TrainConfig, task, folder: RunFolder) -> dict:
    # Data, model, method, and what they ask of the machine, are all checked before out_dir is
    # touched: a bad input leaves the previous run in out_dir as it was.
    out = Path(cfg.out_dir)
    phases, mark = {}, [time.perf_counter()]  # where the whole job's time goes (summary["phase_seconds"])

    def lap(name):
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - mark[0]
        mark[0] = now

    checkpoint, restart = distributed.rank0(lambda: _check_out_dir(folder, cfg))  # only rank 0 touches out_dir
    loads = checkpoint is not None and distributed.is_rank0()  # the other ranks take its tensors (distributed.sync)
    _seed_everything(cfg.seed)
    task = task or _load_task(cfg)
    if not task.train:
        raise DataError(f"task {task.name} has no training examples"
                        + (f" (max_train={cfg.max_train})" if cfg.max_train is not None else ""))
    model, tokenizer = build_task_model(cfg.model, task.kind, len(task.labels or []))
    if task.kind == "classification" and task.labels:  # saved with the adapter: deltatune serve names the classes
        model.label_names = list(task.labels)
    objective = OBJECTIVES[task.kind](tokenizer, cfg)
    data = {split: objective.encode(task.split(split), train=split == "train") for split in ("train", "valid", "test")}
    objective.warn_truncated(stacklevel=3)  # at the caller of train()
    state = {"step": 0, "consumed": 0, "best_value": None, "best_step": None, "bad_evals": 0,
             "zero_shot_value": None, "train_seconds": 0.0, "step_seconds": []}
    lap("setup")

    zero_shot = None
    # The pretrained model before attach (a classifier: its untrained head); by rank 0, with the whole base.
    if checkpoint is None and data["test"] and distributed.is_rank0() and not distributed.sharded(cfg):
        with torch.random.fork_rng(devices=[]):  # a method that does not fit fails before the scoring
            dt.detach(_check_positions(cfg, dt.attach(model, cfg.method, **cfg.options), task.kind))
        zero_shot, zero_shot_records, state["zero_shot_cached"] = _zero_shot(cfg, model.to(cfg.device), objective,
                                                                             data["test"], task)
        state["zero_shot_value"] = zero_shot[task.metric]
        lap("zero_shot")
    if not loads:
        dt.attach(model, cfg.method, **cfg.options)
    else:
        dt.load_adapter(model, checkpoint / "adapter")
    _check_positions(cfg, model, task.kind)
    if cfg.grad_checkpointing is True:
        _enable_checkpointing(model)
    distributed.shard_frozen(cfg, model)  # fsdp: each rank keeps its shard of the frozen base
    model.to(cfg.device)
    if cfg.recycle:  # the frozen lower part runs once; training and evaluation start from its cached output
        from deltatune.analysis import recycle
        objective, data = recycle.prepare(cfg, model, objective, data)
    lap("setup")
    checkpointing = _check_batch_fits(distributed.local(cfg), model, objective, data["train"])
    lap("batch_check")
    trainable, total = dt.count_parameters(model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    private = privacy.rule_for(cfg, task.kind, len(data["train"]), dict(zip(names, params)),
                               lambda b: _to(b, cfg.device), lambda: _autocast(cfg))
    rule = updates.build(model, dict(zip(names, params)), max_steps=cfg.max_steps, private=private)  # None: no hooks
    distributed.check_rule(rule)
    if loads:
        state = _load_checkpoint(checkpoint, optimizer, names, cfg, rule)
    state = distributed.sync(model, optimizer, rule, state)
    distributed.rank0(lambda: _prepare_out_dir(folder, cfg, checkpoint, restart))
    log = _Log(out / "log.jsonl" if cfg.json_log and distributed.is_rank0() else None, keep_until=_step_of(checkpoint))
    if zero_shot is not None:
        for stale in PREDICTIONS.values():  # a fresh run: the previous run's predictions go with its metrics
            (out / stale).unlink(missing_ok=True)
        _write_predictions(out / PREDICTIONS["zero-shot"], zero_shot_records)
        log.write({"step": 0, "split": "test", "zero_shot": True, **zero_shot})

    lap("setup")
    ended = _loop(cfg, model, optimizer, names, objective, data, task, state, log, out, rule, phases)
    lap("train")
    phases["train"] -= phases.get("validate", 0.0) + phases.get("checkpoint", 0.0)
    if ended == "interrupted":
        return {"stopped_at": state["step"], "max_steps": cfg.max_steps, "out_dir": str(out),
                "checkpoint": str(distributed.rank0(lambda: _latest_checkpoint(out)))}
    if not distributed.is_rank0():
        return distributed.result(None)  # rank 0's summary, once it has scored the best adapter
    rule_metrics = rule.metrics() if rule is not None else {}  # e.g. the privacy budget spent
    # the test score comes from the saved best adapter, exactly as evaluate() sees it; every reference to the
    # trained model goes first (params and the rules hold its trainable tensors, whose .grad is the size of them)
    optimizer.zero_grad(set_to_none=True)
    del model, optimizer, params, private, rule
    gc.collect()  # hooks and stores refer back to their modules: the model is a cycle, freed by the collector
    best, _ = _restore(cfg, task, out / "best")
    test, records = _score(best.to(cfg.device), objective, data["test"], task, "test", cfg)
    _write_predictions(out / PREDICTIONS["test"], records)
    log.write({"step": state["step"], "split": "test", "best_step": state["best_step"], **test})
    lap("test")
    summary = {
        "method": cfg.method, "task": task.name, "model": cfg.model, "metric": task.metric,
        "value": test[task.metric], "zero_shot_value": state["zero_shot_value"],
        "zero_shot_cached": state.get("zero_shot_cached", False),
        "trainable_params": trainable, "total_params": total, "train_seconds": state["train_seconds"],
        "step_seconds_median": statistics.median(state["step_seconds"]), "peak_rss_mb": _peak_rss_mb(),
        "steps": state["step"], "max_steps": cfg.max_steps, "stopped_early": state["step"] < cfg.max_steps,
        "best_step": state["best_step"], "valid_value": state["best_value"], "seed": cfg.seed, "lr": cfg.lr,
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()}, "grad_checkpointing": checkpointing,
        "batch_size": cfg.batch_size, "options": cfg.options, "out_dir": str(out), "adapter_dir": str(out / "best"),
        "predictions_file": str(out / PREDICTIONS["test"]),
        "zero_shot_predictions_file": str(out / PREDICTIONS["zero-shot"]) if state["zero_shot_value"] is not None else None,
    }
    summary.update(rule_metrics)
    summary.update({k: v for k, v in test.items() if k not in summary})
    atomic_write_json(out / "metrics.json", summary)
    return distributed.result(summary)


def _loop(cfg, model, optimizer, names, objective, data, task, state, log, out, rule=None, phases=None) -> str:
    """Optimizer steps from ``state["step"]``: returns "done", "early-stop" or "interrupted" (stop_after).
    ``phases`` (a dict) gathers the seconds spent validating and checkpointing."""
    phases = {} if phases is None else phases
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
            if validate:  # on rank 0, which tells the others the outcome (state: best, early stopping)
                t0 = time.perf_counter()
                value = distributed.rank0(lambda: _validate(cfg, model, objective, data, task, state, log, out), state,
                                          others=lambda: data["valid"] and _score(model, objective, data["valid"], task, "valid", cfg))
                phases["validate"] = phases.get("validate", 0.0) + time.perf_counter() - t0
                if value is not None:
                    shown[task.metric] = f"{value:.4f}"
                model.train()
            bar.set_postfix(shown, refresh=False)
            if validate or step == stop_at:
                t0 = time.perf_counter()
                distributed.rank0(lambda: _save_checkpoint(out, model, optimizer, names, state, rule))
                phases["checkpoint"] = phases.get("checkpoint", 0.0) + time.perf_counter() - t0
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
    elif distributed.active():  # this rank's share of each micro-batch, then the gradients summed over ranks
        loss = distributed.backward(cfg, model, params, objective, examples, order, step)
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
             max_len: int | None = None, batch_size: int | None = None, out_dir=None, recycle: bool | None = None) -> dict:
    """Score a saved adapter on ``split`` of its training task (or of ``task``: a name, path or TaskData).

    The model (and by default the task) come from the ``run.json`` that ``train`` wrote next to the
    adapter; an ``out_dir`` of ``train`` stands for its ``best`` adapter. The whole split is scored
    unless ``max_eval`` is given (the run's seed then picks the examples, so the run's own max_eval
    reproduces the subset it was tested on). ``max_len`` defaults to the longest input the model takes
    (its position table, less the prompt tokens and, when generating, max_new_tokens; the tokenizer's
    model_max_length where there is no table), not to the length the run trained at: inputs are
    scored whole unless the model cannot take them; ``max_len_source`` says which applied, and
    ``run_max_len`` is the run's (pass it to reproduce the run's own metrics.json). ``batch_size``
    defaults to the run's. With ``out_dir``, ``metrics-<split>.json`` and ``predictions-<split>.jsonl``
    are written there. Returns the metrics plus what was used: examples, max_len, max_len_source,
    run_max_len, batch_size, truncated, adapter.
    ``task="humaneval"`` scores pass@1 of greedy completions instead (``deltatune.tasks.humaneval``;
    ``max_eval``: the first N problems).
    ``recycle`` (default: as the run was trained) scores from the cache of the frozen lower blocks.
    """
    if task == "humaneval":
        from deltatune.tasks import humaneval
        return humaneval.evaluate(model=None, adapter=adapter_dir, limit=max_eval, batch_size=batch_size or 8,
                                  out_dir=out_dir)
    adapter_dir = resolve_adapter(adapter_dir)
    run_json = _run_json_of(adapter_dir)
    cfg = _config_from(_read_run_json(run_json), run_json)
    run_max_len = cfg.max_len
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
    source = "--max-len"
    if max_len is None:  # the whole input: as long as the model takes (dynamic padding: short inputs cost no more)
        longest, source = _longest_input(cfg, model, task.kind, tokenizer)
        cfg = dataclasses.replace(cfg, max_len=max(2, longest))
    objective = OBJECTIVES[task.kind](tokenizer, cfg)
    examples = objective.encode(rows, train=False)
    truncated = objective.truncated
    objective.warn_truncated(stacklevel=2)
    model.to(cfg.device)
    if cfg.recycle if recycle is None else recycle:  # the frozen lower blocks' output from the cache (built once)
        from deltatune.analysis import recycle as recycling
        objective, examples = recycling.prepare(dataclasses.replace(cfg, recycle=True), model, objective, {split: examples})
        examples = examples[split]
    metrics, records = _score(model, objective, examples, task, split, cfg)
    result = {"task": task.name, "split": split, "metric": task.metric, "value": metrics[task.metric], **metrics,
              "examples": len(rows), "max_eval": max_eval, "max_len": cfg.max_len, "max_len_source": source,
              "run_max_len": run_max_len, "batch_size": cfg.batch_size,
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


def _zero_shot(cfg: TrainConfig, model, objective, examples, task) -> tuple[dict, list[dict], bool]:
    """The pretrained model's test score and predictions, and whether they came from the cache.

    A sweep scores the same pretrained model on the same test split in every run: the score is kept in
    ``cache_dir()/zero-shot/`` under a hash of everything it depends on (every parameter and buffer of
    the model, a classifier's seeded head included; the test examples; the tokenizer; max_len,
    max_new_tokens, batch_size, bf16 and the device type), so a hit is the score the run would compute.
    ``DELTATUNE_ZERO_SHOT_CACHE=0`` turns the cache off; an entry that cannot be read or written only
    costs the time of scoring.
    """
    use = os.environ.get("DELTATUNE_ZERO_SHOT_CACHE", "1") != "0"
    path = cache_dir() / "zero-shot" / f"{_zero_shot_key(cfg, model, objective, task)}.json" if use else None
    if path is not None:
        try:
            hit = json.loads(path.read_text())
            return hit["metrics"], hit["records"], True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    with torch.random.fork_rng(devices=[]):  # scoring leaves the run's random stream as it was, hit or miss
        metrics, records = _score(model, objective, examples, task, "test", cfg)
    if path is not None:
        try:
            atomic_write_json(path, {"metrics": metrics, "records": records, "model": cfg.model, "task": task.name})
        except (OSError, StorageError, TypeError, ValueError):
            pass
    return metrics, records, False


def _zero_shot_key(cfg: TrainConfig, model, objective, task) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    tok = objective.tokenizer
    digest.update(_scoring_code())
    digest.update(json.dumps(["zero-shot/1", task.name, task.metric, task.kind, getattr(task, "retrieval_pool", None),
                              type(tok).__name__, len(tok), cfg.max_len, cfg.max_new_tokens, cfg.batch_size,
                              bool(cfg.bf16),
                              torch.device(cfg.device).type, task.split("test")],
                             sort_keys=True, default=str).encode())
    hash_tensors(digest, {**dict(model.named_parameters()), **dict(model.named_buffers())})
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _scoring_code() -> bytes:
    """The source of what turns a model into a score (objectives, metrics, tasks): a change to it is
    a change of the score, so cached zero-shot scores from older code are not reused."""
    import hashlib

    root = Path(__file__).resolve().parent
    files = [root / "objectives.py", root / "metrics.py", root / "lengths.py", *sorted((root / "tasks").glob("*.py"))]
    return hashlib.blake2b(b"".join(f.read_bytes() for f in files if f.is_file()), digest_size=16).digest()


def _write_predictions(path: Path, records: list[dict], **extra) -> None:
    text = "".join(json.dumps({**extra, **r}, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))



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


def _resolved(cfg: TrainConfig, task) -> TrainConfig:
    """The config with its defaults filled in: lr, out_dir, device, bf16="auto", and the task name of a TaskData."""
    if isinstance(cfg.bf16, str) and cfg.bf16 == "auto":
        cfg = dataclasses.replace(cfg, bf16=native_bf16(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
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
    "bf16": ((bool,),), "grad_checkpointing": ((bool,),), "full_logits": ((bool,),), "deterministic": ((bool,),), "resume": ((bool,),),
    "json_log": ((bool,),), "progress": ((bool,),), "overwrite": ((bool,),),
    "out_dir": ((str, None),), "device": ((str, None),),
    "recycle": ((bool,),), "recycle_dtype": ((str,),), "nproc": ((int,), 1, distributed.MAX_PROCS),
    "fsdp": ((bool,),),
}


def _check_settings(cfg: TrainConfig) -> None:
    """Every field of ``cfg`` of its type and in its range (finite numbers); a ConfigError naming the first that is not."""
    for name, (types, *bounds) in _SETTINGS.items():
        value = getattr(cfg, name)
        if (value is None and None in types) or (name == "grad_checkpointing" and value == "auto"):
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
            kind += ' or "auto"' if name == "grad_checkpointing" else ""
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


def _longest_input(cfg: TrainConfig, model, kind: str, tokenizer) -> tuple[int, str]:
    """(the longest max_len that fits the model's positions, with the prompt tokens and generated tokens
    it also needs; where that came from). No position table (T5): the tokenizer's model_max_length, or
    else the run's max_len."""
    limit, prompt = _position_limit(model)
    new = cfg.max_new_tokens if kind == "generation" else 0
    if limit is not None:
        return limit - new - prompt, f"the model's maximum: {limit} positions" + (
            f" less {prompt} prompt tokens" if prompt else "") + (f" less max_new_tokens {new}" if new else "")
    known = getattr(tokenizer, "model_max_length", None)
    if isinstance(known, int) and 2 <= known < 1_000_000:
        return known, "the tokenizer's model_max_length"
    return cfg.max_len, "the run's max_len (the model states no maximum)"


def _position_limit(model) -> tuple[int | None, int]:
    """(the positions the model's table has, None for relative positions; the soft-prompt tokens attached)."""
    from deltatune.deltas import SoftPrompt
    from deltatune.sites import find_backbone

    _, backbone = find_backbone(model)
    limit = next((v for k in ("max_position_embeddings", "n_positions")
                  if isinstance(v := getattr(backbone.config, k, None), int) and not isinstance(v, bool)), None)
    offset = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    if limit is not None and isinstance(offset, int):  # RoBERTa-style position ids start after the padding index
        limit -= offset + 1
    return limit, sum(m.prompt.shape[0] for m in model.modules() if isinstance(m, SoftPrompt))


def _check_positions(cfg: TrainConfig, model, kind: str):
    """The longest input (max_len tokens, then max_new_tokens more when generating) plus the prompt
    tokens a method prepends fits in the model's positions; returns ``model``."""
    limit, prompt = _position_limit(model)
    if limit is None:  # relative positions (T5): no table to run off
        return model
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


def _check_batch_fits(cfg: TrainConfig, model, objective, examples) -> bool:
    """The largest micro-batch the run can meet (batch_size copies of its longest example) fits in
    memory and gives a finite loss, checked before out_dir changes and leaving the parameters, their
    gradients and every RNG as they were. Returns whether activation checkpointing is on.

    First the memory it needs is predicted without building it: the tensors autograd keeps for the
    backward pass, measured on batches of one and two copies, grow linearly with the batch. With
    grad_checkpointing="auto", checkpointing is turned on here when that passes AUTO_CHECKPOINT_BYTES
    (and measured again). A batch that cannot fit is refused there; one that may fit then runs one
    forward and backward pass.
    """
    longest = max(examples, key=_n_tokens)
    device = torch.device(cfg.device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    fix = "lower batch_size (--batch-size; grad_accum keeps the effective batch) or max_len (--max-len)"
    what = f"a batch of {cfg.batch_size} examples of up to {_n_tokens(longest)} tokens"

    def kept_for_backward(n: int) -> int:
        total = [0]

        def pack(t):  # counts; keeps nothing (a saved output packed as itself would be a cycle autograd never frees)
            total[0] += t.numel() * t.element_size()

        with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            batch = _to(objective.collate([longest] * n), cfg.device)
            with _autocast(cfg):
                objective.loss(model, batch)
        return total[0]

    def predicted() -> tuple[int, int]:
        """(bytes the batch keeps for backward, of which its own activations): linear in the batch, measured
        at 1 and 2 copies (a batch of one also counts the frozen weights linear layers keep a reference to)."""
        one, two = kept_for_backward(1), kept_for_backward(2)
        return one + (cfg.batch_size - 1) * max(two - one, 0), cfg.batch_size * max(two - one, 0)

    model.train()
    need, activations = predicted()
    checkpointing = cfg.grad_checkpointing is True
    if cfg.grad_checkpointing == "auto" and activations > AUTO_CHECKPOINT_BYTES:
        before = activations
        _enable_checkpointing(model)
        (need, _), checkpointing = predicted(), True
        if distributed.is_rank0():
            print(f"{what} keeps about {before / 2**30:.3g} GiB of activations for the backward pass: recomputing "
                  f"them there instead (grad_checkpointing='auto', over {AUTO_CHECKPOINT_BYTES / 2**30:g} GiB; about "
                  f"{need / 2**30:.3g} GiB kept; the same losses, more time per step; --grad-checkpointing off "
                  "turns it off)", file=sys.stderr)
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
    return checkpointing


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


def native_bf16(device: str, cpu_flags: str | None = None) -> bool:
    """Does ``device`` compute bfloat16 natively? A GPU that supports it; a CPU with AVX512-BF16 or AMX-BF16
    (x86) or the BF16 extension (ARM), read from /proc/cpuinfo (``cpu_flags`` stands in for it in tests).
    Elsewhere (no such flags, or no /proc/cpuinfo) bf16 would be emulated and slower: fp32 is kept."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if torch.device(device).type != "cpu":
        return False
    if cpu_flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpu_flags = next((line.split(":", 1)[1] for line in f if line.startswith(("flags", "Features"))), "")
        except OSError:
            return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(cpu_flags.split()))


def _autocast(cfg: TrainConfig):
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)


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
