"""``POST /v1/adapters/{name}/embed``: unit-length embeddings from a retrieval adapter."""
from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel, Field

from ..api import ServerDep, Texts, endpoint


class Embeddings(BaseModel):
    adapter: str
    embeddings: list[list[float]] = Field(..., description="one unit-length vector per text")
    tokens: list[int] = Field(..., description="tokens read per text (after truncation to --max-len)")


@endpoint("POST", "/v1/adapters/{name}/embed", label="embed", answer=Embeddings,
          errors=(400, 404, 410, 413, 422, 429, 504), summary="unit-length embeddings (retrieval adapters)")
async def embed(name: str, body: Texts, request: Request, server: ServerDep):
    results = await server.run(request, server.jobs(name, "embed", server.texts(body)))
    server.counted(name)
    return {"adapter": name, "embeddings": [r["embedding"] for r in results], "tokens": [r["tokens"] for r in results]}
