#!/usr/bin/env python
"""In-process A/B of scoring a generation task: before, ``generate`` on fixed batches in the rows' order
(each padded to its longest prompt and run until its longest output ends); after, one key/value cache with
the rows taken longest prompt first, each leaving the batch as it ends and the next row taking its place
(``deltatune.tasks.decoding.greedy``, what ``Generation.predict`` runs now).

    .venv/bin/python bench/generation_scoring.py                     # SmolLM2, 40 code-summarization validation rows
    .venv/bin/python bench/generation_scoring.py --model tiny-llama --rounds 1 --max-eval 8   # a smoke run

Both paths score the same encoded rows with the same model in ONE process, alternating (round 1 before
first, round 2 after first, ...), so the machine's drift hits both alike; the report gives each path's
median time, the median of the per-round ratios, whether the predictions are identical, each path's BLEU,
and the load average before and after. The settings default to `bench/jobs.py gen`'s: batch size 8,
max_len 128, max_new_tokens 64, the task's seeded subset of 40 (seed 0), float32; ``--adapter none`` is
the zero-shot score (the pretrained model). ``--adapter lora`` attaches the engine's default LoRA, freshly
initialised: it writes what the base writes and adds the adapter's cost, so it does not show what a tuned
adapter gains (its rows end at different steps, where the fixed batches wait for their longest row).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if os.path.exists("/proc/loadavg") else "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="code-summarization")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--max-eval", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--adapter", default="none", help="comma-separated: none (zero-shot) and/or lora")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's own); 1 keeps a shared machine's load from stalling the "
                         "threads of one matmul, and makes the CPU time the work done")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)

    import torch

    import deltatune as dt
    from deltatune.tasks import load_task
    from deltatune.tasks.kinds import Generation
    from deltatune.training import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task(args.task, seed=0, max_train=256, max_eval=args.max_eval)
    rows = task.split(args.split)
    results = []
    for adapter in args.adapter.split(","):
        torch.manual_seed(0)
        model, tokenizer = Generation.build_model(args.model)
        if adapter != "none":
            dt.attach(model, adapter)
        model.eval()
        cfg = TrainConfig(model=args.model, task=args.task, max_len=args.max_len, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, progress=False)
        objective = Generation(tokenizer, cfg)
        examples = objective.encode(rows, train=False)
        paths = {"before": objective.predict_in_batches, "after": objective.predict}
        times = {name: [] for name in paths}
        cpu = {name: [] for name in paths}
        preds = {}
        before_load = load()
        for r in range(args.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                start, start_cpu = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    out = paths[name](model, examples, args.batch_size, "cpu")
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                if name in preds and preds[name] != out:
                    raise SystemExit(f"{name}: the predictions changed between rounds")
                preds[name] = out
                print(f"  {adapter} round {r + 1} {name}: {times[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU, "
                      f"load {load()}", flush=True)
        ratios = [a / b for a, b in zip(times["after"], times["before"])]
        cpu_ratios = [a / b for a, b in zip(cpu["after"], cpu["before"])]
        differ = [i for i, (a, b) in enumerate(zip(preds["before"], preds["after"])) if a != b]
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in preds["after"]]
        result = {"model": args.model, "task": args.task, "split": args.split, "rows": len(rows), "adapter": adapter,
                  "batch_size": args.batch_size, "max_len": args.max_len, "max_new_tokens": args.max_new_tokens,
                  "before_s": times["before"], "after_s": times["after"],
                  "before_median_s": statistics.median(times["before"]), "after_median_s": statistics.median(times["after"]),
                  "ratio_median": statistics.median(ratios), "before_cpu_s": cpu["before"], "after_cpu_s": cpu["after"],
                  "cpu_ratio_median": statistics.median(cpu_ratios), "identical": not differ, "differing_rows": differ,
                  "bleu4_before": task.score(preds["before"], args.split)["bleu4"],
                  "bleu4_after": task.score(preds["after"], args.split)["bleu4"],
                  "prediction_tokens_median": statistics.median(lengths), "prediction_tokens_max": max(lengths),
                  "load_before": before_load, "load_after": load(), "threads": torch.get_num_threads()}
        results.append(result)
        print(f"{adapter}: before {result['before_median_s']:.1f} s, after {result['after_median_s']:.1f} s "
              f"(median of per-round ratios {result['ratio_median']:.2f}; CPU time "
              f"{statistics.median(cpu['before']):.1f} s / {statistics.median(cpu['after']):.1f} s, "
              f"ratio {result['cpu_ratio_median']:.2f}), identical predictions: {not differ}, "
              f"BLEU-4 {result['bleu4_before']:.2f} / {result['bleu4_after']:.2f}, "
              f"load {result['load_before']} -> {result['load_after']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
