"""The HTTP face of the engine: FastAPI routes, errors, metrics, the bearer token, the web page.

OpenAPI at /openapi.json and /docs. Errors are JSON ``{"detail": "one line naming the problem"}``:
400 malformed JSON, empty input or the wrong task for the adapter; 401 a missing or wrong token;
404 an unknown adapter; 409 a name already loaded or no index yet; 410 an adapter unloaded while
the request waited; 413 an input too large; 422 a field of the wrong type; 429 a full queue (with
Retry-After); 504 a request that ran out of time.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..errors import DeltatuneError
from . import search
from .engine import KINDS, Engine, Job, ServeError
from .page import PAGE


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


class Texts(BaseModel):
    text: str | None = Field(None, description="one input")
    texts: list[str] | None = Field(None, description="several inputs (each is one row of a batch)")


class Query(BaseModel):
    query: str
    k: int = Field(5, ge=1, le=100)


class Prompt(BaseModel):
    prompt: str
    max_new_tokens: int = Field(64, ge=1, le=1024)
    stream: bool = True


class LoadRequest(BaseModel):
    name: str = Field(..., description="the adapter's name in this server")
    path: str = Field(..., description="an adapter folder written by dt.save_adapter (or a train out_dir)")


class IndexRequest(BaseModel):
    path: str = Field(..., description="a folder of Python files on the server")


# What the endpoints answer, for the OpenAPI description (the handlers return plain dicts).
class Error(BaseModel):
    detail: str = Field(..., description="one line naming the problem and what to do")


class AdapterOut(BaseModel):
    name: str
    kind: str = Field(..., description="retrieval, classification or generation")
    method: str
    path: str
    parameters: int
    size_bytes: int
    requests: int = Field(..., description="requests answered")
    rows: int = Field(..., description="texts run (a request may carry several)")
    labels: int | None = Field(None, description="classes of a classification adapter")
    label_names: list[str] | None = Field(None, description="their names, when the adapter carries them")
    indexed: dict | None = Field(None, description="the search index: root and functions")


class AdapterList(BaseModel):
    model: str
    adapters: list[AdapterOut]


class Embeddings(BaseModel):
    adapter: str
    embeddings: list[list[float]] = Field(..., description="one unit-length vector per text")
    tokens: list[int] = Field(..., description="tokens read per text (after truncation to --max-len)")


class ClassResult(BaseModel):
    label: str | int = Field(..., description="the class name, or its index when the adapter carries no names")
    index: int
    probabilities: list[float] = Field(..., description="in class order")
    tokens: int


class Classes(BaseModel):
    adapter: str
    labels: list[str] | None
    results: list[ClassResult]
    note: str | None = Field(None, description="present when the adapter carries no label names")


class Hit(BaseModel):
    name: str
    file: str
    line: int
    code: str
    score: float


class Hits(BaseModel):
    adapter: str
    query: str
    results: list[Hit]
    tokens: int


class Generated(BaseModel):
    adapter: str
    text: str
    tokens: int


ERRORS = {400: "malformed JSON, empty input, the wrong task for this adapter, a bad adapter file",
          404: "no adapter of that name", 409: "the name is taken, or search before the adapter is indexed",
          410: "the adapter was unloaded while the request waited", 413: "input over --max-chars, or too many texts",
          422: "a field of the wrong type", 429: "the queue is full; retry after Retry-After seconds",
          499: "the client left", 504: "the request took longer than --timeout"}


def _errors(*codes: int) -> dict:
    return {c: {"model": Error, "description": ERRORS[c]} for c in codes}


DESCRIPTION = """One frozen {model} and many task adapters, batched across adapters: concurrent requests for
different adapters share one forward pass (per-row routing).

Errors are JSON `{{"detail": "..."}}` naming the problem: 400 malformed JSON, empty input or the wrong task
for the adapter; 401 a missing or wrong token; 404 an unknown adapter; 409 a name already loaded or no
index yet; 410 an adapter unloaded while the request waited; 413 an input too large; 422 a field of the
wrong type; 429 a full queue (with Retry-After); 504 a request that ran out of time.
Loading, unloading and indexing need the bearer token when the server has one ({guarded})."""


def create_app(engine: Engine, *, token: str | None = None, timeout: float = 30.0, max_chars: int = 20000,
               max_items: int = 64) -> FastAPI:
    metrics = engine.metrics or Metrics()
    engine.metrics = metrics
    metrics.queue.set_function(engine.queue_depth)
    metrics.adapters.set_function(lambda: len(engine.adapters))
    app = FastAPI(title="deltatune serve", version="1", description=DESCRIPTION.format(
        model=engine.model_name, guarded="set" if token is not None else "this one has none: they are open"))
    app.state.engine = engine

    @app.exception_handler(ServeError)
    async def _serve_error(request, err: ServeError):
        headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after else None
        return JSONResponse({"detail": err.message}, status_code=err.status, headers=headers)

    @app.exception_handler(DeltatuneError)
    async def _dt_error(request, err):
        return JSONResponse({"detail": " ".join(str(err).split())}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON body: send a JSON object with Content-Type: "
                                           "application/json"}, status_code=400)
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return JSONResponse({"detail": f"field '{where}': {first.get('msg', 'invalid')}"}, status_code=422)

    app.add_middleware(_Counted, engine=engine, metrics=metrics)

    bearer = HTTPBearer(auto_error=False, description="the server's --token (or $DELTATUNE_SERVE_TOKEN)")

    def guard(request: Request, _=Depends(bearer)) -> None:  # the scheme documents it; the check is here
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ServeError(401, "this endpoint needs the server's token: Authorization: Bearer <token>")

    def check_text(text: str | None, what: str = "text") -> str:
        if text is None or not text.strip():
            raise ServeError(400, f"'{what}' is empty; send some text")
        if len(text) > max_chars:
            raise ServeError(413, f"'{what}' has {len(text)} characters; the limit is {max_chars}")
        return text

    def rows(body: Texts) -> list[str]:
        if (body.text is None) == (body.texts is None):
            raise ServeError(400, "send exactly one of 'text' (a string) or 'texts' (a list of strings)")
        if body.texts is not None:
            if not body.texts:
                raise ServeError(400, "'texts' is empty; send at least one string")
            if len(body.texts) > max_items:
                raise ServeError(413, f"'texts' has {len(body.texts)} items; the limit is {max_items}")
            return [check_text(t, "texts[]") for t in body.texts]
        return [check_text(body.text)]

    async def run(request: Request, jobs: list[Job]) -> list[dict]:
        futures = [asyncio.wrap_future(f) for f in engine.submit(jobs)]
        deadline = time.monotonic() + timeout
        pending = set(futures)
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServeError(504, f"the request took longer than the server's timeout ({timeout:g} s)")
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

    def task_jobs(name: str, task: str, texts: list[str], **extra) -> list[Job]:
        engine.info(name, task)
        deadline = time.monotonic() + timeout
        return [Job(task, name, t, deadline, **extra) for t in texts]

    def counted(name: str) -> None:
        info = engine.adapters.get(name)
        if info is not None:
            info.requests += 1

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE

    @app.get("/health", summary="liveness: the worker thread runs")
    async def health():
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped", "model": engine.model_name,
                             "adapters": len(engine.adapters), "queue_depth": engine.queue_depth()},
                            status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/adapters", summary="the loaded adapters: kind, method, size, traffic", response_model=AdapterList)
    async def list_adapters():
        return {"model": engine.model_name, "adapters": [i.public() for i in engine.adapters.values()]}

    @app.post("/v1/adapters", status_code=201, dependencies=[Depends(guard)], response_model=AdapterOut,
              responses={401: {"model": Error, "description": "no or wrong token"}, **_errors(400, 409, 422)},
              summary="load an adapter folder under a name (validated as dt.load_adapter does)")
    async def load(body: LoadRequest):
        info = await asyncio.to_thread(engine.load, body.name, body.path)
        return info.public()

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(guard)], summary="unload an adapter",
                responses={401: {"model": Error, "description": "no or wrong token"}, **_errors(404)})
    async def unload(name: str):
        await asyncio.to_thread(engine.unload, name)
        return {"unloaded": name}

    @app.post("/v1/adapters/{name}/embed", summary="unit-length embeddings (retrieval adapters)",
              responses={200: {"model": Embeddings}, **_errors(400, 404, 410, 413, 422, 429, 504)})
    async def embed(name: str, body: Texts, request: Request):
        results = await run(request, task_jobs(name, "embed", rows(body)))
        counted(name)
        return {"adapter": name, "embeddings": [r["embedding"] for r in results],
                "tokens": [r["tokens"] for r in results]}

    @app.post("/v1/adapters/{name}/classify", summary="the class and class probabilities (classification adapters)",
              responses={200: {"model": Classes}, **_errors(400, 404, 410, 413, 422, 429, 504)},
              description="Per text: `label` (the class name saved with the adapter, or its index when the "
                          "adapter carries no names), `index`, and `probabilities` in class order. `labels` lists "
                          "the class names, or is null with a `note` when the adapter has none.")
    async def classify(name: str, body: Texts, request: Request):
        names = engine.info(name, "classify").label_names
        results = await run(request, task_jobs(name, "classify", rows(body)))
        counted(name)
        out = {"adapter": name, "labels": names, "results": results}
        if names is None:
            out["note"] = ("this adapter carries no label names (train saves them from the task's labels); "
                           "'label' is the class index")
        return out

    @app.post("/v1/adapters/{name}/search", summary="the indexed functions closest to a query",
              responses={200: {"model": Hits}, **_errors(400, 404, 409, 410, 413, 422, 429, 504)})
    async def search_(name: str, body: Query, request: Request):
        (result,) = await run(request, task_jobs(name, "search", [check_text(body.query, "query")], k=body.k))
        counted(name)
        return {"adapter": name, "query": body.query, **result}

    @app.post("/v1/adapters/{name}/index", dependencies=[Depends(guard)],
              responses={401: {"model": Error, "description": "no or wrong token"}, **_errors(400, 404, 410, 422)},
              summary="index a folder of Python files (functions split with ast) for search")
    async def index(name: str, body: IndexRequest):
        engine.info(name, "search")
        return await asyncio.to_thread(build_index, engine, name, body.path)

    @app.post("/v1/adapters/{name}/generate", summary="generated text (causal-LM adapters); streams NDJSON",
              description="With `stream` (the default) the answer is NDJSON: `{\"token\": ...}` lines as tokens are "
                          "made, then `{\"done\": true, \"text\", \"tokens\"}` (or `{\"error\", \"status\"}`). "
                          "With `stream: false`, one JSON object.",
              responses={200: {"model": Generated, "content": {"application/x-ndjson": {}}},
                         **_errors(400, 404, 410, 413, 422, 429, 504)})
    async def generate(name: str, body: Prompt, request: Request):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        (job,) = task_jobs(name, "generate", [check_text(body.prompt, "prompt")], max_new_tokens=body.max_new_tokens)
        job.sink = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        if not body.stream:
            job.sink = None
            (result,) = await run(request, [job])
            counted(name)
            return {"adapter": name, **result}
        future = asyncio.wrap_future(engine.submit([job])[0])

        async def lines():
            try:
                while True:
                    piece = await asyncio.wait_for(pieces.get(), timeout)
                    if piece is None:
                        break
                    yield json.dumps({"token": piece}) + "\n"
                try:
                    result = await asyncio.wait_for(future, timeout)
                    counted(name)
                    yield json.dumps({"done": True, **result}) + "\n"
                except ServeError as err:
                    yield json.dumps({"error": err.message, "status": err.status}) + "\n"
            except asyncio.TimeoutError:
                yield json.dumps({"error": f"no token for {timeout:g} s", "status": 504}) + "\n"
            finally:
                job.cancelled = True  # a client that left stops its row at the next token

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


_ENDPOINTS = {"embed", "classify", "search", "index", "generate", "adapters", "/", "/docs", "/openapi.json",
              "/metrics", "/health"}


class _Counted:
    """Counts requests and their latency by endpoint, adapter and status. Plain ASGI (not
    ``@app.middleware``, whose wrapper hides a client's disconnect from the handlers)."""

    def __init__(self, app, engine: Engine, metrics: Metrics):
        self.app, self.engine, self.metrics = app, engine, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            parts = scope["path"].strip("/").split("/")
            if len(parts) == 4 and parts[:2] == ["v1", "adapters"]:
                endpoint, adapter = parts[3], parts[2] if parts[2] in self.engine.adapters else "-"
            elif parts[:2] == ["v1", "adapters"]:
                endpoint, adapter = "adapters", "-"
            else:
                endpoint, adapter = "/" + parts[0], "-"
            if endpoint not in _ENDPOINTS:  # label values stay a fixed set, whatever paths clients send
                endpoint = "other"
            if endpoint not in ("/metrics", "/health"):
                self.metrics.requests.labels(endpoint, adapter, str(status[0])).inc()
                self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)


def build_index(engine: Engine, name: str, root: str) -> dict:
    """Index ``root`` with adapter ``name``: reuse the saved index when the adapter and files are the same."""
    info = engine.info(name, "search")
    root_path = Path(root).expanduser().resolve()
    key = search.files_key(root_path, info.identity + engine.model_name)
    folder = engine.index_dir / key
    index = search.Index.load(folder)
    cached = index is not None
    if index is None:
        items, report = search.functions(root_path)
        vectors = engine.encode(name, [f"{f.name}\n{f.code}" for f in items])
        index = search.Index(str(root_path), items, vectors, report)
        index.save(folder)
    info = engine.adapters.get(name)
    if info is None:
        raise ServeError(410, f"adapter {name!r} was unloaded while its index was built")
    info.index = index
    return {"adapter": name, "root": index.root, "functions": len(index.items), "cached": cached,
            "saved_to": str(folder), **index.report}


__all__ = ["create_app", "build_index", "Metrics", "KINDS"]
