"""``/v1/adapters``: list the loaded adapters, load one (token), unload one (token)."""
from __future__ import annotations

import asyncio

from fastapi import Request
from pydantic import BaseModel, Field

from ..api import AdapterOut, ServerDep, endpoint


class AdapterList(BaseModel):
    model: str = Field(..., description="the frozen base (a folder by its own name)")
    adapters: list[AdapterOut]


class LoadRequest(BaseModel):
    name: str = Field(..., description="the adapter's name in this server")
    path: str = Field(..., description="an adapter folder written by dt.save_adapter (or a train out_dir)")


@endpoint("GET", "/v1/adapters", label="adapters", answer=AdapterList,
          summary="the loaded adapters: kind, method, size, traffic (file paths only to clients with the token)")
async def list_adapters(request: Request, server: ServerDep):
    return {"model": server.model, "adapters": [server.adapter(i, request) for i in server.engine.adapters.values()]}


@endpoint("POST", "/v1/adapters", label="adapters", answer=AdapterOut, status=201, guarded=True,
          errors=(400, 409, 422), summary="load an adapter folder under a name (validated as dt.load_adapter does)")
async def load(body: LoadRequest, request: Request, server: ServerDep):
    info = await asyncio.to_thread(server.engine.load, body.name, body.path)
    return server.adapter(info, request)


@endpoint("DELETE", "/v1/adapters/{name}", label="adapters", guarded=True, errors=(404,), summary="unload an adapter")
async def unload(name: str, server: ServerDep):
    await asyncio.to_thread(server.engine.unload, name)
    return {"unloaded": name}
