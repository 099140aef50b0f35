"""The one training loop, for every method and every task kind.

    from deltatune.train import TrainConfig, train, evaluate
    summary = train(TrainConfig(model="minilm", task="code-search", method="lora", out_dir="runs/x"))
    evaluate("runs/x/best")                    # scores the best adapter on the test split again

Methods change nothing here: ``dt.attach`` freezes the base and the optimizer takes every
parameter that requires grad. Task kinds differ in their objectives (``deltatune.tasks.kinds``: how
examples are tokenised, the loss, the predictions the task scores); resumable state is written and
validated by ``checkpoints.py``; run folders and durable writes are ``storage.py``'s.

``out_dir`` holds ``run.json`` (the TrainConfig, for ``evaluate`` and ``resume``), ``log.jsonl`` (one
object per step and per evaluation), ``checkpoints/step-N/`` (the latest resumable state, no pickle),
``best/`` (the best adapter on the validation split) and ``metrics.json`` (what ``train`` returns).
"""
from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

import deltatune as dt
from ..errors import ConfigError, DataError
from ..storage import RunFolder, atomic_write_json
from .. import updates
from ..tensors import to_device
from . import distributed, privacy
from .checkpoints import latest_checkpoint, load_checkpoint, step_of
from .config import TrainConfig, resolved
from . import scoring
from .scoring import load_task
from .loop import run_loop, seed_everything
from .memory import autocast, check_batch_fits, check_positions, deterministic, enable_checkpointing, peak_rss_mb
from ..quantize import quantize_base
from ..tasks.kinds import build_task_model, get_kind
from .outdir import Log, check_out_dir, finish_replacing, prepare_out_dir, restore_replaced
from .runs import PREDICTIONS, write_predictions


class ScaledAdamW(torch.optim.AdamW):
    """AdamW whose step gives some parameters a multiple of the learning rate (LoRA+: ``ratios`` maps
    id(parameter) to its multiple). It keeps the one parameter group the loop schedules and checkpoints
    save; only inside ``step`` is the group split by multiple, each part at lr x its multiple."""

    def __init__(self, params, ratios: dict, **kwargs):
        super().__init__(params, **kwargs)
        self.ratios = ratios

    def step(self, closure=None):
        groups = self.param_groups
        split = []
        for group in groups:
            by_ratio: dict = {}
            for p in group["params"]:
                by_ratio.setdefault(self.ratios.get(id(p), 1.0), []).append(p)
            split += [{**group, "params": ps, "lr": group["lr"] * ratio} for ratio, ps in by_ratio.items()]
        self.param_groups = split
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def train(cfg: TrainConfig, task=None) -> dict:
    """Train ``cfg.method`` on ``cfg.task`` (or on ``task``, an already loaded TaskData); returns the summary.

    The summary is also written to ``out_dir/metrics.json``. A run cut short by ``stop_after``
    returns ``{"stopped_at": step, ...}`` instead; ``resume=True`` then finishes it with the same result.
    """
    cfg = resolved(cfg, task)
    from .freeze import resolve_options
    cfg = resolve_options(cfg, task)  # telly k="auto": the freeze depth from a layer analysis (cached)
    if distributed.spawns(cfg):  # nproc > 1: that many processes, each running train(); rank 0's summary
        return distributed.spawn(train, cfg, task)
    with deterministic(cfg.deterministic), distributed.group(cfg) as cfg, distributed.folder(RunFolder, cfg.out_dir) as folder:
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

    checkpoint, restart = distributed.rank0(lambda: check_out_dir(folder, cfg))  # only rank 0 touches out_dir
    loads = checkpoint is not None and distributed.is_rank0()  # the other ranks take its tensors (distributed.sync)
    seed_everything(cfg.seed)
    task = task or load_task(cfg)
    if not task.train:
        raise DataError(f"task {task.name} has no training examples"
                        + (f" (max_train={cfg.max_train})" if cfg.max_train is not None else ""))
    kind = get_kind(task.kind)
    model, tokenizer = build_task_model(cfg.model, kind, len(task.labels or []))
    if cfg.quantize is not None:  # the base's linear layers in 4 or 8 bits; the adapter trains on top in float32
        if cfg.fsdp:
            raise ConfigError("--quantize with --fsdp: FSDP shards float weights, not bitsandbytes' quantized ones; "
                              "drop --fsdp (a quantized base is small enough to keep whole on every rank)")
        quantize_base(model, cfg.quantize)
    if kind.labelled and task.labels:  # saved with the adapter: deltatune serve names the classes
        model.label_names = list(task.labels)
    objective = kind(tokenizer, cfg)
    data = {split: objective.encode(task.split(split), train=split == "train") for split in ("train", "valid", "test")}
    objective.warn_truncated(stacklevel=3)  # at the caller of train()
    state = {"step": 0, "consumed": 0, "best_value": None, "best_step": None, "bad_evals": 0,
             "zero_shot_value": None, "train_seconds": 0.0, "step_seconds": []}
    lap("setup")

    zero_shot = None
    # The pretrained model before attach (a classifier: its untrained head); by rank 0, with the whole base.
    if checkpoint is None and data["test"] and cfg.score_test and distributed.is_rank0() and not distributed.sharded(cfg):
        with torch.random.fork_rng(devices=[]):  # a method that does not fit fails before the scoring
            dt.detach(check_positions(cfg, dt.attach(model, cfg.method, **cfg.options), kind))
        zero_shot, zero_shot_records, state["zero_shot_cached"] = scoring.zero_shot(cfg, model.to(cfg.device), objective,
                                                                             data["test"], task)
        state["zero_shot_value"] = zero_shot[task.metric]
        lap("zero_shot")
    if not loads:
        dt.attach(model, cfg.method, **cfg.options)
    else:
        dt.load_adapter(model, checkpoint / "adapter")
    if cfg.frozen_dropout:  # the frozen lower layers keep training-mode dropout (telly as in its paper)
        dt.set_frozen_dropout(model, True)
    check_positions(cfg, model, kind)
    if cfg.grad_checkpointing is True:
        enable_checkpointing(model)
    distributed.shard_frozen(cfg, model)  # fsdp: each rank keeps its shard of the frozen base
    model.to(cfg.device)
    if cfg.recycle:  # the frozen lower part runs once; training and evaluation start from its cached output
        from . import recycle
        objective, data = recycle.prepare(cfg, model, objective, data)
    if cfg.compile:  # CUDA only (resolved() refuses it elsewhere); the module stays itself for saving and routing
        model.forward = torch.compile(model.forward)
    lap("setup")
    checkpointing = check_batch_fits(distributed.local(cfg), model, objective, data["train"])
    lap("batch_check")
    trainable, total = dt.count_parameters(model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    ratios = updates.lr_ratios(model, cfg.lora_plus_ratio)  # LoRA+: {id(B factor): ratio}; {} when 1
    optimizer = (ScaledAdamW(params, ratios, lr=cfg.lr, weight_decay=cfg.weight_decay) if ratios
                 else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    private = privacy.rule_for(cfg, kind, len(data["train"]), dict(zip(names, params)),
                               lambda b: to_device(b, cfg.device), lambda: autocast(cfg))
    rule = updates.build(model, dict(zip(names, params)), max_steps=cfg.max_steps, private=private)  # None: no hooks
    distributed.check_rule(rule)
    if loads:
        state = load_checkpoint(checkpoint, optimizer, names, cfg, rule)
    state = distributed.sync(model, optimizer, rule, state)
    distributed.rank0(lambda: prepare_out_dir(folder, cfg, checkpoint, restart))
    try:  # a run an --overwrite replaces is kept aside until this run's first checkpoint: it comes back if this run fails first
        log = Log(out / "log.jsonl" if cfg.json_log and distributed.is_rank0() else None, keep_until=step_of(checkpoint))
        if zero_shot is not None:
            for stale in PREDICTIONS.values():  # a fresh run: the previous run's predictions go with its metrics
                (out / stale).unlink(missing_ok=True)
            write_predictions(out / PREDICTIONS["zero-shot"], zero_shot_records)
            log.write({"step": 0, "split": "test", "zero_shot": True, **zero_shot})

        lap("setup")
        ended = run_loop(cfg, model, optimizer, names, objective, data, task, state, log, out, rule, phases)
        lap("train")
        phases["train"] -= phases.get("validate", 0.0) + phases.get("checkpoint", 0.0)
        if ended == "interrupted":  # stop_after: a pause, to go on from its checkpoint
            if distributed.is_rank0():
                restore_replaced(out, "this run stopped (stop_after) before its first checkpoint")
            return {"stopped_at": state["step"], "max_steps": cfg.max_steps, "out_dir": str(out),
                    "checkpoint": str(distributed.rank0(lambda: latest_checkpoint(out)))}
        if not distributed.is_rank0():
            return distributed.result(None)  # rank 0's summary, once it has scored the best adapter
        rule_metrics = rule.metrics() if rule is not None else {}  # e.g. the privacy budget spent
        # the test score comes from the saved best adapter, exactly as evaluate() sees it; every reference to the
        # trained model goes first (params and the rules hold its trainable tensors, whose .grad is the size of them)
        optimizer.zero_grad(set_to_none=True)
        del model, optimizer, params, private, rule
        gc.collect()  # hooks and stores refer back to their modules: the model is a cycle, freed by the collector
        test = {}  # score_test=False (a sweep's trial): the test split stays out of the run
        if cfg.score_test:
            best, _ = scoring.restore(cfg, task, out / "best")
            test, records = scoring.score(best.to(cfg.device), objective, data["test"], task, "test", cfg)
            write_predictions(out / PREDICTIONS["test"], records)
            log.write({"step": state["step"], "split": "test", "best_step": state["best_step"], **test})
            lap("test")
        summary = {
            "method": cfg.method, "task": task.name, "model": cfg.model, "metric": task.metric,
            "value": test.get(task.metric), "zero_shot_value": state["zero_shot_value"],
            "zero_shot_cached": state.get("zero_shot_cached", False),
            "trainable_params": trainable, "total_params": total, "train_seconds": state["train_seconds"],
            "step_seconds_median": statistics.median(state["step_seconds"]), "peak_rss_mb": peak_rss_mb(),
            "steps": state["step"], "max_steps": cfg.max_steps, "stopped_early": state["step"] < cfg.max_steps,
            "best_step": state["best_step"], "valid_value": state["best_value"], "seed": cfg.seed, "lr": cfg.lr,
            "phase_seconds": {k: round(v, 3) for k, v in phases.items()}, "grad_checkpointing": checkpointing,
            "batch_size": cfg.batch_size, "options": cfg.options, "out_dir": str(out), "adapter_dir": str(out / "best"),
            "predictions_file": str(out / PREDICTIONS["test"]) if cfg.score_test else None,
            "zero_shot_predictions_file": str(out / PREDICTIONS["zero-shot"]) if state["zero_shot_value"] is not None else None,
        }
        summary.update(rule_metrics)
        summary.update({k: v for k, v in test.items() if k not in summary})
        atomic_write_json(out / "metrics.json", summary)
        finish_replacing(out)
        return distributed.result(summary)
    except BaseException:
        if distributed.is_rank0():
            restore_replaced(out, "this run stopped with an error")
        raise
