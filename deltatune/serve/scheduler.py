"""Continuous batching for generation: the worker schedules at every decode step.

The engine's worker calls :meth:`Scheduler.step` between its other work. A step

1. drops the rows that will not go on (the client left: 499; the adapter was unloaded: 410), at once;
2. admits queued generation rows, first come first served, while the running batch has room: at most
   ``max_rows`` rows and ``max_tokens`` tokens in flight (each row counts its prompt plus the tokens it
   may still make), and at most ``prefill_tokens`` prompt tokens prefilled per step, so that a burst of
   long prompts cannot stall the rows already generating for long. Rows that did not fit wait in the
   engine's queue (bounded: 429 with Retry-After beyond it);
3. prefills each admitted prompt alone (batch of one: exactly the pass it gets alone; requests for the
   same prompt and adapter admitted together, such as the ``n`` choices of one request, share it),
   samples its first token from that pass, and adds its key/value cache to the running batch;
4. runs ONE forward pass of one token per running row, each row with its own adapter
   (``dt.routing``), sampling parameters and stop conditions; rows that finished leave the batch at once.

The running batch and its key/value cache are a :class:`deltatune.tasks.decoding.CacheBatch` (its module
says how rows join, leave and see exactly the keys and positions they have alone; scoring a generation
task decodes through the same core). Here each pass runs under ``dt.routing`` with every row's own
adapter; prefix tuning's keys/values are masked for the rows of other adapters. So rows of every routable
method share one batch and every row's tokens equal what its request gives alone (greedy, and seeded
sampling: each row draws from its own ``torch.Generator``), up to the float rounding of a batched matmul.
Models with sliding-window or recurrent layers (whose caches cannot be padded this way) are not
scheduled here: :func:`supported` says why, and the engine batches their generation statically.
"""
from __future__ import annotations

import contextlib
import math
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

import deltatune as dt
from ..models import format_prompt
from ..tasks.decoding import CacheBatch, supported


@dataclass(frozen=True)
class GenerateOptions:
    """How one generation row samples and stops, and how its text becomes the model's input."""

    temperature: float = 0.0  # 0: greedy (argmax); else softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: the fewest most likely tokens whose probability reaches top_p
    seed: int | None = None  # the row's torch.Generator seed (None: a fresh random seed)
    stop: tuple[str, ...] = ()  # stop before the first of these strings; it is not part of the text
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely
    template: bool = True  # the text is a user prompt for the model's chat template (models.format_prompt)
    truncate: bool = True  # a prompt over max_len keeps its last max_len tokens; False: refused (400)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = GenerateOptions()


class Piece(str):
    """A piece of generated text as the sink receives it; ``logprobs`` holds the entries of the tokens that
    made it (when the row asked for log-probabilities)."""

    logprobs: list = ()


def routed(model, names: list):
    """``dt.routing(model, names)`` (None: the bare base); a model that never had an adapter runs as it is."""
    if dt.store.store_of(model) is None:
        if any(n is not None for n in names):
            raise dt.ConfigError(f"no adapter is attached; cannot route rows to {sorted(set(names) - {None})}")
        return contextlib.nullcontext()
    return dt.routing(model, names)


class _Row:
    """One generation row in flight."""

    def __init__(self, job, options: GenerateOptions, prompt_tokens: int, device):
        self.job, self.options, self.prompt_tokens = job, options, prompt_tokens
        self.generator = None
        if not options.greedy:
            seed = options.seed if options.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.ids: list[int] = []  # generated tokens, without the end-of-sequence token
        self.made = 0  # tokens generated, the end-of-sequence token included (usage)
        self.length = 0  # keys the row holds in the cache: its next token's position
        self.last = -1  # the token fed at the next decode pass
        self.text = ""  # the decoded text (cut at a stop string)
        self.sent = 0  # characters of text given to the sink
        self.logprobs: list[dict] = []
        self.unsent_logprobs: list[dict] = []
        self.finish: str | None = None

    @property
    def budget(self) -> int:
        """Tokens this row may still hold in the cache: its keys now plus the tokens it may still make."""
        return self.length + self.job.max_new_tokens - self.made


class Scheduler:
    """Continuous batching over one model (see the module docstring). ``take(fits)`` hands over queued
    generation rows in order while ``fits(job)`` says there is room; ``fail(job, status, message)``
    answers a row with an error; ``observe(rows, seconds)`` is told of every decode pass."""

    def __init__(self, model, tokenizer, adapters: dict, *, take: Callable, fail: Callable, observe: Callable,
                 device, max_rows: int, max_tokens: int, max_len: int, prefill_tokens: int = 512):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.take, self.observe = take, observe
        self._fail_with = fail
        self.device, self.max_rows, self.max_tokens, self.max_len = device, max_rows, max_tokens, max_len
        self.prefill_tokens = prefill_tokens
        ends = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        ends = ends if isinstance(ends, (list, tuple)) else [ends]
        self.eos = {t for t in (*ends, tokenizer.eos_token_id) if t is not None}
        self.batch = CacheBatch(model, device)  # the running rows (_Row) and their key/value cache
        self._prompts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # job -> its token ids, or a refusal

    # ------------------------------------------------------------------------------ state

    @property
    def rows(self) -> list[_Row]:
        return self.batch.rows

    def fail(self, job, status: int, message: str) -> None:
        try:
            self._fail_with(job, status, message)
        except Exception:  # its sink cannot take the news (the server's loop is gone): nobody is listening
            job.cancelled = True

    @staticmethod
    def _tell(job, piece) -> None:
        """Give the job's sink a piece of text (None: the end); a sink that raises loses its client."""
        try:
            job.sink(piece)
        except Exception:
            job.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.rows)

    @property
    def in_flight(self) -> int:
        return sum(row.budget for row in self.rows)

    def close(self, message: str = "the server is shutting down") -> None:
        for row in self.rows:
            self.fail(row.job, 503, message)
        self._keep([])

    # ------------------------------------------------------------------------------ one step

    def step(self) -> None:
        """Drop rows that will not go on, admit queued rows, run one decode pass."""
        self._drop_gone()
        rows, tokens, prefill = len(self.rows), self.in_flight, 0

        def fits(job) -> bool:
            nonlocal rows, tokens, prefill
            prompt = self._prompt(job)
            length = len(prompt) if isinstance(prompt, list) else 0  # a refused prompt takes no room
            need = length + job.max_new_tokens
            if rows >= self.max_rows or rows and (tokens + need > self.max_tokens or prefill + length > self.prefill_tokens):
                return False  # an empty batch always admits one row, however long
            rows, tokens, prefill = rows + 1, tokens + need, prefill + length
            return True

        joined = self.take(fits)
        if joined:
            with torch.no_grad():
                self._join(joined)
        if self.rows:
            start = time.monotonic()
            try:
                with torch.no_grad():
                    self._decode()
            except Exception as err:  # a bug or out of memory: the rows in flight fail, the worker goes on
                for row in self.rows:
                    if row.finish is None:
                        self.fail(row.job, 500, f"the generation batch failed: {type(err).__name__}: {str(err)[:200]}")
                self._keep([])
                return
            self.observe(len(self.rows), time.monotonic() - start)
            self._keep([i for i, row in enumerate(self.rows) if row.finish is None])

    def _drop_gone(self) -> None:
        keep = []
        for i, row in enumerate(self.rows):
            job = row.job
            if job.cancelled or job.future.done():
                self.fail(job, 499, "the client left during generation")
            elif job.adapter is not None and job.adapter not in self.adapters:
                self.fail(job, 410, f"adapter {job.adapter!r} was unloaded during generation")
            else:
                keep.append(i)
        if len(keep) != len(self.rows):
            self._keep(keep)

    # ------------------------------------------------------------------------------ prompts

    def _prompt(self, job):
        """The job's prompt as token ids, or (status, message) when it cannot run; computed once."""
        if job in self._prompts:
            return self._prompts[job]
        options = job.options or GREEDY
        tok = self.tokenizer
        try:
            text = format_prompt(tok, job.text) if options.template else job.text
            ids = tok(text, add_special_tokens=False)["input_ids"]
        except Exception as err:  # text the tokenizer or the template cannot take: this row fails alone
            self._prompts[job] = (400, f"the prompt cannot be tokenized: {type(err).__name__}: {str(err)[:200]}")
            return self._prompts[job]
        if not ids:
            out = (400, "the prompt is empty once tokenized; send some text")
        elif len(ids) > self.max_len and not options.truncate:
            out = (400, f"the prompt has {len(ids)} tokens; this server reads at most {self.max_len} (--max-len); "
                        "send a shorter prompt")
        else:
            out = ids[-self.max_len:]  # over max_len: its last max_len tokens, the ones next to the answer
        self._prompts[job] = out
        return out

    # ------------------------------------------------------------------------------ joining

    def _join(self, jobs: list) -> None:
        """Prefill each new prompt alone (shared by the jobs asking for the same prompt and adapter), sample
        its first token, and add the rows that go on to the batch."""
        groups: dict = {}
        for job in jobs:
            prompt = self._prompt(job)
            if not isinstance(prompt, list):
                self.fail(job, *prompt)
                continue
            key = (job.adapter, tuple(prompt))
            groups.setdefault(key, []).append(job)
        for (adapter, prompt), group in groups.items():
            if adapter is not None and adapter not in self.adapters:
                for job in group:
                    self.fail(job, 410, f"adapter {adapter!r} was unloaded while this request was queued")
                continue
            try:
                logits, cache = self.batch.prefill(list(prompt), routed(self.model, [adapter]))
            except Exception as err:  # this prompt fails alone; the batch goes on
                for job in group:
                    self.fail(job, 500, f"the prompt failed: {type(err).__name__}: {str(err)[:200]}")
                continue
            length = cache[0][0].shape[2]  # the prompt's tokens, and a soft prompt's in front of them
            rows = []
            for job in group:
                row = _Row(job, job.options or GREEDY, len(prompt), self.device)
                row.length = length
                self._accept(row, logits)
                if row.finish is None:
                    rows.append(row)
            if rows:
                self.batch.add(rows, cache)

    def _keep(self, indices: list[int]) -> None:
        """Keep only these rows (the batch's order may change: rows are read from ``self.rows`` afresh) and
        trim the left padding they all share."""
        self.batch.keep(indices)

    # ------------------------------------------------------------------------------ decoding

    def _decode(self) -> None:
        logits = self.batch.decode(routed(self.model, [row.job.adapter for row in self.rows]))
        for i, row in enumerate(self.rows):
            self._accept(row, logits[i])

    # ------------------------------------------------------------------------------ one token

    def _accept(self, row: _Row, logits: torch.Tensor) -> None:
        """Choose the row's next token from its logits (V,), stream the text it completes, and finish the row
        at an end-of-sequence token, a stop string or its token limit. A row that fails here (logits that
        are not finite) fails alone."""
        try:
            self._next(row, logits)
        except Exception as err:
            row.finish = "error"
            self.fail(row.job, 500, f"this row failed: {type(err).__name__}: {str(err)[:200]}")

    def _next(self, row: _Row, logits: torch.Tensor) -> None:
        options, job = row.options, row.job
        token = _choose(logits, options, row.generator)
        row.made += 1
        row.last = token
        if options.logprobs is not None and token not in self.eos:
            entry = _logprob_entry(self.tokenizer, logits, token, options.logprobs)
            row.logprobs.append(entry)
            row.unsent_logprobs.append(entry)
        if token in self.eos:
            return self._finish(row, "stop")
        row.ids.append(token)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if options.stop:
            start = max(0, len(row.text) - max(map(len, options.stop)))
            found = [at for at in (text.find(s, start) for s in options.stop) if at >= 0]
            if found:
                row.text = text[:min(found)]
                return self._finish(row, "stop")
        row.text = text
        if row.made >= job.max_new_tokens:
            return self._finish(row, "length")
        self._send(row, _held_back(text, options.stop))

    def _send(self, row: _Row, hold: int = 0) -> None:
        """Give the sink the text not yet sent, but the last ``hold`` characters."""
        end = len(row.text) - hold
        if end <= row.sent or row.job.sink is None:
            return
        piece = Piece(row.text[row.sent:end])
        if row.unsent_logprobs:
            piece.logprobs, row.unsent_logprobs = row.unsent_logprobs, []
        row.sent = end
        self._tell(row.job, piece)

    def _finish(self, row: _Row, reason: str) -> None:
        row.finish = reason
        job = row.job
        self._send(row)
        result = {"text": row.text, "tokens": len(row.ids), "token_ids": row.ids, "finish_reason": reason,
                  "prompt_tokens": row.prompt_tokens, "completion_tokens": row.made}
        if row.options.logprobs is not None:
            result["logprobs"] = row.logprobs
        if not job.future.done():
            job.future.set_result(result)
        if job.sink is not None:
            self._tell(job, None)
        info = self.adapters.get(job.adapter)
        if info is not None:
            info.rows += 1


def _choose(logits: torch.Tensor, options: GenerateOptions, generator) -> int:
    """Greedy, or a draw from softmax(logits / temperature) cut to the top-p nucleus, with the row's generator."""
    if options.greedy or options.temperature < torch.finfo(logits.dtype).tiny:  # the limit as temperature -> 0
        return int(logits.argmax())
    scores = (logits - logits.max()) / options.temperature  # <= 0, the top one 0: no overflow at temperature 1e-40
    if options.top_p < 1.0:
        ordered, order = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        keep = probs.cumsum(-1) - probs < options.top_p  # the mass before a token is short of top_p: keep it
        keep[0] = True  # the top token always (a top_p below float32's least value compares as 0)
        scores = torch.full_like(scores, -math.inf).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def _logprob_entry(tokenizer, logits: torch.Tensor, token: int, top: int) -> dict:
    """The model's log-probability of ``token`` (the raw distribution: before temperature and top-p) and of
    the ``top`` most likely tokens."""
    logp = logits.log_softmax(-1)
    entry = {"id": token, "token": tokenizer.decode([token]), "logprob": float(logp[token])}
    if top:
        values, ids = logp.topk(top)
        entry["top"] = [{"id": int(i), "token": tokenizer.decode([int(i)]), "logprob": float(v)}
                        for v, i in zip(values.tolist(), ids.tolist())]
    else:
        entry["top"] = []
    return entry


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not to stream yet: an incomplete character (the decoder shows
    U+FFFD until its last byte comes), or the start of a stop string that the next tokens may complete."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


__all__ = ["Scheduler", "GenerateOptions", "GREEDY", "Piece", "routed", "supported"]
