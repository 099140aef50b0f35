"""`deltatune bench`: every method x seed in a fresh process each, then results.csv/.md and report.html."""
from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from deltatune import machine, settings
from deltatune.errors import ConfigError, TrainingError
from deltatune.report import pool_note

from .common import check_method, check_task, parse_sets, slug, split_list
from .common import seeds as parse_seeds

NAME, HELP = "bench", "compare methods: every method x seed, then results.csv/.md and report.html"
DESCRIPTION = ("Train every method with every seed on the same data and budget, each run in a fresh process, "
               "then write results.csv, results.md, plots and report.html.")


def add_arguments(p) -> None:
    from deltatune.training.config import TrainConfig

    p.add_argument("--model", required=True, help="the model every run fine-tunes (minilm, smollm2, tiny-<family>, ...)")
    p.add_argument("--task", required=True, help="the task every run trains and is scored on (see `deltatune tasks`)")
    p.add_argument("--methods", required=True, help="comma list, e.g. full,lora,bitfit")
    p.add_argument("--seeds", default="1", help="a count (3 = seeds 0,1,2) or a comma list of seeds (default 1)")
    p.add_argument("--out", metavar="DIR", help="default runs/bench-<model>-<task>; a folder of an earlier bench, a new "
                   "or an empty one (a folder deltatune did not write is refused, never written into)")
    p.add_argument("--set", action="append", metavar="[METHOD:]KEY=VALUE",
                   help="a method option for every run, or with METHOD: for that method's runs only")
    settings.add_flags(p, TrainConfig)


def method_sets(items: list[str] | None, methods: list[str]) -> dict[str, list[str]]:
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


def child_env() -> dict:
    """The environment of a bench run: this deltatune importable whatever the working directory."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def last_json_line(stdout: str):
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None
    return None


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args) -> int:
    methods = split_list(args.methods)
    if not methods:
        raise ConfigError("--methods is empty; give a comma list such as --methods full,lora,bitfit")
    sets = method_sets(args.set, methods)
    for m in methods:
        try:
            check_method(m, parse_sets(sets[m]))
        except ConfigError as e:
            raise ConfigError(f"{e} (--set {m}:KEY=VALUE sets an option for {m} runs only)") from None
    check_task(args.task)
    seeds = parse_seeds(args.seeds)
    from deltatune.storage import BENCH, OwnedFolder, chosen_folder

    # Before any run: a folder deltatune did not write (a user's results.csv, report.html, ...) is refused
    # here, so nothing of it is replaced, whether the runs succeed or fail; a link in a bench folder too.
    with OwnedFolder(chosen_folder(args.out, f"runs/bench-{slug(args.model)}-{slug(args.task)}"), BENCH) as folder:
        folder.check()
        return _bench(args, methods, sets, seeds, folder)


def _bench(args, methods: list[str], sets: dict, seeds: list[int], folder) -> int:
    from deltatune import report
    from deltatune.training.config import TrainConfig

    out = folder.open()  # created and marked as a bench folder, and locked while the bench runs
    shared = settings.argv_of(settings.values_from(args, TrainConfig), TrainConfig)  # handed on to every run
    meta = {**report.machine_info(), "command": args.command_line,
            "model": args.model, "task": args.task, "methods": methods, "seeds": seeds, "max_steps": args.max_steps}
    folder.write_text(report.META_FILE, json.dumps(meta, indent=2))

    # Seeds outside methods: a slow drift of the machine (thermal, other load) then spreads over
    # every method instead of landing on the last ones.
    plan = list(itertools.product(seeds, methods))
    rows, failures = [], []
    started = time.monotonic()
    for i, (seed, method) in enumerate(plan, 1):
        run_dir = out / "runs" / f"{slug(method)}-s{seed}"
        command = [sys.executable, "-m", "deltatune", "train", "--model", args.model, "--task", args.task,
                   "--method", method, "--seed", str(seed), "--out", str(run_dir), "--json", *shared]
        for item in sets[method]:
            command += ["--set", item]
        print(f"[{i}/{len(plan)}] {method} seed {seed}: deltatune {shlex.join(command[3:])}", file=sys.stderr, flush=True)
        # A fresh process per run, so that peak RSS and timings belong to that run alone.
        run_started, cpu_before, machine_before = time.monotonic(), children_cpu_seconds(), machine.machine_cpu()
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=child_env())
        # Wall and CPU time of the whole run (start-up, loading, evaluations included): on a shared
        # machine their ratio shows how much of the 2 cores the run actually had.
        run_seconds, cpu_seconds = time.monotonic() - run_started, children_cpu_seconds() - cpu_before
        # The runs are timed one after another, so other work on the machine during one run would
        # read as a slow method: measure it, and the report marks the runs it touched.
        other_load = machine.other_load(machine_before, machine.machine_cpu(), cpu_seconds, run_seconds)
        summary = last_json_line(proc.stdout) if proc.returncode == 0 else None
        if summary is None:
            failures.append(f"{method} seed {seed} (exit code {proc.returncode})")
            print(f"[{i}/{len(plan)}] {method} seed {seed} FAILED with exit code {proc.returncode}",
                  file=sys.stderr, flush=True)
            continue
        rows.append(report.normalize_row(summary, seed=seed, max_steps=args.max_steps, out_dir=str(run_dir),
                                         run_seconds=run_seconds, cpu_seconds=cpu_seconds, other_load=other_load))
        folder.write_text(report.RESULTS_FILE, report.csv_text(rows))  # after every run: an interrupted bench keeps them
        busy = "" if other_load is None else f", other load {100 * other_load:.0f}%" + (
            f" {report.BUSY_MARK} time not trustworthy" if report.busy({"other_load": other_load}) else "")
        print(f"[{i}/{len(plan)}] {method} seed {seed}: {summary.get('metric')} {summary.get('value'):.4f}"
              f"{pool_note(summary)}, {report.human_count(summary.get('trainable_params'))} trainable, "
              f"{summary.get('step_seconds_median') or 0:.3f} s/step{busy} ({time.monotonic() - started:.0f} s so far)",
              file=sys.stderr, flush=True)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    folder.write_text(report.META_FILE, json.dumps(meta, indent=2))
    paths = report.write_report(rows, folder, meta)
    print(report.markdown(rows, meta))
    print(f"report: {paths['html']}")
    if failures:
        raise TrainingError(f"{len(failures)} of {len(plan)} runs failed: {'; '.join(failures)}; "
                            f"the report covers the other {len(rows)} (their messages are above)")
    return 0
