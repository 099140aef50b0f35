"""``GET /v1/models`` (OpenAI): the base model and every adapter, as model ids a request may name."""
from __future__ import annotations

import time

from ..api import ServerDep, endpoint
from ..engine import ServeError
from ..openai_api import openai_error, openai_route

STARTED = int(time.time())  # "created" of the base and of adapters loaded at start-up


def _model(server, name: str | None, info=None) -> dict:
    """A model object: OpenAI's fields, and the kind and method of a loaded adapter (never a server path);
    ``info`` None: an adapter folder not loaded yet."""
    return {"id": server.model if name is None else name, "object": "model", "created": STARTED,
            "owned_by": "deltatune", "root": server.model, "parent": None if name is None else server.model,
            "kind": info.kind if info else None, "method": info.method if info and name is not None else None,
            "loaded": info is not None}


def _models(server) -> list[dict]:
    engine = server.engine
    loaded = dict(engine.adapters)  # a copy: the worker may load or unload one meanwhile
    out = [_model(server, None, engine.base)] + [_model(server, name, info) for name, info in loaded.items()]
    if engine.adapter_dir is not None:  # adapter folders a request may name: loaded on first use
        out += [_model(server, name) for name in engine.adapter_dir.names() if name not in loaded]
    return out


@endpoint("GET", "/v1/models", label="openai.models", error_body=openai_error, **openai_route(
    None, "OpenAI: the models a request may name (the base, the adapters, adapter folders under --adapter-dir)",
    "`{\"object\": \"list\", \"data\": [model, ...]}`; a model is `{id, object, created, owned_by, root, parent, kind, "
    "method, loaded}`: `parent` is the base for an adapter, `loaded` false for an adapter folder under --adapter-dir "
    "that the first request naming it loads."))
async def list_models(server: ServerDep):
    return {"object": "list", "data": _models(server)}


@endpoint("GET", "/v1/models/{model}", label="openai.models", error_body=openai_error,
          **openai_route(None, "OpenAI: one model", "a model object, as in the list; 404 for an id that names none"))
async def one_model(model: str, server: ServerDep):
    found = next((m for m in _models(server) if m["id"] == model), None)
    if found is None:
        raise ServeError(404, f"'model': no model {model!r}")
    return found
