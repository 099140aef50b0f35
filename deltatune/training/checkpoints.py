"""Checkpoints of the training loop: what a resumable state holds (adapter, optimizer, data position,
update-rule state; no pickle), how it is written atomically, and how a saved trainer.json is
validated field by field before a run resumes from it.
"""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

import deltatune as dt
from deltatune.errors import AdapterFileError, StorageError
from deltatune import storage
from deltatune.storage import atomic_write_bytes, atomic_write_json
from .config import COUNT, TrainConfig






# Where a run an --overwrite replaces is kept until the new run's first checkpoint (see outdir.restore_replaced).
REPLACED = ".replaced"


def save_checkpoint(out: Path, model, optimizer, names, state, rule=None) -> None:
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
        kept = latest_checkpoint(out)
        where = f"the last good checkpoint is kept at {kept}" if kept else "no earlier checkpoint exists"
        raise StorageError(f"the checkpoint of step {state['step']} was not saved: {err}. {where}; once that is "
                           "fixed, run again with resume") from None
    for old in checkpoints(out):  # only once the new one is complete
        if old != path:
            storage.remove_dir(old)
    storage.remove_dir(out / REPLACED)  # this run can be resumed now: the run an --overwrite replaced goes


def load_checkpoint(path: Path, optimizer, names, cfg: TrainConfig, rule=None) -> dict:
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
        _check_trainer_json(meta, step_of(path), cfg, optimizer.param_groups[0])
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
        "step": (lambda v: v == step and whole(v, 1, COUNT), f"{step}, the step of its directory"),
        "consumed": (lambda v: whole(v, 0, COUNT) and v == step * cfg.batch_size * cfg.grad_accum,
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


def checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"  # real folders only: a link is never followed (RunFolder refuses them anyway)
    found = [p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name) and storage.is_dir(p)] if storage.is_dir(folder) else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[1]) if checkpoint else 0


# ------------------------------------------------------------------------------------ setup
