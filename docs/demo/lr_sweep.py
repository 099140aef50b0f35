"""The learning-rate sweep behind the per-method default lr and the demo's budget (see lr-sweep.md).

Every run is the demo's budget (deltatune/cli.py DEMO: minilm, code-search, seed 0, max_train 480,
max_eval 200, batch 32, max_len 96) with one learning rate, trained in this one process on the task
loaded once. Only the VALIDATION score is printed and recorded (the best validation MRR of the run,
i.e. at its last step when eval_every > max_steps): the test split is not looked at here.

    .venv/bin/python docs/demo/lr_sweep.py --out /tmp/sweep lora:5e-4,2e-3 ia3:3e-3,1e-2 [--max-steps 15]
"""
import argparse
import json
import sys
import time
from pathlib import Path

from deltatune.tasks import load_task
from deltatune.train import TrainConfig, train


def main() -> None:
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
    data = load_task("code-search", seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)
    runs = [(m, float(lr)) for item in args.grid for m, lrs in [item.split(":")] for lr in lrs.split(",")]
    for method, lr in runs:
        started = time.monotonic()
        cfg = TrainConfig(model="minilm", task="code-search", method=method, lr=lr, max_steps=args.max_steps,
                          batch_size=args.batch_size, max_len=args.max_len, max_train=args.max_train,
                          max_eval=args.max_eval, seed=args.seed, eval_every=args.max_steps, progress=False,
                          out_dir=str(out / f"{method}-lr{lr:g}-steps{args.max_steps}-bs{args.batch_size}"))
        summary = train(cfg, task=data)
        record = {"method": method, "lr": lr, "max_steps": args.max_steps, "batch_size": args.batch_size,
                  "valid_mrr": summary["valid_value"], "step_seconds_median": summary["step_seconds_median"],
                  "wall_seconds": round(time.monotonic() - started, 1)}
        with (out / "sweep.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
