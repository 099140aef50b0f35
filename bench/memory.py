"""Peak memory and seconds per step of LoRA on SmolLM2 code-summarization: deltatune with the LM
head over every position (before), in chunks where labels count (after, the default), plus
activation checkpointing, and the peer (transformers.Trainer + peft, bench/peers/trainer_peft_generation.py).

    .venv/bin/python bench/memory.py --rounds 2 --steps 3 --json docs/bench/memory-generation.jsonl
    .venv/bin/python bench/memory.py --steps-only --rounds 2 --steps 2   # the training steps alone, no scoring

Each configuration runs as its own child process (`deltatune train ...` as a user runs it, or the
peer script) for a few optimizer steps at the engine's defaults (batch 32, max_len 128, LoRA r 8 on
q and v); the configurations alternate within a round, in a rotated order each round. Per run:
the child's peak RSS (``os.wait4``'s ``ru_maxrss``: the whole process, model load and evaluation
included), its median step time, its losses, and how busy the machine was meanwhile (the CPU time
other processes used, from /proc/stat, in cores; and the CPU steal). Runs already in the --json file
are kept and not repeated (resumable). The table printed at the end gives medians over rounds.
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
TASK = ["--model", "smollm2", "--task", "code-summarization", "--method", "lora"]
CONFIGS = {  # name -> the extra flags of `deltatune train` (None: the peer)
    "deltatune --full-logits --grad-checkpointing off": ["--full-logits", "--grad-checkpointing", "off"],
    "deltatune --grad-checkpointing off": ["--grad-checkpointing", "off"],
    "deltatune": [],  # the defaults: the LM head in chunks, grad_checkpointing="auto" (on at this batch)
    "deltatune + malloc mmap threshold 1 MiB": [],
    "Trainer + peft": None,
}


# Environment of a configuration's child process: glibc's malloc puts blocks under its mmap threshold in
# its heaps, and raises that threshold (up to 32 MiB) each time it frees an mmapped block, so a training
# step's 10-25 MiB activations end up in heaps whose freed holes the RSS keeps. A fixed threshold turns
# the raising off: every block of 1 MiB or more is mapped on allocation and returned on free.
ENVS = {"deltatune + malloc mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}}


def steps_only(name: str, steps: int, max_train: int) -> None:
    """The child of --steps-only: the engine's own optimizer steps (deltatune.training.loop.optimizer_step: the
    objective's loss, backward, clipping, AdamW) on the run's data, without the zero-shot,
    validation and test scoring a `deltatune train` run adds; one JSON line."""
    import resource

    import torch

    import deltatune as dt
    from deltatune.tasks.kinds import Generation, build_task_model
    from deltatune.tasks import load_task
    from deltatune.cli import on_off_auto
    from deltatune.training import TrainConfig
    from deltatune.training.config import resolved as _resolved
    from deltatune.training.loop import DataOrder, optimizer_step as _step
    from deltatune.training.memory import check_batch_fits as _check_batch_fits

    flags = CONFIGS[name]
    gc = on_off_auto(flags[flags.index("--grad-checkpointing") + 1]) if "--grad-checkpointing" in flags else "auto"
    cfg = _resolved(TrainConfig(model="smollm2", task="code-summarization", method="lora", max_steps=steps,
                                max_train=max_train, full_logits="--full-logits" in flags, grad_checkpointing=gc), None)
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task, seed=cfg.seed, max_train=cfg.max_train, max_eval=1)
    model, tok = build_task_model(cfg.model, "generation")
    dt.attach(model, cfg.method)
    objective = Generation(tok, cfg)
    data = objective.encode(task.train, train=True)
    checkpointing = _check_batch_fits(cfg, model, objective, data)  # the engine's own decision (and its check)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order, seconds, losses = DataOrder(len(data), cfg.seed, 0), [], []
    model.train()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        losses.append(_step(cfg, model, optimizer, params, objective, data, order).item())
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"step_seconds": seconds, "step_seconds_median": statistics.median(seconds),
                      "train_seconds": sum(seconds), "losses": losses, "grad_checkpointing": checkpointing,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def saved_for_backward(batch_size: int = 32) -> dict:
    """What autograd keeps for the backward pass, per configuration, in MB: measured on batches of 1
    and 2 copies of the longest training example (128 tokens) and extrapolated linearly to
    ``batch_size``, the way the engine predicts a batch's memory before a run (train._check_batch_fits).
    Cheap: the largest batch it builds is two examples."""
    import torch

    import deltatune as dt
    from deltatune.tasks.kinds import Generation, build_task_model
    from deltatune.tasks import load_task
    from deltatune.training import TrainConfig
    from deltatune.training.memory import enable_checkpointing as _enable_checkpointing, n_tokens as _n_tokens

    task = load_task("code-summarization", seed=0, max_train=256, max_eval=1)
    out = {}
    for name, flags in CONFIGS.items():
        if flags is None:
            continue
        model, tok = build_task_model("smollm2", "generation")
        dt.attach(model, "lora")
        if "--grad-checkpointing" not in flags:  # the defaults: "auto" checkpoints a batch of 32 here
            _enable_checkpointing(model)
        model.train()
        objective = Generation(tok, TrainConfig(full_logits="--full-logits" in flags))
        longest = max(objective.encode(task.train, train=True), key=_n_tokens)
        kept = []
        for n in (1, 2):
            total = [0]

            def pack(t, total=total):
                total[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                objective.loss(model, objective.collate([longest] * n))
            kept.append(total[0])
        out[name] = {"tokens": _n_tokens(longest), "batch_1_mb": kept[0] / 2**20, "batch_2_mb": kept[1] / 2**20,
                     f"batch_{batch_size}_mb": (kept[0] + (batch_size - 1) * (kept[1] - kept[0])) / 2**20}
    return out


def _cpu() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick, sum(fields[:8]) / tick


def run(name: str, args, out_dir: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **ENVS.get(name, {})}
    common = ["--max-steps", str(args.steps), "--max-train", str(args.max_train), "--max-eval", str(args.max_eval)]
    if CONFIGS[name] is None:
        command = [sys.executable, str(ROOT / "bench/peers/trainer_peft_generation.py"), *common, "--out", out_dir]
    elif args.steps_only:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--steps", str(args.steps),
                   "--max-train", str(args.max_train)]
    else:
        command = [sys.executable, "-m", "deltatune", "train", *TASK, *CONFIGS[name], *common,
                   "--eval-every", "100000", "--out", out_dir, "--overwrite", "--json"]
    busy0, steal0, total0 = _cpu()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        busy1, steal1, total1 = _cpu()
        stdout.seek(0), stderr.seek(0)
        text, errors = stdout.read().decode(), stderr.read().decode()
    if child.returncode != 0:
        raise SystemExit(f"{name} failed (exit {child.returncode}):\n{errors[-3000:]}")
    summary = json.loads(text.strip().splitlines()[-1])
    own = usage.ru_utime + usage.ru_stime
    cores = os.cpu_count() or 1
    record = {"config": name, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_seconds": wall,
              "step_seconds_median": summary["step_seconds_median"], "train_seconds": summary["train_seconds"],
              "others_cores": max(0.0, (busy1 - busy0) - own) / wall,  # CPU others used meanwhile, in cores
              "steal_share": (steal1 - steal0) / max(total1 - total0, 1e-9), "cores": cores,
              "loadavg_after": os.getloadavg()[0], "command": " ".join(command[1:])}
    if CONFIGS[name] is None or args.steps_only:
        record["losses"] = summary["losses"]
        record["step_seconds"] = summary["step_seconds"]
    else:
        log = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
        record["losses"] = [r["loss"] for r in log if "loss" in r]
    return record


def table(records: list[dict]) -> str:
    rows = ["| configuration | peak RSS (MB), median | runs | s/step, median | loss at step 1 | others' CPU (cores) |",
            "|---|---|---|---|---|---|"]
    for name in CONFIGS:
        mine = [r for r in records if r["config"] == name]
        if not mine:
            continue
        rss = statistics.median(r["peak_rss_mb"] for r in mine)
        step = statistics.median(r["step_seconds_median"] for r in mine)
        spread = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in mine)
        losses = sorted({f"{r['losses'][0]:.5f}" for r in mine})
        others = ", ".join(f"{r['others_cores']:.2f}" for r in mine)
        rows.append(f"| {name} | {rss:.0f} ({spread}) | {len(mine)} | {step:.2f} | {' / '.join(losses)} | {others} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-train", type=int, default=256)
    p.add_argument("--max-eval", type=int, default=8)
    p.add_argument("--steps-only", action="store_true", help="deltatune children run the engine's steps alone, no "
                   "scoring (as the peer script does without --eval); the default runs `deltatune train`")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--saved", action="store_true", help="only print what autograd keeps for backward per deltatune "
                   "configuration (batches of 1 and 2, extrapolated to 32); one JSON line")
    p.add_argument("--json", default="runs/memory-generation.jsonl", help="one JSON line per run (appended; resumable)")
    args = p.parse_args(argv)
    if args.child:
        return steps_only(args.child, args.steps, args.max_train)
    if args.saved:
        print(json.dumps(saved_for_backward()))
        return None
    names = [n.strip() for n in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    mode = "steps-only" if args.steps_only else "deltatune train"
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]  # rotated: no configuration always first
        for name in order:
            if any(r["config"] == name and r["round"] == round_ and r["steps"] == args.steps
                   and r.get("mode", "deltatune train") == mode for r in records):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                record = {"round": round_, "steps": args.steps, "mode": mode, **run(name, args, str(Path(tmp) / "run"))}
            records.append(record)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"round {round_} {name}: peak RSS {record['peak_rss_mb']:.0f} MB, {record['step_seconds_median']:.2f} s/step, "
                  f"losses {[round(x, 4) for x in record['losses']]}, others {record['others_cores']:.2f} cores", flush=True)
    print(table([r for r in records if r["config"] in names and r["steps"] == args.steps
                 and r.get("mode", "deltatune train") == mode]))


if __name__ == "__main__":
    main()
