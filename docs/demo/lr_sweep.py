"""The learning-rate and budget sweep behind the per-method default lr and the demo's budget (lr-sweep.md).

Every run is the demo's setting (deltatune/cli.py DEMO: minilm, code-search, seed 0, max_train 480,
max_eval 200) at one (method, lr, steps, batch, max_len), trained in this one process on the task
loaded once. Only the VALIDATION split is scored: the task handed to train() has its test split
replaced by the first 32 validation items, so
the run's "zero-shot" and final scores are on 32 validation items only (not recorded: they keep
train() from scoring the test split, cheaply); the test split is never looked at.

Resumable: a (method, lr, steps, batch, max_len) already in OUT/sweep.jsonl is skipped.

    .venv/bin/python docs/demo/lr_sweep.py --out /tmp/sweep lora:5e-4,2e-3 ia3:3e-3,1e-2 [--max-steps 15]
    .venv/bin/python docs/demo/lr_sweep.py --table docs/demo/lr-sweep.jsonl   # the page's table from the raw results
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from deltatune.tasks import load_task
from deltatune.training import TrainConfig, train


# The per-method lr defaults before this sweep (deltatune at 7c7d734): the table compares each lr with them.
DEFAULTS_BEFORE = {"full": 5e-5, "lora": 2e-3, "ia3": 1e-2, "houlsby": 1e-3, "pfeiffer": 1e-3, "parallel": 1e-3,
                   "prefix": 5e-4, "prompt": 3e-1, "bitfit": 1e-3, "ln": 1e-3, "telly": 5e-5}


def ranks_of(run_dir: Path) -> list[int]:
    """The rank of each validation query's code at the run's last validation (predictions-valid.jsonl)."""
    return [json.loads(line)["rank"] for line in (run_dir / "predictions-valid.jsonl").read_text().splitlines()]


def paired(a: list[int], b: list[int]) -> tuple[float, float]:
    """MRR(a) - MRR(b) over the same queries, and its standard error (paired, per query)."""
    d = [1 / x - 1 / y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return mean, (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def table(path: str) -> str:
    """A markdown table of a sweep.jsonl: per method, each lr's validation MRR (the best in bold) and
    its paired difference from the method's previous default lr, +- one standard error over queries."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    base = {(r["method"], r["max_steps"]): r for r in rows if r["lr"] == DEFAULTS_BEFORE.get(r["method"])}
    best = {}
    for r in rows:
        key = (r["method"], r["max_steps"], r["batch_size"], r.get("max_len", 96))
        best[key] = max(best.get(key, 0.0), r["valid_mrr"])
    out = ["| method | steps x batch, max_len | lr | validation MRR | vs. previous default (paired SE) "
           "| s/step (median, busy machine) | wall s |", "|---|--:|--:|--:|--:|--:|--:|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["max_steps"], r["lr"])):
        key = (r["method"], r["max_steps"], r["batch_size"], r.get("max_len", 96))
        mrr = f"{r['valid_mrr']:.4f}"
        out.append(f"| {r['method']} | {r['max_steps']} x {r['batch_size']}, {r.get('max_len', 96)} | {r['lr']:g} | "
                   + (f"**{mrr}**" if r["valid_mrr"] == best[key] else mrr) + " | " + _versus(r, base)
                   + f" | {r['step_seconds_median']:.1f} | {r['wall_seconds']:.0f} |")
    return "\n".join(out)


def _versus(r: dict, base: dict) -> str:
    b = base.get((r["method"], r["max_steps"]))
    if b is None or b is r or "valid_ranks" not in r or "valid_ranks" not in b:
        return "(default)" if b is r else "–"
    diff, se = paired(r["valid_ranks"], b["valid_ranks"])
    return f"{diff:+.4f} ± {se:.4f}"


def main() -> None:
    if sys.argv[1:2] == ["--ranks"]:  # add valid_ranks to records written before the runs kept them
        out = Path(sys.argv[2])
        rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines() if line.strip()]
        for r in rows:
            name = f"{r['method']}-lr{r['lr']:g}-steps{r['max_steps']}-bs{r['batch_size']}-len{r.get('max_len', 96)}"
            if "valid_ranks" not in r and (out / name / "predictions-valid.jsonl").exists():
                r["valid_ranks"] = ranks_of(out / name)
        (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2]))
        return
    p = argparse.ArgumentParser()
    p.add_argument("grid", nargs="+", help="METHOD:LR,LR,...")
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--max-train", type=int, default=480)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sweep.jsonl"
    key = lambda r: (r["method"], r["lr"], r["max_steps"], r["batch_size"], r.get("max_len", 96))  # noqa: E731
    done = {key(json.loads(line)) for line in log.read_text().splitlines() if line.strip()} if log.exists() else set()
    data = load_task("code-search", seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)
    data = dataclasses.replace(data, test=data.valid[:32])  # train() scores no test item; see the docstring
    runs = [(m, float(lr)) for item in args.grid for m, lrs in [item.split(":")] for lr in lrs.split(",")]
    for method, lr in runs:
        if (method, lr, args.max_steps, args.batch_size, args.max_len) in done:
            continue
        started = time.monotonic()
        name = f"{method}-lr{lr:g}-steps{args.max_steps}-bs{args.batch_size}-len{args.max_len}"
        cfg = TrainConfig(model="minilm", task="code-search", method=method, lr=lr, max_steps=args.max_steps,
                          batch_size=args.batch_size, max_len=args.max_len, max_train=args.max_train,
                          max_eval=args.max_eval, seed=args.seed, eval_every=args.max_steps, progress=False,
                          overwrite=True, out_dir=str(out / name))
        summary = train(cfg, task=data)
        record = {"method": method, "lr": lr, "max_steps": args.max_steps, "batch_size": args.batch_size,
                  "max_len": args.max_len, "seed": args.seed, "train": len(data.train), "valid": len(data.valid),
                  "valid_mrr": summary["valid_value"], "trainable_params": summary["trainable_params"],
                  "step_seconds_median": summary["step_seconds_median"], "valid_ranks": ranks_of(out / name),
                  "wall_seconds": round(time.monotonic() - started, 1)}
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
