"""What a sweep shows: ``results.md`` (every trial, the chosen configuration, its test score and the comparison
with the baseline), ``results.csv`` and ``sweep.png`` (the metric against each searched setting, and the trials
over time), written to the sweep's folder when it ends, and again from its files alone by ``deltatune report
SWEEP_DIR`` (:func:`from_folder`, :func:`rebuild`), also while it is unfinished."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import storage
from ..errors import ConfigError, DataError
from .config import SweepConfig
from .files import read_json, read_records
from .search import best_of
from .space import Space, show
from .trial import BASELINE

LEVEL_Z = 1.959964  # 95% two-sided, normal
BOOTSTRAP = 2000


# ----------------------------------------------------------------------------- the comparison

def example_scores(path, value) -> list[float] | None:
    """Each test example's score from an evaluation's predictions file, where the metric is their mean: the
    reciprocal rank (MRR) or whether the prediction is the reference (accuracy); None for a metric that is no
    such mean (BLEU, F1)."""
    try:
        rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if not rows or not all(isinstance(r, dict) for r in rows):
        return None
    ways = []
    if all(isinstance(r.get("rank"), int) and r["rank"] >= 1 for r in rows):
        ways.append([1.0 / r["rank"] for r in rows])
    if all("prediction" in r and "reference" in r for r in rows):
        ways.append([float(r["prediction"] == r["reference"]) for r in rows])
    return next((w for w in ways if abs(statistics.fmean(w) - value) <= 1e-6), None)


def compare(chosen: dict, baseline: dict, metric: str) -> dict:
    """chosen - baseline on test with a 95% interval: a paired bootstrap over the test examples (each example's
    score averaged over the seeds; the same resampled examples on both sides) plus, with several seeds, the
    variance of the per-seed differences over their number; a normal interval of the summed variances. Inside
    it, the verdict is "undecided"."""
    difference = chosen["value"] - baseline["value"]
    out = {"metric": metric, "difference": difference, "low": None, "high": None, "verdict": "undecided",
           "how": "no per-example scores for this metric: no interval, no verdict"}
    sides = []
    for side in (chosen, baseline):
        scores = [example_scores(s["predictions_file"], s["value"]) for s in side["seeds"]]
        if any(s is None for s in scores) or len({len(s) for s in scores}) != 1:
            return out
        sides.append(np.mean(np.array(scores), axis=0))
    if len(sides[0]) != len(sides[1]) or not len(sides[0]):
        return out
    diff = sides[0] - sides[1]
    rng = np.random.default_rng(0)  # fixed: the report reads the same every time
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))].mean(axis=1)
    variance = float(np.var(means, ddof=1))
    paired = [a["value"] - b["value"] for a, b in zip(chosen["seeds"], baseline["seeds"])]
    if len(paired) > 1:
        variance += statistics.variance(paired) / len(paired)
    half = LEVEL_Z * math.sqrt(variance)
    out.update(low=difference - half, high=difference + half, examples=len(diff),
               how=f"95% interval: paired bootstrap over the {len(diff)} test examples ({BOOTSTRAP} resamples)"
                   + (f" plus the spread of {len(paired)} seeds" if len(paired) > 1 else ", one seed (its training "
                      "randomness is not in the interval)"))
    if difference - half > 0:
        out["verdict"] = "the chosen configuration is better"
    elif difference + half < 0:
        out["verdict"] = "the baseline is better"
    return out


# ----------------------------------------------------------------------------- text

def _value(v, digits=4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _label(record: dict) -> str:
    return "baseline" if record.get("baseline") else str(record["number"])


def rows(plan, result) -> list[dict]:
    """One row per trial (the baseline first), for the table and the CSV."""
    chosen = result["chosen"]
    out = []
    records = ([result["baseline"]] if result["baseline"] else []) + result["trials"]
    for r in records:
        row = {"trial": _label(r), **{d.name: r["params"].get(d.key) for d in plan.space.dims},
               "status": r["status"], f"{plan.metric}_valid": r.get("value"),
               "best_step": "/".join(str(x.get("best_step")) for x in r["runs"]),
               "seconds": r.get("seconds"), "chosen": r is chosen,
               "resumed_from": "/".join(str(x.get("resumed_from", 0)) for x in r["runs"]),
               "out_dirs": " ".join(x["out_dir"] for x in r["runs"]), "error": r.get("error")}
        out.append(row)
    return out


def csv_text(table: list[dict]) -> str:
    f = io.StringIO(newline="")
    columns = list(table[0]) if table else ["trial"]
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in table:
        writer.writerow({k: "" if row.get(k) is None else json.dumps(row[k]) if isinstance(row[k], list) else row[k]
                         for k in columns})
    return f.getvalue()


def markdown(plan, result) -> str:
    cfg, space, metric = plan.cfg, plan.space, plan.metric
    base = {k: v for k, v in space.base.items() if k not in ("model", "task", "method", "options")}
    # sorted: the same line from the driver's plan and from sweep.json (written with sorted keys)
    fixed = ", ".join(f"{k}={show(v)}" for k, v in [*sorted(base.items()), *sorted(space.base.get("options", {}).items())]) \
        or "defaults"
    searched = ", ".join(f"{d.name} {d.describe()}" for d in space.dims) or "nothing (one configuration)"
    lines = [f"# Sweep: {space.method} on {space.base.get('task', 'code-search')} ({space.base.get('model', 'minilm')})",
             "",
             f"Searched: {searched}; algorithm {cfg.algorithm}"
             + (f" (search seed {cfg.search_seed})" if cfg.algorithm != "grid" else "")
             + f", pruning {cfg.prune}; seeds {', '.join(map(str, cfg.seeds))}; every trial: {fixed}. "
             f"A trial's score is {metric} on the **validation** split (each run's best validation, mean over the "
             "seeds); the test split is scored for the chosen configuration only"
             + (" and the baseline (the searched settings at their defaults)" if cfg.baseline else "") + ".",
             ""]
    table = rows(plan, result)
    names = [d.name for d in space.dims]
    lines.append("| trial | " + " | ".join(names) + f" | status | {metric} (valid) | best step | seconds |")
    lines.append("|---|" + "---|" * len(names) + "---|--:|--:|--:|")
    for row in table:
        mark = " **chosen**" if row["chosen"] else ""
        lines.append(f"| {row['trial']}{mark} | " + " | ".join(show(row[n]) for n in names)
                     + f" | {row['status']} | {_value(row[f'{metric}_valid'])} | {row['best_step']} | "
                       f"{_value(row['seconds'], 0)} |")
    lines.append("")
    chosen = result["chosen"]
    if chosen is None:
        lines.append("No trial finished with a validation score; nothing is chosen.")
    else:
        params = ", ".join(f"{d.name}={show(chosen['params'].get(d.key))}" for d in space.dims)
        lines.append(f"**Chosen on validation:** {'the baseline' if chosen.get('baseline') else 'trial ' + str(chosen['number'])}"
                     f"{' (' + params + ')' if params else ''}: {metric} {_value(chosen['value'])} on validation"
                     + (f"; **test** (scored for this configuration only): {_value(result['test']['value'])}"
                        f" ({_examples(result['test'])})" if result["test"] else "") + ".")
    if result["baseline"] is not None:
        b = result["baseline"]
        defaults = ", ".join(f"{d.name}={show(b['params'].get(d.key))}" for d in space.dims)
        lines.append(f"\nBaseline (the defaults: {defaults}): "
                     f"{metric} {_value(b.get('value'))} on validation"
                     + (f", {_value(result['baseline_test']['value'])} on test" if result["baseline_test"] else "") + ".")
    c = result["comparison"]
    if c is not None:
        interval = f" (95% interval {c['low']:+.4f} to {c['high']:+.4f})" if c["low"] is not None else ""
        lines.append(f"\nChosen minus baseline on test: {c['difference']:+.4f}{interval}: {c['verdict']}. {c['how']}.")
    for note in result["notes"]:
        lines.append(f"\nNote: {note}.")
    load = result["other_load"]
    lines.append(f"\nWall time of this call: {result['wall_seconds'] / 60:.1f} min (the trials, all calls together: "
                 f"{result['trial_seconds'] / 60:.1f} min)"
                 + (f"; other processes took {100 * load:.0f}% of the CPU meanwhile" if load is not None else "")
                 + ". Every trial's run folder is listed in results.csv; the plot is sweep.png.")
    return "\n".join(lines) + "\n"


def _examples(test: dict) -> str:
    seeds = test["seeds"]
    return (f"{seeds[0].get('examples')} test examples, " if seeds and seeds[0].get("examples") else "") + \
        (f"mean of seeds {', '.join(str(s['seed']) for s in seeds)}")


def summary_lines(plan, result) -> list[str]:
    out = []
    if result["test"]:
        out.append(f"test {plan.metric} of the chosen configuration: {result['test']['value']:.4f}"
                   + (f" (baseline {result['baseline_test']['value']:.4f})" if result["baseline_test"] else ""))
    c = result["comparison"]
    if c is not None and c["low"] is not None:
        out.append(f"chosen minus baseline on test: {c['difference']:+.4f} (95% interval {c['low']:+.4f} to "
                   f"{c['high']:+.4f}): {c['verdict']}")
    out += [f"note: {n}" for n in result["notes"]]
    out.append(f"results.md, results.csv and sweep.png in {result['out']}")
    return out


# ----------------------------------------------------------------------------- the plot

def plot_png(plan, result) -> bytes:
    """One panel per searched setting (the metric against its values; log axis for a log range; pruned trials
    hollow, the chosen one starred), and one of the trials over time with the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims, metric = plan.space.dims, plan.metric
    records = ([result["baseline"]] if result["baseline"] else []) + result["trials"]
    scored = [r for r in records if isinstance(r.get("value"), (int, float))]
    panels = len(dims) + 1
    cols = min(3, panels)
    rows_ = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.4 * rows_), dpi=110, squeeze=False)
    axes = axes.ravel()
    chosen = result["chosen"]
    for ax, dim in zip(axes, dims):
        values = [r["params"].get(dim.key) for r in scored]
        if dim.numeric:
            xs = values
            if dim.log or (dim.kind == "choice" and all(isinstance(v, (int, float)) and v > 0 for v in values)
                           and max(values) / min(values) >= 10):
                ax.set_xscale("log")
        else:
            labels = [show(v) for v in dim.values]
            xs = [labels.index(show(v)) if show(v) in labels else len(labels) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        for r, x in zip(scored, xs):
            style = dict(marker="o", color="C0", markersize=6)
            if r["status"] == "pruned":
                style.update(markerfacecolor="none")
            if r.get("baseline"):
                style.update(marker="s", color="grey")
            ax.plot([x], [r["value"]], linestyle="none", **style)
            if r is chosen:
                ax.plot([x], [r["value"]], marker="*", color="C3", markersize=14, linestyle="none")
        ax.set_xlabel(dim.name)
        ax.set_ylabel(f"{metric} (valid)")
        ax.grid(alpha=0.3)
    if dims:  # what the markers mean, once
        from matplotlib.lines import Line2D

        keys = [Line2D([], [], marker="o", color="C0", linestyle="none", label="trial"),
                Line2D([], [], marker="*", color="C3", markersize=12, linestyle="none", label="chosen")]
        if any(r["status"] == "pruned" for r in scored):
            keys.append(Line2D([], [], marker="o", color="C0", markerfacecolor="none", linestyle="none", label="pruned"))
        if result["baseline"] is not None:
            keys.append(Line2D([], [], marker="s", color="grey", linestyle="none", label="baseline (defaults)"))
        axes[0].legend(handles=keys, fontsize=7)
    ax = axes[len(dims)]
    start = min((r["started"] for r in records if r.get("started")), default=0.0)
    order = sorted(scored, key=lambda r: r.get("ended") or 0)
    times = [((r.get("ended") or start) - start) / 60 for r in order]
    ax.plot(times, [r["value"] for r in order], "o", color="C0", markersize=5, label="trial")
    best, steps = -math.inf, []
    for r in order:
        if r["status"] == "complete":
            best = max(best, r["value"])
        steps.append(best if best > -math.inf else None)
    ax.step(times, [s if s is not None else np.nan for s in steps], where="post", color="C3", label="best so far")
    ax.set_xlabel("minutes since the first trial started")
    ax.set_ylabel(f"{metric} (valid)")
    ax.set_title("trials over time", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for extra in axes[panels:]:
        extra.set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write(folder, plan, result) -> dict:
    """results.md, results.csv and (with matplotlib) sweep.png in the sweep's folder; their paths."""
    files = {"results.md": folder.write_text("results.md", markdown(plan, result)),
             "results.csv": folder.write_text("results.csv", csv_text(rows(plan, result)))}
    try:
        png = plot_png(plan, result)
    except ImportError:  # matplotlib is the report extra
        png = None
    if png is not None:
        files["sweep.png"] = folder.write_bytes("sweep.png", png)
    return {k: str(v) for k, v in files.items()}


# ----------------------------------------------------------------------------- from the folder alone

FILES = ("results.md", "results.csv", "sweep.png")  # what write() and rebuild() write


@dataclass
class Saved:
    """A sweep as its folder holds it: what the table and the plot read of the driver's plan."""

    cfg: SweepConfig
    space: Space
    metric: str
    out: Path


def from_folder(path) -> tuple[Saved, dict]:
    """The sweep in ``path`` and its outcome, read from ``sweep.json``, ``trials.jsonl`` and ``chosen.json``
    (nothing loaded or trained). A sweep that has not ended (killed, or running) has no ``chosen.json`` yet, or an
    older one: its best trial so far is shown, and no test score."""
    path = Path(path)
    saved = read_json(path / "sweep.json")
    try:
        space = Space.from_json(saved["identity"]["space"])
        settings = saved["settings"]
        cfg = SweepConfig(**{f.name: settings[f.name] for f in dataclasses.fields(SweepConfig) if f.name in settings})
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as err:
        raise DataError(f"{path / 'sweep.json'} is not the file deltatune sweep writes ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:120]}); run the sweep again into another --out") from None
    records = read_records(path)
    ended = read_json(path / "chosen.json") if os.path.lexists(path / "chosen.json") else None
    best = best_of(records.values())
    # chosen.json speaks for the records only while they have the same best (a sweep that went on has another)
    if ended is not None and (ended.get("chosen") or {}).get("number") != (best or {}).get("number"):
        ended = None
    trials = [r for n, r in sorted(records.items()) if n >= 0]
    metric = (ended or {}).get("metric") or next((r.get("metric") for r in records.values() if r.get("metric")), None) \
        or "value"
    starts = [r["started"] for r in records.values() if isinstance(r.get("started"), (int, float))]
    ends = [r["ended"] for r in records.values() if isinstance(r.get("ended"), (int, float))]
    result = {"out": str(path), "metric": metric, "trials": trials, "baseline": records.get(BASELINE), "chosen": best,
              "trial_seconds": round(sum(r.get("seconds") or 0 for r in records.values()), 1),
              "wall_seconds": round(max(ends) - min(starts), 1) if starts and ends else 0.0, "other_load": None,
              "test": None, "baseline_test": None, "comparison": None,
              "notes": ["the sweep has not ended (it was stopped, or it is running): the best trial so far is shown, "
                        "the test split is not scored yet; run the same sweep again to go on"]}
    if ended is not None:
        result.update({k: ended.get(k) for k in ("test", "baseline_test", "comparison", "other_load")},
                      notes=list(ended.get("notes") or []),
                      wall_seconds=ended.get("wall_seconds") or result["wall_seconds"])
    return Saved(cfg, space, metric, path.absolute()), result


def rebuild(folder) -> tuple[str, dict]:
    """results.md, results.csv and sweep.png written again into the sweep's folder (an open-able
    :class:`~deltatune.storage.OwnedFolder` of kind SWEEP) from its files; the markdown and the paths."""
    saved, result = from_folder(folder.path)
    folder.open()
    for name in FILES:  # every name checked before the first is written
        folder.file(name)
    return markdown(saved, result), write(folder, saved, result)
