#!/usr/bin/env python
"""Side-by-side speed and memory benchmark: deltatune vs Hugging Face peft vs AdapterHub adapters.

Every (size, config, library) cell runs in its own fresh subprocess, so its peak RSS
(`ru_maxrss`) is its own. Rounds are round-robin: each round runs every cell once, the order
rotated between rounds, and a cell's result is the median over rounds of its per-process median
step time, so drift of a shared machine hits all cells alike.

    .venv/bin/python bench/run.py --quick                 # smoke test, a few minutes
    .venv/bin/python bench/run.py                         # the full run (quiet machine!)
    .venv/bin/python bench/run.py --sizes bert-base --configs 'full,telly,lora*'

Environments (`bash bench/setup_peers.sh` makes the peer ones):
    main      .venv                  torch baselines and deltatune
    peft      .venv-peers/peft       peft, same transformers as main
    adapters  .venv-peers/adapters   adapters, which pins its own (older) transformers
The `full` and `infer-base` baselines run in every environment; each row's ratio is taken
against the baseline of its own environment, so a different transformers version under
`adapters` does not count for or against it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

# The parts, re-exported: bench/ab.py, bench/recycle.py and the tests use them as `run.<name>`.
from configs import *  # noqa: F401,F403  (shapes, configurations, each library's attach)
from configs import CONFIGS, RESULT_TAG, ROOT, SIZES
from lockstep import Row, env_python, groups_of, plan, run_group, worker  # noqa: F401
from results import aggregate, build_rows, goals, key, lib_label, paired, report, table  # noqa: F401


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configs: " + ", ".join(
                                     n + ("" if s.get("default", True) else " (not default)")
                                     for n, s in CONFIGS.items()))
    ap.add_argument("--sizes", default="minilm,bert-base,smollm2")
    ap.add_argument("--configs", default=None, help="comma-separated names or globs; 'all' "
                    "includes the non-default ones")
    ap.add_argument("--libs", default=None, help="restrict to these of torch,deltatune,peft,adapters")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, 3 steps, minilm only")
    ap.add_argument("--out", default="docs/performance.md")
    ap.add_argument("--json", default=None, help="raw results (default runs/bench-<time>.json)")
    ap.add_argument("--merge", default=None, help="comma-separated raw JSON files of earlier runs "
                    "to report together with this one (--rounds 0: only rebuild the report)")
    ap.add_argument("--peers-dir", type=Path, default=ROOT / ".venv-peers")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.quick:
        args.rounds, args.steps, args.warmup, args.sizes = 1, 3, 2, "minilm"
    args.warmup = max(args.warmup, 2)  # the gradient check runs after one optimizer update

    jobs = plan(args) if args.rounds > 0 else []
    command = "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now()
    results = []
    for path in filter(None, (args.merge or "").split(",")):
        results += [r for r in json.loads(Path(path).read_text())
                    if key(r) not in {key(j) for j in jobs}]  # this run's rows win
    groups = groups_of(jobs)
    print(f"bench: {len(jobs)} rows in {len(groups)} lockstep groups × {args.rounds} round(s); "
          f"{len(results)} results merged", flush=True)
    failed = set()
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        shift = (rnd * len(groups)) // args.rounds  # rotate the order so no group always runs first
        order = groups[shift:] + groups[:shift]
        for i, group in enumerate(order):
            group = [j for j in group if key(j) not in failed]
            if not group:
                continue
            name = f"{group[0]['size']}/{group[0]['config']}"
            for r in run_group(group, args):
                r["round"], r["command"], r["group"] = rnd, command, name
                results.append(r)
                status = f"error: {r['error']}" if "error" in r else (
                    f"{r['step_s']:.4f} s  rss {r['peak_rss_mb']:.0f} MB  trainable {r['trainable']:,}")
                print(f"  [{rnd + 1}/{args.rounds} {i + 1}/{len(order)}] {r['size']:9s} "
                      f"{r['config']:18s} {lib_label(r['lib'], r['env']):22s} {status}", flush=True)
                if "error" in r:
                    failed.add(key(r))  # an error is structural; don't repeat it every round
        done = time.perf_counter() - t_start
        print(f"bench: round {rnd + 1} done, {done / 60:.1f} min so far, "
              f"about {done / (rnd + 1) * (args.rounds - rnd - 1) / 60:.0f} min to go", flush=True)
    elapsed = time.perf_counter() - t_start if jobs else None
    if not results:
        raise SystemExit("bench: nothing ran and nothing merged")
    sizes = [s for s in SIZES if any(r["size"] == s for r in results)]

    cells = aggregate(results)
    rows = build_rows(cells, sizes, results)
    print("\n" + "\n".join(table(rows, "train")) + "\n\n" + "\n".join(table(rows, "infer")))
    print("\nGoals:\n" + "\n".join(goals(rows, cells)))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(rows, cells, results, started, elapsed, command))
    print(f"\nbench: wrote {out}")
    if jobs:  # the raw per-process results, to --merge later
        raw = Path(args.json) if args.json else ROOT / "runs" / f"bench-{started:%Y%m%d-%H%M%S}.json"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(results, indent=1))
        print(f"bench: raw results in {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
