#!/usr/bin/env python
"""In-process A/B: alternate steps of several configurations in ONE process, for precise ratios.

`bench/run.py` gives each row its own process (clean peak memory, the published table); this tool
is for profiling and optimising: every configuration lives in the same process, their steps are
interleaved (A B C A B C ...), so drift and noise hit them alike and ratios of a few percent
show up. Configurations are `lib:config` with lib one of torch, dt (deltatune), peft, adapters and config
a `bench/run.py` config name; run it with a peer environment's python to compare with that peer:

    PYTHONPATH=. .venv-peers/peft/bin/python bench/ab.py torch:floor dt:lora-qv peft:lora-qv
    .venv/bin/python bench/ab.py --kind infer torch:infer-base dt:lora-qv dt:lora-qv:merged
    .venv/bin/python bench/ab.py --size bert-base torch:full dt:telly dt:telly:frozen_dropout=true
    .venv/bin/python bench/ab.py --profile dt:prefix      # torch.profiler's top operators too
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: model shapes and each library's attach)


def build(spec: str, size: str, kind: str):
    import torch
    lib, config, *flags = spec.split(":")
    overrides = dict(f.split("=", 1) for f in flags if "=" in f)  # dt:telly:frozen_dropout=true
    model, cfg = bench.build_model(size, 0)
    family = bench.SIZES[size]["family"]
    libs = {"torch": "torch", "dt": "deltatune", "peft": "peft", "adapters": "adapters"}
    if lib not in libs:
        raise SystemExit(f"ab: unknown library {lib!r} in {spec!r}; use torch, dt, peft or adapters")
    options = {}
    if overrides:  # deltatune options, parsed like the CLI's --set
        from deltatune.names import number_or_text
        options = {k: {"true": True, "false": False}.get(v.lower(), number_or_text(v)) for k, v in overrides.items()}
    model = bench.attach(model, cfg, libs[lib], config, family, **options)
    if kind == "infer":
        model.eval()
        if "merged" in flags:
            bench.merge_lora(model, libs[lib])
    else:
        model.train()
    return (torch.compile(model) if "compile" in flags else model), libs[lib], cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("specs", nargs="+", help="lib:config[:merged][:compile][:option=value...]; the first is the reference")
    ap.add_argument("--size", default="minilm", choices=list(bench.SIZES))
    ap.add_argument("--kind", default="train", choices=["train", "infer"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators per config")
    ap.add_argument("--json", help="append one line to this file: each spec's median step and ratio (JSON)")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    built = {s: build(s, args.size, args.kind) for s in args.specs}
    vocab = next(iter(built.values()))[2].vocab_size

    def stepper(model, lib, spec):
        gen = torch.Generator().manual_seed(0)  # the same tokens for every spec (floor+20tok: 20 more)
        extra = bench.CONFIGS.get(spec.split(":")[1], {}).get("extra_tokens", 0)
        ids = torch.randint(1, vocab, (args.batch, args.seq + extra), generator=gen)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 2, (args.batch,), generator=gen)
        if args.kind == "train":
            return bench.TrainStep(model, lib, [p for p in model.parameters() if p.requires_grad],
                                   dict(input_ids=ids, attention_mask=mask), labels)

        def step():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
        return step

    steps = {s: stepper(m, lib, s) for s, (m, lib, _) in built.items()}
    for spec, step in steps.items():  # warm-up (compiles), one update so zero-initialised deltas are live
        t0 = time.perf_counter()
        step(), step()
        if spec.endswith(":compile") or ":compile:" in spec:
            print(f"  {spec}: first two steps (compilation) {time.perf_counter() - t0:.0f} s", flush=True)
    times = {s: [] for s in steps}
    ticks0 = bench.cpu_ticks()
    for _ in range(args.rounds):
        for s, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[s].append(time.perf_counter() - t0)
    ticks1 = bench.cpu_ticks()
    steal = f", CPU steal {100 * (ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1]):.0f}%" if ticks0 and ticks1 else ""
    ref = times[args.specs[0]]
    print(f"{args.size}, {args.kind}, batch {args.batch}, seq {args.seq}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds{steal}; ratio: median over rounds of the step time over "
          f"the reference's step in the same round")
    result = {}
    for s in args.specs:
        med = statistics.median(times[s])
        ratio = statistics.median(t / r for t, r in zip(times[s], ref))
        result[s] = {"median_s": med, "ratio": ratio}
        print(f"  {s:28s} median {1e3 * med:9.1f} ms  best {1e3 * min(times[s]):9.1f} ms  ratio {ratio:6.3f}x"
              f"  (spread {100 * (max(times[s]) - min(times[s])) / med:.0f}%)")
    if args.json:
        import json
        import os
        with open(args.json, "a") as f:
            f.write(json.dumps({"size": args.size, "kind": args.kind, "batch": args.batch, "seq": args.seq,
                                "rounds": args.rounds, "threads": args.threads, "load": os.getloadavg()[0],
                                "specs": result}) + "\n")
    if args.profile:
        from torch.profiler import profile
        for s, step in steps.items():
            with profile() as prof:
                step()
            print(f"\n{s}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
