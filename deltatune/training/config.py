"""A run's configuration: :class:`TrainConfig`, its declared settings, and the one validator.

Every field is checked here, for a config from the API or the CLI and for one read back from
``run.json``; ``resolved`` fills in the defaults that depend on the machine and the method.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

import deltatune as dt
from ..errors import ConfigError
from ..names import slug
from . import distributed

COUNT = 2**53  # counts stay exact in JSON (a double)


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
RESUMABLE_CHANGES = {"resume", "stop_after", "log_every", "json_log", "progress", "out_dir", "device", "lr", "max_grad_norm",
                      "overwrite", "nproc", "fsdp", "full_logits", "grad_checkpointing"}


def resolved(cfg: TrainConfig, task) -> TrainConfig:
    """The config with its defaults filled in: lr, out_dir, device, bf16="auto", and the task name of a TaskData."""
    if isinstance(cfg.bf16, str) and cfg.bf16 == "auto":
        cfg = dataclasses.replace(cfg, bf16=native_bf16(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    check_settings(cfg)
    task_name = task.name if task is not None else cfg.task
    return dataclasses.replace(
        cfg,
        task=task_name,
        options=dict(cfg.options),
        lr=cfg.lr if cfg.lr is not None else dt.method_info(cfg.method)["lr"],
        out_dir=str(cfg.out_dir or f"runs/{slug(cfg.model)}-{slug(task_name)}-{slug(cfg.method)}-s{cfg.seed}"),
        device=cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )


# The type and range of every TrainConfig field, checked in one place for a config from the API or the
# CLI and for one read back from run.json: (types, lowest, highest); None in types: may be None.
SETTINGS = {
    "model": ((str,),), "task": ((str,),), "method": ((str,),), "options": ((dict,),),
    "max_steps": ((int,), 1, COUNT), "batch_size": ((int,), 1, COUNT), "grad_accum": ((int,), 1, COUNT),
    "eval_every": ((int,), 1, COUNT), "log_every": ((int,), 1, COUNT), "max_len": ((int,), 2, COUNT),
    "max_new_tokens": ((int,), 1, COUNT), "seed": ((int,), 0, 2**32 - 1),  # NumPy's seeds
    "early_stop_patience": ((int, None), 1, COUNT), "max_train": ((int, None), 1, COUNT),
    "max_eval": ((int, None), 1, COUNT), "stop_after": ((int, None), 1, COUNT),
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


def check_settings(cfg: TrainConfig) -> None:
    """Every field of ``cfg`` of its type and in its range (finite numbers); a ConfigError naming the first that is not."""
    for name, (types, *bounds) in SETTINGS.items():
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
