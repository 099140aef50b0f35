"""The HTTP face of the engine: the FastAPI app assembled from the registered endpoints.

``create_app`` adds one route per registration in ``api.ENDPOINTS`` (the modules of ``endpoints/``),
and around them what every endpoint shares: the errors (one line, in the endpoint's error shape),
the request metrics, the bearer token, and the body check that runs before any handler: a body over
the limit is refused with 413 before it is read (by its Content-Length, or as soon as a streamed
body passes the limit), and a JSON body holding a string that is not valid Unicode (a lone
surrogate such as ``"\\ud800"``) is refused with 400 naming the field, so such a row never joins a
batch with other clients' rows.

OpenAPI at /openapi.json and /docs.
"""
from __future__ import annotations

import asyncio

import json
import re
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from ..errors import DeltatuneError
from .api import ENDPOINTS, ERRORS, Metrics, Server, detail_body, guard
from .engine import Engine, ServeError
from .search import build_index

DESCRIPTION = """One frozen {model} and many task adapters, batched across adapters: concurrent requests for
different adapters share one forward pass (per-row routing).

Errors are JSON `{{"detail": "..."}}` naming the problem: {errors}.
Request bodies over {max_body} bytes are refused with 413 before they are read.
Loading, unloading and indexing need the bearer token when the server has one ({guarded}); the server's
file paths are shown only to clients holding it."""


def body_limit(max_chars: int, max_items: int) -> int:
    """The default body limit: room for ``max_items`` texts of ``max_chars`` characters however they are
    escaped (12 bytes: a character outside the BMP written as a JSON surrogate pair, ``\\uXXXX\\uXXXX``),
    plus 64 KiB for the rest of the body."""
    return 12 * max_chars * max_items + (64 << 10)


def create_app(engine: Engine, *, token: str | None = None, timeout: float = 30.0, max_chars: int = 20000,
               max_items: int = 64, max_body: int | None = None) -> FastAPI:
    from . import endpoints  # noqa: F401  (importing the package registers every endpoint module)

    metrics = engine.metrics or Metrics()
    engine.metrics = metrics
    metrics.queue.set_function(engine.queue_depth)
    metrics.adapters.set_function(lambda: len(engine.adapters))
    server = Server(engine, metrics, token=token, timeout=timeout, max_chars=max_chars, max_items=max_items,
                    max_body=max_body if max_body is not None else body_limit(max_chars, max_items))
    app = FastAPI(title="deltatune serve", version="1", description=DESCRIPTION.format(
        model=server.model, errors="; ".join(f"{code} {text}" for code, text in sorted(ERRORS.items())),
        max_body=server.max_body, guarded="set" if token is not None else "this one has none: they are open"))
    app.state.server, app.state.engine = server, engine

    @app.exception_handler(ServeError)
    async def _serve_error(request, err: ServeError):
        headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after else None
        return _error(request, err.status, err.message, headers)

    @app.exception_handler(DeltatuneError)
    async def _dt_error(request, err):
        return _error(request, 400, " ".join(str(err).split()))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(request, 400, "malformed JSON body: send a JSON object with Content-Type: application/json")
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return _error(request, 422, f"field '{where}': {first.get('msg', 'invalid')}")

    app.add_middleware(_Counted, server=server)
    for spec in ENDPOINTS:
        route_class = type("Route", (_Route,), {"spec": spec})
        app.router.add_api_route(spec.path, spec.handler, methods=[spec.method], route_class_override=route_class,
                                 dependencies=[Depends(guard)] if spec.guarded else None, **spec.route)
    return app


def _error(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """An error in the shape of the endpoint that answers it (ours, ``{"detail"}``, unless it declares another)."""
    spec = request.scope.get(_SPEC)
    shape = spec.error_body if spec is not None else detail_body
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a message quoting bad text stays sendable
    return JSONResponse(shape(status, message), status_code=status, headers=headers)


# ---------------------------------------------------------------------------------- the body check

_SPEC = "deltatune.endpoint"  # the scope key naming the registered endpoint that answers a request
_UNPARSED = object()
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs: what is left is a lone half


class _Route(APIRoute):
    """A registered endpoint's route: the body is read within the server's limit and checked before the
    handler (and FastAPI's parsing) sees it."""

    spec = None  # its api.Endpoint (set on the class made for it: the handler is built in __init__)

    def get_route_handler(self):
        handle, spec = super().get_route_handler(), self.spec

        async def checked(request: Request):
            request.scope[_SPEC] = spec  # for the error shape and the request metrics around the handler
            return await handle(await _checked(request))

        return checked


class _Read(Request):
    """A request whose body was read (bounded) and parsed once; FastAPI reads both from here."""

    def __init__(self, request: Request, body: bytes, value):
        super().__init__(request.scope, request.receive)
        self._bytes, self._value = body, value

    async def body(self) -> bytes:
        return self._bytes

    async def json(self):
        if self._value is _UNPARSED:  # not JSON: raises the JSONDecodeError FastAPI answers as malformed JSON
            return json.loads(self._bytes)
        return self._value


BODY_SECONDS = 30  # the longest a request body may take to arrive


async def _checked(request: Request) -> Request:
    server: Server = request.app.state.server
    limit = server.max_body
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:  # refused before a byte of it is read
        raise ServeError(413, f"the request body has {int(declared)} bytes; this server reads at most {limit} "
                              f"(--max-chars {server.max_chars} per text, {server.max_items} texts per request)")
    chunks = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a streamed body without a length: stop reading at the limit
                raise ServeError(413, f"the request body passed {limit} bytes, the most this server reads "
                                      f"(--max-chars {server.max_chars} per text, {server.max_items} texts per request)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_SECONDS)  # a body sent a byte at a time holds no connection for ever
    except ClientDisconnect:
        raise ServeError(499, "the client left while sending its body") from None
    except asyncio.TimeoutError:
        raise ServeError(408, f"the request body took over {BODY_SECONDS} s to arrive; send it whole") from None
    body = b"".join(chunks)
    value = _UNPARSED
    if body:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            pass  # FastAPI answers it (400 malformed JSON) when the endpoint expects JSON
        except RecursionError:
            raise ServeError(400, "malformed JSON body: nested too deeply; send a flat JSON object") from None
        except UnicodeDecodeError:
            raise ServeError(400, "the body is not UTF-8 text; send JSON encoded as UTF-8") from None
        except ValueError as err:  # a number too long to convert
            raise ServeError(400, f"malformed JSON body: {' '.join(str(err).split(';')[0].split())[:200]}") from None
        if value is not _UNPARSED:
            _check_unicode(value)
    return _Read(request, body, value)


def _check_unicode(value) -> None:
    """400 naming the first string (or key) of a parsed JSON body that holds a lone surrogate: such text has
    no UTF-8 form, the tokenizer refuses it, and it must fail its own request only."""
    stack = [("", value)]
    while stack:  # not recursive: a body may nest as deep as the JSON parser allows
        where, item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                raise ServeError(400, f"field '{where or 'body'}' is not valid Unicode: a lone surrogate "
                                      f"U+{ord(found.group()):04X} at character {found.start()}; send text that "
                                      "encodes as UTF-8")
        elif isinstance(item, dict):
            for key, inner in reversed(list(item.items())):
                stack.append((f"{where}.{key}" if where else str(key), inner))
                stack.append((f"{where}.{key}" if where else str(key), key))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}" if where else str(i), inner) for i, inner in reversed(list(enumerate(item))))


# ------------------------------------------------------------------------------------------ metrics

_FASTAPI_PAGES = {"/docs", "/openapi.json"}


class _Counted:
    """Counts requests and their latency by endpoint (the registration's label), adapter and status. Plain
    ASGI (not ``@app.middleware``, whose wrapper hides a client's disconnect from the handlers)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

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
            spec = scope.get(_SPEC)
            if spec is None or spec.counted:
                # label values stay a fixed set, whatever paths clients send
                endpoint = spec.label if spec is not None else (
                    scope["path"] if scope["path"] in _FASTAPI_PAGES else "other")
                name = (scope.get("path_params") or {}).get("name")
                adapter = name if name in self.server.engine.adapters else "-"
                self.server.metrics.requests.labels(endpoint, adapter, str(status[0])).inc()
                self.server.metrics.latency.labels(endpoint).observe(time.monotonic() - start)


__all__ = ["create_app", "build_index", "body_limit", "Metrics"]
