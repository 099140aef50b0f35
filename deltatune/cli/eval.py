"""`deltatune eval`: score a run's adapter, an adapter folder (deltatune or PEFT format) or the bare model
(zero-shot) on a task's split, the same way in each case; or a model on HumanEval (--task humaneval)."""
from __future__ import annotations

import json
from pathlib import Path

from deltatune.errors import ConfigError
from deltatune.report import pool_note
from .common import check_task, jsonable, slug, split_list

NAME, HELP = "eval", "score a run, an adapter folder or the bare model (zero-shot) on a task; HumanEval pass@k"


def add_arguments(p) -> None:
    p.add_argument("--adapter", metavar="DIR",
                   help="the --out of `deltatune train` (its best/ adapter), an adapter inside it, or an adapter folder "
                   "in deltatune's or the PEFT format (then --model and --task are needed); without it, the bare "
                   "--model is scored on --task (zero-shot)")
    p.add_argument("--model", help="the model to score: needed for an adapter folder outside a run and without "
                   "--adapter (default: the run's); humaneval: the model to generate with")
    p.add_argument("--task", help="the task to score on (default: the run's); humaneval: pass@k of --model (with "
                   "--adapter if given) on the 164 HumanEval problems")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="default test")
    p.add_argument("--max-eval", type=int, metavar="N", help="score N examples of the split, the same N for every "
                   "run (a fixed data seed picks them; default: the whole split)")
    p.add_argument("--max-len", type=int, metavar="N", help="truncate inputs to N tokens (default: the run's training "
                   "length; outside a run the model's own configured maximum, e.g. 256 for minilm, else the "
                   "longest its positions take)")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per forward pass (default: the run's, else 32)")
    p.add_argument("--quantize", metavar="nf4|fp4|int8|none", help="score on a quantized base (bitsandbytes), the "
                   "adapter unmerged on top; none: the float32 base (default: as the run trained; float32 outside a run)")
    p.add_argument("--out", metavar="DIR", help="where metrics-<split>.json and predictions-<split>.jsonl go "
                   "(default: <run dir>/eval-<task>/, <adapter dir>/eval-<task>/ outside a run, "
                   "runs/<model>-<task>-zero-shot/ without an adapter)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    he = p.add_argument_group("--task humaneval")
    he.add_argument("--n", type=int, default=1, help="samples per problem (default 1: greedy)")
    he.add_argument("--k", default="1,10", help="pass@k for these k <= n (default 1,10)")
    he.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for n > 1 (e.g. 0.8)")
    he.add_argument("--max-new-tokens", type=int, default=384, help="completion length limit (default 384)")
    he.add_argument("--limit", type=int, metavar="P", help="the first P problems only")
    he.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    he.add_argument("--workers", type=int, help="programs run in parallel (default: CPU count, at most 8)")
    he.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    he.add_argument("--prompt-format", default="completion", choices=["completion", "chat"],
                    help="completion: the model continues the prompt (the paper's protocol, default); chat: an "
                    "instruct model is asked in its chat template and its answer's code block is run")


# What `deltatune eval` used, printed on one line of its own rather than among the metrics.
_EVAL_SETTINGS = ("task", "split", "metric", "value", "examples", "max_eval", "max_len", "max_len_source", "run_max_len",
                  "batch_size", "truncated", "adapter", "model", "predictions_file", "quantize")


def run(args) -> int:
    for flag in ("adapter", "model", "task"):  # an empty value would silently mean "none given"
        value = getattr(args, flag)
        if value is not None and not str(value).strip():
            raise ConfigError(f"--{flag} is empty; give a value, or leave --{flag} out")
    if args.task == "humaneval":
        return run_humaneval(args)
    if args.task:
        check_task(args.task)
    from deltatune.training import default_eval_dir, evaluate, resolve_adapter

    from deltatune.storage import EVAL, OwnedFolder, chosen_folder

    adapter = resolve_adapter(args.adapter) if args.adapter else None  # a run directory stands for its best/ adapter
    out = default_eval_dir(adapter, args.task, args.model) if args.out is None else \
        chosen_folder(args.out, "<run dir>/eval-<task>")
    out = OwnedFolder(out, EVAL)  # an eval folder: new, empty or an earlier eval's; never a user's, never a link
    metrics = evaluate(adapter, task=args.task, split=args.split, model=args.model, max_eval=args.max_eval,
                       max_len=args.max_len, batch_size=args.batch_size, out_dir=out, quantize=args.quantize)
    if args.json:
        print(json.dumps(metrics, default=jsonable), flush=True)
        return 0
    whole = "the whole split" if metrics["max_eval"] is None else f"--max-eval {metrics['max_eval']}"
    print(f"{metrics['task']} {metrics['split']}: {metrics['metric']} = {metrics['value']:.4f}{pool_note(metrics)}")
    for key, value in metrics.items():
        if key not in _EVAL_SETTINGS and key != metrics["metric"]:
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"used: {metrics['examples']} examples ({whole}), max_len {metrics['max_len']} ({metrics['max_len_source']}; "
          f"{metrics['truncated']} inputs truncated), batch size {metrics['batch_size']}; model {metrics['model']}, "
          f"adapter {metrics['adapter'] or 'none (zero-shot)'}"
          + (f", on a {metrics['quantize']}-quantized base" if metrics.get("quantize") else ""))
    if metrics["run_max_len"] not in (None, metrics["max_len"]):
        print(f"  the run trained and was tested at max_len {metrics['run_max_len']}: "
              f"--max-len {metrics['run_max_len']} (the default) reproduces its own scoring")
    print(f"metrics and predictions in {out.path}")
    return 0


def run_humaneval(args) -> int:
    """`deltatune eval --task humaneval`: pass@k of a model, with or without an adapter (tasks/humaneval.py)."""
    from deltatune.tasks import humaneval

    try:
        ks = [int(k) for k in split_list(args.k)]
    except ValueError:
        raise ConfigError(f"--k {args.k!r}: give a comma list of whole numbers, e.g. --k 1,10") from None
    if args.split != "test":
        raise ConfigError("HumanEval has one split, test; leave --split out")
    from deltatune.storage import EVAL, OwnedFolder, chosen_folder

    out = args.out
    if out is None:
        from deltatune.training import default_eval_dir

        out = default_eval_dir(args.adapter, "humaneval") if args.adapter else \
            Path("runs") / f"humaneval-{slug(args.model or 'model')}"
    out = OwnedFolder(chosen_folder(out, "runs/humaneval-<model>"), EVAL)
    out.check()  # before the model loads: an eval folder deltatune may write (a user's predictions are never replaced)
    from deltatune.training.runs import adapter_and_model

    adapter, model = adapter_and_model(args.adapter, args.model) if args.adapter else (None, args.model)
    m = humaneval.evaluate(model=model, adapter=adapter, n=args.n, ks=ks, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens, limit=args.limit, seed=args.seed,
                           batch_size=8 if args.batch_size is None else args.batch_size, workers=args.workers, timeout=args.timeout, out_dir=out,
                           prompt_format=args.prompt_format)
    if args.json:
        print(json.dumps(m, default=jsonable), flush=True)
        return 0
    setting = (f"{m['problems']} problems, {m['prompt_format']} prompts, n={m['n']}, {m['decoding']}"
               + (f" (temperature {m['temperature']:g}, top-p {m['top_p']:g})" if m["decoding"] == "sampling" else "")
               + f", max {m['max_new_tokens']} new tokens, seed {m['seed']}")
    for key in [k for k in m if k.startswith("pass@")]:
        print(f"humaneval {key} = {m[key]:.4f}  ({setting})")
    print(f"samples: {m['passed']} passed, {m['failed']} failed, {m['timed_out']} timed out; "
          f"model {m['model']}, adapter {m['adapter'] or 'none'}; generation {m['generation_seconds']:.0f} s, "
          f"execution {m['execution_seconds']:.0f} s")
    print(f"metrics and per-sample results in {out.path}")
    return 0
