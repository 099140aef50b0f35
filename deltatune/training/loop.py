"""The one training loop: optimizer steps over a seeded, resumable data order, validation that keeps
the best adapter, checkpoints, and the loss read back from the device every few steps.
"""
from __future__ import annotations

import math
import random
import sys
import time
from functools import lru_cache

import numpy as np
import torch

import deltatune as dt
from .. import storage
from ..errors import ConfigError, StorageError, TrainingError
from ..tensors import to_device
from . import distributed
from .checkpoints import latest_checkpoint, save_checkpoint
from .config import TrainConfig
from . import scoring
from .memory import autocast
from .runs import PREDICTIONS, write_predictions


def run_loop(cfg, model, optimizer, names, objective, data, task, state, log, out, rule=None, phases=None) -> str:
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
    with progress_bar(cfg, state["step"]) as bar:
        while state["step"] < stop_at:
            step = state["step"] + 1  # steps count from 1
            lr = cfg.lr * lr_factor(step - 1, cfg.max_steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss = optimizer_step(cfg, model, optimizer, params, objective, data["train"], order, rule, step)
            seconds = time.perf_counter() - t0
            state.update(step=step, consumed=order.consumed, train_seconds=state["train_seconds"] + seconds)
            state["step_seconds"].append(seconds)
            examples, seconds_here = examples + cfg.batch_size * cfg.grad_accum, seconds_here + seconds
            pending.append((step, loss, lr))
            bar.update()

            validating = step % cfg.eval_every == 0 or step == cfg.max_steps
            if validating or step % cfg.log_every == 0 or step == stop_at:
                shown.update({"loss": f"{read_losses(pending, log, out):.4f}",
                              "ex/s": f"{examples / seconds_here:.1f}"})
            if validating:  # on rank 0, which tells the others the outcome (state: best, early stopping)
                t0 = time.perf_counter()
                value = distributed.rank0(lambda: validate(cfg, model, objective, data, task, state, log, out), state,
                                          others=lambda: data["valid"] and scoring.score(model, objective, data["valid"], task, "valid", cfg))
                phases["validate"] = phases.get("validate", 0.0) + time.perf_counter() - t0
                if value is not None:
                    shown[task.metric] = f"{value:.4f}"
                model.train()
            bar.set_postfix(shown, refresh=False)
            if validating or step == stop_at:
                t0 = time.perf_counter()
                distributed.rank0(lambda: save_checkpoint(out, model, optimizer, names, state, rule))
                phases["checkpoint"] = phases.get("checkpoint", 0.0) + time.perf_counter() - t0
            if cfg.early_stop_patience is not None and state["bad_evals"] >= cfg.early_stop_patience:
                return "early-stop"
    return "done" if state["step"] == cfg.max_steps else "interrupted"


def optimizer_step(cfg, model, optimizer, params, objective, examples, order, rule=None, step=0) -> torch.Tensor:
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
            batch = to_device(objective.collate([examples[i] for i in order.take(cfg.batch_size)]), cfg.device)
            with autocast(cfg):
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


def validate(cfg, model, objective, data, task, state, log, out) -> float | None:
    """Score the validation split and keep the best adapter in out/best; returns the metric."""
    metrics, records = scoring.score(model, objective, data["valid"], task, "valid", cfg) if data["valid"] else ({}, [])
    write_predictions(out / PREDICTIONS["valid"], records, step=state["step"])  # the latest validation's
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


def read_losses(pending: list, log, out) -> float:
    """Read the pending losses back in one sync, log them, and stop on the first NaN/Inf."""
    values = torch.stack([loss for _, loss, _ in pending]).float().tolist()
    for (step, _, lr), value in zip(pending, values):
        if not math.isfinite(value):
            kept = latest_checkpoint(out)
            where = f"the last good checkpoint is kept at {kept}" if kept else "no checkpoint was written before it"
            raise TrainingError(
                f"the loss became {value} at step {step} (lr {lr:.3g}); {where}. Lower the learning rate "
                "(lr) or clip gradients harder (max_grad_norm), then run again; with resume=True the run "
                "goes on from that checkpoint"
            )
        log.write({"step": step, "loss": value, "lr": lr})
    pending.clear()
    return values[-1]


def lr_factor(step: int, max_steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``max_steps`` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup))


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
            chunk = permutation(self.n, self.seed, epoch)[pos:pos + k - len(out)]
            out += chunk
            self.consumed += len(chunk)
        return out


@lru_cache(maxsize=4)
def permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def progress_bar(cfg: TrainConfig, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, disable=not cfg.progress, file=sys.stderr,
                unit="step", dynamic_ncols=True, desc=f"{cfg.method} {cfg.task}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device
