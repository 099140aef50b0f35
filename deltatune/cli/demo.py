"""`deltatune demo`: the whole comparison on embedded defaults (a `deltatune bench` with fixed settings)."""
from __future__ import annotations

import shlex

from . import bench
from .common import Parser

NAME, HELP = "demo", "the whole comparison on minilm / code-search in about 6 minutes on 2 CPU cores"


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="a tiny budget, for smoke tests")
    p.add_argument("--out", metavar="DIR", help="default runs/demo (runs/demo-quick with --quick)")


# `deltatune demo`: the whole comparison on embedded defaults, sized to finish in about 6 minutes on 2 cores
# on 2 CPU cores. Measured on a 2-core Xeon @ 2.5 GHz: the 8 methods at 20 steps with these sizes took
# 1363 CPU-seconds (about 170 per run: ~20 to start and load, ~6 per step, 3 evaluations of ~5 steps
# each), i.e. ~12.5 min on two idle cores; 15 steps brings it to ~10 min. prompt, pfeiffer and
# parallel do not fit that budget; `deltatune bench --methods ...` runs them.
DEMO_METHODS = ["full", "lora", "houlsby", "ia3", "prefix", "bitfit", "ln", "telly"]
DEMO = {"model": "minilm", "task": "code-search", "seeds": "1", "out": "runs/demo",
        "max-steps": 15, "batch-size": 32, "max-len": 96, "max-train": 480, "max-eval": 200}
DEMO_QUICK = {**DEMO, "out": "runs/demo-quick", "max-steps": 2, "batch-size": 8, "max-len": 32,
              "max-train": 16, "max-eval": 32}


def demo_argv(quick: bool = False, out: str | None = None) -> list[str]:
    """The `deltatune bench` arguments that `deltatune demo` runs."""
    from deltatune.storage import chosen_folder

    defaults = DEMO_QUICK if quick else DEMO
    settings = {**defaults, **({"out": str(chosen_folder(out, defaults["out"]))} if out is not None else {})}
    return ["bench", "--methods", ",".join(DEMO_METHODS), *[x for k, v in settings.items() for x in (f"--{k}", str(v))]]


def run(args) -> int:
    argv = demo_argv(args.quick, args.out)
    parser = Parser(prog="deltatune bench")
    bench.add_arguments(parser)
    bench_args = parser.parse_args(argv[1:])
    bench_args.command = "bench"
    bench_args.command_line = f"{args.command_line}  (= deltatune {shlex.join(argv)})"
    return bench.run(bench_args)
