"""A run's configuration: :class:`TrainConfig`, its declared settings, and the one validator.

Every field is checked here, for a config from the API or the CLI and for one read back from
``run.json``; ``resolved`` fills in the defaults that depend on the machine and the method.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

import deltatune as dt
from ..errors import ConfigError
from ..names import slug
from .. import settings
from ..settings import setting
from . import distributed

COUNT = 2**53  # counts stay exact in JSON (a double)


@dataclass
class TrainConfig:
    """Every setting of a run, declared once: its type (the annotation), range, default and help. The CLI's
    `train` and `bench` flags are generated from these declarations (``settings.add_flags``), and
    :func:`check_settings` checks them once per run (also for a config read back from ``run.json``)."""

    model: str = setting("minilm", flag=False, help="minilm, smollm2, tiny-<family>, a local folder or a cached HF id")
    task: str = setting("code-search", flag=False, help="a task name or data path, see deltatune.tasks.load_task")
    method: str = setting("lora", flag=False, help="a registered method")
    options: dict = setting({}, flag=False, help='method options, e.g. {"r": 16, "sites": ["attn.q", "attn.v"]}')
    max_steps: int = setting(200, min=1, max=COUNT, help="optimizer steps")
    batch_size: int = setting(32, min=1, max=COUNT, help="examples per micro-batch (with --nproc: the global batch)")
    grad_accum: int = setting(1, min=1, max=COUNT, help="micro-batches per optimizer step (a bigger effective batch "
                                                         "in the memory of one)")
    lr: float | None = setting(None, min=0.0, max=10.0, metavar="LR",  # 10: room for any sweep, refuses overflows
                               default_text="the method's own, see `deltatune methods`", help="learning rate")
    weight_decay: float = setting(0.0, min=0.0, max=1e6, help="AdamW weight decay")
    lora_plus_ratio: float = setting(1.0, min=1e-3, max=1e4, help="LoRA+: train the B factors (the method's "
                                     "faster_parameters) at this multiple of lr; 1 is plain training (Hayou et al. "
                                     "2024 suggest 16)")
    warmup_ratio: float = setting(0.1, min=0.0, max=1.0, help="linear warm-up over this share of the steps, "
                                                              "then linear decay to 0")
    max_grad_norm: float | None = setting(1.0, min=0.0, max=1e12, help="gradient clipping norm; 0 turns it off")
    eval_every: int = setting(50, min=1, max=COUNT, help="validate (and checkpoint) every N steps and at the end")
    early_stop_patience: int | None = setting(None, min=1, max=COUNT,
                                              default_text="off", help="stop after N validations without improvement")
    seed: int = setting(0, min=0, max=2**32 - 1, flag=False, help="random seed")  # NumPy's seeds
    max_len: int = setting(128, min=2, max=COUNT, help="tokens per input; longer inputs are truncated (one warning)")
    max_new_tokens: int = setting(64, min=1, max=COUNT, help="generation tasks: greedy decoding length limit")
    score_rows: int | None = setting(None, min=1, max=COUNT,
                                     help="generation tasks: prompts decoded together over one key/value cache when "
                                          "scoring (default: 4 x batch size, at most 32; a decode step reads every "
                                          "weight once for all its rows)")
    bf16: bool | str = setting(False, choices=(True, False, "auto"),
                               help="bfloat16 autocast: on (the bare flag), off, or auto (on where the device "
                                    "computes bf16 natively; emulated bf16 is many times slower)")
    grad_checkpointing: bool | str = setting("auto", choices=(True, False, "auto"),
                                             help="recompute activations in the backward pass to save memory: on "
                                                  "(the bare flag), off, or auto (on when the largest batch would keep "
                                                  "over 2 GiB of activations; the same losses either way)")
    quantize: str | None = setting(None, choices=("nf4", "fp4", "int8"), metavar="nf4|fp4|int8",
                                   default_text="off: a float32 base",
                                   help="hold the base's linear layers quantized (bitsandbytes; nf4 is QLoRA's 4-bit "
                                        "type) and train the adapter on top in float32; methods that train "
                                        "quantized weights are refused (docs/performance.md)")
    compile: bool = setting(False, help="torch.compile the model's forward pass for training, on a CUDA device; "
                                        "refused on a CPU, where inductor's training step measured 0.87-0.91x the eager "
                                        "speed (docs/performance.md, \"What profiling taught us\")")
    full_logits: bool = setting(False, help="generation: compute the LM head at every position (default: only "
                                            "where labels count, in chunks)")
    frozen_dropout: bool = setting(False, help="keep dropout on in frozen lower layers (telly: the paper's behaviour; "
                                               "default off: a fixed feature extractor)")
    deterministic: bool = setting(False, flag=False, help="torch.use_deterministic_algorithms(True, warn_only=True)")
    max_train: int | None = setting(None, min=1, max=COUNT, default_text="all", help="use at most N training examples")
    max_eval: int | None = setting(None, min=1, max=COUNT, default_text="all", help="use at most N validation/test examples")
    out_dir: str | None = setting(None, flag=False, help="None: runs/<model>-<task>-<method>-s<seed>")
    resume: bool = setting(False, help="continue from the checkpoint in the output directory")
    stop_after: int | None = setting(None, min=1, max=COUNT, flag=False,
                                     help="stop (with a checkpoint) after N steps in this call; resume continues")
    log_every: int = setting(10, min=1, max=COUNT, flag=False,
                             help="read the loss back from the device every N steps (one sync)")
    json_log: bool = setting(True, flag=False, help="write log.jsonl")
    progress: bool = setting(True, flag=False, help="progress bars on stderr")
    device: str | None = setting(None, flag=False, help="None: cuda if available, else cpu")
    overwrite: bool = setting(False, help="replace the previous run in the output directory (else it is refused)")
    recycle: bool = setting(False, help="run the frozen lower blocks once and train from their cached output "
                                        "(embedding recycling)")
    recycle_dtype: str = setting("float32", help="the recycling cache's dtype: float32 (exact), float16 or bfloat16")
    dp_epsilon: float | None = setting(None, min=1e-6, max=1e6, default_text="off, not private",
                                       help="train with differential privacy (DP-SGD) to this epsilon")
    dp_delta: float | None = setting(None, min=1e-300, max=0.999999, default_text="the largest power of ten at most 1/(10 N), N training examples; docs/privacy.md",
                                     help="DP delta")
    dp_clip: float | None = setting(None, min=1e-12, max=1e12, default_text="1.0",
                                    help="DP per-example gradient norm bound C")
    nproc: int = setting(1, min=1, max=distributed.MAX_PROCS,
                         help="data-parallel processes on this machine (gloo on CPU, NCCL on GPUs); --batch-size "
                              "stays the global batch and must divide by N. Or run under `torchrun --nproc_per_node N "
                              "-m deltatune train`")
    fsdp: bool = setting(False, help="with several processes: shard the frozen base's weights over them (FSDP), for "
                                     "bases too large for one device")
    score_test: bool = setting(True, flag=False,
                               help="score the test split (the base model before training, the best adapter at the "
                                    "end); False keeps the test split out of the run (a sweep's trials, chosen on "
                                    "validation): the summary's value is then None")


# Fields that may differ between a run and its resumption without changing the result.
# lr and max_grad_norm may change too: the way to go on after a NaN loss.
RESUMABLE_CHANGES = {"resume", "stop_after", "log_every", "json_log", "progress", "out_dir", "device", "lr", "max_grad_norm",
                      "overwrite", "nproc", "fsdp", "full_logits", "grad_checkpointing", "compile"}


def resolved(cfg: TrainConfig, task) -> TrainConfig:
    """The config with its defaults filled in: lr, out_dir, device, bf16="auto", and the task name of a TaskData."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(cfg.bf16, str) and cfg.bf16 == "auto":
        cfg = dataclasses.replace(cfg, bf16=native_bf16(device))
    elif cfg.bf16 is True and not native_bf16(device):
        warn_emulated_bf16(device)
    check_settings(cfg)
    if cfg.compile and not device.startswith("cuda"):
        raise ConfigError(f"--compile on {device}: torch.compile's training step on a CPU measured 0.87-0.91x the eager "
                          "speed here (LoRA, (IA)^3, the bottleneck adapters; the frozen model alone is slower too: "
                          "docs/performance.md, \"What profiling taught us\"), so it would only cost time; drop "
                          "--compile (it is for CUDA devices)")
    task_name = task.name if task is not None else cfg.task
    return dataclasses.replace(
        cfg,
        task=task_name,
        options=dict(cfg.options),
        lr=cfg.lr if cfg.lr is not None else dt.method_info(cfg.method)["lr"],
        out_dir=str(cfg.out_dir if cfg.out_dir is not None else f"runs/{slug(cfg.model)}-{slug(task_name)}-{slug(cfg.method)}-s{cfg.seed}"),
        device=cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )


def check_settings(cfg: TrainConfig) -> None:
    """Every field of ``cfg`` of its declared type, range and choices; a ConfigError naming the first that is not."""
    settings.check(cfg)


def warn_emulated_bf16(device: str) -> None:
    """One warning per process (however many runs, resumes and evaluations resolve a config): bf16 on a device
    that would emulate it is many times slower than float32, not faster."""
    if device in _WARNED_BF16:
        return
    _WARNED_BF16.add(device)
    where = "this CPU has no native bfloat16 (no avx512_bf16, amx_bf16 or bf16 flag in /proc/cpuinfo)" \
        if torch.device(device).type == "cpu" else f"{device} does not compute bfloat16 natively"
    warnings.warn(f"--bf16: {where}, so bfloat16 would be emulated, many times slower than float32 (measured: "
                  "about 10x per step on SmolLM2); drop --bf16, or use --bf16 auto (bf16 only where it is native)",
                  stacklevel=3)


_WARNED_BF16: set = set()


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
