"""`deltatune analyze`: probes, RSA/CKA per layer and a freeze depth (deltatune.analysis)."""
from __future__ import annotations

import json

from deltatune.analysis.labels import PROPERTIES

NAME = "analyze"
HELP = ("which layers hold what, and which a fine-tune changes: probes, RSA, CKA, a freeze depth "
        "(HTML, JSON, PNG)")


def add_arguments(p) -> None:
    p.add_argument("--model", default="minilm", help="minilm, smollm2, tiny-bert, a folder or a cached HF id (default minilm)")
    p.add_argument("--task", default="code-search", help="the task whose data the similarity and fine-tunes use")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="a `deltatune train` output (or adapter) folder to compare with the pretrained model; repeatable")
    p.add_argument("--out", metavar="DIR", help="default runs/analysis-<model>-<task>; a new or empty folder, or one "
                   "an earlier analysis wrote (any other is refused, never written into)")
    p.add_argument("--properties", default=",".join(PROPERTIES), help=f"probed properties (default {','.join(PROPERTIES)})")
    p.add_argument("--no-probing", action="store_true", help="similarity and freeze depth only")
    p.add_argument("--finetune", metavar="METHODS",
                   help="methods fine-tuned briefly for the similarity when there is no --adapter (default full; "
                        "e.g. full,lora,houlsby,telly side by side)")
    p.add_argument("--finetune-steps", type=int, default=50, metavar="N", help="steps of each short fine-tune (0: none)")
    p.add_argument("--functions", default="600,150,300", metavar="TRAIN,VALID,TEST",
                   help="stdlib functions probed per split (default 600,150,300)")
    p.add_argument("--samples", type=int, default=500, metavar="N", help="texts compared for RSA / CKA (default 500)")
    p.add_argument("--search-samples", type=int, default=500, metavar="N",
                   help="code-search test queries for the semantic probe (default 500)")
    p.add_argument("--threshold", type=float, default=0.9, help="RSA threshold of the freeze-depth rule (default 0.9)")
    p.add_argument("--score", default="rsa_spearman",
                   help="the per-layer similarity the freeze-depth rule reads: rsa_spearman (default, the Telly study's), "
                        "rsa_spearman_std (every dimension standardised first, for models with rogue dimensions), "
                        "rsa_pearson or cka")
    p.add_argument("--max-len", type=int, default=256, metavar="N")
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the analysis as one JSON line")


def run(args) -> int:
    from deltatune.analysis.api import analyze
    from deltatune.errors import ConfigError
    from deltatune.names import slug
    from deltatune.storage import chosen_folder

    try:
        n_train, n_valid, n_test = (int(x) for x in args.functions.split(","))
    except ValueError:
        raise ConfigError(f"--functions {args.functions!r}: expected three numbers, e.g. 600,150,300") from None
    properties = tuple(p for p in args.properties.split(",") if p)
    unknown = sorted(set(properties) - set(PROPERTIES))
    if unknown:
        raise ConfigError(f"--properties: unknown {', '.join(unknown)}; known: {', '.join(PROPERTIES)}")
    for name, value, low in (("--finetune-steps", args.finetune_steps, 0), ("--samples", args.samples, 3), ("--search-samples", args.search_samples, 2),
                             ("--max-len", args.max_len, 2), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    out = chosen_folder(args.out, f"runs/analysis-{slug(args.model)}-{slug(args.task)}")
    result = analyze(args.model, args.task, args.adapter, out, probing=not args.no_probing, properties=properties,
                     n_train=n_train, n_valid=n_valid, n_test=n_test, samples=args.samples,
                     search_samples=args.search_samples,
                     finetune=None if args.finetune is None else tuple(m for m in args.finetune.split(",") if m),
                     finetune_steps=args.finetune_steps,
                     threshold=args.threshold, score=args.score, max_len=args.max_len, batch_size=args.batch_size,
                     seed=args.seed)
    if args.json:
        print(json.dumps(result), flush=True)
        return 0
    for prop, r in result.get("probing", {}).items():
        scores = " ".join(f"{v:.3f}" for v in r["score"])
        print(f"{prop:<16} {r['metric']:<8} per layer: {scores}   peak h{r['peak_layer']}   baseline {r['baseline']:.3f}"
              + (f"   weighted {r['weighted']['accuracy']:.3f}" if "weighted" in r else ""))
    for name, r in result.get("similarity", {}).get("models", {}).items():
        print(f"{name:<24} rsa(spearman) {' '.join(f'{v:.3f}' for v in r['rsa_spearman'])}   "
              f"cka {' '.join(f'{v:.3f}' for v in r['cka'])}")
    if "freeze" in result:
        print(f"recommended freeze depth K = {result['freeze']['k']} (telly k={result['freeze']['k']}): {result['freeze']['rule']}")
    print(f"analysis.json, plots and analysis.html in {out}")
    return 0
