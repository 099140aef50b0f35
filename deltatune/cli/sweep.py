"""`deltatune sweep`: search run settings and method options on the validation split, here or on a Ray cluster.

Every run-setting flag of `train` takes a value (fixed for every trial) or a search space: ``--lr
log:1e-5..1e-2``, ``--batch-size 16,32``; ``--set r=4,8,16`` does the same for a method option."""
from __future__ import annotations

import json
import sys

from deltatune import settings
from deltatune.errors import ConfigError

from .common import _KEY, check_method, check_task, jsonable
from .common import seeds as parse_seeds

NAME, HELP = "sweep", "search learning rate, rank and any setting on the validation split (here or on Ray)"
DESCRIPTION = ("Search run settings and method options: grid (extended past an edge where the best sits), random, "
               "or Optuna's TPE with median pruning. Each trial is an ordinary run folder, scored on the validation "
               "split only; the test split is scored for the chosen configuration alone. Run the same command again "
               "to go on with a sweep that was stopped. A setting's value: one value (fixed), values (4,8,16; lists "
               "of a list-valued option separated by |) or a range (1e-4..1e-2, log:1e-5..1e-2, :N grid points).")
DEFAULTS = {"model": "minilm", "task": "code-search", "method": "lora"}


def _searchable_fields():
    from deltatune.sweep.space import RESERVED
    from deltatune.training.config import TrainConfig

    return [f for f in settings.flag_fields(TrainConfig) if f.name not in RESERVED]


def add_arguments(p) -> None:
    from deltatune.sweep.config import SweepConfig

    p.add_argument("--model", default=DEFAULTS["model"], help=f"the model (default {DEFAULTS['model']})")
    p.add_argument("--task", default=DEFAULTS["task"], help=f"the task (default {DEFAULTS['task']})")
    p.add_argument("--method", default=DEFAULTS["method"], help=f"the method (default {DEFAULTS['method']})")
    p.add_argument("--set", action="append", metavar="KEY=VALUES",
                   help="a method option, fixed or searched, repeatable: --set r=4,8,16 --set alpha=log:8..64 "
                        "--set 'sites=attn.q,attn.v|attn.q,attn.k,attn.v,attn.o'")
    p.add_argument("--seeds", default="1", help="a count (3 = seeds 0,1,2) or a comma list; every trial runs each "
                                                "and scores their mean (default 1)")
    p.add_argument("--out", metavar="DIR", help="the sweep's folder (default runs/sweep-<model>-<task>-<method>); "
                                                "the same folder again goes on with the sweep there")
    p.add_argument("--ray", metavar="auto|ADDRESS", help="run the trials on a Ray cluster (auto: the one this machine "
                                                         "belongs to); the driver and the records stay here")
    p.add_argument("--json", action="store_true", help="progress on stderr; end with one JSON line on stdout")
    group = p.add_argument_group("run settings (a value, values or a range each; default: train's)")
    for f in _searchable_fields():
        types, _ = settings.types_of(f)
        help_text = (f.metadata.get("help") or f.name.replace("_", " ")) + f" (default: {_default_text(f)})"
        if types == [bool]:
            group.add_argument(settings.flag_of(f.name), nargs="?", const="true", metavar="true,false", help=help_text)
        else:
            group.add_argument(settings.flag_of(f.name), metavar="VALUES", help=help_text)
    settings.add_flags(p.add_argument_group("the search"), SweepConfig)


def sweep_config(args):
    """The SweepConfig the flags describe (nothing loaded yet)."""
    from deltatune.sweep.config import SweepConfig

    base = {"model": args.model, "task": args.task, "method": args.method}
    space, labels = {}, {}
    for f in _searchable_fields():
        text = getattr(args, f.name, None)
        if text is not None:
            space[f.name] = text
            labels[f.name] = settings.flag_of(f.name)
    options = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key) or not value.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUES, e.g. --set r=16 or --set r=4,8,16")
        options[key] = value
        labels[f"options.{key}"] = f"--set {key}"
    if options:
        space["options"] = options
    return SweepConfig(base=base, space=space, labels=labels, seeds=parse_seeds(args.seeds), out=args.out,
                       ray=args.ray, **settings.values_from(args, SweepConfig))


def run(args) -> int:
    check_method(args.method)
    check_task(args.task)
    config = sweep_config(args)
    from deltatune.sweep import run_sweep

    stream = sys.stderr if args.json else sys.stdout
    result = run_sweep(config, log=lambda line: print(line, file=stream, flush=True))
    if args.json:
        keep = ("out", "metric", "chosen", "test", "baseline", "baseline_test", "comparison", "notes", "wall_seconds",
                "trial_seconds", "other_load", "files")
        print(json.dumps({k: result[k] for k in keep} | {"trials": len(result["trials"])}, default=jsonable), flush=True)
    return 0


def _default_text(f) -> str:
    shown = f.metadata.get("default_text") or f.default
    if isinstance(shown, bool):
        return "on" if shown else "off"
    return "none" if shown is None else str(shown)
