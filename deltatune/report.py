"""The comparison report of a bench: results.csv -> results.md, two PNG plots and one self-contained HTML page
(and, for a sweep's folder, :func:`report_dir` rebuilds the sweep's own table and plot: deltatune.sweep.report).

Everything here is a pure function of the per-run rows (one dict per method x seed, the JSON summary
that `deltatune train --json` prints) plus a small `meta` dict (machine, versions, date, command), so
the report can be rebuilt from an existing results.csv without training anything:

    rows = read_csv("runs/demo/results.csv")
    write_report(rows, "runs/demo", meta=read_meta("runs/demo"))

The folder is written by the rule of :class:`deltatune.storage.OwnedFolder` (kind BENCH): a bench folder
(its marker) has its report files replaced, never through a link; a folder without the marker only gets
new files (nothing of the user's is replaced). matplotlib is imported only when a plot is drawn, with
the non-interactive Agg backend.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import statistics
from pathlib import Path

from deltatune import storage
from deltatune.errors import DataError
from deltatune.machine import machine_info  # noqa: F401  (re-exported: the machine description lives there)
from deltatune.names import number_or_text  # noqa: F401  (re-exported)

# Columns written first to results.csv, in this order; any other scalar key of a summary follows, sorted.
CSV_COLUMNS = [
    "method", "seed", "task", "model", "metric", "value", "zero_shot_value", "pool", "pool_protocol",
    "trainable_params", "total_params", "trainable_pct", "train_seconds",
    "step_seconds_median", "peak_rss_mb", "run_seconds", "cpu_seconds", "other_load", "max_steps", "out_dir",
]
META_FILE = "bench.json"
RESULTS_FILE = "results.csv"
# What write_report writes into the bench folder (a report is rebuilt from results.csv and bench.json).
REPORT_FILES = ("results.md", "metric_vs_params.png", "step_time.png", "report.html")
MAX_RESULTS_BYTES = 256 * 2**20  # a results.csv or bench.json of a bench is far smaller
ZERO_SHOT = "zero-shot"
# A run's step times are marked as not to be trusted when other processes (or the hypervisor, as
# steal) took more than this share of the CPU time of the cores the run could use, while it ran.
BUSY_LOAD = 0.10
BUSY_MARK = "†"


def pool_note(summary: dict) -> str:
    """' (candidate pool 656, whole-split)' for a retrieval score that names its pool, else ''."""
    pool = summary.get("pool")
    if not isinstance(pool, (int, float)) or isinstance(pool, bool):
        return ""
    protocol = summary.get("pool_protocol")
    return f" (candidate pool {pool:.0f}" + (f", {protocol})" if protocol else ")")


def busy(row: dict) -> bool:
    """Whether other work on the machine took more than BUSY_LOAD of the CPU while this run ran."""
    load = row.get("other_load")
    return isinstance(load, (int, float)) and load > BUSY_LOAD


# ----------------------------------------------------------------------------- rows in and out

def normalize_row(summary: dict, **extra) -> dict:
    """One results.csv row from a training summary: scalar values only, plus trainable_pct."""
    row = {k: v for k, v in {**summary, **extra}.items() if v is None or isinstance(v, (str, int, float, bool))}
    if isinstance(summary.get("options"), dict):  # the method options of the run, readable in one cell
        row["options"] = json.dumps(summary["options"], sort_keys=True)
    trainable, total = row.get("trainable_params"), row.get("total_params")
    if isinstance(trainable, (int, float)) and isinstance(total, (int, float)) and total:
        row["trainable_pct"] = 100.0 * trainable / total
    return row


def csv_text(rows: list[dict]) -> str:
    """results.csv: one line per run; the known columns first, then every other key the rows carry."""
    extra = sorted({k for r in rows for k in r} - set(CSV_COLUMNS))
    columns = [c for c in CSV_COLUMNS if any(c in r for r in rows)] + extra
    f = io.StringIO(newline="")
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return f.getvalue()


def write_csv(rows: list[dict], path) -> Path:
    """Writes results.csv to ``path`` atomically (a link there is replaced itself, never written through)."""
    path = Path(path)
    storage.atomic_write_bytes(path, csv_text(rows).encode("utf-8"))
    return path


def _parse_cell(text: str):
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    return number_or_text(text)


def read_csv(path) -> list[dict]:
    """The rows of a results.csv, with numbers parsed back to int/float and empty cells to None."""
    path = Path(path)
    if not os.path.lexists(path):
        raise DataError(f"no results file at {path}; run `deltatune bench --out {path.parent}` first")
    text = _read_small(path, "a results.csv written by `deltatune bench`")
    try:
        rows = [{k: _parse_cell(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text.decode("utf-8"), newline=""))]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a results.csv written by `deltatune bench` ({type(e).__name__}: {e}); "
                        f"rerun the bench, or re-save the file as UTF-8 CSV") from None
    if not rows or "method" not in rows[0] or "value" not in rows[0]:
        raise DataError(f"{path} has no runs (expected columns method, value, ...); was it written by `deltatune bench`?")
    return rows


# ----------------------------------------------------------------------------- aggregation

def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not values:
        return None, None
    # Sample standard deviation across seeds; a single seed has no spread to report.
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per method, in order of first appearance: mean and std across seeds.

    When the runs carry a zero-shot score (retrieval: the untrained backbone), a first entry named
    "zero-shot" holds it, with no trainable parameters and no timings.
    """
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(str(r["method"]), []).append(r)
    out = []
    # Every run of one seed scores the same untrained backbone: one zero-shot value per seed.
    per_seed = {}
    for r in rows:
        if r.get("zero_shot_value") is not None:
            per_seed.setdefault(r.get("seed"), r["zero_shot_value"])
    zero_shot = _mean_std(list(per_seed.values()))
    if zero_shot[0] is not None:
        out.append({"method": ZERO_SHOT, "runs": len(per_seed),
                    "metric": _first(rows, "metric"), "value": zero_shot[0], "value_std": zero_shot[1],
                    "trainable_params": 0, "trainable_pct": 0.0})
    for name, runs in methods.items():
        entry = {"method": name, "runs": len(runs), "metric": _first(runs, "metric"),
                 "busy_runs": sum(map(busy, runs)),
                 "other_load": max((r["other_load"] for r in runs if isinstance(r.get("other_load"), (int, float))),
                                   default=None)}
        for key in ("value", "trainable_params", "trainable_pct", "step_seconds_median", "peak_rss_mb", "train_seconds"):
            entry[key], entry[key + "_std"] = _mean_std([r.get(key) for r in runs])
        out.append(entry)
    return out


def _first(rows, key):
    return next((r[key] for r in rows if r.get(key) not in (None, "")), None)


# ----------------------------------------------------------------------------- formatting

def human_count(n) -> str:
    """22713216 -> '22.7M', 73728 -> '73.7k', 0 -> '0'."""
    if n is None:
        return "–"
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}" if n / size < 100 else f"{n / size:.0f}{unit}"
    return f"{n:.0f}"


def _pm(mean, std, fmt: str) -> str:
    if mean is None:
        return "–"
    return format(mean, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")


def _pct(p) -> str:
    if p is None:
        return "–"
    return f"{p:.0f}%" if p >= 99.5 else f"{p:.3g}%"


def _pools(rows: list[dict]) -> list:
    return sorted({r["pool"] for r in rows if isinstance(r.get("pool"), (int, float))})


def metric_label(rows: list[dict]) -> str:
    """The metric's name, with its candidate pool when every run was ranked against the same one."""
    metric = _first(rows, "metric") or "value"
    pools = _pools(rows)
    return metric + (pool_note({"pool": pools[0], "pool_protocol": _first(rows, "pool_protocol")})
                     if len(pools) == 1 else "")


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table, shared by the markdown and the HTML output.

    A time per step measured while other work used the machine (see busy) carries BUSY_MARK.
    """
    agg = aggregate(rows)
    per_cell_pool = len(_pools(rows)) > 1  # else the pool is named once, in the header
    header = ["method", "runs", metric_label(rows), "trainable params", "trainable %", "time / step", "peak RSS"]
    body = []
    for a in agg:
        runs = [r for r in rows if str(r["method"]) == a["method"]] or rows  # zero-shot: every run's pool
        pool = "".join(pool_note({"pool": p}) for p in _pools(runs)) if per_cell_pool else ""
        step = a.get("step_seconds_median")
        body.append([
            a["method"],
            str(a["runs"]),
            _pm(a["value"], a["value_std"], ".4f") + pool,
            human_count(a["trainable_params"]),
            _pct(a["trainable_pct"]),
            _pm(step, a.get("step_seconds_median_std"), ".3f") + (" s" if step is not None else "")
            + (f" {BUSY_MARK}" if step is not None and a.get("busy_runs") else ""),
            _pm(a.get("peak_rss_mb"), a.get("peak_rss_mb_std"), ".0f") + (" MB" if a.get("peak_rss_mb") is not None else ""),
        ])
    return header, body


def timing_notes(rows: list[dict]) -> list[str]:
    """What the time column can be trusted for: which runs shared the machine with other work."""
    measured = [r for r in rows if isinstance(r.get("other_load"), (int, float))]
    if not measured:
        return ["Times per step: the load of other processes on the machine was not measured for these runs, "
                "so a slow method may also be a busy machine."]
    flagged = [r for r in measured if busy(r)]
    worst = max(r["other_load"] for r in measured)
    if not flagged:
        return [f"Times per step: other processes took at most {100 * worst:.0f}% of the CPU while any run ran "
                f"(runs above {100 * BUSY_LOAD:.0f}% are marked {BUSY_MARK})."]
    runs = ", ".join(f"{r['method']} seed {r.get('seed')} ({100 * r['other_load']:.0f}%)" for r in flagged)
    return [f"{BUSY_MARK} Not a measurement of the method: other processes took more than {100 * BUSY_LOAD:.0f}% "
            f"of the CPU while these runs ran, so their time per step is inflated: {runs}. Re-run them on a quiet "
            "machine to compare speeds."]


def describe_setup(meta: dict) -> str:
    """One line naming the machine, the versions and the date, e.g. for the header of results.md."""
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    machine = f"{m.get('cpu', 'unknown CPU')} ({m.get('cores', '?')} cores, {m.get('ram_gb', '?')} GB RAM)"
    versions = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "deltatune") if k in v)
    return f"Measured on {machine}; {versions}; {meta.get('date', 'undated')}."


def markdown(rows: list[dict], meta: dict | None = None) -> str:
    """results.md: a header line naming the machine and versions, the budget, then the table."""
    header, body = table(rows)
    lines = []
    if meta:
        lines.append(describe_setup(meta))
        lines.append("")
        budget = _budget(rows, meta)
        if budget:
            lines += [budget, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += [""] + timing_notes(rows)
    return "\n".join(lines) + "\n"


def _budget(rows: list[dict], meta: dict) -> str:
    model, task = _first(rows, "model"), _first(rows, "task")
    seeds = sorted({r.get("seed") for r in rows if r.get("seed") is not None})
    parts = [f"Model `{model}`, task `{task}`" if model and task else None,
             f"{meta['max_steps']} steps per run" if meta.get("max_steps") else None,
             ("1 seed per method" if len(seeds) == 1 else f"{len(seeds)} seeds per method (mean ± std)") if seeds else None]
    parts = [p for p in parts if p]
    line = ", ".join(parts) + "." if parts else ""
    if meta.get("wall_seconds"):
        line += f" {len(rows)} runs took {meta['wall_seconds'] / 60:.1f} min in all."
    if meta.get("command"):
        line += f" Command: `{meta['command']}`."
    return line.strip()


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_params(rows: list[dict], path) -> Path:
    """The metric against the number of trainable parameters (log x), one labelled point per method."""
    return _save_png(path, _metric_vs_params_png(rows))


def plot_step_time(rows: list[dict], path) -> Path:
    """Median seconds per training step for each method, as bars with the spread across seeds."""
    return _save_png(path, _step_time_png(rows))


def _save_png(path, data: bytes) -> Path:
    """Write the PNG ``data`` atomically to ``path`` (a link there is replaced, never written through)."""
    path = Path(path)
    storage.atomic_write_bytes(path, data)
    return path


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _metric_vs_params_png(rows: list[dict]) -> bytes:
    plt = _pyplot()
    agg = aggregate(rows)
    metric = metric_label(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for a in agg:
        if a["method"] == ZERO_SHOT:
            ax.axhline(a["value"], color="grey", linestyle="--", linewidth=1)
            ax.annotate(ZERO_SHOT, (0.01, a["value"]), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), color="grey", fontsize=8)
            continue
        if a["value"] is None or not a["trainable_params"]:
            continue
        ax.errorbar(a["trainable_params"], a["value"], yerr=a["value_std"] or 0, fmt="o", capsize=3)
        ax.annotate(a["method"], (a["trainable_params"], a["value"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=9)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)  # room for the labels right of the outermost points
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(metric)
    ax.set_title(f"{_first(rows, 'metric') or 'value'} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _png(plt, fig)


def _step_time_png(rows: list[dict]) -> bytes:
    plt = _pyplot()
    agg = [a for a in aggregate(rows) if a["method"] != ZERO_SHOT and a.get("step_seconds_median") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    names = [a["method"] + (f" {BUSY_MARK}" if a.get("busy_runs") else "") for a in agg]
    bars = ax.bar(names, [a["step_seconds_median"] for a in agg],
                  yerr=[a["step_seconds_median_std"] or 0 for a in agg], capsize=3, color="tab:blue")
    for bar, a in zip(bars, agg):
        if a.get("busy_runs"):  # hatched grey: timed while other work used the machine
            bar.set_color("lightgrey")
            bar.set_hatch("//")
            bar.set_edgecolor("dimgrey")
    if any(a.get("busy_runs") for a in agg):
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(facecolor="lightgrey", edgecolor="dimgrey", hatch="//",
                                 label=f"{BUSY_MARK} machine busy with other work (> {100 * BUSY_LOAD:.0f}% CPU): not trustworthy")],
                  loc="upper left", fontsize=8)
    ax.set_ylabel("seconds per step (median)")
    ax.set_title("time per training step")
    ax.grid(True, axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    return _png(plt, fig)


# ----------------------------------------------------------------------------- machine and HTML

def _read_small(path: Path, what: str) -> bytes:
    """The bytes of a regular file of the bench folder, never through a link (a FIFO, a device or a huge
    file is a one-line DataError: none of them is what the bench wrote)."""
    try:
        return storage.read_bytes(path, MAX_RESULTS_BYTES)
    except OSError as e:
        why = ("it is a symbolic link, which deltatune does not follow in its folders" if os.path.islink(path)
               else e.strerror or str(e))
        raise DataError(f"{path} cannot be read as {what} ({why}); replace it with the file itself") from None


def read_meta(out_dir) -> dict:
    """The bench.json written next to results.csv (machine, versions, command), or {} if there is none."""
    path = Path(out_dir) / META_FILE
    if not os.path.lexists(path):
        return {}
    try:
        meta = json.loads(_read_small(path, "the bench.json `deltatune bench` writes").decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({type(e).__name__}); delete it to rebuild the report "
                        "without it") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds {type(meta).__name__}, not the JSON object `deltatune bench` writes; delete it "
                        "to rebuild the report without it")
    return meta


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(storage.read_bytes(png)).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}th,td{padding:.3rem .7rem;border-bottom:1px solid #ddd}
td:not(:first-child),th:not(:first-child){text-align:right}th{background:#f4f4f4}
img{max-width:100%}code,pre{background:#f4f4f4;padding:.1rem .3rem}pre{padding:.6rem;overflow-x:auto}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}dt{font-weight:600}
"""


def html_page(rows: list[dict], meta: dict, images: dict[str, Path]) -> str:
    """One self-contained HTML page: the table, the plots embedded as base64, the machine and the command."""
    esc = html.escape
    header, body = table(rows)
    model, task = _first(rows, "model"), _first(rows, "task")
    title = f"deltatune bench: {model} on {task}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p>{esc(describe_setup(meta))}</p>" if meta else "",
             "<h2>Results</h2><table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in body]
    parts.append("</tbody></table>")
    parts += [f"<p>{esc(note)}</p>" for note in timing_notes(rows)]
    for caption, png in images.items():
        parts.append(f"<figure><img alt='{esc(caption)}' src='{_data_uri(png)}'><figcaption>{esc(caption)}</figcaption></figure>")
    m, v = meta.get("machine", {}), meta.get("versions", {})
    setup = {"CPU": m.get("cpu"), "cores": m.get("cores"), "RAM": f"{m['ram_gb']} GB" if m.get("ram_gb") else None,
             "OS": m.get("os"), **{k: v[k] for k in v}, "date": meta.get("date")}
    parts.append("<h2>Setup</h2><dl>" + "".join(f"<dt>{esc(str(k))}</dt><dd>{esc(str(val))}</dd>"
                                                 for k, val in setup.items() if val is not None) + "</dl>")
    if meta.get("command"):
        parts.append(f"<h2>Command</h2><pre>{esc(meta['command'])}</pre>")
    columns = [c for c in CSV_COLUMNS if any(r.get(c) is not None for r in rows) and c != "out_dir"]
    parts.append("<details><summary>Every run</summary><table><thead><tr>"
                 + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr></thead><tbody>")
    parts += ["<tr>" + "".join(f"<td>{esc(_cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows]
    parts.append("</tbody></table></details></body></html>")
    return "\n".join(p for p in parts if p)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def report_folder(out_dir, what: str = "DIR") -> storage.OwnedFolder:
    """The folder a report is written to: a bench folder (its marker), a new one, or, since the report's
    folder is also its input, a folder without the marker that holds none of REPORT_FILES yet (they are
    then only added, never replacing a file of the user's)."""
    return storage.OwnedFolder(out_dir, storage.BENCH, what=what, add=REPORT_FILES)


def report_dir(out_dir, what: str = "DIR") -> tuple[str, dict[str, Path]]:
    """`deltatune report DIR`: the report of a sweep's folder (recognised by the ``sweep.json`` a sweep writes:
    its table, CSV and plot rebuilt from its records) or of a bench folder (from results.csv and bench.json).
    Returns the markdown and the paths written ("main": the one to open). The folder is written by the
    rule of :class:`~deltatune.storage.OwnedFolder`: replacing its own files in a folder of its kind, only adding
    new ones elsewhere."""
    from deltatune.sweep import files as sweep_files

    if sweep_files.is_sweep(out_dir):
        from deltatune.sweep import report as sweep_report

        folder = storage.OwnedFolder(out_dir, storage.SWEEP, what=what, add=sweep_report.FILES)
        folder.check()  # a running sweep holds the lock: refused until it ends (it writes these files then)
        try:
            text, files = sweep_report.rebuild(folder)
        finally:
            folder.close()
        paths = {name: Path(p) for name, p in files.items()}
        return text, {**paths, "main": paths["results.md"]}
    folder = report_folder(out_dir, what)
    folder.check()  # a folder the report may write (nothing through a link, nothing of the user's replaced)
    try:
        rows = read_csv(Path(folder.path) / RESULTS_FILE)
        meta = read_meta(folder.path)
        paths = write_report(rows, folder, meta)
    finally:
        folder.close()
    return markdown(rows, meta), {**paths, "main": paths["html"]}


def write_report(rows: list[dict], out_dir, meta: dict | None = None) -> dict[str, Path]:
    """Writes results.md, metric_vs_params.png, step_time.png and report.html into ``out_dir`` (a folder, or
    an :class:`~deltatune.storage.OwnedFolder` already open); returns their paths. Nothing is written
    through a link, and nothing written when a file of the user's is in the way (see report_folder)."""
    if not rows:
        raise DataError("no finished runs to report on; every run of the bench failed (see the messages above)")
    folder = out_dir if isinstance(out_dir, storage.OwnedFolder) else report_folder(out_dir)
    folder.open()
    for name in REPORT_FILES:  # every name checked before the first is written
        folder.file(name)
    meta = meta or {}
    pngs = _metric_vs_params_png(rows), _step_time_png(rows)  # drawn before the first file is written
    paths = {"markdown": folder.write_text("results.md", markdown(rows, meta)),
             "metric_plot": folder.write_bytes("metric_vs_params.png", pngs[0]),
             "time_plot": folder.write_bytes("step_time.png", pngs[1])}
    images = {f"{metric_label(rows)} vs trainable parameters (log scale); error bars: std across seeds": paths["metric_plot"],
              "median time per training step" + (f"; hatched grey ({BUSY_MARK}): timed while other work used the machine"
                                                 if any(map(busy, rows)) else ""): paths["time_plot"]}
    paths["html"] = folder.write_text("report.html", html_page(rows, meta, images))
    return paths
