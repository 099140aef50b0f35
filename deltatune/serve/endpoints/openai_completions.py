"""``POST /v1/completions`` (OpenAI): text completion of raw prompts, by the adapter (or base) ``model`` names."""
from __future__ import annotations

import time

from fastapi import Request
from pydantic import Field

from ..api import ServerDep, endpoint
from ..engine import ServeError
from ..openai_api import (FINGERPRINT, Sampled, answer, completion_id, jobs_for, openai_error, openai_route, parse,
                          stream, usage, use_model)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class CompletionRequest(Sampled):
    prompt: str | list[str] = Field(..., description="the text the model continues (no chat template), or several")
    logprobs: int | None = Field(None, ge=0, le=5, description="the chosen token's log-probability and the k most likely")
    echo: bool = Field(False, description="the prompt in front of each choice's text")
    best_of: int | None = Field(None, ge=1, description="only equal to n")
    suffix: str | None = Field(None, description="not supported")


def _logprobs(entries: list[dict], offset: int) -> dict:
    """OpenAI's completion log-probabilities: tokens, their log-probabilities, the top ones, text offsets."""
    tokens, at = [], []
    for e in entries:
        at.append(offset)
        tokens.append(e["token"])
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries], "text_offset": at}


@endpoint("POST", "/v1/completions", label="openai.completions", error_body=openai_error,
          **openai_route(CompletionRequest, "OpenAI: complete a prompt (the adapter is the model)",
                         "OpenAI's completions: `model` names the adapter (or the base); `max_tokens` (default 16), "
                         "`temperature`, `top_p`, `stop`, `seed`, `n`, `logprobs` (up to 5), `echo`, `stream` "
                         "(server-sent events, `data: [DONE]` last; `stream_options.include_usage`). The prompt is "
                         "read as it is (no chat template) and must fit --max-len tokens.",
                         answer=None, stream=True))
async def completions(request: Request, server: ServerDep):
    body = (await parse(request, CompletionRequest)).checked()
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ServeError(400, "'prompt': empty; send a string or a list of strings")
    prompts = [server.text(p, "prompt") for p in prompts]
    if body.best_of not in (None, body.n):
        raise ServeError(400, "'best_of': only equal to n is supported (each choice is returned)")
    if body.suffix:
        raise ServeError(400, "'suffix': insertion is not supported by this server; leave it out")
    if body.echo and body.logprobs is not None:
        raise ServeError(400, "'echo': not with logprobs (the prompt's log-probabilities are not computed)")
    name, lease = await use_model(server, body.model, "generate")
    try:
        jobs = jobs_for(server, name, prompts, body, body.logprobs, DEFAULT_MAX_TOKENS)
    except BaseException:
        lease.release()
        raise
    rid, created = completion_id("cmpl"), int(time.time())

    def echoed(index: int) -> str:
        return prompts[index // body.n] if body.echo else ""

    def choice(index: int, text: str, finish, entries) -> dict:
        return {"index": index, "text": text, "finish_reason": finish,
                "logprobs": None if entries is None else _logprobs(entries, len(echoed(index)))}

    def wrap(choices: list, **extra) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": FINGERPRINT, "choices": choices, **extra}

    if body.stream:
        offsets = [len(echoed(i)) for i in range(len(jobs))]

        def chunk(index, piece, finish):
            entries = list(getattr(piece, "logprobs", ())) if body.logprobs is not None else None
            data = wrap([{"index": index, "text": str(piece), "finish_reason": finish,
                          "logprobs": _logprobs(entries, offsets[index]) if entries else None}])
            offsets[index] += len(piece)
            return data

        head = lambda: [wrap([choice(i, echoed(i), None, None)]) for i in range(len(jobs)) if echoed(i)]  # noqa: E731
        tail = lambda total: wrap([], usage=total)  # noqa: E731
        include = bool(body.stream_options and body.stream_options.include_usage)
        return stream(server, name, jobs, lease, head=head, chunk=chunk, tail=tail, include_usage=include, n=body.n)
    results = await answer(server, request, jobs, lease)
    server.counted(name)
    return wrap([choice(i, echoed(i) + r["text"], r["finish_reason"], r.get("logprobs")) for i, r in enumerate(results)],
                usage=usage(results, body.n))
