#!/usr/bin/env python
"""LoRA's relatives beside peft (issue 23): each method's training-step overhead above the frozen floor,
deltatune's and peft's, from repeated in-process A/B runs.

    .venv/bin/python bench/relatives.py --processes 3 --rounds 10 --json docs/bench/relatives.jsonl
    .venv/bin/python bench/relatives.py --configs dora-qv --processes 4      # one config again (its old lines removed first)

For each config, --processes runs of `bench/ab.py torch:floor dt:CONFIG peft:CONFIG` (a fresh process each,
the two libraries' order swapped every other run); each run gives the median over its rounds of each step
time over the floor's in the same round. The table shows, per library, the median of those ratios over the
runs and their range; the verdict names a faster library only where the ranges do not overlap AND the gap exceeds
the ±5% this machine resolves (RESOLUTION), else "undecided". `--from FILE` renders the table from earlier runs' lines
without running anything.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESOLUTION = 0.05  # ratios of steps taken side by side resolve about ±5% here (docs/performance.md, "Noisy machine")
CONFIGS = ["lora-qv", "dora-qv", "pissa-qv", "vera-qv", "loha-qv", "lokr-qv", "oft-qv", "boft-qv", "hra-qv", "fourierft-qv",
           "adalora-qv", "ptuning", "trainable-tokens", "llama-adapter"]
# Configs that run on another shape than MiniLM's at batch 8 (peft's adaption prompts exist for Llama-type models only;
# SmolLM2-135M's shape at batch 2 keeps a process to minutes)
SHAPE = {"llama-adapter": ["--size", "smollm2", "--batch", "2"]}


def table(lines: list[dict]) -> str:
    by: dict[str, dict[str, list[float]]] = {}
    shape: dict[str, str] = {}
    for line in lines:
        for spec, r in line["specs"].items():
            lib, config = spec.split(":")[:2]
            if lib != "torch":
                by.setdefault(config, {}).setdefault(lib, []).append(r["ratio"])
                if (line.get("size"), line.get("batch")) != ("minilm", 8):
                    shape[config] = f" ({line.get('size')} shape, batch {line.get('batch')})"
    out = ["| config | runs | deltatune × floor (range) | peft × floor (range) | overhead above the floor, dt / peft | "
           "verdict |", "|---|--:|--:|--:|--:|---|"]
    for config, libs in sorted(by.items(), key=lambda kv: CONFIGS.index(kv[0]) if kv[0] in CONFIGS else len(CONFIGS)):
        dt, pf = libs.get("dt", []), libs.get("peft", [])
        if not dt or not pf:
            continue
        md, mp = statistics.median(dt), statistics.median(pf)
        gap = (mp - md) / mp  # of peft's step; this machine resolves about RESOLUTION between processes
        if max(dt) < min(pf) and gap > RESOLUTION:
            verdict = f"deltatune faster ({gap:.1%} of peft's step)"
        elif max(pf) < min(dt) and -gap > RESOLUTION:
            verdict = f"peft faster ({-gap:.1%} of its step)"
        else:
            verdict = ("undecided (ranges overlap)" if not (max(dt) < min(pf) or max(pf) < min(dt))
                       else f"undecided (a gap of {abs(gap):.1%}, within the {RESOLUTION:.0%} this machine resolves)")
        out.append(f"| {config}{shape.get(config, '')} | {len(dt)} | {md:.3f} ({min(dt):.3f}-{max(dt):.3f}) | {mp:.3f} ({min(pf):.3f}-"
                   f"{max(pf):.3f}) | {md - 1:+.1%} / {mp - 1:+.1%} | {verdict} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=str(HERE.parent / "docs" / "bench" / "relatives.jsonl"))
    ap.add_argument("--from", dest="source", help="render the table from this file's lines; run nothing")
    args = ap.parse_args(argv)
    if not args.source:
        for i in range(args.processes):
            for config in args.configs.split(","):
                libs = [f"dt:{config}", f"peft:{config}"]
                specs = ["torch:floor", *(libs if i % 2 == 0 else libs[::-1])]
                subprocess.run([sys.executable, str(HERE / "ab.py"), *specs, *SHAPE.get(config, []),
                                "--rounds", str(args.rounds), "--json", args.json], check=True)
    lines = [json.loads(x) for x in Path(args.source or args.json).read_text().splitlines() if x.strip()]
    print(table(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
