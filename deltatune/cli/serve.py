"""`deltatune serve`: the flags and the server live with the server (deltatune/serve)."""
from __future__ import annotations

NAME, HELP = "serve", "serve adapters over HTTP, batched across adapters (docs/serving.md)"


def add_arguments(p) -> None:
    from deltatune.serve import add_arguments as add

    add(p)


def run(args) -> int:
    from deltatune.serve import run as serve

    return serve(args)
