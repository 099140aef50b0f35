"""The `deltatune` command line: methods, tasks, train, eval, bench, report, demo.

Each subcommand is one `cmd_*` function; the parser only names flags. The engine (transformers) and
the report (matplotlib) are imported inside the commands that need them, so `--help` costs no more
than importing the package. Every DeltatuneError ends the program with a one-line message and exit
code 2, like a usage error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import deltatune as dt
from deltatune.errors import ConfigError, DeltatuneError, TrainingError
from deltatune.names import slug as _slug
from deltatune.report import pool_note

EXIT_USAGE = 2

# The flags `train` and `bench` share, as (flag, type, help). `bench` hands them on to every run
# unchanged, so both commands read them from this one table. type None = an on/off switch.
def on_off_auto(text: str):
    """A switch with an automatic setting: on -> True, off -> False, auto -> "auto"."""
    value = {"on": True, "off": False, "auto": "auto"}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected on, off or auto, got {text!r}")
    return value


TRAINING_FLAGS = [
    ("--max-steps", int, "optimizer steps (default: the engine's)"),
    ("--batch-size", int, "examples per step (default: the engine's)"),
    ("--lr", float, "learning rate (default: the method's own, see `deltatune methods`)"),
    ("--max-len", int, "truncate inputs to this many tokens"),
    ("--eval-every", int, "evaluate on the validation split every N steps"),
    ("--max-train", int, "use at most N training examples"),
    ("--max-eval", int, "use at most N validation/test examples"),
    ("--bf16", None, "train in bfloat16 autocast"),
    ("--grad-checkpointing", on_off_auto, "recompute activations in the backward pass to save memory: on (the bare flag), "
                                          "off, or auto (the default: on when the largest batch would keep over 2 GiB of "
                                          "activations; the same losses either way)"),
    ("--full-logits", None, "generation: compute the LM head at every position (default: only where labels count, in chunks)"),
    ("--resume", None, "continue from the checkpoint in the output directory"),
    ("--overwrite", None, "replace the previous run in the output directory (else it is refused)"),
    ("--dp-epsilon", float, "train with differential privacy (DP-SGD) to this epsilon"),
    ("--dp-delta", float, "DP delta (default: 1/N rounded down to a power of ten)"),
    ("--dp-clip", float, "DP per-example gradient norm bound (default 1.0)"),
    ("--recycle", None, "run the frozen lower blocks once and train from their cached output (embedding recycling)"),
    ("--recycle-dtype", str, "the recycling cache's dtype: float32 (default, exact), float16 or bfloat16"),
    ("--nproc", int, "data-parallel processes on this machine (gloo on CPU, NCCL on GPUs); --batch-size stays the "
                     "global batch and must divide by N. Or run under `torchrun --nproc_per_node N -m deltatune train`"),
    ("--fsdp", None, "with several processes: shard the frozen base's weights over them (FSDP), for bases too large for one device"),
]

# `deltatune demo`: the whole comparison on embedded defaults, sized to finish in about ten minutes
# on 2 CPU cores. Measured on a 2-core Xeon @ 2.5 GHz: the 8 methods at 20 steps with these sizes took
# 1363 CPU-seconds (about 170 per run: ~20 to start and load, ~6 per step, 3 evaluations of ~5 steps
# each), i.e. ~12.5 min on two idle cores; 15 steps brings it to ~10 min. prompt, pfeiffer and
# parallel do not fit that budget; `deltatune bench --methods ...` runs them.
DEMO_METHODS = ["full", "lora", "houlsby", "ia3", "prefix", "bitfit", "ln", "telly"]
DEMO = {"model": "minilm", "task": "code-search", "seeds": "1", "out": "runs/demo",
        "max-steps": 15, "batch-size": 32, "max-len": 96, "max-train": 480, "max-eval": 200}
DEMO_QUICK = {**DEMO, "out": "runs/demo-quick", "max-steps": 2, "batch-size": 8, "max-len": 32,
              "max-train": 16, "max-eval": 32}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------- --set KEY=VALUE

def parse_value(text: str):
    """'16' -> 16, '1e-3' -> 0.001, 'true' -> True, 'none' -> None, 'a,b' -> ['a', 'b'], else the string."""
    text = text.strip()
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    from .names import number_or_text

    return number_or_text(text)


_KEY = re.compile(r"[A-Za-z_][\w.-]*$")


def parse_sets(items: list[str] | None) -> dict:
    """The method options from repeated `--set KEY=VALUE` flags; a later KEY wins."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key) or not value.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set r=16 or --set sites=attn.q,attn.v")
        options[key] = parse_value(value)
    return options


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    """'3' -> [0, 1, 2] (a count); '0,7,9' -> exactly those seeds."""
    try:
        values = [int(part) for part in _split_list(text)]
    except ValueError:
        values = []
    if not values or (len(values) == 1 and values[0] < 1):
        raise ConfigError(f"--seeds {text!r}: give a count (--seeds 3 runs seeds 0,1,2) or a list (--seeds 0,7,9)")
    return list(range(values[0])) if len(values) == 1 else values


# ----------------------------------------------------------------------------- checks before loading anything

def _check_method(name: str, options: dict | None = None) -> None:
    """An unknown method or a bad option fails here, before a model or a dataset is loaded."""
    from deltatune.registry import build_method

    known = dt.methods()
    if name not in known:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    build_method(name, options or {})  # raises ConfigError naming the option and the valid ones


def _check_task(name: str) -> None:
    from deltatune.tasks import TASKS

    if name not in TASKS and not name.startswith("hf:") and not os.path.lexists(name):
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                          "(or a .jsonl/.csv file, a directory of train/valid/test files, or hf:<dataset>)")


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())


# ----------------------------------------------------------------------------- commands

def cmd_methods(args) -> int:
    infos = [dt.method_info(name) for name in dt.methods()]
    if args.json:
        print(json.dumps(infos, default=_jsonable))
        return 0
    rows = []
    for info in infos:
        # `sites`, plus any other *sites option, e.g. (IA)^3's input_sites.
        sites = "; ".join(",".join(value) + ("" if key == "sites" else f" ({key})")
                          for key, value in info["options"].items() if key.endswith("sites") and value)
        rows.append([info["name"], info["paper"], sites or "-", "yes" if info["mergeable"] else "no",
                     f"{info['lr']:g}"])
    _print_table(["method", "paper", "default sites", "mergeable", "default lr"], rows)
    return 0


def cmd_tasks(args) -> int:
    from deltatune.tasks import TASKS

    if args.tasks_command == "show":
        from deltatune.tasks import load_task

        _check_task(args.name)
        print(load_task(args.name).card())
        return 0
    if args.json:
        print(json.dumps([{"name": name, "description": text} for name, text in TASKS.items()]))
        return 0
    _print_table(["task", "description"], [[name, text] for name, text in TASKS.items()])
    return 0


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_train(args) -> int:
    import dataclasses

    options = parse_sets(args.set)
    _check_method(args.method, options)
    _check_task(args.task)
    from deltatune.training import TrainConfig, train

    out = args.out or f"runs/{_slug(args.model)}-{_slug(args.task)}-{_slug(args.method)}-s{args.seed}"
    config = {"model": args.model, "task": args.task, "method": args.method, "options": options,
              "seed": args.seed, "out_dir": out}
    for flag, kind, _ in TRAINING_FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None and (value is not False or kind is on_off_auto):  # `not in (None, False)` would drop a 0
            config[_dest(flag)] = value
    supported = {f.name for f in dataclasses.fields(TrainConfig)}
    unsupported = sorted(set(config) - supported)
    if unsupported:
        raise ConfigError(f"the engine does not support {', '.join('--' + k.replace('_', '-') for k in unsupported)}")
    summary = train(TrainConfig(**config))
    from deltatune.training.distributed import rank

    if rank():  # under torchrun: rank 0 prints
        return 0
    if args.json:
        print(json.dumps(summary, default=_jsonable), flush=True)
    else:
        _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out) -> None:
    from deltatune.report import human_count

    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    share = f" ({100 * trainable / total:.3g}%)" if trainable is not None and total else ""
    zero = summary.get("zero_shot_value")
    print(f"{summary.get('method')} on {summary.get('task')} ({summary.get('model')}): "
          f"{summary.get('metric')} = {summary.get('value'):.4f}" + pool_note(summary)
          + (f" (zero-shot {zero:.4f})" if isinstance(zero, (int, float)) else ""))
    print(f"trainable {human_count(trainable)} of {human_count(total)}{share}; "
          f"{summary.get('train_seconds', 0):.1f} s training, {summary.get('step_seconds_median') or 0:.3f} s/step, "
          f"peak RSS {summary.get('peak_rss_mb') or 0:.0f} MB")
    print(f"adapter, metrics.json and predictions-test.jsonl in {out}")


# What `deltatune eval` used, printed on one line of its own rather than among the metrics.
_EVAL_SETTINGS = ("task", "split", "metric", "value", "examples", "max_eval", "max_len", "max_len_source", "run_max_len",
                  "batch_size", "truncated", "adapter", "predictions_file")


def cmd_eval(args) -> int:
    if args.task == "humaneval":
        return _cmd_eval_humaneval(args)
    if not args.adapter:
        raise ConfigError("--adapter is required (a model without one is scored by --task humaneval only)")
    if args.task:
        _check_task(args.task)
    from deltatune.training import default_eval_dir, evaluate, resolve_adapter

    adapter = resolve_adapter(args.adapter)  # a run directory stands for its best/ adapter
    out = Path(args.out) if args.out else default_eval_dir(adapter, args.task)
    metrics = evaluate(adapter, task=args.task, split=args.split, max_eval=args.max_eval, max_len=args.max_len,
                       batch_size=args.batch_size, out_dir=out)
    if args.json:
        print(json.dumps(metrics, default=_jsonable), flush=True)
        return 0
    whole = "the whole split" if metrics["max_eval"] is None else f"--max-eval {metrics['max_eval']}"
    print(f"{metrics['task']} {metrics['split']}: {metrics['metric']} = {metrics['value']:.4f}{pool_note(metrics)}")
    for key, value in metrics.items():
        if key not in _EVAL_SETTINGS and key != metrics["metric"]:
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"used: {metrics['examples']} examples ({whole}), max_len {metrics['max_len']} ({metrics['max_len_source']}; "
          f"{metrics['truncated']} inputs truncated), batch size {metrics['batch_size']}; adapter {metrics['adapter']}")
    if metrics["max_len_source"] != "--max-len" and metrics["run_max_len"] != metrics["max_len"]:
        print(f"  the run trained and was tested at max_len {metrics['run_max_len']}: "
              f"--max-len {metrics['run_max_len']} reproduces its own scoring")
    print(f"metrics and predictions in {out}")
    return 0


def _cmd_eval_humaneval(args) -> int:
    """`deltatune eval --task humaneval`: pass@k of a model, with or without an adapter (tasks/humaneval.py)."""
    from deltatune.tasks import humaneval

    try:
        ks = [int(k) for k in _split_list(args.k)]
    except ValueError:
        raise ConfigError(f"--k {args.k!r}: give a comma list of whole numbers, e.g. --k 1,10") from None
    if args.split != "test":
        raise ConfigError("HumanEval has one split, test; leave --split out")
    out = args.out
    if out is None:
        from deltatune.training import default_eval_dir

        out = default_eval_dir(args.adapter, "humaneval") if args.adapter else \
            Path("runs") / f"humaneval-{_slug(args.model or 'model')}"
    m = humaneval.evaluate(model=args.model, adapter=args.adapter, n=args.n, ks=ks, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens, limit=args.limit, seed=args.seed,
                           batch_size=args.batch_size or 8, workers=args.workers, timeout=args.timeout, out_dir=out,
                           prompt_format=args.prompt_format)
    if args.json:
        print(json.dumps(m, default=_jsonable), flush=True)
        return 0
    setting = (f"{m['problems']} problems, {m['prompt_format']} prompts, n={m['n']}, {m['decoding']}"
               + (f" (temperature {m['temperature']:g}, top-p {m['top_p']:g})" if m["decoding"] == "sampling" else "")
               + f", max {m['max_new_tokens']} new tokens, seed {m['seed']}")
    for key in [k for k in m if k.startswith("pass@")]:
        print(f"humaneval {key} = {m[key]:.4f}  ({setting})")
    print(f"samples: {m['passed']} passed, {m['failed']} failed, {m['timed_out']} timed out; "
          f"model {m['model']}, adapter {m['adapter'] or 'none'}; generation {m['generation_seconds']:.0f} s, "
          f"execution {m['execution_seconds']:.0f} s")
    print(f"metrics and per-sample results in {out}")
    return 0


def _method_sets(items: list[str] | None, methods: list[str]) -> dict[str, list[str]]:
    """`--set KEY=V` goes to every run, `--set METHOD:KEY=V` only to that method's runs."""
    per_method = {m: [] for m in methods}
    for item in items or []:
        scope, sep, rest = item.partition(":")
        if sep and "=" not in scope:
            if scope not in per_method:
                raise ConfigError(f"--set {item!r}: method {scope!r} is not among --methods {','.join(methods)}")
            per_method[scope].append(rest)
        else:
            for m in methods:
                per_method[m].append(item)
    return per_method


def _child_env() -> dict:
    """The environment of a bench run: this deltatune importable whatever the working directory."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _last_json_line(stdout: str):
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None
    return None


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu() -> tuple[float, float, int] | None:
    """(busy, steal) CPU seconds so far on the cores this process may run on, and their number,
    from /proc/stat; None where there is no /proc/stat (macOS, Windows)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy = steal = cores = 0
    for line in lines:
        name, *fields = line.split()
        if not re.fullmatch(r"cpu\d+", name) or (allowed is not None and int(name[3:]) not in allowed):
            continue
        user, nice, system, _idle, _iowait, irq, softirq, stolen = ([int(x) for x in fields[:8]] + [0] * 8)[:8]
        busy, steal, cores = busy + user + nice + system + irq + softirq, steal + stolen, cores + 1
    return (busy / tick, steal / tick, cores) if cores else None


def _other_load(before, after, own_cpu_seconds: float, wall_seconds: float) -> float | None:
    """The share of the CPU time of our cores that other processes used (or the hypervisor stole)
    between two _machine_cpu() readings, while our own processes used own_cpu_seconds."""
    if before is None or after is None or wall_seconds <= 0:
        return None
    others = max(0.0, after[0] - before[0] - own_cpu_seconds) + max(0.0, after[1] - before[1])
    return round(min(1.0, others / (wall_seconds * after[2])), 3)


def cmd_bench(args) -> int:
    from deltatune import report

    methods = _split_list(args.methods)
    if not methods:
        raise ConfigError("--methods is empty; give a comma list such as --methods full,lora,bitfit")
    sets = _method_sets(args.set, methods)
    for m in methods:
        try:
            _check_method(m, parse_sets(sets[m]))
        except ConfigError as e:
            raise ConfigError(f"{e} (--set {m}:KEY=VALUE sets an option for {m} runs only)") from None
    _check_task(args.task)
    seeds = _seeds(args.seeds)
    out = Path(args.out or f"runs/bench-{_slug(args.model)}-{_slug(args.task)}")
    from deltatune.storage import make_dir

    make_dir(out)  # a StorageError line when --out is a file, on a read-only disk, ...

    shared = []
    for flag, kind, _ in TRAINING_FLAGS:
        value = getattr(args, _dest(flag))
        if kind is None and value:
            shared.append(flag)
        elif kind is on_off_auto and value is not None:
            shared += [flag, {True: "on", False: "off"}.get(value, "auto")]
        elif kind is not None and value is not None:
            shared += [flag, str(value)]
    meta = {**report.machine_info(), "command": args.command_line,
            "model": args.model, "task": args.task, "methods": methods, "seeds": seeds, "max_steps": args.max_steps}
    (out / report.META_FILE).write_text(json.dumps(meta, indent=2))

    # Seeds outside methods: a slow drift of the machine (thermal, other load) then spreads over
    # every method instead of landing on the last ones.
    plan = list(itertools.product(seeds, methods))
    rows, failures = [], []
    started = time.monotonic()
    for i, (seed, method) in enumerate(plan, 1):
        run_dir = out / "runs" / f"{_slug(method)}-s{seed}"
        command = [sys.executable, "-m", "deltatune", "train", "--model", args.model, "--task", args.task,
                   "--method", method, "--seed", str(seed), "--out", str(run_dir), "--json", *shared]
        for item in sets[method]:
            command += ["--set", item]
        print(f"[{i}/{len(plan)}] {method} seed {seed}: deltatune {shlex.join(command[3:])}", file=sys.stderr, flush=True)
        # A fresh process per run, so that peak RSS and timings belong to that run alone.
        run_started, cpu_before, machine_before = time.monotonic(), _children_cpu_seconds(), _machine_cpu()
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=_child_env())
        # Wall and CPU time of the whole run (start-up, loading, evaluations included): on a shared
        # machine their ratio shows how much of the 2 cores the run actually had.
        run_seconds, cpu_seconds = time.monotonic() - run_started, _children_cpu_seconds() - cpu_before
        # The runs are timed one after another, so other work on the machine during one run would
        # read as a slow method: measure it, and the report marks the runs it touched.
        other_load = _other_load(machine_before, _machine_cpu(), cpu_seconds, run_seconds)
        summary = _last_json_line(proc.stdout) if proc.returncode == 0 else None
        if summary is None:
            failures.append(f"{method} seed {seed} (exit code {proc.returncode})")
            print(f"[{i}/{len(plan)}] {method} seed {seed} FAILED with exit code {proc.returncode}",
                  file=sys.stderr, flush=True)
            continue
        rows.append(report.normalize_row(summary, seed=seed, max_steps=args.max_steps, out_dir=str(run_dir),
                                         run_seconds=run_seconds, cpu_seconds=cpu_seconds, other_load=other_load))
        report.write_csv(rows, out / "results.csv")  # after every run, so an interrupted bench keeps its results
        busy = "" if other_load is None else f", other load {100 * other_load:.0f}%" + (
            f" {report.BUSY_MARK} time not trustworthy" if report.busy({"other_load": other_load}) else "")
        print(f"[{i}/{len(plan)}] {method} seed {seed}: {summary.get('metric')} {summary.get('value'):.4f}"
              f"{pool_note(summary)}, {report.human_count(summary.get('trainable_params'))} trainable, "
              f"{summary.get('step_seconds_median') or 0:.3f} s/step{busy} ({time.monotonic() - started:.0f} s so far)",
              file=sys.stderr, flush=True)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / report.META_FILE).write_text(json.dumps(meta, indent=2))
    paths = report.write_report(rows, out, meta)
    print(report.markdown(rows, meta))
    print(f"report: {paths['html']}")
    if failures:
        raise TrainingError(f"{len(failures)} of {len(plan)} runs failed: {'; '.join(failures)}; "
                            f"the report covers the other {len(rows)} (their messages are above)")
    return 0


def cmd_report(args) -> int:
    from deltatune import report

    rows = report.read_csv(Path(args.dir) / "results.csv")
    meta = report.read_meta(args.dir)
    paths = report.write_report(rows, args.dir, meta)
    print(report.markdown(rows, meta))
    print(f"report: {paths['html']}")
    return 0


def demo_argv(quick: bool = False, out: str | None = None) -> list[str]:
    """The `deltatune bench` arguments that `deltatune demo` runs."""
    settings = {**(DEMO_QUICK if quick else DEMO), **({"out": out} if out else {})}
    return ["bench", "--methods", ",".join(DEMO_METHODS), *[x for k, v in settings.items() for x in (f"--{k}", str(v))]]


def cmd_demo(args) -> int:
    argv = demo_argv(args.quick, args.out)
    bench_args = build_parser().parse_args(argv)
    bench_args.command_line = f"{args.command_line}  (= deltatune {shlex.join(argv)})"
    return cmd_bench(bench_args)


# ----------------------------------------------------------------------------- parser

def _add_training_flags(p) -> None:
    for flag, kind, help_text in TRAINING_FLAGS:
        if kind is None:
            p.add_argument(flag, action="store_true", help=help_text)
        elif kind is on_off_auto:
            p.add_argument(flag, nargs="?", const=True, type=kind, metavar="on|off|auto", help=help_text)
        else:
            p.add_argument(flag, type=kind, metavar="X" if flag.startswith("--dp-") else {float: "LR", str: "NAME"}.get(kind, "N"), help=help_text)


def cmd_findings(args) -> int:
    from deltatune import findings

    return findings.main(args)


def cmd_serve(args) -> int:
    from .serve import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deltatune", description="Parameter-efficient fine-tuning: every method is a delta "
                     "at a site, combined in a certain way.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("methods", help="list the registered methods")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.set_defaults(run=cmd_methods)

    p = sub.add_parser("tasks", help="list the tasks, or `tasks show NAME` for one dataset card")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    tasks_sub = p.add_subparsers(dest="tasks_command", metavar="show")
    show = tasks_sub.add_parser("show", help="print the dataset card of a task")
    show.add_argument("name", help="task name (see `deltatune tasks`)")
    p.set_defaults(run=cmd_tasks)

    p = sub.add_parser("train", help="train one adapter and evaluate it",
                       description="Train one adapter; writes the adapter and metrics.json to --out.")
    p.add_argument("--model", required=True, help="minilm, smollm2, tiny-<family>, an HF id or a local path")
    p.add_argument("--task", required=True, help="a task name (see `deltatune tasks`) or a task directory")
    p.add_argument("--method", required=True, help="a method name (see `deltatune methods`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a method option, repeatable: --set r=16 --set sites=attn.q,attn.v "
                   "(numbers, true/false and none are parsed; a comma makes a list: layers=5,)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<model>-<task>-<method>-s<seed>)")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding the summary")
    _add_training_flags(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved adapter, or a model on HumanEval (--task humaneval)")
    p.add_argument("--adapter", metavar="DIR",
                   help="an adapter directory, or the --out of `deltatune train` (then its best/ adapter); "
                   "required except with --task humaneval")
    p.add_argument("--task", help="evaluate on this task instead of the one it was trained on; humaneval: "
                   "pass@k of --model (with --adapter if given) on the 164 HumanEval problems")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="default test")
    p.add_argument("--max-eval", type=int, metavar="N",
                   help="score N examples of the split, picked with the run's seed (default: the whole split)")
    p.add_argument("--max-len", type=int, metavar="N", help="truncate inputs to N tokens (default: the longest the model takes, so inputs are scored whole)")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per forward pass (default: the run's)")
    p.add_argument("--out", metavar="DIR", help="where metrics-<split>.json and predictions-<split>.jsonl go "
                   "(default: <run dir>/eval-<task>/)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    he = p.add_argument_group("--task humaneval")
    he.add_argument("--model", help="the model to generate with (default: the adapter's)")
    he.add_argument("--n", type=int, default=1, help="samples per problem (default 1: greedy)")
    he.add_argument("--k", default="1,10", help="pass@k for these k <= n (default 1,10)")
    he.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for n > 1 (e.g. 0.8)")
    he.add_argument("--max-new-tokens", type=int, default=384, help="completion length limit (default 384)")
    he.add_argument("--limit", type=int, metavar="P", help="the first P problems only")
    he.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    he.add_argument("--workers", type=int, help="programs run in parallel (default: CPU count, at most 8)")
    he.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    he.add_argument("--prompt-format", default="completion", choices=["completion", "chat"],
                    help="completion: the model continues the prompt (the paper's protocol, default); chat: an "
                    "instruct model is asked in its chat template and its answer's code block is run")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("bench", help="compare methods: every method x seed, then results.csv/.md and report.html",
                       description="Train every method with every seed on the same data and budget, each run "
                       "in a fresh process, then write results.csv, results.md, plots and report.html.")
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--methods", required=True, help="comma list, e.g. full,lora,bitfit")
    p.add_argument("--seeds", default="1", help="a count (3 = seeds 0,1,2) or a comma list of seeds (default 1)")
    p.add_argument("--out", metavar="DIR", help="default runs/bench-<model>-<task>")
    p.add_argument("--set", action="append", metavar="[METHOD:]KEY=VALUE",
                   help="a method option for every run, or with METHOD: for that method's runs only")
    _add_training_flags(p)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("report", help="rebuild results.md, the plots and report.html from DIR/results.csv")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("demo", help="the whole comparison on minilm / code-search in about ten minutes")
    p.add_argument("--quick", action="store_true", help="a tiny budget, for smoke tests")
    p.add_argument("--out", metavar="DIR", help="default runs/demo (runs/demo-quick with --quick)")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("analyze", help="which layers hold what, and which a fine-tune changes: probes, RSA, CKA, "
                       "a freeze depth (HTML, JSON, PNG)")
    from .analysis.cli import add_arguments as add_analyze_arguments, run as run_analyze  # flags live with the analysis
    add_analyze_arguments(p)
    p.set_defaults(run=run_analyze)

    p = sub.add_parser("findings", help="measure the seed papers' claims on our tasks and write docs/findings.md "
                       "(resumable, mergeable run files)")
    from .findings import add_arguments as add_findings_arguments  # flags live with the findings
    add_findings_arguments(p)
    p.set_defaults(run=cmd_findings)

    p = sub.add_parser("serve", help="serve adapters over HTTP, batched across adapters (docs/serving.md)")
    from .serve import add_arguments as add_serve_arguments  # the server's flags live with the server
    add_serve_arguments(p)
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "deltatune " + shlex.join(argv)  # recorded in the bench report
    # Library warnings (e.g. truncated inputs) as one line each instead of file:line plus source;
    # restored on the way out, since tests call main() inside their own process.
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"deltatune {args.command}: warning: {message}\n"
    try:
        return args.run(args) or 0
    except DeltatuneError as e:
        message = " ".join(str(e).split())  # one line, whatever the message
        print(f"deltatune {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deltatune methods | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = previous_format
