"""Data-parallel training: N processes, one global batch, the same result as one process.

    deltatune train ... --nproc 2                          # spawns 2 local processes itself
    torchrun --nproc_per_node 2 -m deltatune train ...     # or under torchrun (any --nnodes)
    train(TrainConfig(..., nproc=2))                       # the API; returns rank 0's summary

Every process holds the whole model and all the data, and takes its share of every global
micro-batch: ``batch_size`` stays the global batch (it must divide by N), rank r takes rows
[r*B/N, (r+1)*B/N) of the order one process would take, and the order and its position live in
the run, not in the processes, so a checkpoint resumes under any number of processes.

Gradients: each rank's loss is scaled to its share of the global loss (its examples, or for
generation its target tokens, over the global batch's), the backward passes run as in one
process, and once per optimizer step the gradients of the trainable parameters alone are summed
over the ranks in flat buckets (the frozen base has none to send). That is DDP's reduction,
done after the micro-batches rather than through DDP's autograd hooks, which assume one forward
per backward: retrieval encodes queries and code separately, and update rules (DPS) read the
gradients between backward and step. Retrieval gathers every rank's embeddings (this rank's keep
their graph), so the in-batch negatives are the whole global batch's, as in one process.

Only rank 0 touches ``out_dir``: it checks it, loads a checkpoint, validates, writes the log,
the checkpoints, the best adapter and metrics.json; the other ranks receive what it loaded
(adapter tensors, optimizer and update-rule state, RNG state, loop state) by broadcast, and the
outcome of what it decided (early stopping, errors) likewise. Dropout draws a per-rank stream
seeded from (seed, step, micro-batch, rank), so the shared RNG stream (what a checkpoint saves,
what DPS draws its masks from) stays the same on every rank. With dropout the result is the same
in distribution as one process, not the same numbers; without it, the same to rounding.

Refused with N > 1: private training (per-example clipping and its noise run in one process),
embedding recycling (its cache is built by one process), and an update rule that says it reads
what only one process has (``UpdateRule.refuses_processes``: SIFT's choice of entries from the first
gradient). DPS works: its masks come from the shared stream, its scores from the summed gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import queue as queues
import random
import socket
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

from deltatune.errors import ConfigError, DeltatuneError, TrainingError
from deltatune.tensors import autocast, to_device

MAX_PROCS = 1024
_BUCKET = 1 << 24  # elements per all-reduce: 64 MB of float32 at most, however large the model
_TIMEOUT = datetime.timedelta(hours=2)  # the other ranks wait while rank 0 validates or scores


# ------------------------------------------------------------------------------------ who am I


def _env_int(name: str, default: int, low: int, high: int, what: str,
             fix: str = "torchrun sets it, or unset it to train in one process") -> int:
    """torchrun's variable ``name`` as a whole number in [low, high]: a one-line ConfigError otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not (text.lstrip("-").isdigit() and len(text) < 12 and low <= int(text) <= high):
        raise ConfigError(f"{name}={text!r} must be a whole number in [{low}, {high}] ({what}); {fix}")
    return int(text)


def rank() -> int:
    """This process's rank (0 in one process; RANK under torchrun before the group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    world = size()
    return _env_int("RANK", 0, 0, world - 1, f"this process's place among WORLD_SIZE={world}")


def size() -> int:
    """The number of processes of the run (1 in one process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1, 1, 65536, "the number of processes of the run")


def is_rank0() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------------------------------ checks


def check(cfg, nproc: int) -> None:
    """What cannot run in ``nproc`` processes, as one ConfigError naming the fix (before any process starts)."""
    if nproc <= 1:
        return
    if cfg.batch_size % nproc:
        up = -(-cfg.batch_size // nproc) * nproc
        raise ConfigError(f"batch_size {cfg.batch_size} does not divide among {nproc} processes: each takes an equal "
                          f"share of the global batch; use --batch-size {up} (or another multiple of {nproc}), "
                          f"or --nproc that divides {cfg.batch_size}")
    if cfg.dp_epsilon is not None:
        raise ConfigError("private training (--dp-epsilon) runs in one process (its per-example clipping and noise "
                          "are not split across processes); drop --nproc")
    if cfg.recycle:
        raise ConfigError("--recycle builds its cache in one process; drop --nproc or --recycle")
    device = torch.device(cfg.device)
    local = _env_int("LOCAL_WORLD_SIZE", nproc, 1, 65536, "the processes on this machine")
    if device.type == "cuda" and local > torch.cuda.device_count():
        raise ConfigError(f"{local} processes on this machine need {local} GPUs, it has {torch.cuda.device_count()}; "
                          "lower --nproc, or train on the CPU (device='cpu')")


def check_rule(rule) -> None:
    """Update rules that read what only one process has are refused with N > 1 (each rule says so
    itself, and why, in ``refuses_processes``)."""
    if rule is None or not active():
        return
    for part in getattr(rule, "rules", [rule]):
        if part.refuses_processes:
            raise ConfigError(part.refuses_processes)


_SHARDED: list = []  # the modules shard_frozen sharded, while they train


def sharded(cfg) -> bool:
    return bool(cfg.fsdp) and active()


def shard_frozen(cfg, model) -> None:
    """fsdp: the frozen weights of every transformer block (and the rest) sharded over the ranks
    with FSDP2, all-gathered around each block's forward and backward; the trainable parameters
    stay whole on every rank (their gradients are summed by all_reduce_grads, as without fsdp)."""
    _SHARDED.clear()
    if not sharded(cfg):
        return
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(cfg.device).type, (size(),))
    trainable = {p for p in model.parameters() if p.requires_grad}
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    inner = {id(sub) for m in lists for child in m for sub in child.modules() if sub is not child}
    for blocks in lists:
        if id(blocks) not in inner:  # the outermost lists: the transformer's blocks
            for block in blocks:
                if any(not p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    _SHARDED.append(model)


def local(cfg):
    """The config as one rank sees its batches: batch_size is its share (for the memory check)."""
    return dataclasses.replace(cfg, batch_size=cfg.batch_size // size()) if active() else cfg


# ------------------------------------------------------------------------------------ the group


def spawns(cfg) -> bool:
    """Should train() start ``cfg.nproc`` processes itself (rather than be one of them)?"""
    inside = size()
    if inside > 1 and cfg.nproc > 1 and cfg.nproc != inside:
        raise ConfigError(f"nproc {cfg.nproc} inside a run of {inside} processes (torchrun started them); drop --nproc")
    return cfg.nproc > 1 and inside == 1


@contextlib.contextmanager
def group(cfg):
    """Join the process group when started as one of several processes (torchrun, or spawn()); yields
    the config this rank runs: its device (cuda:LOCAL_RANK), nproc = the number of processes,
    progress on rank 0 only. In one process: ``cfg`` unchanged."""
    world = size()
    if world <= 1:
        yield cfg
        return
    check(cfg, world)
    created = not dist.is_initialized()
    device = cfg.device
    if torch.device(device).type == "cuda":
        device = f"cuda:{_env_int('LOCAL_RANK', 0, 0, 65535, 'this process on its machine')}"
        torch.cuda.set_device(torch.device(device))
    if created:
        _check_rendezvous()
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo", timeout=_TIMEOUT)
    cfg = dataclasses.replace(cfg, nproc=world, device=device, progress=cfg.progress and rank() == 0)
    try:
        with warnings.catch_warnings():
            if rank():  # rank 0 says it once
                warnings.simplefilter("ignore")
            yield cfg
    finally:
        _SHARDED.clear()
        if created:
            dist.destroy_process_group()


def _check_rendezvous() -> None:
    """torchrun's environment names where the processes meet (MASTER_ADDR, MASTER_PORT); a port that is no port
    is refused here in one line, rather than as a traceback from inside torch.distributed."""
    rank()  # a RANK outside [0, WORLD_SIZE) would wait for ever for the others
    _env_int("LOCAL_RANK", 0, 0, 65535, "this process's place on its machine")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name, "").strip():
            raise ConfigError(f"WORLD_SIZE={size()} processes meet at MASTER_ADDR:MASTER_PORT, but {name} is not set; "
                              "start them with torchrun (which sets both), or set both (e.g. MASTER_ADDR=127.0.0.1 "
                              "MASTER_PORT=29500)")
    port = _env_int("MASTER_PORT", 0, 1, 65535, "the TCP port rank 0 listens on",
                    "set it to a free port, e.g. torchrun --master-port 29500 (or --rdzv-endpoint HOST:29500)")
    addr = os.environ["MASTER_ADDR"].strip()
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as err:
        raise ConfigError(f"MASTER_ADDR={addr!r} is not an address or a name this machine resolves ({err}); set it to "
                          "the host of rank 0 (torchrun --master-addr HOST)") from None


def folder(make, path):
    """Rank 0's run folder (``make(path)``); the other ranks get None and never touch ``path``."""
    return make(path) if is_rank0() else contextlib.nullcontext()


def rank0(fn, sync: dict | None = None, others=None):
    """``fn()`` on rank 0, its result (or its DeltatuneError) on every rank; ``sync`` (a dict) is
    made rank 0's on every rank afterwards. With a sharded base (fsdp) the other ranks run
    ``others()`` meanwhile: the same forward passes as rank 0, whose weights they hold shards of.
    In one process: ``fn()``."""
    if not active():
        return fn()
    box = [None]
    if others is not None and not is_rank0() and _SHARDED:
        others()
    if is_rank0():
        try:
            box[0] = ("ok", fn(), sync)
        except DeltatuneError as err:
            box[0] = ("error", type(err).__name__, str(err), None)
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, *rest = box[0]
    if kind == "error":
        raise _error(rest[0], rest[1])
    if sync is not None and not is_rank0():
        sync.clear()
        sync.update(rest[1])
    return rest[0]


def result(summary):
    """Rank 0's ``summary`` on every rank (the others pass None and wait for it)."""
    if not active():
        return summary
    box = [summary]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _error(name: str, message: str) -> Exception:
    from deltatune import errors

    kind = getattr(errors, name, None)
    return kind(message) if isinstance(kind, type) and issubclass(kind, DeltatuneError) else TrainingError(message)


# ------------------------------------------------------------------------------------ state


def sync(model, optimizer, rule, state: dict) -> dict:
    """Make every rank start where rank 0 does: the trainable parameters and the buffers, the
    optimizer's and the update rule's state, the RNG streams and the loop state (what rank 0 loaded
    from a checkpoint, or its fresh initialisation). Returns the loop state."""
    if not active():
        return state
    tensors = [p.data for p in model.parameters() if p.requires_grad] + list(model.buffers())
    for t in tensors:
        if t.dtype == torch.bool:  # not every backend sends booleans
            carrier = t.to(torch.uint8)
            dist.broadcast(carrier, src=0)
            t.copy_(carrier.bool())
        else:
            dist.broadcast(t, src=0)
    box = [None]
    if is_rank0():
        rngs = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state() if torch.device(_device(model)).type == "cuda" else None}
        box[0] = (optimizer.state_dict(), rule.state_dict() if rule is not None else {}, rngs, state)
    dist.broadcast_object_list(box, src=0)
    optim, rule_state, rngs, state = box[0]
    if not is_rank0():
        if optim["state"]:
            optimizer.load_state_dict(optim)
        if rule is not None:
            rule.load_state_dict(rule_state)
        torch.set_rng_state(rngs["torch"])
        random.setstate(rngs["python"])
        np.random.set_state(rngs["numpy"])
        if rngs["cuda"] is not None:
            torch.cuda.set_rng_state(rngs["cuda"])
    return state


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------ the step


def backward(cfg, model, params, objective, examples, order, step) -> torch.Tensor:
    """This rank's share of every micro-batch of the step, forward and backward, then the trainable
    gradients summed over the ranks; returns the step's global loss (as one process logs it)."""
    me, world = rank(), size()
    per = cfg.batch_size // world
    gathered = objective.in_batch
    loss = torch.zeros((), device=cfg.device)
    for micro in range(cfg.grad_accum):
        rows = [examples[i] for i in order.take(cfg.batch_size)]
        shards = [rows[r * per:(r + 1) * per] for r in range(world)]
        share = 1.0 if gathered else _share(objective, model, shards, me)
        batch = to_device(objective.collate(shards[me]), cfg.device)
        with _rank_rng(cfg, step, micro, me), autocast(cfg):
            value = objective.loss(_Gathered(model) if gathered else model, batch)
        (value * (share / cfg.grad_accum)).backward()
        # Every rank computes the whole retrieval loss (its gradient reaches only this rank's rows).
        loss = loss + value.detach().float() * ((1.0 / world if gathered else share) / cfg.grad_accum)
    return all_reduce_grads(params, loss)


def _share(objective, model, shards, me) -> float:
    """This rank's weight in the global micro-batch's loss: its target tokens over all ranks' for
    generation (the loss is a mean over target tokens), its examples over all ranks' otherwise."""
    counts = [objective.units(model, shard) for shard in shards]
    total = sum(counts)
    return counts[me] / total if total else 1.0 / len(shards)


class _Gathered:
    """``model(**inputs)`` returning every rank's rows in rank order (the global batch); this
    rank's rows keep their graph, the others' are constants here (their ranks backpropagate them)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        mine = self.model(**inputs)
        parts = [torch.empty_like(mine) for _ in range(size())]
        dist.all_gather(parts, mine.detach().contiguous())
        parts[rank()] = mine
        return torch.cat(parts)

    def __getattr__(self, name):
        return getattr(self.model, name)


@contextlib.contextmanager
def _rank_rng(cfg, step: int, micro: int, me: int):
    """Dropout's stream on this rank for this micro-batch, seeded from (seed, step, micro, rank); the
    shared stream is left as it was, so it stays the same on every rank."""
    device = torch.device(cfg.device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((((cfg.seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + me) % (2**63))
        yield


@torch.no_grad()
def all_reduce_grads(params, loss: torch.Tensor) -> torch.Tensor:
    """Sum ``.grad`` of ``params`` over the ranks in flat buckets (a parameter without a gradient on
    every rank keeps none, as in one process); returns ``loss`` summed likewise."""
    device = loss.device
    flags = torch.tensor([p.grad is not None for p in params] + [0.0], dtype=torch.float32, device=device)
    flags[-1] = loss.float()
    dist.all_reduce(flags)
    bucket, filled = [], 0
    for p in params:
        if bucket and (filled + p.numel() > _BUCKET or p.dtype != bucket[0].dtype or p.device != bucket[0].device):
            _reduce(bucket)
            bucket, filled = [], 0
        bucket.append(p)
        filled += p.numel()
    if bucket:
        _reduce(bucket)
    for p, flag in zip(params, flags[:-1].tolist()):
        if flag == 0:
            p.grad = None
    return flags[-1]


def _reduce(params) -> None:
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        part = flat[offset:offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)
        offset += p.numel()


# ------------------------------------------------------------------------------------ launching


def launch(fn, args: tuple, nproc: int, device: str = "cpu") -> list:
    """Run ``fn(*args)`` in ``nproc`` new local processes joined in one process group (gloo on the
    CPU, NCCL on GPUs, one GPU each); returns their results in rank order. The first failure ends
    the others and is raised here: a DeltatuneError as itself, anything else as a TrainingError."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
    results = ctx.Queue()
    port = _free_port()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, cores // nproc)
    shown = _warning_format()
    procs = [ctx.Process(target=_child, args=(r, nproc, port, threads, device, fn, args, results, shown), daemon=False)
             for r in range(nproc)]
    for p in procs:
        p.start()
    done, failed, finished = {}, {}, False
    try:
        while len(done) + len(failed) < nproc and not failed:
            try:
                r, kind, *payload = results.get(timeout=0.5)
            except queues.Empty:
                for r, p in enumerate(procs):
                    if p.exitcode is not None and r not in done and r not in failed:
                        try:  # what it sent before it ended may still be on its way
                            r2, kind, *payload = results.get(timeout=2)
                            (done if kind == "ok" else failed)[r2] = payload
                        except queues.Empty:
                            failed[r] = ["TrainingError", f"process {r} of {nproc} ended with exit code {p.exitcode} "
                                         "without a result (killed, or out of memory?)", ""]
                        break
                continue
            (done if kind == "ok" else failed)[r] = payload
        finished = True
    finally:
        for p in procs:  # a failure (or ^C here) ends the ranks still waiting on the failed one
            if p.is_alive() and (failed or not finished):
                p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if failed:
        first = min(failed, key=lambda r: (failed[r][0] not in _ERRORS, r))  # a DeltatuneError, lowest rank first
        name, message, trace = failed[first]
        if name in _ERRORS:
            raise _error(name, message)
        if os.environ.get("DELTATUNE_DEBUG"):  # the child's traceback, for whoever debugs deltatune itself
            sys.stderr.write(trace)
        where = " (DELTATUNE_DEBUG=1 prints its traceback)" if not os.environ.get("DELTATUNE_DEBUG") else ""
        raise TrainingError(f"process {first} of {nproc} failed: {name}: {' '.join(message.split())[:300]}{where}")
    return [done[r][0] for r in range(nproc)]


def _errors() -> set[str]:
    from deltatune import errors

    return {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, DeltatuneError)}


_ERRORS = _errors()


_DEFAULT_FORMATWARNING = warnings.formatwarning
_MESSAGE = "\x00message\x00"


def _warning_format() -> str | None:
    """How this process prints a warning, as a template a child process can take (the CLI's one line,
    ``deltatune train: warning: ...``); None where Python's own format is in use."""
    if warnings.formatwarning is _DEFAULT_FORMATWARNING:
        return None
    try:
        text = warnings.formatwarning(_MESSAGE, UserWarning, "", 0)
    except Exception:  # a format that needs a real file and line: the children keep Python's
        return None
    return text if _MESSAGE in text else None


def _child(me, nproc, port, threads, device, fn, args, results, shown=None) -> None:
    os.environ.update(RANK=str(me), LOCAL_RANK=str(me), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if shown is not None:  # a spawned process starts with Python's format: print warnings as the parent does
        warnings.formatwarning = lambda message, *_, **__: shown.replace(_MESSAGE, str(message))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(me)
        dist.init_process_group("nccl" if cuda else "gloo", rank=me, world_size=nproc, timeout=_TIMEOUT)
        try:
            out = fn(*args)
        finally:
            dist.destroy_process_group()
        results.put((me, "ok", out))
    except BaseException as err:  # reported to the parent, which ends the other ranks
        import traceback

        results.put((me, "error", type(err).__name__, str(err), traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(train, cfg, task=None) -> dict:
    """``train(cfg, task)`` in ``cfg.nproc`` local processes; rank 0's summary."""
    check(cfg, cfg.nproc)
    return launch(train, (cfg, task), cfg.nproc, cfg.device)[0]
