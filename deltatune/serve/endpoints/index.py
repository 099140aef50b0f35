"""``POST /v1/adapters/{name}/index`` (token): index a folder of Python files on the server for search."""
from __future__ import annotations

import asyncio

from fastapi import Request
from pydantic import BaseModel, Field

from ..api import ServerDep, endpoint
from ..search import build_index


class IndexRequest(BaseModel):
    path: str = Field(..., description="a folder of Python files on the server")


@endpoint("POST", "/v1/adapters/{name}/index", label="index", guarded=True, errors=(400, 404, 410, 422),
          summary="index a folder of Python files (functions split with ast) for search")
async def index(name: str, body: IndexRequest, request: Request, server: ServerDep):
    server.engine.info(name, "search")
    report = await asyncio.to_thread(build_index, server.engine, name, body.path)
    if not server.authenticated(request):  # the server's folders stay on the server
        report.pop("root", None)
        report.pop("saved_to", None)
    return report
