"""``POST /v1/embeddings`` (OpenAI): unit-length embeddings from a retrieval adapter (or the base encoder)."""
from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import Request
from pydantic import Field

from ..api import ServerDep, endpoint
from ..engine import ServeError
from ..openai_api import OpenAIRequest, openai_error, openai_route, parse, use_model


class EmbeddingRequest(OpenAIRequest):
    input: str | list[str] | list[int] | list[list[int]] = Field(..., description="a text or a list of texts")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: int | None = Field(None, ge=1, description="only the model's own width")


@endpoint("POST", "/v1/embeddings", label="openai.embeddings", error_body=openai_error,
          **openai_route(EmbeddingRequest, "OpenAI: embeddings (a retrieval adapter is the model)",
                         "OpenAI's embeddings: `model` names a retrieval adapter (or the base encoder); unit-length "
                         "vectors (mean pooling, as the adapter was trained); `encoding_format` float or base64; "
                         "`usage.prompt_tokens` counts the tokens read (after truncation to --max-len)."))
async def embeddings(request: Request, server: ServerDep):
    body = await parse(request, EmbeddingRequest)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ServeError(400, "'input': empty; send a string or a list of strings")
    if not all(isinstance(t, str) for t in texts):
        raise ServeError(400, "'input': token ids are not supported by this server; send text")
    if len(texts) > server.max_items:
        raise ServeError(413, f"'input': {len(texts)} texts; the limit is {server.max_items}")
    texts = [server.text(t, "input") for t in texts]
    width = server.engine.hidden_size
    if body.dimensions not in (None, width):
        raise ServeError(400, f"'dimensions': this model's embeddings have {width}; send {width} or leave it out")
    name, lease = await use_model(server, body.model, "embed")
    try:
        results = await server.run(request, server.jobs(name, "embed", texts))
    finally:
        lease.release()
    server.counted(name)

    def encoded(vector: list[float]):
        if body.encoding_format == "float":
            return vector
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")

    tokens = sum(r["tokens"] for r in results)
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(r["embedding"])} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
