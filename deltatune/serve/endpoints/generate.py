"""``POST /v1/adapters/{name}/generate``: text from a causal-LM adapter, streamed as NDJSON lines."""
from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from ..api import ServerDep, endpoint
from ..engine import ServeError


class Prompt(BaseModel):
    prompt: str
    max_new_tokens: int = Field(64, ge=1, le=1024)
    stream: bool = True


class Generated(BaseModel):
    adapter: str
    text: str
    tokens: int


@endpoint("POST", "/v1/adapters/{name}/generate", label="generate", errors=(400, 404, 410, 413, 422, 429, 504),
          responses={200: {"model": Generated, "content": {"application/x-ndjson": {}}}},
          summary="generated text (causal-LM adapters); streams NDJSON",
          description="With `stream` (the default) the answer is NDJSON: `{\"token\": ...}` lines as tokens are "
                      "made, then `{\"done\": true, \"text\", \"tokens\"}` (or `{\"error\", \"status\"}`). "
                      "With `stream: false`, one JSON object.")
async def generate(name: str, body: Prompt, request: Request, server: ServerDep):
    (job,) = server.jobs(name, "generate", [server.text(body.prompt, "prompt")], max_new_tokens=body.max_new_tokens)
    if not body.stream:
        (result,) = await server.run(request, [job])
        server.counted(name)
        return {"adapter": name, **result}
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    job.sink = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    future = asyncio.wrap_future(server.engine.submit([job])[0])
    timeout = server.timeout

    async def lines():
        try:
            while True:
                piece = await asyncio.wait_for(pieces.get(), timeout)
                if piece is None:
                    break
                yield json.dumps({"token": piece}) + "\n"
            try:
                result = await asyncio.wait_for(future, timeout)
                server.counted(name)
                yield json.dumps({"done": True, **result}) + "\n"
            except ServeError as err:
                yield json.dumps({"error": err.message, "status": err.status}) + "\n"
        except asyncio.TimeoutError:
            yield json.dumps({"error": f"no token for {timeout:g} s", "status": 504}) + "\n"
        finally:
            job.cancelled = True  # a client that left stops its row at the next token
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # its 499 is no one's answer now

    return StreamingResponse(lines(), media_type="application/x-ndjson")
