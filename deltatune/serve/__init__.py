"""``deltatune serve``: one frozen model, many task adapters, batched across adapters over HTTP.

    deltatune serve --model minilm --adapter search=runs/search --adapter bugs=runs/bugs
    curl -s localhost:8000/v1/adapters/search/embed -d '{"text": "read a file"}' -H 'Content-Type: application/json'

See docs/serving.md. ``engine.Engine`` is the batching worker (usable without HTTP); ``app.create_app``
the FastAPI app; ``search`` the code index.
"""
from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from dataclasses import dataclass, fields

from .. import settings
from ..settings import setting

TOKEN_ENV = "DELTATUNE_SERVE_TOKEN"


@dataclass
class Limits:
    """The server's numbers, declared once (type, range, default, help): their flags are generated from
    here and every value is checked before the model is loaded."""

    port: int = setting(8000, min=0, max=65535, help="TCP port to listen on; 0 picks a free one")
    max_batch: int = setting(32, min=1, max=4096, help="rows per forward pass")
    max_wait_ms: float = setting(5.0, min=0.0, max=60_000.0, metavar="MS", help="how long the first row waits for others")
    queue: int = setting(256, min=1, max=1_000_000, help="rows that may wait; beyond: 429")
    timeout: float = setting(30.0, min=0.001, max=86_400.0, metavar="SECONDS", help="seconds a request may take")
    max_len: int = setting(256, min=8, max=1 << 20, help="tokens per input; longer inputs are truncated")
    max_chars: int = setting(20000, min=1, max=10_000_000,
                             help="characters per input; longer: 413 (request bodies are bounded from it)")
    batching: str = setting("continuous", choices=("continuous", "static"), metavar="continuous|static",
                            help="generation: rows join and leave the running batch at every token, or one batch "
                                 "runs to its longest row")
    max_tokens_in_flight: int = setting(8192, min=1, max=1 << 30,
                                        help="generation: prompt plus new tokens of the running rows; more wait")
    quantize: str | None = setting(None, choices=("nf4", "fp4", "int8"), metavar="nf4|fp4|int8",
                                   default_text="off: a float32 base",
                                   help="hold the base's linear layers quantized (bitsandbytes); adapters run unmerged "
                                        "on top in float32 (docs/performance.md)")
    max_adapters: int = setting(8, min=1, max=1 << 20,
                                help="with --adapter-dir: adapters in memory, --adapter ones included; the least "
                                     "recently used one no request holds is unloaded for a new one")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="the frozen base: minilm, smollm2, tiny-*, or a folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="load an adapter folder under NAME (repeatable)")
    p.add_argument("--index", action="append", default=[], metavar="NAME=DIR",
                   help="index a folder of Python files for search with retrieval adapter NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    settings.add_flags(p, Limits)
    p.add_argument("--token", default=None,
                   help=f"bearer token for loading, unloading and indexing (default: ${TOKEN_ENV}; none: open)")
    p.add_argument("--index-dir", default=None, help="where search indexes are saved (default: the deltatune cache)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="a folder of adapter folders: a request naming one as its model loads it (OpenAI endpoints)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default), cuda, cuda:N or mps when this machine has it")


def check_limits(args) -> Limits:
    """The numeric flags as a checked ``Limits``; a ConfigError naming the first flag out of its range."""
    from ..errors import ConfigError

    limits = Limits(**settings.values_from(args, Limits))  # a flag left out keeps the declared default
    for f in fields(Limits):
        value = getattr(limits, f.name)
        if settings.problem(value, f):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be {settings.describe(f)}, got {value!r}")
    return limits


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    from ..errors import ConfigError

    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} expects NAME=DIR, got {item!r}")
        out.append((name, path))
    return out


_BIND_WHY = {errno.EADDRINUSE: "the port is in use (another server?); pick another --port or stop the other one",
             errno.EACCES: "this user may not bind that port (ports below 1024 need privileges); pick --port 1024 or above",
             errno.EADDRNOTAVAIL: "the address is not one of this machine's; use 127.0.0.1, 0.0.0.0 or one of its own"}


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` at ``port``, listening; a ConfigError naming the cause
    (the port taken, a privileged port, an address that is not this machine's) otherwise."""
    from ..errors import ConfigError

    if not host.strip():
        raise ConfigError("--host is empty (which would listen on every interface); use 127.0.0.1 (this machine "
                          "only) or 0.0.0.0 (every interface)")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"--host {host!r} is not an address or a name this machine resolves ({err}); "
                          "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((a[0], a[1], a[2], None, a[4]) for a in addresses):
            if port == 0 and sockets:  # any free port: the one the first address got, on every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)
    except OSError as err:
        for sock in sockets:
            sock.close()
        why = _BIND_WHY.get(err.errno, err.strerror or str(err))
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
    return sockets


def run(args) -> int:
    limits = check_limits(args)  # every flag before anything slow: the model loads only for a server that can run
    adapters, indexes = _pairs(args.adapter, "--adapter"), _pairs(args.index, "--index")
    from ..storage import user_path

    for flag, pairs in (("--adapter", adapters), ("--index", indexes)):
        for name, path in pairs:
            user_path(path, f"{flag} {name}=")  # before the model loads

    import asyncio

    import uvicorn

    from .app import build_index, create_app
    from .engine import Engine, check_device

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_device(args.device)
    adapter_dir = None
    if args.adapter_dir is not None:
        from ..errors import ConfigError
        from .adapters_on_demand import AdapterDir

        adapter_dir = AdapterDir(args.adapter_dir, limits.max_adapters)
        if len(adapters) >= limits.max_adapters:
            raise ConfigError(f"--max-adapters {limits.max_adapters} counts the {len(adapters)} --adapter ones too and "
                              "leaves no room for one from --adapter-dir; raise it")
    sockets = listen(args.host, limits.port)
    engine = None
    try:
        engine = Engine(args.model, max_batch=limits.max_batch, max_wait=limits.max_wait_ms / 1000,
                        queue_size=limits.queue, max_len=limits.max_len, index_dir=args.index_dir, device=args.device,
                        batching=limits.batching, max_tokens=limits.max_tokens_in_flight, quantize=limits.quantize)
        engine.adapter_dir = adapter_dir
        app = create_app(engine, token=token, timeout=limits.timeout, max_chars=limits.max_chars)  # metrics before work
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
        config = uvicorn.Config(app, log_level="warning")
        port = sockets[0].getsockname()[1]
        where = f"[{args.host}]" if ":" in args.host else args.host
        print(f"deltatune serve: http://{where}:{port}/ (OpenAPI: /docs), model on {engine.device}", file=sys.stderr)
        asyncio.run(uvicorn.Server(config).serve(sockets=sockets))
    finally:
        for sock in sockets:
            sock.close()
        if engine is not None:
            engine.close()
    return 0
