"""``POST /v1/chat/completions`` (OpenAI): the messages through the model's chat template, answered by the
adapter (or base) ``model`` names."""
from __future__ import annotations

import time
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ..api import ServerDep, endpoint
from ..engine import ServeError
from ..openai_api import (FINGERPRINT, Sampled, answer, completion_id, jobs_for, openai_error, openai_route, parse,
                          stream, usage, use_model)

DEFAULT_MAX_TOKENS = 256  # when neither max_tokens nor max_completion_tokens is given (OpenAI: the rest of the context)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # other fields of a message (name, refusal) are ignored
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampled):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    logprobs: bool = Field(False, description="each token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and the k most likely (needs logprobs)")
    response_format: dict | None = Field(None, description="only {\"type\": \"text\"}")


def render(tokenizer, messages: list[Message]) -> str:
    """The text the model reads: the messages through its chat template, with the assistant's header last. A
    model without a template reads one user message as it is (as /v1/adapters/{name}/generate does)."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template refused the conversation (roles out of order, ...)
            raise ServeError(400, f"'messages': the model's chat template refused them: {str(err)[:200]}") from None
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    raise ServeError(400, "'messages': this model has no chat template, so it reads one user message only; send one, "
                          "or use /v1/completions with your own prompt format")


def _logprobs(entries: list[dict]) -> dict:
    def one(e):
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top"]]} for e in entries], "refusal": None}


@endpoint("POST", "/v1/chat/completions", label="openai.chat", error_body=openai_error,
          **openai_route(ChatRequest, "OpenAI: answer a conversation (the adapter is the model)",
                         "OpenAI's chat completions: the messages go through the model's chat template; `model` names "
                         "the adapter (or the base); `max_tokens`/`max_completion_tokens` (default 256), "
                         "`temperature`, `top_p`, `stop`, `seed`, `n`, `logprobs` + `top_logprobs`, `stream` "
                         "(server-sent chunks, `data: [DONE]` last; `stream_options.include_usage`).", stream=True))
async def chat(request: Request, server: ServerDep):
    body = (await parse(request, ChatRequest)).checked()
    if body.top_logprobs is not None and not body.logprobs:
        raise ServeError(400, "'top_logprobs': only with logprobs: true")
    if body.response_format not in (None, {"type": "text"}):
        raise ServeError(400, "'response_format': only {\"type\": \"text\"} is supported by this server")
    if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise ServeError(400, "'max_completion_tokens': differs from max_tokens; send one of them")
    body.max_tokens = body.max_tokens or body.max_completion_tokens
    for m in body.messages:
        if len(m.text) > server.max_chars:
            raise ServeError(413, f"'messages': a message has {len(m.text)} characters; the limit is {server.max_chars}")
    prompt = server.text(render(server.engine.tokenizer, body.messages), "messages")
    name, lease = await use_model(server, body.model, "generate")
    try:
        jobs = jobs_for(server, name, [prompt], body, (body.top_logprobs or 0) if body.logprobs else None,
                        DEFAULT_MAX_TOKENS)
    except BaseException:
        lease.release()
        raise
    rid, created = completion_id("chatcmpl"), int(time.time())

    def wrap(choices: list, kind: str = "chat.completion", **extra) -> dict:
        return {"id": rid, "object": kind, "created": created, "model": body.model,
                "system_fingerprint": FINGERPRINT, "choices": choices, **extra}

    if body.stream:
        def delta(index: int, content: dict, finish=None, entries=None) -> dict:
            return wrap([{"index": index, "delta": content, "finish_reason": finish,
                          "logprobs": _logprobs(entries) if entries else None}], "chat.completion.chunk")

        def chunk(index, piece, finish):
            entries = list(getattr(piece, "logprobs", ())) if body.logprobs else None
            return delta(index, {"content": str(piece)} if piece else {}, finish, entries)

        head = lambda: [delta(i, {"role": "assistant", "content": ""}) for i in range(len(jobs))]  # noqa: E731
        tail = lambda total: wrap([], "chat.completion.chunk", usage=total)  # noqa: E731
        include = bool(body.stream_options and body.stream_options.include_usage)
        return stream(server, name, jobs, lease, head=head, chunk=chunk, tail=tail, include_usage=include, n=body.n)
    results = await answer(server, request, jobs, lease)
    server.counted(name)
    return wrap([{"index": i, "message": {"role": "assistant", "content": r["text"], "refusal": None},
                  "logprobs": _logprobs(r["logprobs"]) if body.logprobs else None, "finish_reason": r["finish_reason"]}
                 for i, r in enumerate(results)], usage=usage(results, body.n))
