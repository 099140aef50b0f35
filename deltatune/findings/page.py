"""docs/findings.md from the run files of ``deltatune findings`` (see :mod:`deltatune.findings`).

Everything on the page is computed here from ``<out>/runs/*.json``: means and sample standard
deviations over the seeds that finished, the learning-rate grids (validation scores) and the
verdicts, whose criteria are written next to them. Missing runs are listed with the command that
completes them. Plots go to ``<out>/*.png``.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .. import findings as F
from . import GRID, GRID_SEED, SETTINGS, Store, choose_lr, group_lr, planned_runs, run_config

# Where each claim comes from (METHODS.md section), shown under its title.
SOURCES = {
    "1": "Ayupov & Chirkova 2022 and He et al. 2022 (PEFT for code); the seeds' framing in issue 12",
    "2": "Shi et al., ISSTA 2023, Towards Efficient Fine-tuning of Pre-trained Code Models (Telly); METHODS.md section 2",
    "3": "Zhang et al., NeurIPS 2022, Dynamic Parameter Selection; METHODS.md section 1",
    "4": "Qi et al. 2022, LN-tuning (arXiv 2211.08682); METHODS.md section 10",
    "5": "Karimi Mahabadi et al., NeurIPS 2021, Compacter; METHODS.md section 6",
    "6": "Saad-Falcon et al., Findings of EACL 2023, Embedding Recycling; METHODS.md section 11",
    "7": "Yu et al., ICLR 2022, Differentially Private Fine-tuning of Language Models; METHODS.md section 13",
}


def _point(metric: str) -> float:
    """One 'point' of a metric: 0.01 for scores in [0, 1] (MRR, accuracy), 1 for BLEU (x100)."""
    return 1.0 if metric in ("bleu4",) else 0.01


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _count(n) -> str:
    from ..report import human_count

    return human_count(n) if isinstance(n, (int, float)) else "–"


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
    """What the page says about one group: per-seed test values, mean/std, params, lr and its grid."""
    setting = SETTINGS[g.setting]
    lr = group_lr(store, g, groups)
    tuned = g.lr_from is None and g.fixed_lr is None and g.tune
    grid = choose_lr(store, setting, g)[1] if tuned else []
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
        first = next((store.get(run_config(setting, g, r["lr"], GRID_SEED)) for r in grid if r["done"]), None)
    res = first["result"] if first else {}
    trainable, total = res.get("trainable_params"), res.get("total_params")

    def med(key):
        xs = [r["result"].get(key) for r in records.values() if isinstance(r["result"].get(key), (int, float))]
        return statistics.median(xs) if xs else None

    return {"group": g, "setting": setting, "lr": lr, "tuned": tuned, "grid": grid, "records": records,
            "values": values, "mean": mean, "std": std, "n": len(values), "missing": [s for s in seeds if s not in records],
            "metric": res.get("metric"), "pool": res.get("pool"), "zero_shot": res.get("zero_shot_value"),
            "trainable": trainable, "total": total,
            "pct": 100.0 * trainable / total if isinstance(trainable, (int, float)) and total else None,
            "step_s": med("step_seconds_median"), "best_step": med("best_step"),
            "wall_s": statistics.median([r["wall_seconds"] for r in records.values()]) if records else None,
            "other_load": max((r.get("other_load") or 0 for r in records.values()), default=None),
            "dp_epsilon": med("dp_epsilon"), "dp_noise": med("dp_noise_multiplier"), "valid": med("valid_value")}


def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    return _fmt(s["mean"]) + (f" ± {_fmt(s['std'])}" if s["std"] is not None else "")


def _lr_cell(s: dict, groups: dict) -> str:
    g = s["group"]
    if s["lr"] is None:
        return f"waits for {groups[g.lr_from].name}'s grid on {groups[g.lr_from].setting}" if g.lr_from else "grid not done"
    if g.lr_from:
        return f"{s['lr']:.3g} (= {groups[g.lr_from].name} on {groups[g.lr_from].setting})"
    return f"{s['lr']:.3g}" + (" (grid)" if s["tuned"] else " (fixed)")


def results_table(stats: list[dict], groups: dict, extra_cols=()) -> str:
    """Markdown table, one row per group."""
    head = ["setting", "method", "seeds", "test (mean ± std)", "per seed", "zero-shot", "trainable", "% of model",
            "lr (chosen on valid)", *[c[0] for c in extra_cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        metric = s["metric"] or ""
        cells = [s["setting"].name, s["group"].name, f"{s['n']}/{s['n'] + len(s['missing'])}",
                 f"{metric} {_pm(s)}".strip(), ", ".join(_fmt(v) for v in s["values"]) or "–", _fmt(s["zero_shot"]),
                 _count(s["trainable"]), _pct(s["pct"]), _lr_cell(s, groups), *[c[1](s) for c in extra_cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(stats: list[dict]) -> str:
    rows = [s for s in stats if s["tuned"] and s["grid"]]
    if not rows:
        return ""
    lines = ["| setting | method | " + " | ".join(f"lr x {f:.3g}" for f in GRID) + " | chosen |", "|---|---|" + "---|" * (len(GRID) + 1)]
    for s in rows:
        cells = [f"{r['lr']:.3g}: " + (_fmt(r["valid"]) if r["done"] else "not run") for r in s["grid"]]
        edge = "" if s["lr"] is None or len(s["grid"]) < 2 or s["lr"] not in (s["grid"][0]["lr"], s["grid"][-1]["lr"]) \
            else " (edge of the grid)"
        lines.append(f"| {s['setting'].name} | {s['group'].name} | " + " | ".join(cells) + f" | {s['lr']:.3g}{edge} |"
                     if s["lr"] is not None else f"| {s['setting'].name} | {s['group'].name} | " + " | ".join(cells) + " | – |")
    return ("Learning-rate grids (seed 0, validation score at the end of the run; the best is chosen, the test "
            "split is not looked at; a choice at the edge of the grid means a wider grid might find a better lr):\n\n"
            + "\n".join(lines))


def budget_table(settings: list) -> str:
    lines = ["| setting | model | task | steps x batch | max_len | training examples | valid/test examples (pool) |",
             "|---|---|---|---|---|---|---|"]
    for st in settings:
        train = f"{st.max_train} (subset)" if st.max_train else "whole split (steps x batch drawn)"
        evals = f"{st.max_eval} each (retrieval pool {st.max_eval})" if st.max_eval and st.task == "code-search" else (
            f"{st.max_eval} each" if st.max_eval else "whole splits")
        batch = f"{st.batch}" if st.grad_accum == 1 else f"{st.per_step} ({st.batch} x {st.grad_accum} accumulated)"
        lines.append(f"| {st.name} | {st.model} | {st.task} | {st.steps} x {batch} | {st.max_len} | {train} | {evals} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_params(stats: list[dict], path: Path, title: str) -> Path | None:
    done = [s for s in stats if s["mean"] is not None and s["pct"]]
    if not done:
        return None
    plt = _plt()
    settings = sorted({s["setting"].name for s in done})
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 3.8), squeeze=False)
    for ax, name in zip(axes[0], settings):
        for s in [s for s in done if s["setting"].name == name]:
            ax.errorbar(s["pct"], s["mean"], yerr=s["std"] or 0, fmt="o", capsize=3)
            ax.annotate(s["group"].name, (s["pct"], s["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (% of model, log)")
        ax.set_ylabel(f"test {done[0]['metric'] if len({s['metric'] for s in done}) == 1 else 'metric'} (mean ± std)")
        ax.set_title(f"{title}: {name}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_telly(stats: list[dict], path: Path) -> Path | None:
    done = [s for s in stats if s["mean"] is not None]
    if not done:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ks = [s["group"].options and dict(s["group"].options).get("k") for s in done]
    a.errorbar(ks, [s["mean"] for s in done], yerr=[s["std"] or 0 for s in done], fmt="o-", capsize=3)
    a.set_xlabel("K (frozen bottom layers)")
    a.set_ylabel(f"test {done[0]['metric']} (mean ± std)")
    a.grid(alpha=0.3)
    b.plot(ks, [s["step_s"] for s in done], "o-")
    b.set_xlabel("K (frozen bottom layers)")
    b.set_ylabel("s / step (median; shared machine)")
    b.grid(alpha=0.3)
    fig.suptitle(f"Telly-K on {done[0]['setting'].model} / {done[0]['setting'].task}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _per_layer_plot(series: dict, ylabel: str, title: str, path: Path) -> Path | None:
    """One line per name over the hidden states (0 = embeddings)."""
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in series.items():
        ax.plot(range(len(values)), values, "o-", label=name, ms=3)
    ax.set_xlabel("hidden state (0 = embeddings)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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


def _scaled(scores: list) -> list:
    lo, hi = min(scores, default=0), max(scores, default=1)
    return [(x - lo) / (hi - lo) if hi > lo else 0 for x in scores]


def plot_probing(analysis: dict, path: Path) -> Path | None:
    series = {name: _scaled(p.get("score") or []) for name, p in (analysis.get("probing") or {}).items()}
    return _per_layer_plot(series, "probe score, min-max scaled per property",
                           f"{analysis.get('model')}: where each property peaks", path)


def plot_rsa(analysis: dict, path: Path) -> Path | None:
    models = (analysis.get("similarity") or {}).get("models") or {}
    series = {name: c["rsa_spearman"] for name, c in models.items()}
    series.update({f"{name}, standardised": c["rsa_spearman_std"] for name, c in models.items() if "rsa_spearman_std" in c})
    return _per_layer_plot(series, "RSA (Spearman), pretrained vs fine-tuned",
                           f"{analysis.get('model')}: which layers a fine-tune changes", path)


# ----------------------------------------------------------------------------- verdicts

def _diff_text(a: dict, b: dict) -> str:
    """'a 0.7500 ± 0.0100 vs b 0.7400 ± 0.0200 (-0.0100)'."""
    return (f"{a['group'].name} {_pm(a)} vs {b['group'].name} {_pm(b)} "
            f"({b['mean'] - a['mean']:+.4f})")


def _within(a: dict, b: dict, points: float) -> bool:
    """|a - b| within ``points`` points of the metric, or within the two groups' seed std combined."""
    tol = max(points * _point(a["metric"]), (a["std"] or 0) + (b["std"] or 0))
    return abs(a["mean"] - b["mean"]) <= tol


def _complete(*stats) -> bool:
    return all(s is not None and s["mean"] is not None for s in stats)


def _unlearned(*stats) -> str:
    """A warning when no group beats the untrained model (its zero-shot score) by a point: at this
    budget the task was not learned, and a comparison of the groups says little."""
    zero = [s["zero_shot"] for s in stats if s.get("zero_shot") is not None]
    if not zero or any(s["mean"] > max(zero) + _point(s["metric"]) for s in stats):
        return ""
    return (f" (but none beats the untrained model's {max(zero):.4f} by a point: at this budget the task is "
            "not learned, so this comparison says little)")


def verdict_1(st: dict) -> str:
    parts, holds = [], []
    for setting in ("cs", "bd", "dm"):
        full = st.get(f"{setting}:full")
        peft = [st[k] for k in (f"{setting}:lora", f"{setting}:houlsby") if k in st and st[k]["mean"] is not None]
        if not _complete(full) or not peft:
            parts.append(f"{setting}: not enough runs yet")
            continue
        best = max(peft, key=lambda s: s["mean"])
        close = best["mean"] >= full["mean"] or full["mean"] - best["mean"] <= _point(full["metric"])
        undecided = not close and _within(full, best, 1)  # more than a point behind, but inside the seeds' spread
        unlearned = _unlearned(full, *peft)
        if not unlearned and not undecided:  # a task no group learned, or seeds too spread to tell, count neither way
            holds.append(close)
        verdict = ("matches full fine-tuning" if close else
                   "more than a point behind, but within the seeds' spread: undecided at this number of seeds"
                   if undecided else "falls behind full fine-tuning")
        st_ = full["setting"]
        parts.append(f"{st_.task} ({st_.steps} steps x {st_.per_step}), full vs the better PEFT method: "
                     f"{_diff_text(full, best)}: {verdict}"
                     + unlearned)
    full, lora = st.get("sum:full"), st.get("sum:lora")
    if _complete(full, lora):
        behind = full["mean"] - lora["mean"] > max(_point(full["metric"]), (full["std"] or 0) + (lora["std"] or 0))
        holds.append(behind)
        parts.append(f"code-summarization (SmolLM2, tiny budget): {_diff_text(full, lora)}: "
                     + ("LoRA falls behind full fine-tuning" if behind else "LoRA does not fall behind full fine-tuning"))
    else:
        parts.append("code-summarization (SmolLM2): not run yet")
    return _verdict(holds, parts, "matches = the better of LoRA/Houlsby within 1 point (0.01) of full fine-tuning, "
                    "or above it; falls behind = more than a point below and more than the two seed stds combined; "
                    "between the two (more than a point below, within the stds): undecided, counted neither way")


def verdict_3(st: dict) -> str:
    parts, holds = [], []
    for setting in ("dm", "dm500", "bd", "bd500"):
        full, dps = st.get(f"{setting}:full"), st.get(f"{setting}:dps")
        if not _complete(full, dps) or full["std"] is None or dps["std"] is None:
            parts.append(f"{setting}: not enough runs yet")
            continue
        stable = dps["std"] < full["std"]
        unlearned = _unlearned(full, dps)
        if not unlearned:  # a task no group learned at this budget counts neither way
            holds.append(stable)
        what = f"{full['setting'].task}, {full['setting'].max_train or 'all'} training examples"
        parts.append(f"{what}: std over {dps['n']} seeds DPS {dps['std']:.4f} vs full {full['std']:.4f} "
                     f"({'lower' if stable else 'not lower'}); mean {_diff_text(full, dps)}{unlearned}")
        if setting.endswith("500"):
            better = dps["mean"] > full["mean"]
            if not unlearned:
                holds.append(better)
            parts.append(f"500 examples: DPS is {'better' if better else 'not better'} than full fine-tuning on the mean")
    return _verdict(holds, parts, "stable = lower sample std over the seeds; better = higher mean test accuracy")


def verdict_4(st: dict) -> str:
    pool = [s for k, s in st.items() if k.startswith("cs:") and s["mean"] is not None and s["pct"] is not None
            and s["pct"] < 0.1]
    ln = st.get("cs:ln")
    if not _complete(ln) or len(pool) < 2:
        return "**Verdict: not enough runs yet.**"
    ranked = sorted(pool, key=lambda s: -s["mean"])
    order = "; ".join(f"{s['group'].name} {_pm(s)} ({_pct(s['pct'])})" for s in ranked)
    best_other = max((s for s in pool if s is not ln), key=lambda s: s["mean"])
    holds = ranked[0] is ln
    tie = not holds and _within(ln, best_other, 0)
    extra = " (LN-tuning is below the best, but within the seeds' std of it)" if tie else ""
    return _verdict([holds], [f"methods under 0.1% on code-search, best first: {order}{extra}"],
                    "holds = LN-tuning has the highest mean test MRR of the methods measured under 0.1% "
                    "of MiniLM's parameters (the % measured by count_parameters)")


def verdict_5(st: dict) -> str:
    c, full = st.get("cs:compacter++"), st.get("cs:full")
    if not _complete(c, full):
        return "**Verdict: not enough runs yet.**"
    under = c["pct"] is not None and c["pct"] < 0.1
    near = c["mean"] >= full["mean"] or _within(full, c, 2)
    return _verdict([under, near], [f"code-search: {_diff_text(full, c)}; compacter++ trains {_pct(c['pct'])}"],
                    "near = within 2 points (0.02 MRR) of full fine-tuning or within the seeds' std combined, "
                    "with under 0.1% of the parameters")


def verdict_7(st: dict) -> str:
    """At each private budget measured: private LoRA against LoRA at the same budget. A budget where neither
    learns the task counts neither way."""
    parts, holds = [], []
    for setting in ("dm", "dm-dp"):
        lora = st.get(f"{setting}:lora")
        dp = next((s for k, s in st.items() if k.startswith(f"{setting}:lora:dp_epsilon")), None)
        if lora is None or dp is None:
            continue
        budget = f"{lora['setting'].steps} steps x {lora['setting'].per_step}"
        if not _complete(lora, dp):
            parts.append(f"docstring-match at {budget}: not enough runs yet")
            continue
        gap = lora["mean"] - dp["mean"]
        eps = f"; epsilon spent {dp['dp_epsilon']:.2f}" if dp["dp_epsilon"] is not None else ""
        noise = f", noise multiplier {dp['dp_noise']:.3f}" if dp.get("dp_noise") is not None else ""
        unlearned = _unlearned(lora, dp)
        if not unlearned:
            holds.append(gap <= 0.03)
        parts.append(f"docstring-match at {budget}: {_diff_text(lora, dp)}{eps}{noise}{unlearned}")
    if not parts:
        return "**Verdict: not enough runs yet.**"
    return _verdict(holds, parts, "within a few points = at most 3 accuracy points (0.03) below non-private LoRA "
                    "at the same budget")


def verdict_6(st: dict) -> str:
    parts, holds = [], []
    for k in (3, 4):
        plain = st.get(f"cs-telly:telly:k={k}")
        rec = st.get(f"cs-telly:telly:k={k}:recycle=True")
        if not _complete(plain, rec) or not plain["step_s"] or not rec["step_s"]:
            parts.append(f"K={k}: not enough runs yet")
            continue
        speed = plain["step_s"] / rec["step_s"]
        wall = plain["wall_s"] / rec["wall_s"] if rec["wall_s"] else None
        holds.append(speed >= 1.8 and _within(plain, rec, 1))
        parts.append(f"telly K={k}: {speed:.2f}x faster steps (median s/step {plain['step_s']:.3f} -> {rec['step_s']:.3f}), "
                     f"whole run (cache build, evaluations, loading included) {wall:.2f}x; test {_diff_text(plain, rec)}")
    plain, half = st.get("cs-telly:telly:k=3"), st.get("cs-telly:telly:k=3:recycle=True:recycle_dtype=float16")
    if _complete(plain, half):
        parts.append(f"an fp16 cache (half the disk) for telly K=3: test {_diff_text(plain, half)} "
                     f"({'within' if _within(plain, half, 1) else 'not within'} 1 point of the uncached run)")
    return _verdict(holds, parts, "holds = at least 1.8x faster training steps and test MRR within 1 point; "
                    "timings on a shared machine: see the load column")


def _verdict(holds: list[bool], parts: list[str], rule: str) -> str:
    if not holds and any("not learned" in p for p in parts):
        head = "**Verdict: no evidence either way at this budget: the task was not learned.**"
    elif not holds:
        head = "**Verdict: not measured yet.**"
    elif all(holds):
        head = "**Verdict: holds on our tasks.**"
    elif not any(holds):
        head = "**Verdict: does not hold on our tasks.**"
    else:
        head = "**Verdict: holds only in part on our tasks.**"
    return head + "\n\n" + "\n".join(f"- {p}" for p in parts) + f"\n\nCriterion: {rule}."


VERDICTS = {"1": verdict_1, "3": verdict_3, "4": verdict_4, "5": verdict_5, "6": verdict_6, "7": verdict_7}


# ----------------------------------------------------------------------------- claim 2

def _analysis_section(store: Store, claim) -> list[str]:
    out = []
    for extra in claim.extra_runs:
        from . import SCHEMA

        config = {"schema": SCHEMA, **extra}
        record = store.get(config)
        if record is None:
            out.append(f"- {'Probing' if extra.get('probing', True) else 'RSA after fine-tuning'} of {extra['model']} "
                       f"({extra['task']}): not run yet.")
            continue
        a = record["result"]
        what = "probing" if extra.get("probing", True) else "representational similarity"
        adapters = ", ".join(f"{u['group']} (seed 0, lr {u['lr']:.3g}" + ("; trained again for its adapter" if u.get("retrained")
                                                                       else "") + ")" for u in record.get("adapters", []))
        lines = [f"**{a['model']}, {what}** ({a.get('blocks')} blocks; hidden state 0 = embeddings), "
                 f"{record['wall_seconds'] / 60:.1f} min" + (f"; fine-tuned adapters compared: {adapters}" if adapters else "")
                 + (f"; probes on {a['settings']['n_train']}/{a['settings']['n_valid']}/{a['settings']['n_test']} "
                    "standard-library functions (train/valid/test, split by module), semantic probe over "
                    f"{a['settings']['search_samples']} code-search test pairs" if a.get("probing") else "") + "."]
        probing = a.get("probing") or {}
        if probing:
            lines.append("\n| property | metric | peak layer | peak score | score at 0 / middle / top | baseline |")
            lines.append("|---|---|---|---|---|---|")
            for name, p in probing.items():
                sc = p["score"]
                mid = len(sc) // 2
                lines.append(f"| {name} | {p.get('metric')} | {p.get('peak_layer', int(max(range(len(sc)), key=sc.__getitem__)))} "
                             f"of {len(sc) - 1} | {_fmt(max(sc))} | {_fmt(sc[0])} / {_fmt(sc[mid])} / {_fmt(sc[-1])} "
                             f"| {_fmt(p.get('baseline'))} |")
        sim = (a.get("similarity") or {}).get("models") or {}
        if sim:
            lines.append(f"\nRSA (Spearman) per hidden state, pretrained vs fine-tuned, on {a['similarity']['samples']} "
                         f"{a['similarity']['split']} texts:\n")
            n = max(len(c["rsa_spearman"]) for c in sim.values())
            lines.append("| model | " + " | ".join(str(i) for i in range(n)) + " |")
            lines.append("|---|" + "---|" * n)
            for name, c in sim.items():
                lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in c["rsa_spearman"]) + " |")
            for name, c in sim.items():
                if "rsa_spearman_std" in c:
                    lines.append(f"| {name}, standardised | " + " | ".join(f"{x:.3f}" for x in c["rsa_spearman_std"]) + " |")
            share = a["similarity"].get("pretrained_top_dimension_share")
            if share:
                lines.append("| pretrained: top-dimension share | " + " | ".join(f"{x:.2f}" for x in share) + " |")
            lowest = {name: _lowest_two(c["rsa_spearman"]) for name, c in sim.items()}
            lines.append("\nLeast similar hidden states (the two lowest RSA): "
                         + "; ".join(f"{name}: {v}" for name, v in lowest.items()) + f" (top = {n - 1}).")
            lowest_std = {name: _lowest_two(c["rsa_spearman_std"]) for name, c in sim.items() if "rsa_spearman_std" in c}
            if lowest_std:
                lines.append("On standardised representations (every dimension z-scored over the texts first, against "
                             "rogue dimensions; Timkey & van Schijndel 2021): "
                             + "; ".join(f"{name}: {v}" for name, v in lowest_std.items()) + ".")
            if share and max(share) > 0.5:
                rogue = [i for i, x in enumerate(share) if x > 0.5]
                lines.append(f"\nCaveat: in hidden states {_ranges(rogue)} of the pretrained {a['model']}, one dimension "
                             f"holds over half of a mean-pooled vector's squared norm (up to {max(share):.0%}): cosine "
                             "similarities, and so the plain RSA (and CKA), there mostly follow that one dimension; the "
                             "standardised rows do not.")
        if a.get("freeze"):
            lines.append(f"\nRecommended freeze depth: K = {a['freeze']['k']} ({a['freeze']['rule']}).")
        kind = "probing" if extra.get("probing", True) else "rsa"
        png = (plot_probing if kind == "probing" else plot_rsa)(a, store.out / f"{kind}-{a['model']}.png")
        if png:
            lines.append(f"\n![{kind} {a['model']}]({_rel(png)})")
        out.append("\n".join(lines))
    return ["\n\n".join(out)] if out else []


_PROPERTY_ORDER = ["lexical", "syntactic", "syntactic-depth", "structural", "semantic"]


def _probe_verdict(store: Store, claim) -> list[str]:
    from . import SCHEMA

    parts, holds = [], []
    for extra in claim.extra_runs:
        record = store.get({"schema": SCHEMA, **extra})
        if record is None:
            continue
        a = record["result"]
        probing = a.get("probing") or {}
        top = (a.get("blocks") or 0)
        rel = {k: p["peak_layer"] / top for k, p in probing.items() if top and "peak_layer" in p}
        if {"lexical", "syntactic", "structural"} <= set(rel):
            order_ok = rel["lexical"] <= rel["syntactic"] <= rel["structural"]
            holds.append(order_ok)
            named = sorted(rel, key=lambda k: (_PROPERTY_ORDER.index(k) if k in _PROPERTY_ORDER else 9, k))
            parts.append(f"{a['model']} probing peaks (layer/{top}): " + ", ".join(f"{k} {probing[k]['peak_layer']}"
                                                                                  for k in named) +
                         (": lexical <= syntactic <= structural, as the paper found" if order_ok else
                          ": not the paper's lexical < syntactic < structural order"))
        sim = (a.get("similarity") or {}).get("models") or {}
        for name, c in sim.items():
            r = c["rsa_spearman"]
            low2 = _lowest_two(r)
            top2 = low2 == [len(r) - 2, len(r) - 1]
            holds.append(top2)
            parts.append(f"{a['model']} {name}: the two least similar hidden states are {low2} of 0..{len(r) - 1}"
                         + (" (the top two, as the paper found)" if top2 else " (not the top two)"))
            if "rsa_spearman_std" in c:  # reported beside the paper's measure, not counted in the verdict
                r = c["rsa_spearman_std"]
                low2 = _lowest_two(r)
                parts.append(f"{a['model']} {name}, standardised RSA (not counted): {low2}"
                             + (" (the top two)" if low2 == [len(r) - 2, len(r) - 1] else " (not the top two)"))
    return parts if not holds else [("all agree with the paper" if all(holds) else "some differ from the paper")] + parts


def _rule_check(store: Store, claim, stats: list[dict]) -> list[str]:
    """The freeze depth the RSA rule recommends against what Telly-K measured at (or nearest) that K."""
    from . import SCHEMA

    out = []
    for extra in claim.extra_runs:
        record = store.get({"schema": SCHEMA, **extra})
        k = ((record or {}).get("result") or {}).get("freeze", {}).get("k")
        if k is None:
            continue
        model = record["result"]["model"]
        measured = [s for s in stats if s["setting"].model == model and s["mean"] is not None]
        if not measured:
            continue
        near = min(measured, key=lambda s: abs(dict(s["group"].options).get("k", 0) - k))
        best = max(measured, key=lambda s: s["mean"])
        nk, bk = dict(near["group"].options).get("k"), dict(best["group"].options).get("k")
        zero = near.get("zero_shot")
        out.append(f"{model}: the RSA rule recommends K={k}; Telly-K measured at K={nk}: {_pm(near)}"
                   + (f" (the untrained model: {zero:.4f})" if zero is not None else "")
                   + (f", against the best measured K={bk}: {_pm(best)}" if best is not near else ", the best K measured")
                   + (": at these budgets the similarity after fine-tuning does not tell how deep freezing is cheap"
                      if best is not near and not _within(best, near, 1) else ""))
    return out


def _telly_text(stats: list[dict]) -> str:
    done = [s for s in stats if s["mean"] is not None]
    if not done:
        return ""
    base = next((s for s in done if dict(s["group"].options).get("k") == 0), None)
    rows = []
    for s in done:
        k = dict(s["group"].options).get("k")
        near = base is not None and (s["mean"] >= base["mean"] or _within(base, s, 1))
        rows.append(f"K={k}: {_pm(s)}" + ("" if base is None or s is base else (" (within 1 point of K=0)" if near else " (below K=0 by more than 1 point)")))
    last = max(dict(s["group"].options).get("k", 0) for s in done)
    zero = next((s["zero_shot"] for s in done if s.get("zero_shot") is not None), None)
    if zero is not None and F.SETTINGS[done[0]["group"].setting].task == "code-search":
        rows.append(f"K={last + 1} (every block frozen: a bi-encoder has nothing left to train) = the pretrained "
                    f"model, {zero:.4f}")
    return "Telly-K against K=0: " + "; ".join(rows) + "."


# ----------------------------------------------------------------------------- the page

def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path("docs").resolve()))
    except ValueError:
        return str(path)


def _machines(store: Store) -> tuple[str, list[float]]:
    import json

    cpus, loads, dates = {}, [], []
    for path in sorted(store.runs.glob("*.json")) if store.runs.is_dir() else ():
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        m = r.get("machine") or {}
        key = f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM"
        cpus[key] = cpus.get(key, 0) + 1
        if isinstance(r.get("other_load"), (int, float)):
            loads.append(r["other_load"])
        if r.get("finished"):
            dates.append(r["finished"])
    text = "; ".join(f"{k} ({n} runs)" for k, n in cpus.items()) or "no runs yet"
    if dates:
        text += f"; runs finished between {min(dates)} and {max(dates)}"
    return text, loads


def render(claims=None, seeds=(0, 1, 2), out="docs/findings", page="docs/findings.md", command="") -> str:
    from . import all_groups

    claims = [str(c) for c in (claims or F.ORDER)]
    claims = sorted(set(claims) | set(F.ORDER), key=lambda c: F.ORDER.index(c) if c in F.ORDER else 99)  # the page covers all
    store = Store(out)
    store.out.mkdir(parents=True, exist_ok=True)
    groups = all_groups(claims)
    stats = {gid: group_stats(store, g, groups, seeds) for gid, g in groups.items()}
    runs = planned_runs(store, claims, seeds)
    done = sum(r["done"] for r in runs)
    machine, loads = _machines(store)
    used = sorted({g.setting for g in groups.values()}, key=list(SETTINGS).index)
    seeds_text = ",".join(map(str, seeds))
    md = ["# Findings: the seed papers' claims, measured on our tasks", "",
          "<!-- generated by `deltatune findings`; edit deltatune/findings/, not this page -->", "",
          f"Generated by `deltatune findings --claims {','.join(F.ORDER)} --seeds {seeds_text}` from the run files in "
          f"[`findings/runs/`](findings/runs/) (one JSON per finished run: its whole configuration, test and validation "
          f"scores, trainable parameters, times, machine). {done} of {len(runs)} planned runs have finished"
          + ("." if done == len(runs) else "; the missing ones are listed under each claim, and the same command "
             "completes them (finished runs are skipped)."), "",
          f"**Machine:** {machine}. "
          + (f"Other processes took a median {100 * statistics.median(loads):.0f}% (max {100 * max(loads):.0f}%) of the "
             "CPU while a run ran (from /proc/stat): the machine was at times shared by 8 engineers, so times and speed-ups "
             "read with the load column; the scores do not depend on the load." if loads else ""), "",
          "**Protocol.** Each method's learning rate is tuned on the **validation split only**: seed "
          f"{GRID_SEED}, the method's default lr times {', '.join(f'{f:.3g}' for f in GRID)}, each at the claim's full "
          "budget; the lr with the best validation score (at the end of the run) is chosen, and every seed then trains "
          "with it (the seed-0 run at the chosen lr is that grid run). Telly-K and recycling runs take the lr chosen for "
          "full fine-tuning at the same budget; DPS takes full fine-tuning's (it is a regulariser of it). The reported "
          f"numbers are on the **test split**, mean ± sample std over seeds {seeds_text}. The training and evaluation "
          "subsets are the same for every seed (data seed 0): seeds change initialisation, dropout and data order. "
          "Each run's test score is that of its best validation checkpoint. MRR ranks each query's code among the "
          "candidate pool named in the budget table. Budgets are small (a shared 2-core CPU): these are findings at "
          "these budgets, not the papers' settings. Code-search runs finished after 2026-11-30 06:00 UTC train on "
          "length-sorted groups of 16 rows (the engine's default since then: the same loss to float rounding, the "
          "dropout masks drawn per group); the earlier ones on the padded batch.", "",
          "Budgets:", "", budget_table([SETTINGS[s] for s in used]), "", "SUMMARY", ""]
    summary = ["| claim | verdict | runs done |", "|---|---|---|"]

    for cid in claims:
        claim = F.CLAIMS[cid]
        start = len(md)
        gs = [g for g in claim.groups]
        cstats = [stats[g.id] for g in gs]
        md += [f"## Claim {cid}: {claim.title}", "", f"> {claim.paper}", "", f"Source: {SOURCES.get(cid, '')}.", ""]
        missing = [r for r in runs if not r["done"] and (
            (r["group"] is not None and r["group"].id in {g.id for g in gs})
            or (r["group"] is None and any(r["config"].get("model") == e["model"] and r["config"].get("kind") == e["kind"]
                                           for e in claim.extra_runs)))]
        if claim.note:
            md += [claim.note, ""]
        if cid in VERDICTS:
            md += [_provisional(VERDICTS[cid]({g.id: stats[g.id] for g in gs}), missing, cstats), ""]
        if cid == "2":
            verdicts = _probe_verdict(store, claim)
            telly = _telly_text([s for s in cstats if s["setting"].name == "cs-telly"])
            head = ("**Verdict: " + verdicts[0] + ".**") if verdicts else "**Verdict: layer analysis not run yet.**"
            head = _provisional(head, missing, cstats)
            md += ([head, ""] + [f"- {p}" for p in verdicts[1:]] + ([f"- {telly}"] if telly else [])
                   + [f"- {p}" for p in _rule_check(store, claim, cstats)] + [""])
            md += _analysis_section(store, claim) + [""]
            telly_cols = [("s/step (median)", lambda s: _fmt(s["step_s"], 3)),
                          ("time/epoch (s)", lambda s: _fmt(s["step_s"] * math.ceil(_n_train(s) / s["setting"].batch), 0)
                           if s["step_s"] and _n_train(s) else "–"),
                          ("steps to best valid", lambda s: _fmt(s["best_step"], 0)),
                          ("time to best valid (s)", lambda s: _fmt(s["best_step"] * s["step_s"], 0)
                           if s["best_step"] and s["step_s"] else "–")]
            md += [results_table(cstats, groups, telly_cols), ""]
            for name in ("cs-telly", "sum-telly"):
                png = plot_telly([s for s in cstats if s["setting"].name == name], store.out / f"telly-{name}.png")
                if png:
                    md += [f"![telly {name}]({_rel(png)})", ""]
            md += ["Time per epoch = median s/step x steps in one pass over the whole training split; time to best "
                   "validation = steps to the best validation score (validated every "
                   f"{SETTINGS['cs-telly'].eval_every} steps) x median s/step.", ""]
        elif cid == "6":
            cols = [("s/step (median)", lambda s: _fmt(s["step_s"], 3)), ("run wall s (median)", lambda s: _fmt(s["wall_s"], 0)),
                    ("max other load", lambda s: f"{100 * s['other_load']:.0f}%" if s["other_load"] is not None else "–")]
            md += [results_table(cstats, groups, cols), ""]
        else:
            extra = [("epsilon spent", lambda s: _fmt(s["dp_epsilon"], 2))] if cid == "7" else []
            md += [results_table(cstats, groups, extra), ""]
            if cid in ("1", "4", "5"):
                png = plot_metric_vs_params(cstats, store.out / f"claim-{cid}.png", f"claim {cid}")
                if png:
                    md += [f"![claim {cid}]({_rel(png)})", ""]
        grids = grid_table(cstats)
        if grids:
            md += [grids, ""]
        if missing:
            md += [f"Missing runs ({len(missing)}): " + "; ".join(_describe(r) for r in missing[:40])
                   + (" ..." if len(missing) > 40 else "") + f". Complete them with `deltatune findings --claims {cid}` "
                   "(resumable).", ""]
        md += [f"Command: `deltatune findings --claims {cid} --seeds {seeds_text}`", ""]
        heads = [item.split("\n", 1)[0] for item in md[start:] if item.startswith("**") and "erdict" in item.split("\n", 1)[0]]
        head = heads[0].replace("**", "") if heads else "–"
        mine = [r for r in runs if (r["group"] is not None and r["group"].id in {g.id for g in gs})
                or (r["group"] is None and any(r["config"] == {"schema": r["config"].get("schema"), **e} for e in claim.extra_runs))]
        summary.append(f"| [{cid}](#claim-{cid}-{_anchor(claim.title)}) {claim.title} | {head} | "
                       f"{sum(r['done'] for r in mine)}/{len(mine)} |")
    todo = [r for r in runs if not r["done"]]
    if todo:
        from . import estimate_seconds

        hours = sum(estimate_seconds(store, r) for r in todo) / 3600
        summary.append(f"\nThe {len(todo)} missing runs need about {hours:.1f} h more on this machine at the load "
                       "measured (estimated from the finished runs of each budget): "
                       f"`deltatune findings --claims {','.join(F.ORDER)}` resumes where it stopped, and "
                       "`--part I/N` splits them across machines (copy the run files into one docs/findings/runs/).")
    at = md.index("SUMMARY")
    md[at:at + 1] = summary
    page = Path(page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(md).rstrip() + "\n")
    return str(page)


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading's text (after 'Claim N: ')."""
    import re

    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _provisional(text: str, missing: list, cstats: list) -> str:
    """A verdict drawn while runs are missing says so, with how many seeds each number rests on."""
    head = text.split("\n", 1)[0]  # the verdict line (a part may say "not run yet" of itself alone)
    if not missing or "not enough runs" in head or "not measured" in head or "not run yet" in head:
        return text
    return text.replace("**Verdict:", f"**Provisional verdict ({len(missing)} of this claim's runs missing; see "
                        "the seeds column for what each number rests on):", 1)


_N_TRAIN: dict = {}


def _n_train(s: dict) -> int | None:
    """Training examples of the setting (recorded by the run, else counted from the task)."""
    for r in s["records"].values():
        if isinstance(r.get("n_train"), int):
            return r["n_train"]
    st = s["setting"]
    key = (st.task, st.max_train)
    if key not in _N_TRAIN:
        from ..tasks import load_task

        _N_TRAIN[key] = len(load_task(st.task, seed=0, max_train=st.max_train, max_eval=1).train)
    return _N_TRAIN[key]


def _describe(r: dict) -> str:
    c = r["config"]
    if r["group"] is None:
        return f"{'probing' if c.get('probing', True) else 'RSA'} of {c['model']}"
    if c is None:
        return f"{r['group'].name} [{r['group'].setting}] seed {r['seed']} (after its lr grid)"
    return f"{r['group'].name} [{r['group'].setting}] lr {c['lr']:.3g} seed {c['seed']}"
