"""``deltatune serve``: one frozen model, many task adapters, batched across adapters over HTTP.

    deltatune serve --model minilm --adapter search=runs/search --adapter bugs=runs/bugs
    curl -s localhost:8000/v1/adapters/search/embed -d '{"text": "read a file"}' -H 'Content-Type: application/json'

See docs/serving.md. ``engine.Engine`` is the batching worker (usable without HTTP); ``app.create_app``
the FastAPI app; ``search`` the code index.
"""
from __future__ import annotations

import argparse
import os
import sys

TOKEN_ENV = "DELTATUNE_SERVE_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="the frozen base: minilm, smollm2, tiny-*, or a folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="load an adapter folder under NAME (repeatable)")
    p.add_argument("--index", action="append", default=[], metavar="NAME=DIR",
                   help="index a folder of Python files for search with retrieval adapter NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="rows per forward pass (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the first row waits for others (default 5)")
    p.add_argument("--queue", type=int, default=256, help="rows that may wait; beyond: 429 (default 256)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take (default 30)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per input; longer inputs are truncated")
    p.add_argument("--max-chars", type=int, default=20000, help="characters per input; longer: 413")
    p.add_argument("--token", default=None,
                   help=f"bearer token for loading, unloading and indexing (default: ${TOKEN_ENV}; none: open)")
    p.add_argument("--index-dir", default=None, help="where search indexes are saved (default: the deltatune cache)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default), cuda, cuda:N or mps when this machine has it")


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    from ..errors import ConfigError

    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} expects NAME=DIR, got {item!r}")
        out.append((name, path))
    return out


def run(args) -> int:
    import asyncio

    import uvicorn

    from .app import build_index, create_app
    from .engine import Engine

    adapters, indexes = _pairs(args.adapter, "--adapter"), _pairs(args.index, "--index")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    engine = Engine(args.model, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000, queue_size=args.queue,
                    max_len=args.max_len, index_dir=args.index_dir, device=args.device)
    app = create_app(engine, token=token, timeout=args.timeout, max_chars=args.max_chars)  # metrics before work
    try:
        for name, path in adapters:
            info = engine.load(name, path)
            print(f"deltatune serve: loaded {name} ({info.kind}, {info.method}, {info.size_bytes / 1e6:.2f} MB)",
                  file=sys.stderr)
        for name, path in indexes:
            report = build_index(engine, name, path)
            print(f"deltatune serve: indexed {report['functions']} functions of {path} for {name}"
                  f"{' (saved index)' if report['cached'] else ''}", file=sys.stderr)
        if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"deltatune serve: warning: listening on {args.host} without a token: anyone who reaches it may "
                  f"load and unload adapters; set --token or ${TOKEN_ENV}", file=sys.stderr)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
        print(f"deltatune serve: http://{args.host}:{args.port}/ (OpenAPI: /docs), model on {engine.device}",
              file=sys.stderr)
        asyncio.run(uvicorn.Server(config).serve())
    finally:
        engine.close()
    return 0
