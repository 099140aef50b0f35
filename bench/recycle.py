#!/usr/bin/env python
"""Embedding recycling: time per epoch with and without the cache, and the cache's disk space.

For each configuration (telly with K = half the blocks, telly training only the top 2 blocks, and
full fine-tuning as the reference) one epoch of the code-search training split (``--max-train``
examples) is trained in this process, first computing the whole model every step, then starting
from the recycled cache of the frozen part (built first, and timed: ``build_s``). Every epoch runs
the same steps on the same batches, so "time per epoch" is also "time to the same number of steps".

    .venv/bin/python bench/recycle.py --model minilm --max-train 1024           # ~10 min on 2 idle cores
    .venv/bin/python bench/recycle.py --model smollm2 --max-train 256 --max-len 96
    .venv/bin/python bench/recycle.py --model tiny-bert --max-train 32 --max-len 32   # a smoke test

Writes ``results.json`` and ``results.md`` to ``--out`` (default runs/bench-recycle-<model>). The
cache is built in a fresh folder (``--cache``, default a temporary one), so its build is measured.
Numbers from a busy machine are not measurements: check the load column (other processes' share of
the CPU while the row ran, from /proc/stat) before quoting one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_times():
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    except OSError:
        return None


def _other_load(before, after, own: float) -> float | None:
    """Share of the machine's busy CPU time used by other processes while a row ran (0: quiet)."""
    if before is None or after is None:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total, idle = (after[0] - before[0]) / ticks, (after[1] - before[1]) / ticks
    return max(0.0, (total - idle - own) / max(total, 1e-9))


def configs(n_blocks: int, wanted: list[str]) -> dict[str, tuple[str, dict]]:
    table = {"telly-half": ("telly", {"k": n_blocks // 2}), "telly-top2": ("telly", {"k": max(1, n_blocks - 2)}),
             "full": ("full", {})}
    unknown = sorted(set(wanted) - set(table))
    if unknown:
        raise SystemExit(f"unknown configuration {', '.join(unknown)}; known: {', '.join(table)}")
    return {name: table[name] for name in wanted}


def epoch(model, objective, examples, batch_size: int, lr: float, seed: int) -> float:
    """Seconds for one epoch of AdamW steps over ``examples`` in a seeded order."""
    import torch

    from deltatune.analysis.freeze import _to

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    start = time.perf_counter()
    for s in range(0, len(order) - batch_size + 1, batch_size):
        batch = _to(objective.collate([examples[i] for i in order[s:s + batch_size]]), "cpu")
        objective.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(args) -> list[dict]:
    import torch

    import deltatune as dt
    from deltatune.analysis import recycle
    from deltatune.models import build_task_model
    from deltatune.sites import num_layers
    from deltatune.tasks import load_task
    from deltatune.train import OBJECTIVES, TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["DELTATUNE_CACHE"] = args.cache  # where the recycling cache is built (the corpus is read from there too)
    task = load_task(args.task, seed=0, max_train=args.max_train, max_eval=8)
    probe_model, _ = build_task_model(args.model, task.kind)
    n_blocks = num_layers(probe_model)
    del probe_model
    rows = []
    for name, (method, options) in configs(n_blocks, args.configs.split(",")).items():
        model, tokenizer = build_task_model(args.model, task.kind, len(task.labels or []))
        cfg = TrainConfig(model=args.model, task=args.task, method=method, options=options, batch_size=args.batch_size,
                          max_len=args.max_len, device="cpu", progress=False, recycle=True, recycle_dtype=args.dtype)
        objective = OBJECTIVES[task.kind](tokenizer, cfg)
        examples = objective.encode(task.split("train"), train=True)
        dt.attach(model, method, **options)
        lr = dt.method_info(method)["lr"]
        steps = len(examples) // args.batch_size
        row = {"model": args.model, "config": name, "method": method, "options": options, "blocks": n_blocks,
               "examples": len(examples), "steps_per_epoch": steps, "batch_size": args.batch_size, "max_len": args.max_len,
               "dtype": args.dtype, "trainable_params": dt.count_parameters(model)[0]}
        epoch(model, objective, examples[:args.batch_size * 2], args.batch_size, lr, args.seed)  # warm-up
        before, own0 = _cpu_times(), time.process_time()
        row["epoch_s"] = epoch(model, objective, examples, args.batch_size, lr, args.seed)
        row["load"] = _other_load(before, _cpu_times(), time.process_time() - own0)
        if method == "full":
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        before, own0 = _cpu_times(), time.process_time()
        t0 = time.perf_counter()
        objective, data = recycle.prepare(cfg, model, objective, {"train": examples}, progress=False)
        row["build_s"] = time.perf_counter() - t0
        files = sorted((Path(args.cache) / "recycle").glob("train-*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
        row["cache_mb"] = files[-1].stat().st_size / 2**20
        epoch(model, objective, data["train"][:args.batch_size * 2], args.batch_size, lr, args.seed)
        row["recycled_epoch_s"] = epoch(model, objective, data["train"], args.batch_size, lr, args.seed)
        row["recycled_load"] = _other_load(before, _cpu_times(), time.process_time() - own0)
        row["speedup"] = row["epoch_s"] / row["recycled_epoch_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    full = next((r for r in rows if r["config"] == "full"), None)
    for r in rows:
        if full is not None and "recycled_epoch_s" in r:
            r["vs_full"] = full["epoch_s"] / r["recycled_epoch_s"]
            r["vs_full_with_build"] = full["epoch_s"] / (r["recycled_epoch_s"] + r["build_s"])
    return rows


def markdown(rows: list[dict]) -> str:
    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    head = ("| config | trainable | epoch s | recycled epoch s | cache build s | cache MB | speedup | vs full | "
            "vs full, build counted | load |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        load = max(x for x in (r.get("load"), r.get("recycled_load"), 0.0) if x is not None)
        lines.append(f"| {r['config']} ({r['method']} {r['options']}) | {r['trainable_params']:,} | {f(r['epoch_s'], '.2f')} | "
                     f"{f(r.get('recycled_epoch_s'), '.2f')} | {f(r.get('build_s'), '.2f')} | {f(r.get('cache_mb'), '.1f')} | "
                     f"{f(r.get('speedup'), '.2f')} | {f(r.get('vs_full'), '.2f')} | {f(r.get('vs_full_with_build'), '.2f')} | "
                     f"{load:.0%} |")
    r0 = rows[0]
    return (f"Embedding recycling on {r0['model']} ({r0['blocks']} blocks): one epoch of {r0['examples']} code-search "
            f"examples, batch {r0['batch_size']}, max_len {r0['max_len']}, cache dtype {r0['dtype']}.\n\n" + "\n".join(lines)
            + "\n\nload: other processes' share of the CPU while the row ran; above 10% the times are not a measurement.\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="code-search")
    p.add_argument("--configs", default="telly-half,telly-top2,full")
    p.add_argument("--max-train", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="the folder the recycling cache is built in (default: a fresh temporary one)")
    p.add_argument("--out", help="default runs/bench-recycle-<model>")
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/bench-recycle-{args.model}")
    with tempfile.TemporaryDirectory(prefix="dt-recycle-") as tmp:
        if not args.cache:
            args.cache = tmp
            from deltatune.models import cache_dir as default_cache

            for corpus in default_cache().glob("stdlib-*.json"):  # the extracted corpus and built tasks: no re-extraction
                if corpus.is_file() and not corpus.is_symlink():
                    (Path(tmp) / corpus.name).write_bytes(corpus.read_bytes())
        before = os.environ.get("DELTATUNE_CACHE")
        try:
            rows = run(args)
        finally:  # the environment as it was (main() is also called from a test)
            if before is None:
                os.environ.pop("DELTATUNE_CACHE", None)
            else:
                os.environ["DELTATUNE_CACHE"] = before
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
