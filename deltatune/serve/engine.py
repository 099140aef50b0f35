"""The serving engine: one frozen model, many named adapters, one worker thread that owns them.

Requests become ``Job`` rows in one bounded queue. The worker takes the first waiting row, waits
up to ``max_wait`` seconds for more (or until ``max_batch`` rows are there), and runs every row it
took in ONE forward pass with ``dt.routing`` (row i with its own adapter): embed, classify and
search rows of different adapters share a batch; generation rows share theirs. Loading and
unloading adapters are control operations the worker applies between batches (before the next
batch is gathered), so the model is only ever touched by the worker; the file is read and
validated before the operation is queued, and rows still queued for an unloaded adapter fail with
410.

Task kinds follow from the adapter file: ``head.*`` tensors -> classification (the head becomes an
``nn.Linear`` kept with the adapter and applied to the mean-pooled backbone output; the model's
own head is never used; the class names are the ``labels`` its config carries, written by
``train`` from the task, or indices when it carries none); otherwise generation on a causal LM,
retrieval on an encoder (mean pooling + L2 normalisation, as ``models.BiEncoder``).

``device``: ``cpu`` (default), ``cuda``/``cuda:N`` or ``mps`` when torch has it; anything else is a
ConfigError naming what this machine has.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import deltatune as dt
from ..errors import ConfigError, DeltatuneError
from ..training.runs import resolve_adapter
from ..models import BiEncoder, cache_dir, format_prompt, load_backbone, mean_pool

KINDS = {"embed": "retrieval", "search": "retrieval", "classify": "classification", "generate": "generation"}


class ServeError(DeltatuneError):
    """An error with the HTTP status it maps to."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class AdapterInfo:
    name: str
    kind: str  # retrieval, classification, generation
    method: str
    path: str
    parameters: int
    size_bytes: int
    identity: str  # hash of the adapter file: keys the saved search index
    head: nn.Linear | None = None
    label_names: list[str] | None = None  # the classes' names from the adapter's config, or None: indices
    requests: int = 0
    rows: int = 0
    index: object = None  # search.Index

    def public(self) -> dict:
        out = {k: getattr(self, k) for k in ("name", "kind", "method", "path", "parameters", "size_bytes",
                                              "requests", "rows")}
        out["labels"] = self.head.out_features if self.head is not None else None
        out["label_names"] = self.label_names
        out["indexed"] = None if self.index is None else {"root": self.index.root, "functions": len(self.index.items)}
        return out


@dataclass(eq=False)
class Job:
    task: str  # embed, classify, search, generate
    adapter: str
    text: str
    deadline: float
    k: int = 5
    max_new_tokens: int = 64
    sink: Callable | None = None  # generate: called from the worker with each new piece of text, then None
    future: cf.Future = field(default_factory=cf.Future)
    cancelled: bool = False  # the client left or timed out: skip it (a generation stops at its next token)
    queued: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> str:
        return "generate" if self.task == "generate" else "encode"


class Engine:
    """``Engine("minilm")``; ``load(name, dir)``; ``submit([Job(...)])``; ``close()``."""

    def __init__(self, model: str = "minilm", *, max_batch: int = 32, max_wait: float = 0.005,
                 queue_size: int = 256, max_len: int = 256, index_dir: str | None = None, metrics=None,
                 device: str = "cpu"):
        if max_batch < 1 or queue_size < 1 or max_wait < 0 or max_len < 8:
            raise ValueError("max_batch and queue_size must be >= 1, max_wait >= 0, max_len >= 8")
        self.device = check_device(device)
        self.model_name = model
        base, self.tokenizer = load_backbone(model)
        self.generative = hasattr(base, "generate") and base.get_output_embeddings() is not None
        self.model = base if self.generative else BiEncoder(base)
        self.model.to(self.device).eval()
        if self.generative:
            self.tokenizer.padding_side = self.tokenizer.truncation_side = "left"
        self.max_batch, self.max_wait, self.queue_size, self.max_len = max_batch, max_wait, queue_size, max_len
        self.index_dir = Path(index_dir) if index_dir else cache_dir() / "serve-index"
        self.adapters: dict[str, AdapterInfo] = {}
        self.metrics = metrics
        self._jobs: deque[Job] = deque()
        self._control: deque = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._batch_seconds = 0.05  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._run, name="deltatune-serve-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ public

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def queue_depth(self) -> int:
        return len(self._jobs)

    def retry_after(self) -> int:
        batches = math.ceil((len(self._jobs) + 1) / self.max_batch)
        return max(1, math.ceil(batches * self._batch_seconds))

    def info(self, name: str, task: str | None = None) -> AdapterInfo:
        info = self.adapters.get(name)
        if info is None:
            raise ServeError(404, f"no adapter named {name!r}; loaded adapters: {sorted(self.adapters)}")
        if task is not None and KINDS[task] != info.kind:
            fits = [t for t, k in KINDS.items() if k == info.kind]
            raise ServeError(400, f"adapter {name!r} is a {info.kind} adapter ({info.method}); it answers "
                                  f"{', '.join(fits)}, not {task}")
        return info

    def submit(self, jobs: list[Job], wait: bool = False) -> list[cf.Future]:
        """Queue the rows (all or none). Full queue: ServeError 429, or with ``wait`` block for room
        (for internal work such as indexing, never from the event loop)."""
        for job in jobs:
            self.info(job.adapter, job.task)
            if job.task == "generate" and job.max_new_tokens + self.max_len > self.max_positions:
                raise ServeError(400, f"max_new_tokens={job.max_new_tokens} plus the prompt's up to {self.max_len} tokens "
                                      f"exceeds the {self.max_positions} positions of {self.model_name}; ask for at most "
                                      f"{max(1, self.max_positions - self.max_len)} tokens")
        if len(jobs) > self.queue_size:
            raise ServeError(413, f"{len(jobs)} rows in one request; the queue holds {self.queue_size}")
        with self._cond:
            while len(self._jobs) + len(jobs) > self.queue_size:
                if not wait or self._stopping:
                    raise ServeError(429, f"the server is busy ({len(self._jobs)} rows queued, limit "
                                          f"{self.queue_size}); retry later", retry_after=self.retry_after())
                self._cond.wait(0.1)
            now = time.monotonic()
            for job in jobs:
                job.queued = now
            self._jobs.extend(jobs)
            self._cond.notify_all()
        return [j.future for j in jobs]

    def encode(self, adapter: str, texts: list[str], timeout: float = 600.0) -> torch.Tensor:
        """Unit-length embeddings (N, d) of texts through the queue (blocking; not from the event loop)."""
        out = []
        for start in range(0, len(texts), self.max_batch):
            jobs = [Job("embed", adapter, t, time.monotonic() + timeout) for t in texts[start:start + self.max_batch]]
            for f in self.submit(jobs, wait=True):
                out.append(torch.tensor(f.result(timeout)["embedding"]))
        return torch.stack(out) if out else torch.zeros(0, self.hidden_size)

    @property
    def max_positions(self) -> int:
        config = self.model.config if self.generative else self.model.backbone.config
        return getattr(config, "max_position_embeddings", None) or 1 << 30

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size if self.generative else self.model.backbone.config.hidden_size

    def load(self, name: str, path, timeout: float = 300.0) -> AdapterInfo:
        """Validate the file here, then have the worker attach it between batches."""
        dt.store.check_adapter_name(name)
        if name in self.adapters:
            raise ServeError(409, f"adapter {name!r} is already loaded; unload it first or pick another name")
        path = Path(path)
        if dt.formats.format_of(path) == "deltatune":
            dt.read_adapter(resolve_adapter(path) if path.is_dir() else path)  # AdapterFileError
        return self._control_op(("load", name, path), timeout)

    def unload(self, name: str, timeout: float = 300.0) -> None:
        self.info(name)
        self._control_op(("unload", name, None), timeout)

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------ worker

    def _control_op(self, op, timeout):
        future = cf.Future()
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down")
            self._control.append((op, future))
            self._cond.notify_all()
        return future.result(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._control and not self._stopping:
                    self._cond.wait(1.0)
                if self._stopping:
                    break
            self._apply_control()  # loads and unloads first: rows for an unloaded adapter then fail with 410
            batch = self._gather()
            if batch:
                self._execute(batch)
        with self._cond:  # shutting down: nobody waits for ever
            left, self._jobs = list(self._jobs), deque()
        for job in left:
            self._fail(job, ServeError(503, "the server is shutting down"))
        while self._control:
            _, future = self._control.popleft()
            future.set_exception(ServeError(503, "the server is shutting down"))

    def _gather(self) -> list[Job]:
        with self._cond:
            while True:
                self._prune()
                if not self._jobs:
                    return []
                first = self._jobs[0]
                same = sum(1 for j in self._jobs if j.group == first.group)
                left = first.queued + self.max_wait - time.monotonic()
                if self._control or self._stopping:
                    return []  # the operation goes first; the rows stay queued for the next batch
                if same >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            batch, rest = [], deque()
            for job in self._jobs:
                if len(batch) < self.max_batch and job.group == first.group:
                    if job.future.set_running_or_notify_cancel():  # from here on the client cannot cancel it
                        batch.append(job)
                    elif job.sink is not None:
                        job.sink(None)
                else:
                    rest.append(job)
            self._jobs = rest
            self._cond.notify_all()  # room for waiting submitters
            return batch

    def _prune(self) -> None:
        """Answer now the queued rows that will not run: client gone, past their deadline, adapter unloaded."""
        keep, now = deque(), time.monotonic()
        for job in self._jobs:
            if job.cancelled or job.future.done():
                self._fail(job, ServeError(499, "the client left before its request ran"))
            elif now > job.deadline:
                self._fail(job, ServeError(504, "the request timed out in the queue"))
            elif job.adapter not in self.adapters:
                self._fail(job, ServeError(410, f"adapter {job.adapter!r} was unloaded while this request was queued"))
            else:
                keep.append(job)
        if len(keep) != len(self._jobs):
            self._jobs = keep
            self._cond.notify_all()

    @staticmethod
    def _fail(job: Job, err: Exception) -> None:
        try:
            if not job.future.done():
                job.future.set_exception(err)
        except cf.InvalidStateError:  # the client cancelled it at the same moment
            pass
        if job.sink is not None:
            job.sink(None)

    def _execute(self, batch: list[Job]) -> None:
        start = time.monotonic()
        try:
            with torch.no_grad():
                if batch[0].group == "generate":
                    self._generate(batch)
                else:
                    self._encode(batch)
        except Exception as err:  # a bug or out of memory: these rows fail, the worker goes on
            for job in batch:
                self._fail(job, ServeError(500, f"the batch failed: {type(err).__name__}: {str(err)[:200]}"))
        seconds = time.monotonic() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        for job in batch:
            info = self.adapters.get(job.adapter)
            if info is not None:
                info.rows += 1
        if self.metrics is not None:
            self.metrics.batch(len(batch), seconds)

    def _encode(self, batch: list[Job]) -> None:
        enc = self.tokenizer([j.text for j in batch], padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt").to(self.device)
        with dt.routing(self.model, [j.adapter for j in batch]):
            hidden = self.model.backbone(**enc).last_hidden_state
        pooled = mean_pool(hidden, enc["attention_mask"])
        unit = nn.functional.normalize(pooled, dim=-1).float().cpu()
        tokens = enc["attention_mask"].sum(1).tolist()
        for i, job in enumerate(batch):
            info = self.adapters[job.adapter]
            if job.task == "embed":
                result = {"embedding": unit[i].tolist()}
            elif job.task == "classify":
                logits = info.head(pooled[i].to(info.head.weight.dtype))
                probs = torch.softmax(logits.float(), -1).cpu()
                index = int(probs.argmax())
                result = {"label": info.label_names[index] if info.label_names else index, "index": index,
                          "probabilities": [round(p, 6) for p in probs.tolist()]}
            else:  # search
                if info.index is None:
                    raise_later = ServeError(409, f"adapter {job.adapter!r} has no search index yet; index a "
                                                  "folder first (POST /v1/adapters/{name}/index)")
                    self._fail(job, raise_later)
                    continue
                result = {"results": info.index.query(unit[i], job.k)}
            result["tokens"] = int(tokens[i])
            if not job.future.done():
                job.future.set_result(result)

    def _generate(self, batch: list[Job]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        prompts = [format_prompt(tok, j.text) for j in batch]
        enc = tok(prompts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt",
                  add_special_tokens=False).to(self.device)
        ids = [[] for _ in batch]
        texts = [""] * len(batch)
        done = torch.zeros(len(batch), dtype=torch.bool)
        eos = tok.eos_token_id

        def finish(i):
            done[i] = True
            job = batch[i]
            if not job.future.done():
                job.future.set_result({"text": texts[i], "tokens": len(ids[i])})
            if job.sink is not None:
                job.sink(None)

        class Stream(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                new = input_ids[:, -1].tolist()
                for i, job in enumerate(batch):
                    if done[i]:
                        continue
                    if job.cancelled:
                        done[i] = True
                        Engine._fail(job, ServeError(499, "the client left during generation"))
                        continue
                    if new[i] != eos:
                        ids[i].append(new[i])
                        text = tok.decode(ids[i], skip_special_tokens=True)
                        if not text.endswith("\ufffd"):  # a character still incomplete: wait for its next byte
                            piece, texts[i] = text[len(texts[i]):], text
                            if piece and job.sink is not None:
                                job.sink(piece)
                    if new[i] == eos or len(ids[i]) >= job.max_new_tokens:
                        finish(i)
                return done.clone().to(input_ids.device)

        with dt.routing(self.model, [j.adapter for j in batch]):
            self.model.generate(**enc, max_new_tokens=max(j.max_new_tokens for j in batch), do_sample=False,
                                pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                stopping_criteria=StoppingCriteriaList([Stream()]))
        for i in range(len(batch)):
            if not done[i]:
                finish(i)

    def _apply_control(self) -> None:
        while True:
            with self._cond:
                if not self._control:
                    return
                (op, name, path), future = self._control.popleft()
            try:
                future.set_result(self._load(name, path) if op == "load" else self._unload(name))
            except Exception as err:
                future.set_exception(err)

    def _load(self, name: str, path: Path) -> AdapterInfo:
        if name in self.adapters:
            raise ServeError(409, f"adapter {name!r} is already loaded; unload it first or pick another name")
        if path.is_dir():
            path = resolve_adapter(path)
        heads: dict = {}
        dt.load_adapter(self.model, path, adapter=name, heads=heads)
        try:
            self.model.to(self.device)  # the adapter's parameters join the model on its device
            head = self._head(name, heads)
            store = dt.store.require_store(self.model)
            rec = store.records[name]
            params = list(store.adapters[name].parameters())
            n = sum(p.numel() for p in params) + (sum(p.numel() for p in head.parameters()) if head else 0)
            size = sum(p.numel() * p.element_size() for p in params) + (
                sum(p.numel() * p.element_size() for p in head.parameters()) if head else 0)
            if head is not None and self.generative:
                raise ServeError(400, f"{path}: a classification adapter cannot be served on the causal LM "
                                      f"{self.model_name}; serve it on the encoder it was trained on")
            kind = "classification" if head is not None else "generation" if self.generative else "retrieval"
            info = AdapterInfo(name, kind, rec.method.name, str(path), n, size, _file_identity(path), head,
                               _label_names(path, head))
            dt.set_active(self.model)  # idle outside dt.routing: a stray forward pass is the bare base
        except BaseException:
            dt.detach(self.model, name)
            raise
        self.adapters[name] = info
        return info

    def _head(self, name: str, heads: dict) -> nn.Linear | None:
        if not heads:
            return None
        weights = {k: v for k, v in heads.items() if k.endswith(".weight") and v.dim() == 2}
        if len(weights) != 1 or len(heads) > 2:
            raise ServeError(400, f"adapter {name!r} carries a head of {len(heads)} tensors ({sorted(heads)[:4]}); the "
                                  "server serves one linear layer on the pooled output (deltatune's Classifier)")
        key, weight = next(iter(weights.items()))
        bias = heads.get(key[: -len("weight")] + "bias")
        if weight.shape[1] != self.hidden_size or (bias is not None and bias.shape != (weight.shape[0],)):
            raise ServeError(400, f"adapter {name!r}: its head {key} {tuple(weight.shape)} does not fit the model's "
                                  f"hidden size {self.hidden_size}")
        dtype = next(self.model.parameters()).dtype
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        return head.to(self.device).eval().requires_grad_(False)

    def _unload(self, name: str) -> None:
        if name not in self.adapters:
            raise ServeError(404, f"no adapter named {name!r}; loaded adapters: {sorted(self.adapters)}")
        del self.adapters[name]  # first: rows still queued for it fail with 410 from here on
        dt.detach(self.model, name)
        return None


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device this machine has; a ConfigError naming what it has otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no CUDA device is visible"
            raise ConfigError(f"--device {device}: {why} (torch {torch.__version__}); serve on --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {device}: MPS is not available here; serve on --device cpu")
        return dev
    raise ConfigError(f"--device {device!r}: the server runs on cpu, cuda[:N] or mps")


def _label_names(path: Path, head) -> list[str] | None:
    """The class names the adapter's config carries (``labels``, one per row of its head), else None."""
    if head is None:
        return None
    from safetensors import safe_open

    try:  # the header only: the file was read and validated by load_adapter already
        with safe_open(str(path / "adapter.safetensors" if path.is_dir() else path), framework="pt") as f:
            names = json.loads((f.metadata() or {}).get("deltatune", "{}")).get("labels")
    except Exception:  # a PEFT folder (no deltatune config), or no header to read: indices
        return None
    if isinstance(names, list) and len(names) == head.out_features and all(isinstance(x, str) for x in names):
        return names
    return None


def _file_identity(path: Path) -> str:
    file = path / "adapter.safetensors" if path.is_dir() else path
    digest = hashlib.sha256()
    try:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:  # a PEFT folder: its files
        for p in sorted(path.iterdir()) if path.is_dir() else []:
            if p.is_file():
                digest.update(p.name.encode() + p.read_bytes())
    return digest.hexdigest()[:24]


__all__ = ["Engine", "Job", "AdapterInfo", "ServeError", "KINDS", "DeltatuneError"]
