"""`deltatune train`: one adapter trained and scored; every run setting is a flag generated from TrainConfig."""
from __future__ import annotations

import json

from deltatune import settings
from deltatune.report import pool_note
from .common import check_method, check_task, jsonable, parse_sets, slug

NAME, HELP = "train", "train one adapter and evaluate it"
DESCRIPTION = "Train one adapter; writes the adapter and metrics.json to --out."
DEFAULTS = {"model": "minilm", "task": "code-search", "method": "lora"}  # TrainConfig's; shown in --help


def add_arguments(p) -> None:
    from deltatune.training.config import TrainConfig

    p.add_argument("--model", default=DEFAULTS["model"],
                   help=f"minilm, smollm2, tiny-<family>, an HF id or a local path (default {DEFAULTS['model']})")
    p.add_argument("--task", default=DEFAULTS["task"],
                   help=f"a task name (see `deltatune tasks`) or a task directory (default {DEFAULTS['task']})")
    p.add_argument("--method", default=DEFAULTS["method"],
                   help=f"a method name (see `deltatune methods`) (default {DEFAULTS['method']})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a method option, repeatable: --set r=16 --set sites=attn.q,attn.v "
                   "(numbers, true/false and none are parsed; a comma makes a list: layers=5,)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<model>-<task>-<method>-s<seed>)")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding the summary")
    settings.add_flags(p, TrainConfig)


def run(args) -> int:
    options = parse_sets(args.set)
    check_method(args.method, options)
    check_task(args.task)
    from deltatune.training import TrainConfig, train

    from deltatune.storage import chosen_folder

    out = str(chosen_folder(args.out, f"runs/{slug(args.model)}-{slug(args.task)}-{slug(args.method)}-s{args.seed}"))
    config = {"model": args.model, "task": args.task, "method": args.method, "options": options,
              "seed": args.seed, "out_dir": out, **settings.values_from(args, TrainConfig)}
    summary = train(TrainConfig(**config))
    from deltatune.training.distributed import rank

    if rank():  # under torchrun: rank 0 prints
        return 0
    if args.json:
        print(json.dumps(summary, default=jsonable), flush=True)
    else:
        print_summary(summary, out)
    return 0


def print_summary(summary: dict, out) -> None:
    from deltatune.report import human_count

    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    share = f" ({100 * trainable / total:.3g}%)" if trainable is not None and total else ""
    zero = summary.get("zero_shot_value")
    print(f"{summary.get('method')} on {summary.get('task')} ({summary.get('model')}): "
          f"{summary.get('metric')} = {summary.get('value'):.4f}" + pool_note(summary)
          + (f" (zero-shot {zero:.4f})" if isinstance(zero, (int, float)) else ""))
    print(f"trainable {human_count(trainable)} of {human_count(total)}{share}; "
          f"{summary.get('train_seconds', 0):.1f} s training, {summary.get('step_seconds_median') or 0:.3f} s/step, "
          f"peak RSS {summary.get('peak_rss_mb') or 0:.0f} MB")
    if summary.get("dp_epsilon") is not None:  # a privacy budget means nothing without its delta
        print(f"private (DP-SGD): epsilon {summary['dp_epsilon']:.3g} at delta {summary['dp_delta']:.3g} "
              f"(target epsilon {summary.get('dp_target_epsilon')}, noise multiplier {summary.get('dp_noise_multiplier', 0):.3g}, "
              f"clip {summary.get('dp_clip')}, {summary.get('dp_steps')} steps)")
    print(f"adapter, metrics.json and predictions-test.jsonl in {out}")
