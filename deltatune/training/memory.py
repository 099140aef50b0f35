"""What a run asks of the machine and the model: the batch-fit check (memory and a finite first loss),
activation checkpointing, bf16 autocast, deterministic algorithms, and the model's position table.
"""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

from ..errors import ConfigError
from ..tasks.kinds import get_kind
from . import distributed
from .config import TrainConfig
from ..tensors import autocast, to_device  # noqa: F401  (autocast: re-exported for the engine)


# grad_checkpointing="auto" recomputes activations in backward when the largest batch's activations kept for
# it would pass this (the batch-fit check measures them: batch_size x the growth per example): the memory of big causal-LM batches (SmolLM2 at batch 32,
# max_len 128: about 4 GiB -> 1 GiB), and nothing changes for small jobs. Same losses either way.
AUTO_CHECKPOINT_BYTES = 2 * 2**30


def n_tokens(example) -> int:
    """Tokens in one encoded example (a dict of token lists, or a tuple holding such dicts)."""
    if isinstance(example, dict):
        return len(example.get("input_ids", ()))
    if isinstance(example, (tuple, list)):
        return sum(n_tokens(part) for part in example if isinstance(part, (dict, tuple, list)))
    return 0


def check_batch_fits(cfg: TrainConfig, model, objective, examples) -> bool:
    """The largest micro-batch the run can meet (batch_size copies of its longest example) fits in
    memory and gives a finite loss, checked before out_dir changes and leaving the parameters, their
    gradients and every RNG as they were. Returns whether activation checkpointing is on.

    First the memory it needs is predicted without building it: the tensors autograd keeps for the
    backward pass, measured on batches of one and two copies, grow linearly with the batch. With
    grad_checkpointing="auto", checkpointing is turned on here when that passes AUTO_CHECKPOINT_BYTES
    (and measured again). A batch that cannot fit is refused there; one that may fit then runs one
    forward and backward pass.
    """
    longest = max(examples, key=n_tokens)
    device = torch.device(cfg.device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    fix = "lower batch_size (--batch-size; grad_accum keeps the effective batch) or max_len (--max-len)"
    what = f"a batch of {cfg.batch_size} examples of up to {n_tokens(longest)} tokens"
    from tqdm.auto import tqdm

    # Passes of 1 and 2 copies (the prediction), then the whole batch forward and backward: a large model's
    # check takes minutes on a CPU (SmolLM2 at batch 32: about 2.5), so it shows where it is.
    bar = tqdm(total=3, desc=f"batch-fit check: {what}", unit="pass", disable=not cfg.progress, file=sys.stderr,
               dynamic_ncols=True, leave=False)

    def kept_for_backward(n: int) -> int:
        total = [0]

        def pack(t):  # counts; keeps nothing (a saved output packed as itself would be a cycle autograd never frees)
            total[0] += t.numel() * t.element_size()

        with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            batch = to_device(objective.collate([longest] * n), cfg.device)
            with autocast(cfg):
                objective.loss(model, batch)
        bar.update()
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
        enable_checkpointing(model)
        bar.total += 2  # measured again with checkpointing on
        (need, _), checkpointing = predicted(), True
        if distributed.is_rank0():
            print(f"{what} keeps about {before / 2**30:.3g} GiB of activations for the backward pass: recomputing "
                  f"them there instead (grad_checkpointing='auto', over {AUTO_CHECKPOINT_BYTES / 2**30:g} GiB; about "
                  f"{need / 2**30:.3g} GiB kept; the same losses, more time per step; --grad-checkpointing off "
                  "turns it off)", file=sys.stderr)
    free = free_memory(cfg.device)
    if free is not None and need > free:
        bar.close()
        raise ConfigError(f"{what} needs about {need / 2**30:.3g} GiB for its activations, more than the "
                          f"{free / 2**30:.3g} GiB free on {cfg.device}; {fix}")
    try:
        with torch.random.fork_rng(devices=devices):
            batch = to_device(objective.collate([longest] * cfg.batch_size), cfg.device)
            with autocast(cfg):
                loss = objective.loss(model, batch)
            loss.backward()
            value = loss.item()
            bar.update()
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, MemoryError) or "memory" in text.lower():
            raise ConfigError(f"{what} does not fit in memory on {cfg.device} ({text[:120]}); {fix}") from None
        raise
    finally:
        bar.close()
        batch = loss = None
        for p in model.parameters():
            p.grad = None
    if not math.isfinite(value):
        raise ConfigError(f"the first batch gives a loss of {value} before any training: the method's options "
                          f"({cfg.method} {cfg.options}) make the model's outputs non-finite; choose smaller values")
    return checkpointing


def free_memory(device: str) -> int | None:
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


def enable_checkpointing(model) -> None:
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


@contextlib.contextmanager
def deterministic(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def longest_input(cfg: TrainConfig, model, kind, tokenizer) -> tuple[int, str]:
    """(the longest max_len that fits the model's positions, with the prompt tokens and generated tokens
    it also needs; where that came from). No position table (T5): the tokenizer's model_max_length, or
    else the run's max_len."""
    limit, prompt = position_limit(model)
    new = get_kind(kind).new_tokens(cfg)  # generation: max_new_tokens
    if limit is not None:
        return limit - new - prompt, f"the model's maximum: {limit} positions" + (
            f" less {prompt} prompt tokens" if prompt else "") + (f" less max_new_tokens {new}" if new else "")
    known = getattr(tokenizer, "model_max_length", None)
    if isinstance(known, int) and 2 <= known < 1_000_000:
        return known, "the tokenizer's model_max_length"
    return cfg.max_len, "the run's max_len (the model states no maximum)"


def position_limit(model) -> tuple[int | None, int]:
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


def check_positions(cfg: TrainConfig, model, kind):
    """The longest input (max_len tokens, then max_new_tokens more when generating) plus the prompt
    tokens a method prepends fits in the model's positions; returns ``model``."""
    limit, prompt = position_limit(model)
    if limit is None:  # relative positions (T5): no table to run off
        return model
    new = get_kind(kind).new_tokens(cfg)  # generation: max_new_tokens
    if cfg.max_len + new + prompt > limit:
        parts = f"max_len {cfg.max_len}" + (f" + max_new_tokens {new}" if new else "") + (
            f" + {prompt} prompt tokens of {cfg.method}" if prompt else "")
        total = f" = {cfg.max_len + new + prompt}" if new or prompt else ""
        fix = f"lower max_len (--max-len) to {limit - new - prompt}" if limit - new - prompt >= 2 else "shorten the prompt"
        raise ConfigError(f"{parts}{total} positions are more than the {limit} that {cfg.model} has; {fix}")
    return model
