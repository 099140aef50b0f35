#!/usr/bin/env python
"""Embedding recycling: time per epoch with and without the cache, and the cache's disk space.

For each configuration (telly with K = half the blocks, telly training only the top 2 blocks, and
full fine-tuning as the reference) one epoch of the code-search training split (``--max-train``
examples) is trained in this process: first computing the whole model every step ("plain"), then,
for telly, building the recycled cache of the frozen part in a fresh folder (timed: ``build_s``) and
training one epoch from it ("recycled"). Every epoch runs the same steps on the same batches, so
"time per epoch" is also "time to the same number of steps".

The configurations alternate round by round (``--rounds``; the order is reversed every other
round) so that a change of load on a shared machine hits them alike; the tables give the medians.
Every measurement is appended to ``results.jsonl`` as it finishes, and a run started again with
the same ``--out`` skips what is there (resumable).

    .venv/bin/python bench/recycle.py --model minilm --max-train 512 --rounds 2
    .venv/bin/python bench/recycle.py --model smollm2 --max-train 128 --max-len 96 --rounds 2
    .venv/bin/python bench/recycle.py --model bert-base-random --configs telly-top2,full --max-train 128
    .venv/bin/python bench/recycle.py --model tiny-bert --max-train 32 --max-len 32   # a smoke test

``bert-base-random``: the bert-base-uncased shape (12 blocks, d=768, 12 heads, FFN 3072, 110M
parameters) with random weights (``BertConfig()``'s defaults, seed 0) and MiniLM's tokenizer (the
same 30522-token vocabulary): speed does not depend on the weights, and no bert-base checkpoint is
on this machine.

Writes ``results.jsonl`` (every measurement), ``results.json`` (medians) and ``results.md`` to
``--out`` (default runs/bench-recycle-<model>); ``bench/recycle.py --write-doc FOLDER ...`` puts the
tables of those folders into docs/analysis.md's measured section. Load: other processes' share of the CPU while the
measurement ran (from /proc/stat) and the 1-minute load average; quote numbers with it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BERT_BASE = "bert-base-random"


def _cpu_times():
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    except OSError:
        return None


def _other_load(before, after, own: float) -> float | None:
    """Share of the machine's CPU time used by other processes while a row ran (0: quiet)."""
    if before is None or after is None:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total, idle = (after[0] - before[0]) / ticks, (after[1] - before[1]) / ticks
    return max(0.0, (total - idle - own) / max(total, 1e-9))


class Timer:
    """Wall seconds of a block, with the other processes' CPU share and the load average meanwhile."""

    def __enter__(self):
        self.cpu, self.own, self.t0 = _cpu_times(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.own  # this process's CPU time: with 1 thread, the work done
        self.load = _other_load(self.cpu, _cpu_times(), self.cpu_seconds)
        self.loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


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

    from deltatune.tensors import to_device as _to

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


def bert_base_folder(where: Path) -> str:
    """A bert-base-shaped encoder with random weights (seed 0) and MiniLM's tokenizer, saved to ``where``."""
    import torch
    from transformers import BertConfig, BertModel

    from deltatune.models import load_backbone

    if not (where / "config.json").is_file():
        _, tokenizer = load_backbone("minilm", "base")
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=tokenizer.vocab_size)).save_pretrained(where)
        tokenizer.save_pretrained(where)
    return str(where)


def _done(path: Path) -> dict:
    """What results.jsonl already holds, keyed by (model, round, config)."""
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r["model"], r["round"], r["config"])] = r
    return out


def run(args, out: Path) -> list[dict]:
    import torch

    import deltatune as dt
    from deltatune.training import recycle
    from deltatune.tasks.kinds import build_task_model
    from deltatune.sites import num_layers
    from deltatune.tasks import load_task
    from deltatune.training import TrainConfig
    from deltatune.tasks.kinds import KINDS as OBJECTIVES

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["DELTATUNE_CACHE"] = args.cache  # where the recycling cache is built (the corpus is read from there too)
    model_name = bert_base_folder(Path(args.cache) / BERT_BASE) if args.model == BERT_BASE else args.model
    task = load_task(args.task, seed=0, max_train=args.max_train, max_eval=8)
    log = out / "results.jsonl"
    done = _done(log)
    setups = {}  # config -> (model, tokenizer, examples, cfg, lr): built once, used every round

    def setup(name, method, options):
        if name not in setups:
            model, tokenizer = build_task_model(model_name, task.kind, len(task.labels or []))
            cfg = TrainConfig(model=model_name, task=args.task, method=method, options=options,
                              batch_size=args.batch_size, max_len=args.max_len, device="cpu", progress=False,
                              recycle=True, recycle_dtype=args.dtype)
            examples = OBJECTIVES[task.kind](tokenizer, cfg).encode(task.split("train"), train=True)
            dt.attach(model, method, **options)
            setups[name] = (model, tokenizer, examples, cfg, dt.method_info(method)["lr"])
        return setups[name]

    probe, _ = build_task_model(model_name, task.kind)
    n_blocks = num_layers(probe)
    del probe
    table = configs(n_blocks, args.configs.split(","))
    for round_ in range(args.rounds):
        order = list(table.items()) if round_ % 2 == 0 else list(reversed(table.items()))
        for name, (method, options) in order:
            if (args.model, round_, name) in done:
                continue
            model, tokenizer, examples, cfg, lr = setup(name, method, options)
            objective = OBJECTIVES[task.kind](tokenizer, cfg)
            row = {"model": args.model, "round": round_, "config": name, "method": method, "options": options,
                   "blocks": n_blocks, "examples": len(examples), "steps_per_epoch": len(examples) // args.batch_size,
                   "batch_size": args.batch_size, "max_len": args.max_len, "dtype": args.dtype,
                   "trainable_params": dt.count_parameters(model)[0], "threads": torch.get_num_threads()}
            epoch(model, objective, examples[:args.batch_size * 2], args.batch_size, lr, args.seed)  # warm-up
            with Timer() as t:
                epoch(model, objective, examples, args.batch_size, lr, args.seed)
            row.update(epoch_s=t.seconds, epoch_cpu_s=t.cpu_seconds, load=t.load, loadavg=t.loadavg, when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            if method != "full":
                for old in (Path(args.cache) / "recycle").glob("*.safetensors"):
                    old.unlink()  # ours (a fresh folder): every round measures the build
                cached = OBJECTIVES[task.kind](tokenizer, cfg)
                with Timer() as t:
                    cached, data = recycle.prepare(cfg, model, cached, {"train": examples}, progress=False)
                row.update(build_s=t.seconds, build_cpu_s=t.cpu_seconds, build_load=t.load)
                (file,) = (Path(args.cache) / "recycle").glob("train-*.safetensors")
                row["cache_mb"] = file.stat().st_size / 2**20
                epoch(model, cached, data["train"][:args.batch_size * 2], args.batch_size, lr, args.seed)
                with Timer() as t:
                    epoch(model, cached, data["train"], args.batch_size, lr, args.seed)
                row.update(recycled_epoch_s=t.seconds, recycled_cpu_s=t.cpu_seconds, recycled_load=t.load, recycled_loadavg=t.loadavg)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return summarize([r for r in _done(log).values() if r["model"] == args.model])


def summarize(measured: list[dict]) -> list[dict]:
    """One row per configuration: medians over rounds, and the ratios computed from the medians."""
    rows = []
    for name in dict.fromkeys(r["config"] for r in sorted(measured, key=lambda r: r["round"])):
        runs = [r for r in measured if r["config"] == name]
        row = {k: v for k, v in runs[0].items() if k not in ("round",)}
        row["rounds"] = len(runs)
        for key in ("epoch_s", "build_s", "recycled_epoch_s", "cache_mb", "epoch_cpu_s", "build_cpu_s", "recycled_cpu_s"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        loads = [r.get(k) for r in runs for k in ("load", "build_load", "recycled_load") if r.get(k) is not None]
        row["load"] = max(loads) if loads else None
        row["load_median"] = statistics.median(loads) if loads else None
        avgs = [r.get(k) for r in runs for k in ("loadavg", "recycled_loadavg") if r.get(k) is not None]
        row["loadavg"] = statistics.median(avgs) if avgs else None
        if "recycled_epoch_s" in row:
            row["speedup"] = row["epoch_s"] / row["recycled_epoch_s"]
            row["speedup_with_build"] = row["epoch_s"] / (row["recycled_epoch_s"] + row["build_s"])
        rows.append(row)
    full = next((r for r in rows if r["config"] == "full"), None)
    for r in rows:
        for suffix, (fk, bk, ek, pk) in {"": ("epoch_s", "build_s", "recycled_epoch_s", "epoch_s"),
                                          "_cpu": ("epoch_cpu_s", "build_cpu_s", "recycled_cpu_s", "epoch_cpu_s")}.items():
            if r.get(ek) is None:
                continue
            r["speedup" + suffix] = r[pk] / r[ek]
            r["speedup_with_build" + suffix] = r[pk] / (r[ek] + r[bk])
            if full is None or full.get(fk) is None:
                continue
            f, b, e = full[fk], r[bk], r[ek]
            r["vs_full" + suffix] = f / e  # per epoch once the cache is there
            r["vs_full_with_build" + suffix] = f / (e + b)  # one epoch, the build counted
            r["vs_full_3_epochs" + suffix] = 3 * f / (3 * e + b)  # the build counted once over 3 epochs
            # the fewest epochs after which the cached run is 5x faster than full fine-tuning, build counted
            r["epochs_for_5x" + suffix] = math.ceil(5 * b / (f - 5 * e)) if f > 5 * e else None
            r["vs_full_plain" + suffix] = f / r[pk]  # telly without the cache
    return rows


def markdown(rows: list[dict]) -> str:
    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    head = ("| config | trainable | plain epoch s | cache build s | recycled epoch s | cache MB | recycled vs plain "
            "(build counted) | vs full | vs full, 1 epoch with build | 3 epochs with build | epochs to 5x | "
            "other load (max) | load avg |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for suffix, what in (("", "wall seconds"), ("_cpu", "CPU seconds of this process (1 thread: the work done, "
                                                         "whatever the other processes did)")):
        if suffix and not any(r.get("epoch_cpu_s") is not None for r in rows):
            continue
        key = {"": ("epoch_s", "build_s", "recycled_epoch_s"), "_cpu": ("epoch_cpu_s", "build_cpu_s", "recycled_cpu_s")}[suffix]
        lines += ["", f"In {what}:", "", head.replace(" s |", f"{' CPU' if suffix else ''} s |")]
        for r in rows:
            ratio = (f"{f(r.get('speedup' + suffix), '.2f')}x ({f(r.get('speedup_with_build' + suffix), '.2f')}x)"
                     if r.get("speedup" + suffix) else "")
            lines.append(f"| {r['config']} ({r['method']} {r['options']}) | {r['trainable_params']:,} | "
                         f"{f(r.get(key[0]), '.2f')} | {f(r.get(key[1]), '.2f')} | {f(r.get(key[2]), '.2f')} | "
                         f"{f(r.get('cache_mb'), '.1f')} | {ratio} | {f(r.get('vs_full' + suffix), '.2f')} | "
                         f"{f(r.get('vs_full_with_build' + suffix), '.2f')} | {f(r.get('vs_full_3_epochs' + suffix), '.2f')} | "
                         f"{f(r.get('epochs_for_5x' + suffix), 'd')} | {f(r.get('load'), '.0%')} | {f(r.get('loadavg'), '.1f')} |")
    r0 = rows[0]
    return (f"Embedding recycling on {r0['model']} ({r0['blocks']} blocks): one epoch of {r0['examples']} code-search "
            f"examples ({r0['steps_per_epoch']} steps), batch {r0['batch_size']}, max_len {r0['max_len']}, cache dtype "
            f"{r0['dtype']}, {r0.get('threads', '?')} threads; medians of {min(r['rounds'] for r in rows)} alternating "
            "rounds.\n" + "\n".join(lines)
            + "\n\nother load: other processes' share of the CPU while the row ran (the largest over its "
              "measurements); load avg: the 1-minute load average (all processes, this one included).\n")


def write_doc(folders: list[str], doc: Path) -> str:
    """Fill docs/analysis.md's measured section (between <!-- recycle:start --> and <!-- recycle:end -->)
    with the tables of the result folders given (each written by a run of this script)."""
    parts = []
    for folder in folders:
        measured = [json.loads(line) for line in (Path(folder) / "results.jsonl").read_text().splitlines() if line.strip()]
        rows = summarize(measured)
        stamp = max(r.get("when", "") for r in measured) if any("when" in r for r in measured) else ""
        parts.append(f"#### {rows[0]['model']}\n\n" + markdown(rows).strip()
                     + f"\n\nRaw results: `{folder}/results.jsonl`{' (' + stamp + ')' if stamp else ''}.\n")
    text = ("Measured by `bench/recycle.py` (see its docstring); the tables below are its output, the reading "
            "after them is by hand.\n\n" + "\n".join(parts))
    from results import fill_section
    fill_section(doc, "recycle", text)
    return text


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--write-doc"]:  # bench/recycle.py --write-doc docs/bench/recycle-minilm ...
        print(write_doc(argv[1:], Path(__file__).resolve().parent.parent / "docs" / "analysis.md"))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help=f"minilm, smollm2, {BERT_BASE}, tiny-*, or a folder")
    p.add_argument("--task", default="code-search")
    p.add_argument("--configs", default="telly-half,telly-top2,full")
    p.add_argument("--max-train", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="the folder the recycling cache is built in (default: a fresh temporary one)")
    p.add_argument("--out", help="default runs/bench-recycle-<model>")
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/bench-recycle-{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dt-recycle-") as tmp:
        if not args.cache:
            args.cache = tmp
            from deltatune.models import cache_dir as default_cache

            for corpus in default_cache().glob("stdlib-*.json"):  # the extracted corpus and built tasks: no re-extraction
                if corpus.is_file() and not corpus.is_symlink():
                    (Path(tmp) / corpus.name).write_bytes(corpus.read_bytes())
        before = os.environ.get("DELTATUNE_CACHE")
        try:
            rows = run(args, out)
        finally:  # the environment as it was (main() is also called from a test)
            if before is None:
                os.environ.pop("DELTATUNE_CACHE", None)
            else:
                os.environ["DELTATUNE_CACHE"] = before
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
