"""What the OpenAI-compatible endpoints share (``endpoints/openai_*.py``): the error shape, the request
checks, the model a request names, and generation rows run, answered and streamed in OpenAI's shapes.

* **Models.** ``model`` names the base (as ``GET /v1/models`` lists it: a named model as named, a folder
  by its own name), a loaded adapter, or, with ``serve --adapter-dir``, an adapter folder there, loaded
  on first use (:mod:`.adapters_on_demand`). The base model is the bare backbone (``dt.routing``'s None).
* **Errors** are ``{"error": {"message", "type", "param", "code"}}`` with OpenAI's statuses: a bad
  parameter is 400 (not 422), an unknown model 404 with code ``model_not_found``, a full queue 429 with
  Retry-After. A message that names a parameter starts with it quoted (``'temperature': ...``), which is
  where ``param`` is read from.
* **Generation.** One engine row per prompt and choice (``n``); choice ``j`` of a request with ``seed``
  samples with seed ``seed + j``, so it equals a request for that choice alone with that seed. Defaults
  are OpenAI's (temperature 1, top_p 1). ``stream`` answers server-sent events in OpenAI's chunk format,
  ending with ``data: [DONE]``; a client that leaves frees its rows at the next decode step.
* **Log-probabilities** are the model's own distribution (before temperature and top-p), as a
  ``log_softmax`` of the logits the step computed anyway.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__
from .api import Server
from .engine import Job, ServeError
from .scheduler import GenerateOptions

FINGERPRINT = f"deltatune-{__version__}"
MAX_CHOICES = 16  # n, and prompts x n in one request
MAX_STOPS = 4

# ------------------------------------------------------------------------------------------ errors

_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
          504: "timeout"}
_CODES = {404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded", 504: "timeout"}
_PARAM = re.compile(r"^'([A-Za-z_][\w.\[\]]*)'")


def openai_error(status: int, message: str) -> dict:
    """OpenAI's error body (the ``error_body`` of every OpenAI endpoint)."""
    param = _PARAM.match(message)
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param.group(1) if param else None, "code": _CODES.get(status)}}


OPENAI_ERRORS = {**{c: {"description": d} for c, d in {
    400: "a bad parameter (named in error.param), a prompt over --max-len tokens, a model of the wrong kind",
    404: "no such model (error.code model_not_found)", 410: "the adapter was unloaded while the request waited",
    413: "a body over the server's limit, input over --max-chars, or too many inputs",
    429: "the queue is full, or every adapter slot is in use; retry after Retry-After seconds",
    504: "the request took longer than --timeout"}.items()}}


def error_schema() -> dict:
    return {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}


def openai_route(request_model: type[BaseModel] | None, summary: str, description: str, answer: dict | None = None,
                 stream: bool = False) -> dict:
    """The OpenAPI side of an OpenAI endpoint (its body is parsed by the handler, so that a bad parameter
    is OpenAI's 400): the request schema, the answer, the errors in OpenAI's shape."""
    content = {"application/json": {"schema": answer or {"type": "object"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string", "description": "data: {chunk} lines, then data: [DONE]"}}
    responses = {200: {"description": "the answer", "content": content}}
    for status, spec in OPENAI_ERRORS.items():
        responses[status] = {**spec, "content": {"application/json": {"schema": error_schema()}}}
    route = {"summary": summary, "description": description, "responses": responses}
    if request_model is not None:
        route["openapi_extra"] = {"requestBody": {"required": True, "content": {
            "application/json": {"schema": inline_schema(request_model)}}}}
    return route


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its ``$defs`` written in place (an OpenAPI document has no ``#/$defs``)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.split("/")[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


# ------------------------------------------------------------------------------------------ requests

class OpenAIRequest(BaseModel):
    """Fields are checked strictly (a string is not a number) and unknown fields are refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(..., description="the base model, an adapter, or an adapter folder under --adapter-dir")
    user: str | None = Field(None, description="accepted and ignored")


async def parse(request: Request, model: type[BaseModel]):
    """The request body as ``model``; a 400 naming the first bad field otherwise."""
    try:
        value = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ServeError(400, "malformed JSON body: send a JSON object with Content-Type: application/json") from None
    if not isinstance(value, dict):
        raise ServeError(400, "the body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else "body"
        if first["type"] == "extra_forbidden":
            raise ServeError(400, f"'{where}': not a parameter this server supports; leave it out") from None
        if first["type"] == "missing":
            raise ServeError(400, f"'{where}': required") from None
        raise ServeError(400, f"'{where}': {first['msg']}") from None


class Sampled(OpenAIRequest):
    """The sampling parameters completions and chat share."""

    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} strings; the text stops before them")
    seed: int | None = Field(None, ge=0, le=2**63 - 1 - MAX_CHOICES,
                             description="choice j samples with seed + j: the same seed, the same tokens")
    presence_penalty: float = Field(0.0, description="only 0 (no penalty) is supported")
    frequency_penalty: float = Field(0.0, description="only 0 (no penalty) is supported")
    logit_bias: dict[str, float] | None = Field(None, description="only empty is supported")

    def checked(self) -> Sampled:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ServeError(400, f"'{name}': penalties are not supported by this server; send 0 or leave it out")
        if self.logit_bias:
            raise ServeError(400, "'logit_bias': not supported by this server; leave it out")
        stops = self.stops
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ServeError(400, f"'stop': up to {MAX_STOPS} non-empty strings, got {len(stops)}")
        if self.stream_options is not None and not self.stream:
            raise ServeError(400, "'stream_options': only with stream: true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def options(self, choice: int, logprobs: int | None) -> GenerateOptions:
        return GenerateOptions(temperature=self.temperature, top_p=self.top_p,
                               seed=None if self.seed is None else self.seed + choice, stop=self.stops,
                               logprobs=logprobs, template=False, truncate=False)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


Sampled.model_rebuild()


# ------------------------------------------------------------------------------------------ models

class Lease:
    """A request's hold on the model it names (an adapter loaded on demand stays while a lease is held)."""

    def __init__(self, release=None):
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


async def use_model(server: Server, model: str, task: str) -> tuple[str | None, Lease]:
    """(the adapter name for ``Job.adapter``, None for the base; the request's lease) for the model id
    ``model``, which must answer ``task``: 404 unknown, 400 a model of the wrong kind."""
    engine = server.engine
    if model == server.model:
        engine.info(None, task)
        return None, Lease()
    on_demand = engine.adapter_dir
    if on_demand is not None and not on_demand.pinned(engine, model):
        lease = Lease(await on_demand.acquire(engine, model))
    elif model in engine.adapters:
        lease = Lease()
    else:
        raise ServeError(404, f"'model': no model {model!r}; this server has {', '.join(model_ids(server)[:20])}")
    try:
        engine.info(model, task)
    except ServeError:
        lease.release()
        raise
    return model, lease


def model_ids(server: Server) -> list[str]:
    engine = server.engine
    ids = [server.model, *engine.adapters]
    if engine.adapter_dir is not None:
        ids += [n for n in engine.adapter_dir.names() if n not in engine.adapters]
    return ids


# ------------------------------------------------------------------------------------------ generation

def jobs_for(server: Server, name: str | None, prompts: list[str], body: Sampled, logprobs: int | None,
             default_max: int) -> list[Job]:
    """One row per prompt and choice (choice index p * n + j)."""
    if len(prompts) * body.n > MAX_CHOICES:
        raise ServeError(400, f"'n': {len(prompts)} prompts x n={body.n} choices is more than the {MAX_CHOICES} "
                              "rows one request may ask for")
    deadline = time.monotonic() + server.timeout
    return [Job("generate", name, prompt, deadline, max_new_tokens=body.max_tokens or default_max,
                options=body.options(j, logprobs))
            for prompt in prompts for j in range(body.n)]


def usage(results: list[dict], n: int) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results[::n])  # a prompt counts once, whatever its choices
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def answer(server: Server, request: Request, jobs: list[Job], lease: Lease) -> list[dict]:
    """Run the rows and wait for all of them (504 past the timeout, 499 when the client left)."""
    try:
        return await server.run(request, jobs)
    finally:
        lease.release()


def stream(server: Server, name: str | None, jobs: list[Job], lease: Lease, *, head, chunk, tail, include_usage: bool, n: int):
    """Server-sent events: ``head()`` chunks first, ``chunk(index, piece, finish_reason)`` for every piece of
    text and every choice's end, ``tail(usage)`` when usage was asked for, then ``data: [DONE]``. Queued
    before the answer starts, so a full queue is still an HTTP 429."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    for index, job in enumerate(jobs):
        job.sink = lambda piece, i=index: loop.call_soon_threadsafe(pieces.put_nowait, (i, piece))
    try:
        futures = [asyncio.wrap_future(f) for f in server.engine.submit(jobs)]
    except BaseException:
        lease.release()
        raise
    timeout = server.timeout

    def event(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events():
        results: list = [None] * len(jobs)
        try:
            for data in head():
                yield event(data)
            left = set(range(len(jobs)))
            while left:
                index, piece = await asyncio.wait_for(pieces.get(), timeout)
                if piece is not None:
                    yield event(chunk(index, piece, None))
                    continue
                left.discard(index)
                results[index] = await asyncio.wait_for(futures[index], timeout)
                yield event(chunk(index, "", results[index]["finish_reason"]))
            server.counted(name)
            if include_usage:
                yield event(tail(usage(results, n)))
            yield "data: [DONE]\n\n"
        except ServeError as err:
            yield event(openai_error(err.status, err.message))
            yield "data: [DONE]\n\n"
        except asyncio.TimeoutError:
            yield event(openai_error(504, f"no token for {timeout:g} s (--timeout)"))
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancelled = True  # a client that left frees its rows at the next step
            for future in futures:  # their errors (499 for rows freed so) are not this answer's any more
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
            lease.release()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


__all__ = ["openai_error", "openai_route", "parse", "OpenAIRequest", "Sampled", "use_model", "model_ids",
           "jobs_for", "usage", "answer", "stream", "completion_id", "Lease", "FINGERPRINT", "MAX_CHOICES"]
