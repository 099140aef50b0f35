"""What an endpoint module needs: the ``endpoint`` registration, the ``Server`` every handler is given,
the request and answer schemas endpoints share, and the table of error statuses.

An endpoint is one function in a module of ``deltatune/serve/endpoints/`` (importing that package
registers every module in it), declared with its method, path and metrics label::

    @endpoint("POST", "/v1/adapters/{name}/embed", label="embed", answer=Embeddings,
              errors=(400, 404, 410, 413, 422, 429, 504), summary="unit-length embeddings")
    async def embed(name: str, body: Texts, request: Request, server: ServerDep):
        results = await server.run(request, server.jobs(name, "embed", server.texts(body)))
        ...

``create_app`` turns every registration into a route: its OpenAPI answer and errors, the bearer token
when ``guarded``, the request counter under ``label``, the body bound and checked before the handler
runs, and its errors in the endpoint's ``error_body`` shape (``{"detail": ...}`` unless it says
otherwise, e.g. OpenAI's ``{"error": {...}}``).
"""
from __future__ import annotations

import asyncio
import hmac
import os
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, Field

from .engine import Engine, Job, ServeError

# ----------------------------------------------------------------------------------------- errors

ERRORS = {400: "malformed JSON, text that is not valid Unicode (a lone surrogate), empty input, the wrong task for "
               "this adapter, a bad adapter file",
          401: "this endpoint needs the server's token and the request has none, or a wrong one",
          404: "no adapter of that name", 409: "the name is taken, or search before the adapter is indexed",
          410: "the adapter was unloaded while the request waited",
          413: "a body over the server's limit (refused before it is read), input over --max-chars, or too many texts",
          422: "a field of the wrong type", 429: "the queue is full; retry after Retry-After seconds",
          499: "the client left", 504: "the request took longer than --timeout"}


class Error(BaseModel):
    detail: str = Field(..., description="one line naming the problem and what to do")


def detail_body(status: int, message: str) -> dict:
    """Our error shape: ``{"detail": "one line"}`` (FastAPI's own)."""
    return {"detail": message}


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses`` for these error statuses."""
    return {c: {"model": Error, "description": ERRORS[c]} for c in codes}


# ----------------------------------------------------------------------------------- registration

@dataclass(frozen=True)
class Endpoint:
    method: str  # GET, POST, DELETE, ...
    path: str
    label: str  # the endpoint label of deltatune_requests_total (a fixed set, whatever paths clients send)
    handler: Callable
    guarded: bool = False  # needs the bearer token when the server has one
    counted: bool = True  # False: not counted in the request metrics (health checks, scrapes)
    error_body: Callable[[int, str], dict] = detail_body
    route: dict = field(default_factory=dict)  # passed on to FastAPI's add_api_route (summary, responses, ...)


ENDPOINTS: list[Endpoint] = []


def endpoint(method: str, path: str, *, label: str, answer: type | None = None, status: int = 200,
             errors: tuple[int, ...] = (), guarded: bool = False, counted: bool = True,
             error_body: Callable[[int, str], dict] = detail_body, **route) -> Callable:
    """Register the decorated handler as ``method path``. ``answer`` is the schema of a success (for
    OpenAPI; handlers return plain dicts), ``errors`` the statuses it can answer (documented from
    ``ERRORS``; a guarded endpoint adds 401), ``route`` any other argument of FastAPI's
    ``add_api_route`` (``summary``, ``description``, ``response_class``, ``responses``, ...)."""
    method = method.upper()

    def register(handler: Callable) -> Callable:
        if any(e.method == method and e.path == path for e in ENDPOINTS):
            raise ValueError(f"{method} {path} is registered twice (the second by {handler.__module__}.{handler.__name__})")
        responses = {**({status: {"model": answer}} if answer is not None else {}),
                     **error_responses(*errors, *((401,) if guarded else ())), **route.pop("responses", {})}
        ENDPOINTS.append(Endpoint(method, path, label, handler, guarded, counted, error_body,
                                  {**route, "status_code": status, "responses": responses}))
        return handler

    return register


# --------------------------------------------------------------------------------------- metrics

class Metrics:
    """Prometheus metrics of one server (its own registry, so tests may run several)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("deltatune_requests", "HTTP requests by endpoint, adapter and status",
                                ["endpoint", "adapter", "status"], registry=self.registry)
        self.latency = Histogram("deltatune_request_latency_seconds", "request latency", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch_size = Histogram("deltatune_batch_size", "rows per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.batch_seconds = Histogram("deltatune_batch_seconds", "seconds per batch",
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10),
                                       registry=self.registry)
        self.queue = Gauge("deltatune_queue_depth", "rows waiting for the worker", registry=self.registry)
        self.adapters = Gauge("deltatune_adapters", "adapters loaded", registry=self.registry)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


# ---------------------------------------------------------------------------------------- server

def model_label(model: str) -> str:
    """The base model as clients see it: a named model as named, a folder by its own name only (the
    server's paths stay on the server)."""
    if os.path.isabs(model) or os.path.isdir(model) or model.startswith(("~", ".")):
        return os.path.basename(os.path.normpath(os.path.expanduser(model))) or "model"
    return model


class Server:
    """What every handler is given (``server: ServerDep``): the engine, the limits, and the steps every
    endpoint takes: check the texts, make rows, run them, count the request, show an adapter."""

    def __init__(self, engine: Engine, metrics: Metrics, *, token: str | None, timeout: float, max_chars: int,
                 max_items: int, max_body: int):
        self.engine, self.metrics, self.token = engine, metrics, token
        self.timeout, self.max_chars, self.max_items, self.max_body = timeout, max_chars, max_items, max_body
        self.model = model_label(engine.model_name)

    # ---------------------------------------------------------------------------- the token

    def authenticated(self, request: Request) -> bool:
        """The request carries the server's token (never true for a server without one: nobody is)."""
        if self.token is None:
            return False
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    def check_token(self, request: Request) -> None:
        if self.token is not None and not self.authenticated(request):
            raise ServeError(401, "this endpoint needs the server's token: Authorization: Bearer <token>")

    # ---------------------------------------------------------------------------- inputs

    def text(self, text: str | None, what: str = "text") -> str:
        if text is None or not text.strip():
            raise ServeError(400, f"'{what}' is empty; send some text")
        if len(text) > self.max_chars:
            raise ServeError(413, f"'{what}' has {len(text)} characters; the limit is {self.max_chars}")
        return text

    def texts(self, body: Texts) -> list[str]:
        if (body.text is None) == (body.texts is None):
            raise ServeError(400, "send exactly one of 'text' (a string) or 'texts' (a list of strings)")
        if body.texts is not None:
            if not body.texts:
                raise ServeError(400, "'texts' is empty; send at least one string")
            if len(body.texts) > self.max_items:
                raise ServeError(413, f"'texts' has {len(body.texts)} items; the limit is {self.max_items}")
            return [self.text(t, "texts[]") for t in body.texts]
        return [self.text(body.text)]

    # ---------------------------------------------------------------------------- rows

    def jobs(self, name: str, task: str, texts: list[str], **extra) -> list[Job]:
        """One row per text for adapter ``name`` (404 unknown, 400 the wrong task for its kind)."""
        self.engine.info(name, task)
        deadline = time.monotonic() + self.timeout
        return [Job(task, name, t, deadline, **extra) for t in texts]

    async def run(self, request: Request, jobs: list[Job]) -> list[dict]:
        """Queue the rows and wait for their results: 504 past the timeout, 499 when the client left
        (noticed within 0.25 s; its rows not yet run are skipped)."""
        futures = [asyncio.wrap_future(f) for f in self.engine.submit(jobs)]
        deadline = time.monotonic() + self.timeout
        pending = set(futures)
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServeError(504, f"the request took longer than the server's timeout ({self.timeout:g} s)")
                _, pending = await asyncio.wait(pending, timeout=min(left, 0.25))
                if pending and await request.is_disconnected():
                    raise ServeError(499, "the client left")
            return [f.result() for f in futures]
        finally:
            for job in jobs:
                job.cancelled = True  # rows not yet run are skipped
            for f in futures:
                if not f.done():
                    f.cancel()

    def counted(self, name: str) -> None:
        info = self.engine.adapters.get(name)
        if info is not None:
            info.requests += 1

    # ---------------------------------------------------------------------------- answers

    def adapter(self, info, request: Request) -> dict:
        """An adapter as a client sees it: names, kinds, sizes and traffic; its file and its index's folder
        only to a client holding the server's token."""
        out = info.public()
        if not self.authenticated(request):
            out.pop("path", None)
            if out.get("indexed"):
                out["indexed"].pop("root", None)
        return out


def server_of(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server_of)]

_bearer = HTTPBearer(auto_error=False, description="the server's --token (or $DELTATUNE_SERVE_TOKEN)")


def guard(request: Request, _=Depends(_bearer)) -> None:
    """The token check of a guarded endpoint (the bearer scheme documents it in OpenAPI; the check is here)."""
    server_of(request).check_token(request)


# --------------------------------------------------------------------------------- shared schemas

class Texts(BaseModel):
    text: str | None = Field(None, description="one input")
    texts: list[str] | None = Field(None, description="several inputs (each is one row of a batch)")


class AdapterOut(BaseModel):
    name: str
    kind: str = Field(..., description="retrieval, classification or generation")
    method: str
    path: str | None = Field(None, description="the adapter's file on the server: only to clients with the token")
    parameters: int
    size_bytes: int
    requests: int = Field(..., description="requests answered")
    rows: int = Field(..., description="texts run (a request may carry several)")
    labels: int | None = Field(None, description="classes of a classification adapter")
    label_names: list[str] | None = Field(None, description="their names, when the adapter carries them")
    indexed: dict | None = Field(None, description="the search index: functions (and root, to clients with the token)")


__all__ = ["endpoint", "Endpoint", "ENDPOINTS", "Server", "ServerDep", "guard", "Metrics", "ERRORS", "Error",
           "error_responses", "detail_body", "Texts", "AdapterOut", "ServeError", "model_label"]
