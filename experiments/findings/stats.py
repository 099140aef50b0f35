"""What the page says about one group (per-seed scores, mean and std, lr, parameters, test size) and the group as
one side of a comparison (:mod:`findings.intervals`); the number formats the page and the verdicts share."""
from __future__ import annotations

import math
import statistics

from . import intervals as I
from . import suite as F
from .suite import GRID_SEED, SETTINGS, Store, grid, group_lr, run_config

RULES_DATE = "2026-12-06"  # the interval rules (issue 21), and the date the page says they changed


def _point(metric: str) -> float:
    """One 'point' of a metric: 0.01 for scores in [0, 1] (MRR, accuracy), 1 for BLEU (x100)."""
    return 1.0 if metric in ("bleu4",) else 0.01


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _count(n) -> str:
    """22713216 -> '22.7M', 73728 -> '73.7k', 0 -> '0'; '–' when not a number."""
    if not isinstance(n, (int, float)):
        return "–"
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}" if n / size < 100 else f"{n / size:.0f}{unit}"
    return f"{n:.0f}"


def _pct(p) -> str:
    if p is None:
        return "–"
    return f"{p:.3g}%" if p < 1 else f"{p:.1f}%"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None below two values."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def group_stats(store: Store, g, groups: dict, seeds) -> dict:
    """What the page says about one group: per-seed test values, mean/std, params, lr and its grid. While the
    grid waits for an extension (its best at an edge), the runs at the best lr so far are shown, flagged."""
    setting = SETTINGS[g.setting]
    lr = group_lr(store, g, groups, provisional=True)
    tuned = g.lr_from is None and g.fixed_lr is None and g.tune
    found = grid(store, setting, g) if tuned else None
    root = groups.get(g.lr_from) if g.lr_from else None
    source = grid(store, SETTINGS[root.setting], root) if root is not None and root.tune and root.fixed_lr is None \
        else found
    pending = bool(source and source["waiting"] == "extension")
    grid_rows = found["rows"] if found else []
    records = {}
    if lr is not None:
        for seed in seeds:
            record = store.get(run_config(setting, g, lr, seed))
            if record is not None:
                records[seed] = record
    values = [records[s]["result"]["value"] for s in seeds if s in records]
    mean, std = mean_std(values)
    first = next(iter(records.values()), None)
    if first is None and tuned:  # parameter counts do not depend on the lr: any finished grid run has them
        first = next((store.get(run_config(setting, g, r["lr"], GRID_SEED)) for r in grid_rows if r["done"]), None)
    res = first["result"] if first else {}
    trainable, total = res.get("trainable_params"), res.get("total_params")

    def med(key):
        xs = [r["result"].get(key) for r in records.values() if isinstance(r["result"].get(key), (int, float))]
        return statistics.median(xs) if xs else None

    return {"group": g, "setting": setting, "lr": lr, "tuned": tuned, "grid": grid_rows, "records": records,
            "pending": pending, "edge": bool(found and found["edge"]),
            "values": values, "mean": mean, "std": std, "n": len(values), "missing": [s for s in seeds if s not in records],
            "metric": res.get("metric"), "pool": res.get("pool"), "zero_shot": res.get("zero_shot_value"),
            "trainable": trainable, "total": total,
            "pct": 100.0 * trainable / total if isinstance(trainable, (int, float)) and total else None,
            "step_s": med("step_seconds_median"), "best_step": med("best_step"),
            "wall_s": statistics.median([r["wall_seconds"] for r in records.values()]) if records else None,
            "other_load": max((r.get("other_load") or 0 for r in records.values()), default=None),
            "dp_epsilon": med("dp_epsilon"), "dp_delta": med("dp_delta"), "dp_noise": med("dp_noise_multiplier"),
            "valid": med("valid_value"), "n_test": _n_test(setting, records)}


def _side(s: dict) -> I.Side:
    """The group as one side of a comparison (its seeds' test scores, per-example scores where recorded)."""
    recs = [s["records"][k] for k in sorted(s["records"])]
    return I.Side(s["group"].id, [r["result"]["value"] for r in recs], sorted(s["records"]), s["n_test"],
                  examples=[(r.get("test_scores") or {}).get("values") for r in recs],
                  bounds=[I.example_variance_bound(r["result"].get("metric"), r["result"]["value"], r["result"])
                          for r in recs])


def _untrained(s: dict) -> I.Side | None:
    """The untrained model on the group's test set (each run scored it before training): one exact number where
    every seed saw the same, else one per seed (a classifier's head is drawn per seed)."""
    recs = [s["records"][k] for k in sorted(s["records"]) if isinstance(s["records"][k]["result"].get("zero_shot_value"),
                                                                       (int, float))]
    if not recs:
        return None
    values = [r["result"]["zero_shot_value"] for r in recs]
    exact = len(set(values)) == 1
    examples = [(r.get("test_scores") or {}).get("zero_shot") for r in recs]
    bounds = [I.example_variance_bound(r["result"].get("metric"), v, None) for r, v in zip(recs, values)]
    if exact:
        values, examples, bounds = values[:1], examples[:1], bounds[:1]
    return I.Side(f"untrained:{s['setting'].name}", values, [k for k in sorted(s["records"])][:len(values)],
                  s["n_test"], examples=examples, bounds=bounds, exact=exact)


_N_TEST: dict = {}


def _n_test(setting, records: dict) -> int | None:
    """Test examples of the setting (recorded by runs since 2026-12-06, else counted from the task)."""
    for r in records.values():
        if isinstance(r.get("n_test"), int):
            return r["n_test"]
    key = (setting.task, setting.max_train, setting.max_eval)
    if key not in _N_TEST:
        from deltatune.tasks import load_task

        _N_TEST[key] = len(load_task(setting.task, seed=F.DATA_SEED, max_train=setting.max_train,
                                     max_eval=setting.max_eval).test)
    return _N_TEST[key]


def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    return _fmt(s["mean"]) + (f" ± {_fmt(s['std'])}" if s["std"] is not None else "")


def _ranges(xs: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x > start else str(x))
            start = None
    return ", ".join(out)


def _lowest_two(scores: list) -> list[int]:
    """The hidden states of the two lowest scores, in layer order."""
    return sorted(sorted(range(len(scores)), key=scores.__getitem__)[:2])
