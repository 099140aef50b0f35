"""The serving engine: one frozen model, many named adapters, one worker thread that owns them.

Requests become ``Job`` rows in one bounded queue. The worker takes the first waiting row, waits
up to ``max_wait`` seconds for more (or until ``max_batch`` rows are there), and runs every row it
took in ONE forward pass with ``dt.routing`` (row i with its own adapter): embed, classify and
search rows of different adapters share a batch. Generation rows are scheduled at every decode step
(``scheduler.Scheduler``, continuous batching: they join the running batch and leave it as they
finish, between the other batches); ``batching="static"`` runs them as one ``model.generate`` batch
instead. ``Job.adapter`` None is the bare base model. Loading and
unloading adapters are control operations the worker applies between batches (before the next
batch is gathered), so the model is only ever touched by the worker; the file is read and
validated before the operation is queued, and rows still queued for an unloaded adapter fail with
410.

An adapter's task kind is the one saved with it (``task_kind`` in its config, written by ``train``
from the task; :mod:`deltatune.tasks.kinds`), and the kind says which endpoints answer it
(``endpoints``: retrieval embeds and searches, classification classifies, generation generates).
Adapters saved before the kind was (and PEFT folders) are told by their file as before: ``head.*``
tensors -> classification, otherwise generation on a causal LM, retrieval on an encoder.
A classification adapter's head becomes an ``nn.Linear`` kept with the adapter and applied to the
mean-pooled backbone output (the model's own head is never used; the class names are the
``labels`` its config carries, written by ``train`` from the task, or indices when it carries
none); retrieval pools as ``models.BiEncoder`` (mean pooling + L2 normalisation).

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
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import deltatune as dt
from ..errors import ConfigError, DeltatuneError
from ..storage import user_path
from ..training.runs import resolve_adapter
from ..models import BiEncoder, cache_dir, format_prompt, load_backbone, mean_pool
from ..tasks.kinds import KINDS as TASK_KINDS, get_kind
from .scheduler import GenerateOptions, Scheduler, routed, supported

# endpoint -> the task kind whose adapters it serves, as each kind states it (its ``endpoints``)
KINDS = {endpoint: kind.name for kind in TASK_KINDS.values() for endpoint in kind.endpoints}


class ServeError(DeltatuneError):
    """An error with the HTTP status it maps to."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class AdapterInfo:
    name: str
    kind: str  # the task kind's name (deltatune.tasks.kinds): retrieval, classification, generation
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
    adapter: str | None  # None: the bare base model (as in dt.routing)
    text: str
    deadline: float
    k: int = 5
    max_new_tokens: int = 64
    sink: Callable | None = None  # generate: called from the worker with each new piece of text, then None
    future: cf.Future = field(default_factory=cf.Future)
    cancelled: bool = False  # the client left or timed out: skip it (a generation stops at its next token)
    queued: float = field(default_factory=time.monotonic)
    options: GenerateOptions | None = None  # generate: sampling and stops (scheduler.py); None: greedy, chat template

    @property
    def group(self) -> str:
        return "generate" if self.task == "generate" else "encode"


class Engine:
    """``Engine("minilm")``; ``load(name, dir)``; ``submit([Job(...)])``; ``close()``."""

    def __init__(self, model: str = "minilm", *, max_batch: int = 32, max_wait: float = 0.005,
                 queue_size: int = 256, max_len: int = 256, index_dir: str | None = None, metrics=None,
                 device: str = "cpu", batching: str = "continuous", max_tokens: int = 8192, quantize: str | None = None):
        if max_batch < 1 or queue_size < 1 or not 0 <= max_wait < math.inf or max_len < 8:
            raise ConfigError(f"max_batch ({max_batch}) and queue_size ({queue_size}) must be >= 1, max_wait "
                              f"({max_wait}) a finite number >= 0, max_len ({max_len}) >= 8")
        self.device = check_device(device)
        self.model_name = model
        base, self.tokenizer = load_backbone(model, quantize=quantize)  # quantize: nf4/fp4/int8 linear layers
        self.quantize = quantize
        self.generative = hasattr(base, "generate") and base.get_output_embeddings() is not None
        self.model = base if self.generative else BiEncoder(base)
        self.model.to(self.device).eval()
        if self.generative:
            self.tokenizer.padding_side = self.tokenizer.truncation_side = "left"
        elif max_len > self.max_positions:  # a longer input would index past the position table and fail its batch
            raise ConfigError(f"max_len={max_len} is more than the {self.max_positions} positions of {model}; "
                              f"use --max-len {self.max_positions} or less")
        self.max_batch, self.max_wait, self.queue_size, self.max_len = max_batch, max_wait, queue_size, max_len
        self.index_dir = Path(index_dir) if index_dir else cache_dir() / "serve-index"
        self.adapters: dict[str, AdapterInfo] = {}
        self.metrics = metrics
        self._jobs: deque[Job] = deque()
        self._control: deque = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._batch_seconds = 0.05  # moving average, for Retry-After
        # the bare base model as a model of its own (Job.adapter None): a kind by the model's form, no file
        self.base = AdapterInfo(model, next(k.name for k in TASK_KINDS.values() if k.endpoints and not k.labelled
                                            and k.model_form == ("lm" if self.generative else "base")), "none", "", 0, 0, "")
        self.adapter_dir = None  # adapters_on_demand.AdapterDir: model ids loaded from a folder on first use
        # generation: continuous batching (scheduler.py), or one static batch through model.generate
        why = supported(self.model) if self.generative and batching == "continuous" else None
        if why is not None:
            warnings.warn(f"{model}: {why}; its generation is batched statically (one batch at a time)", stacklevel=2)
        self.scheduler = Scheduler(
            self.model, self.tokenizer, self.adapters, take=self._take, fail=lambda job, status, message: self._fail(
                job, ServeError(status, message)), observe=self._observe, device=self.device, max_rows=max_batch,
            max_tokens=max_tokens, max_len=max_len) if self.generative and batching == "continuous" and why is None else None
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

    def info(self, name: str | None, task: str | None = None) -> AdapterInfo:
        info = self.adapters.get(name) if name is not None else self.base
        if info is None:
            raise ServeError(404, f"no adapter named {name!r}; loaded adapters: {sorted(self.adapters)}")
        answers = get_kind(info.kind).endpoints
        if task is not None and task not in answers:
            raise ServeError(400, f"adapter {name!r} is a {info.kind} adapter ({info.method}); it answers "
                                  f"{', '.join(answers)}, not {task}")
        return info

    def submit(self, jobs: list[Job], wait: bool = False) -> list[cf.Future]:
        """Queue the rows (all or none). Full queue: ServeError 429, or with ``wait`` block for room
        (for internal work such as indexing, never from the event loop)."""
        for job in jobs:
            self.info(job.adapter, job.task)
            try:  # text the tokenizer cannot read (a lone surrogate) fails its own request here, never a batch
                job.text.encode("utf-8")
            except (UnicodeEncodeError, AttributeError) as err:
                where = f" at character {err.start}" if isinstance(err, UnicodeEncodeError) else ""
                raise ServeError(400, f"a text is not valid Unicode (a lone surrogate{where}); send text that "
                                      "encodes as UTF-8") from None
            if job.task == "generate" and job.max_new_tokens + self.max_len > self.max_positions:
                raise ServeError(400, f"max_new_tokens={job.max_new_tokens} plus the prompt's up to {self.max_len} tokens "
                                      f"exceeds the {self.max_positions} positions of {self.model_name}; ask for at most "
                                      f"{max(1, self.max_positions - self.max_len)} tokens")
            if job.task == "generate" and job.options is not None and self.scheduler is None:
                raise ServeError(400, f"this server batches generation statically (--batching static, or {self.model_name} "
                                      "has layers continuous batching cannot pad): greedy, with the chat template, "
                                      "only; sampling, stops and raw prompts need --batching continuous")
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
        path = user_path(path, "path")
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
                while not self._jobs and not self._control and not self._stopping and not self._generating:
                    self._cond.wait(1.0)
                if self._stopping:
                    break
            self._apply_control()  # loads and unloads first: rows for an unloaded adapter then fail with 410
            batch = self._gather()
            if batch:
                self._execute(batch)
            if self.scheduler is not None:
                self.scheduler.step()  # continuous batching: rows join and leave, one decode pass
        if self.scheduler is not None:
            self.scheduler.close()
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
                # with a scheduler, generation rows join its running batch instead (_take)
                batchable = [j for j in self._jobs if self.scheduler is None or j.group != "generate"]
                if not batchable:
                    return []
                first = batchable[0]
                same = sum(1 for j in self._jobs if j.group == first.group)
                left = first.queued + self.max_wait - time.monotonic()
                if self._control or self._stopping:
                    return []  # the operation goes first; the rows stay queued for the next batch
                if same >= self.max_batch or left <= 0 or self._generating or len(batchable) < len(self._jobs):
                    break  # (generation waits for no batch to fill)
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

    @property
    def _generating(self) -> bool:
        return self.scheduler is not None and self.scheduler.busy

    def _take(self, fits) -> list[Job]:
        """For the scheduler: queued generation rows, first come first served, while ``fits(job)``."""
        with self._cond:
            self._prune()
            taken, rest, blocked = [], deque(), False
            for job in self._jobs:
                if job.group != "generate" or blocked:
                    rest.append(job)
                elif not fits(job):
                    blocked = True  # the rows behind it wait too (a long prompt is not overtaken for ever)
                    rest.append(job)
                elif job.future.set_running_or_notify_cancel():  # from here on the client cannot cancel it
                    taken.append(job)
                elif job.sink is not None:
                    job.sink(None)
            if len(rest) != len(self._jobs):
                self._jobs = rest
                self._cond.notify_all()  # room for waiting submitters
            return taken

    def _observe(self, rows: int, seconds: float) -> None:
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self.metrics is not None:
            self.metrics.batch(rows, seconds)

    def _prune(self) -> None:
        """Answer now the queued rows that will not run: client gone, past their deadline, adapter unloaded."""
        keep, now = deque(), time.monotonic()
        for job in self._jobs:
            if job.cancelled or job.future.done():
                self._fail(job, ServeError(499, "the client left before its request ran"))
            elif now > job.deadline:
                self._fail(job, ServeError(504, "the request timed out in the queue"))
            elif job.adapter is not None and job.adapter not in self.adapters:
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
            if len(batch) > 1 and batch[0].group == "encode":
                self._alone(batch)  # nothing was streamed: each row runs again by itself
            else:
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

    def _alone(self, batch: list[Job]) -> None:
        """After a failed encode batch, every row not yet answered runs alone: a row that breaks a batch
        fails by itself and the other clients' rows get their answers."""
        for job in batch:
            if job.future.done():
                continue
            try:
                with torch.no_grad():
                    self._encode([job])
            except Exception as err:
                self._fail(job, ServeError(500, f"this row failed: {type(err).__name__}: {str(err)[:200]}"))

    def _encode(self, batch: list[Job]) -> None:
        enc = self.tokenizer([j.text for j in batch], padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt").to(self.device)
        with routed(self.model, [j.adapter for j in batch]):
            hidden = self.model.backbone(**enc).last_hidden_state
        pooled = mean_pool(hidden, enc["attention_mask"])
        unit = nn.functional.normalize(pooled, dim=-1).float().cpu()
        tokens = enc["attention_mask"].sum(1).tolist()
        for i, job in enumerate(batch):
            info = self.info(job.adapter)
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
            kind = _task_kind(path, head, self.generative)
            if not kind.endpoints:
                raise ServeError(400, f"{path}: the server has no endpoint for {kind.name} adapters (the task kind "
                                      "names none); score it with `deltatune eval`")
            if (kind.model_form == "lm") != self.generative:
                raise ServeError(400, f"{path}: a {kind.name} adapter cannot be served on {self.model_name}, "
                                      f"{'a causal LM' if self.generative else 'an encoder'}; serve it on the model "
                                      "it was trained on")
            info = AdapterInfo(name, kind.name, rec.method.name, str(path), n, size, _file_identity(path), head,
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


def _saved_config(path: Path) -> dict:
    """The deltatune config in the adapter file's header, or {} (a PEFT folder carries none)."""
    from safetensors import safe_open

    try:  # the header only: the file was read and validated by load_adapter already
        with safe_open(str(path / "adapter.safetensors" if path.is_dir() else path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("deltatune", "{}"))
    except Exception:  # a PEFT folder (no deltatune config), or no header to read
        return {}
    return config if isinstance(config, dict) else {}


def _task_kind(path: Path, head, generative: bool):
    """The task kind of the adapter at ``path``: the one saved with it (``train`` records its task's kind)."""
    saved = _saved_config(path).get("task_kind")
    if saved is not None:
        try:
            return get_kind(saved)
        except ConfigError as err:
            raise ServeError(400, f"{path}: {err}") from None
    # Adapters saved before the kind was saved with them, and PEFT folders, carry none: the old guess from
    # the file. A head means a labelled kind (classification); without one, the model decides: a causal LM
    # generates, an encoder embeds.
    form = "lm" if generative else "base"
    guess = next((k for k in TASK_KINDS.values()
                  if k.endpoints and k.labelled == (head is not None) and k.model_form == form), None)
    if guess is None:
        raise ServeError(400, f"{path}: an adapter {'with' if head is not None else 'without'} a head cannot be "
                              f"served on {'a causal LM' if generative else 'an encoder'}; serve it on the model it "
                              "was trained on")
    return guess


def _label_names(path: Path, head) -> list[str] | None:
    """The class names the adapter's config carries (``labels``, one per row of its head), else None."""
    if head is None:
        return None
    names = _saved_config(path).get("labels")
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
