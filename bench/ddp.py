"""Data-parallel throughput (issue 15): `deltatune train` with 1 and with N processes, alternating.

    .venv/bin/python bench/ddp.py                       # MiniLM LoRA on code-search: 1 process (2 threads, 1 thread), 2 processes; 2 rounds
    .venv/bin/python bench/ddp.py --model tiny-bert --steps 4 --rounds 1 --out /tmp/ddp.jsonl   # a smoke run

Each run is a fresh `deltatune train ... --nproc N --json` (N = 1: one process with torch's
default threads; N > 1: deltatune spawns N processes of cores/N threads each) with the same global
batch. Throughput is the global batch over rank 0's median step time (a step ends when every
rank's gradients are summed, so it is the slowest rank's step); the run's whole wall time is
recorded too. Configurations alternate round by round so that a change of load on a shared
machine hits both; each run also records how much of the machine's CPU time other processes
used meanwhile (/proc/stat, as `deltatune bench` does) and the 1-minute load average. Results are
appended to --out one JSON line per run, so an interrupted benchmark resumes where it stopped;
the summary (medians, ratio) is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltatune.machine import machine_cpu as _machine_cpu, other_load as _other_load  # noqa: E402  (as `deltatune bench`)


def run_one(args, config: str, work: Path) -> dict:
    """One run of ``config``: "N" (N processes, deltatune's threads: torch's default for one process,
    cores/N each for several) or "N:T" (T threads per process, through OMP_NUM_THREADS)."""
    nproc, _, threads = config.partition(":")
    nproc = int(nproc)
    out = work / f"run-{nproc}-{time.time_ns()}"
    command = [sys.executable, "-m", "deltatune", "train", "--model", args.model, "--task", args.task,
               "--method", args.method, "--max-steps", str(args.steps), "--eval-every", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--max-train",
               str(args.max_train), "--max-eval", str(args.max_eval), "--out", str(out), "--json", "--nproc", str(nproc)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    load = os.getloadavg()[0]
    before, started = _machine_cpu(), time.monotonic()
    usage = os.times()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.monotonic() - started
    after_usage = os.times()
    own = (after_usage.children_user - usage.children_user) + (after_usage.children_system - usage.children_system)
    if proc.returncode:
        raise SystemExit(f"nproc {nproc} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    step = summary["step_seconds_median"]
    return {"config": config, "nproc": nproc, "threads": int(threads) if threads else None, "model": args.model, "task": args.task, "method": args.method, "steps": args.steps,
            "batch_size": args.batch_size, "max_len": args.max_len, "step_seconds_median": step,
            "examples_per_second": args.batch_size / step, "train_seconds": summary["train_seconds"],
            "wall_seconds": round(wall, 2), "cpu_seconds": round(own, 2), "load_1min_before": round(load, 2),
            "other_load": _other_load(before, _machine_cpu(), own, wall), "value": summary["value"],
            "metric": summary["metric"], "cores": len(os.sched_getaffinity(0))}


def summarize(rows: list[dict]) -> str:
    lines = []
    base = None
    for n in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == n]
        eps = statistics.median(r["examples_per_second"] for r in mine)
        base = base or eps
        lines.append(f"{n}: {eps:.1f} examples/s (median of {len(mine)}; "
                     f"{statistics.median(r['step_seconds_median'] for r in mine):.3f} s/step, whole run "
                     f"{statistics.median(r['wall_seconds'] for r in mine):.0f} s), x{eps / base:.2f} of the first; "
                     f"other processes used {100 * statistics.median(r['other_load'] or 0 for r in mine):.0f}% of "
                     f"the CPU, load average {statistics.median(r['load_1min_before'] for r in mine):.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="code-search")
    p.add_argument("--method", default="lora")
    p.add_argument("--configs", default="1,1:1,2", help="comma list of N or N:T (N processes of T threads); "
                   "default 1,1:1,2: one process with torch's threads, one with one thread, two of one thread")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--max-train", type=int, default=256)
    p.add_argument("--max-eval", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "ddp.jsonl"), help="results, one JSON line per run")
    args = p.parse_args()
    counts = args.configs.split(",")
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        for round_ in range(args.rounds):
            order = counts if round_ % 2 == 0 else counts[::-1]  # alternate which goes first
            for n in order:
                if sum(r["config"] == n for r in rows) > round_:  # done before an interruption
                    continue
                row = {**run_one(args, n, Path(tmp)), "round": round_}
                rows.append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"round {round_} config {n}: {row['examples_per_second']:.1f} ex/s, "
                      f"{row['step_seconds_median']:.3f} s/step, other load {row['other_load']}", flush=True)
    print(summarize(rows))


if __name__ == "__main__":
    main()
