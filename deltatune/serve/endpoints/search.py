"""``POST /v1/adapters/{name}/search``: the indexed functions closest to a query."""
from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel, Field

from ..api import ServerDep, endpoint


class Query(BaseModel):
    query: str
    k: int = Field(5, ge=1, le=100)


class Hit(BaseModel):
    name: str
    file: str = Field(..., description="relative to the indexed folder")
    line: int
    code: str
    score: float


class Hits(BaseModel):
    adapter: str
    query: str
    results: list[Hit]
    tokens: int


@endpoint("POST", "/v1/adapters/{name}/search", label="search", answer=Hits,
          errors=(400, 404, 409, 410, 413, 422, 429, 504), summary="the indexed functions closest to a query")
async def search(name: str, body: Query, request: Request, server: ServerDep):
    (result,) = await server.run(request, server.jobs(name, "search", [server.text(body.query, "query")], k=body.k))
    server.counted(name)
    return {"adapter": name, "query": body.query, **result}
