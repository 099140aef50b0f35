"""docs/findings.md from the run files of the findings suite (see :mod:`findings.suite`).

Everything on the page is computed here from ``<out>/runs/*.json``: means and sample standard
deviations over the seeds that finished, the learning-rate grids (validation scores) and the
verdicts, whose criteria are written next to them. Missing runs are listed with the command that
completes them. Plots go to ``<out>/*.png``.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from . import intervals as I
from . import suite as F
from .stats import RULES_DATE, _count, _fmt, _lowest_two, _n_test, _pct, _pm, _ranges, group_stats
from .suite import GRID, GRID_SEED, SETTINGS, Store, estimate_seconds, planned_runs
from .verdicts import VERDICTS, _CACHE, _eps, _probe_verdict, _rule_check, _seed0, _telly_parts, _verdict, learned


# Where each claim comes from (METHODS.md section), shown under its title.
SOURCES = {
    "1": "Ayupov & Chirkova 2022 and He et al. 2022 (PEFT for code); the seeds' framing in issue 12",
    "2": "Shi et al., ISSTA 2023, Towards Efficient Fine-tuning of Pre-trained Code Models (Telly); METHODS.md section 2",
    "3": "Zhang et al., NeurIPS 2022, Dynamic Parameter Selection; METHODS.md section 1",
    "4": "Qi et al. 2022, LN-tuning (arXiv 2211.08682); METHODS.md section 10",
    "5": "Karimi Mahabadi et al., NeurIPS 2021, Compacter; METHODS.md section 6",
    "6": "Saad-Falcon et al., Findings of EACL 2023, Embedding Recycling; METHODS.md section 11",
    "7": "Yu et al., ICLR 2022, Differentially Private Fine-tuning of Language Models; METHODS.md section 13",
    "8": "Liu et al. 2024 (DoRA), Kopiczko et al., ICLR 2024 (VeRA), Hyeon-Woo et al., ICLR 2022 (FedPara: LoHa), "
         "Wu et al. 2024 (ReFT: LoReFT); issue 23",
    "9": "Dettmers et al., NeurIPS 2023, QLoRA: Efficient Finetuning of Quantized LLMs; issue 24",
}


def _lr_cell(s: dict, groups: dict) -> str:
    g = s["group"]
    if s["lr"] is None:
        return f"waits for {groups[g.lr_from].name}'s grid on {groups[g.lr_from].setting}" if g.lr_from else "grid not done"
    wait = " (so far: the grid waits for its extension)" if s["pending"] else ""
    if g.lr_from:
        return f"{s['lr']:.3g} (= {groups[g.lr_from].name} on {groups[g.lr_from].setting}){wait}"
    return f"{s['lr']:.3g}" + (" (grid)" if s["tuned"] else " (fixed)") + wait


def _vs_untrained_cell(s: dict) -> str:
    iv = learned(s)[1]
    return "–" if iv is None else f"{iv.diff:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]"


def results_table(stats: list[dict], groups: dict, extra_cols=()) -> str:
    """Markdown table, one row per group."""
    head = ["setting", "method", "seeds", "test (mean ± std)", "per seed", "zero-shot", "vs zero-shot (95% CI)",
            "trainable", "% of model", "lr (chosen on valid)", *[c[0] for c in extra_cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        metric = s["metric"] or ""
        cells = [s["setting"].name, s["group"].name, f"{s['n']}/{s['n'] + len(s['missing'])}",
                 f"{metric} {_pm(s)}".strip(), ", ".join(_fmt(v) for v in s["values"]) or "–", _fmt(s["zero_shot"]),
                 _vs_untrained_cell(s), _count(s["trainable"]), _pct(s["pct"]), _lr_cell(s, groups),
                 *[c[1](s) for c in extra_cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(stats: list[dict]) -> str:
    rows = [s for s in stats if s["tuned"] and s["grid"]]
    if not rows:
        return ""
    factors = sorted({r["factor"] for s in rows for r in s["grid"]})
    lines = ["| setting | method | " + " | ".join(f"lr x {f:.3g}" for f in factors) + " | chosen |",
             "|---|---|" + "---|" * (len(factors) + 1)]
    for s in rows:
        by = {r["factor"]: r for r in s["grid"]}
        cells = [("–" if f not in by else f"{by[f]['lr']:.3g}: " + (_fmt(by[f]["valid"]) if by[f]["done"] else
                                                                   "to run (extension)" if by[f]["extension"] else "not run"))
                 for f in factors]
        if s["pending"]:
            chosen = f"{s['lr']:.3g} so far (edge of the grid: the extension runs first)"
        elif s["lr"] is None:
            chosen = "–"
        else:
            chosen = f"{s['lr']:.3g}" + (" (edge of the grid, extension limit reached)" if s["edge"] else "")
        lines.append(f"| {s['setting'].name} | {s['group'].name} | " + " | ".join(cells) + f" | {chosen} |")
    return ("Learning-rate grids (seed 0, validation score at the end of the run; the best is chosen, the test split is "
            f"not looked at). Since {RULES_DATE} a grid whose best sits at its edge gets the next lr beyond it "
            f"({F.GRID_STEP:g} times lower or higher, at most {F.MAX_EXTEND} times each way) before any seed runs; "
            "\"to run\" marks such a point not run yet, and until it has run the seeds shown are those of the best "
            "lr so far:\n\n" + "\n".join(lines))


def budget_table(settings: list) -> str:
    lines = ["| setting | model | task | steps x batch | max_len | training examples | valid/test examples (pool) |",
             "|---|---|---|---|---|---|---|"]
    for st in settings:
        train = f"{st.max_train} (subset)" if st.max_train else "whole split (steps x batch drawn)"
        n_test = _n_test(st, {})
        evals = f"{st.max_eval} each (retrieval pool {st.max_eval})" if st.max_eval and st.task == "code-search" else (
            f"{st.max_eval} each" if st.max_eval else f"whole splits (test: {n_test})")
        batch = f"{st.batch}" if st.grad_accum == 1 else f"{st.per_step} ({st.batch} x {st.grad_accum} accumulated)"
        lines.append(f"| {st.name} | {st.model} | {st.task} | {st.steps} x {batch} | {st.max_len} | {train} | {evals} |")
    return "\n".join(lines)


def _facts(cstats: list[dict], seeds) -> str:
    """A claim's budget, seeds, test size and interval, in one paragraph (every claim states them)."""
    settings, seen = [], set()
    for s in cstats:
        st = s["setting"]
        if st.name in seen:
            continue
        seen.add(st.name)
        settings.append(f"{st.name} = {st.model} on {st.task}, {st.steps} steps x {st.per_step}"
                        + (f", {st.max_train} training examples" if st.max_train else "")
                        + f", test {s['n_test']} examples" + (f" (pool {st.max_eval})" if st.task == "code-search" else ""))
    records = [r for s in cstats for r in s["records"].values()]
    have = sum(r.get("test_scores") is not None for r in records)
    how = ("a paired bootstrap over the test examples" if records and have == len(records) else
           "the test-sample bound (no per-example scores in these run files)" if not have else
           f"a paired bootstrap where both sides hold per-example scores ({have} of {len(records)} runs), else the bound")
    return (f"**Budget, seeds, test, interval.** {'; '.join(settings)}. Seeds {','.join(map(str, seeds))} per group "
            f"(lr grid on seed {GRID_SEED}, validation split). Intervals: 95% of each difference, the seeds' spread plus "
            f"the test sample's noise from {how} (rules of {RULES_DATE}, above).")


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



# ----------------------------------------------------------------------------- claim 2

def _analysis_section(store: Store, claim) -> list[str]:
    out = []
    for extra in claim.extra_runs:
        if not _seed0(extra):
            continue
        from .suite import SCHEMA

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



# ----------------------------------------------------------------------------- the page

_PAGE_DIR = [Path("docs")]  # the folder of the page being written: its links are relative to it


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(_PAGE_DIR[0].resolve()))
    except ValueError:
        return str(path)


def _machines(store: Store) -> tuple[str, list[float]]:
    cpus, loads, dates = {}, [], []
    for _, r in store.records():
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


def render(claims=None, seeds=(0, 1, 2), out="docs/findings", page="docs/findings.md") -> str:
    from .suite import all_groups

    _PAGE_DIR[0] = Path(page).parent
    _CACHE.clear()
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
    scored = [r for st in stats.values() for r in st["records"].values()]
    with_examples = sum(r.get("test_scores") is not None for r in scored)
    command = f"python experiments/findings/run.py --claims {','.join(F.ORDER)} --seeds {seeds_text}"
    md = ["# Findings: the seed papers' claims, measured on our tasks", "",
          "<!-- generated by experiments/findings/run.py; edit experiments/findings/, not this page -->", "",
          f"Generated by `{command}` from the run files in "
          f"[`findings/runs/`](findings/runs/) (one JSON per finished run: its whole configuration, test and validation "
          f"scores, trainable parameters, times, machine). {done} of {len(runs)} planned runs have finished"
          + ("." if done == len(runs) else "; the missing ones are listed under each claim, and the same command "
             "completes them (finished runs are skipped)."), "",
          "**Running it.** The harness is a script of the repository, beside `bench/`, not part of the installed "
          "package: from a checkout with `make setup` done, `python experiments/findings/run.py --claims 4,5 --plan` "
          "lists a claim's runs (done, to do) with an estimated time, the same without `--plan` runs what is missing "
          "(resumable: finished runs are skipped) and then writes this page, `--render-only` writes the page from the "
          "run files alone, `--ray auto|ADDRESS` runs the lr grids as sweeps on a Ray cluster (`deltatune sweep`'s "
          "machinery; the run files are written where the driver runs), and "
          "`--rescore` gives finished runs their per-example test scores where a re-run reproduces the recorded score "
          "exactly. It uses deltatune's public API only (`deltatune.training.train`, `deltatune.analysis.analyze`, "
          "`deltatune.tasks.load_task`).", "",
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
          f"**Rules changed on {RULES_DATE}** (issue 21: the verdicts before then compared means with fixed thresholds, "
          "inside the noise of 3 seeds and 40-650 test examples). (1) Every comparison carries a 95% confidence "
          "interval of the difference of the two means that holds both the spread over seeds (the sample variance of "
          "the per-seed scores over their number; paired by seed where the two groups share seeds, initialisation and "
          "data order) and the test sample's noise: a paired bootstrap over the test examples "
          f"({I.BOOTSTRAP} resamples, the same examples for both sides) where the run files hold each example's score, "
          "else an upper bound on one example's variance from the mean score (accuracy: p(1-p); MRR: r1 + (m - r1)/2 - "
          "m^2 with r1 the recall@1, since a reciprocal rank is 1 or at most 1/2; the untrained model's MRR and BLEU "
          "(x100, an average of per-example scores in [0, 100]): m(1-m) or m(100-m)), added for the two sides as if "
          "their errors were uncorrelated, which widens the interval where methods err on the same examples; the "
          "two variances add, Student's t at Welch-Satterthwaite degrees of freedom. "
          f"{with_examples} of the {len(scored)} runs shown hold per-example scores: the files written before "
          f"{RULES_DATE} hold none (no predictions files either: their scratch folders were deleted), so their "
          "intervals use the bound, and are wider than a paired bootstrap would give; `--rescore` adds the scores where "
          "a run reproduces. (2) A verdict reads the interval: a claim's threshold inside it is **undecided**; a "
          "comparison with a group that does not beat the untrained model (the interval of its score minus the "
          "zero-shot score reaches 0) is **not tested** at that budget and counts neither way. (3) A learning-rate "
          f"grid whose best point sits at its edge gets the next lr beyond it ({F.GRID_STEP:g}x, up to {F.MAX_EXTEND} "
          "times each way) before the seeds run; the runs this plans are listed as missing, and until they have run "
          "the page shows the best lr so far. (4) Claim 3 runs at a budget where DPS's stages are as long as the "
          "released code's (23-80 steps), with dropout as released (0 below 2,000 steps). (5) delta is printed beside every epsilon.", "",
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
        md += [_facts(cstats, seeds), ""]
        if cid in VERDICTS:
            md += [_provisional(VERDICTS[cid]({g.id: stats[g.id] for g in gs}), missing, cstats), ""]
        if cid == "2":
            parts = (_probe_verdict(store, claim) + _telly_parts([s for s in cstats if s["setting"].name == "cs-telly"])
                     + [(None, p) for p in _rule_check(store, claim, cstats)])
            md += [_provisional(_verdict(parts, "probing order = the layers each probe's peak cannot be told from "
                                         "(95%, test sample) allow only lexical <= syntactic <= structural (relative "
                                         "depth); RSA = the two top hidden states each below every other state, with an "
                                         "interval over text samples; Telly-K = the interval of K minus K=0 lies above -1 "
                                         "point"), missing, cstats), ""]
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
            extra = [("epsilon spent (delta)", lambda s: _eps(s).replace("epsilon spent ", "").replace(" at delta ", " (delta ")
                      + ")" if s["dp_epsilon"] is not None else "–")] if cid == "7" else []
            md += [results_table(cstats, groups, extra), ""]
            if cid in ("1", "4", "5", "8"):
                png = plot_metric_vs_params(cstats, store.out / f"claim-{cid}.png", f"claim {cid}")
                if png:
                    md += [f"![claim {cid}]({_rel(png)})", ""]
        grids = grid_table(cstats)
        if grids:
            md += [grids, ""]
        if missing:
            md += [f"Missing runs ({len(missing)}): " + "; ".join(_describe(r) for r in missing[:40])
                   + (" ..." if len(missing) > 40 else "") + ". Complete them with "
                   f"`python experiments/findings/run.py --claims {cid}` (resumable; about "
                   f"{sum(estimate_seconds(store, r) for r in missing) / 60:.0f} min on this machine).", ""]
        md += [f"Command: `python experiments/findings/run.py --claims {cid} --seeds {seeds_text}`", ""]
        heads = [item.split("\n", 1)[0] for item in md[start:] if item.startswith("**") and "erdict" in item.split("\n", 1)[0]]
        head = heads[0].replace("**", "") if heads else "–"
        mine = [r for r in runs if (r["group"] is not None and r["group"].id in {g.id for g in gs})
                or (r["group"] is None and any(r["config"] == {"schema": r["config"].get("schema"), **e} for e in claim.extra_runs))]
        summary.append(f"| [{cid}](#claim-{cid}-{_anchor(claim.title)}) {claim.title} | {head} | "
                       f"{sum(r['done'] for r in mine)}/{len(mine)} |")
    todo = [r for r in runs if not r["done"]]
    if todo:
        hours = sum(estimate_seconds(store, r) for r in todo) / 3600
        summary.append(f"\nThe {len(todo)} missing runs need about {hours:.1f} h more on this machine at the load "
                       "measured (estimated from the finished runs of each budget): "
                       f"`python experiments/findings/run.py --claims {','.join(F.ORDER)}` resumes where it stopped, and "
                       "`--ray auto|ADDRESS` spreads them over a Ray cluster.")
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
        from deltatune.tasks import load_task

        _N_TRAIN[key] = len(load_task(st.task, seed=0, max_train=st.max_train, max_eval=1).train)
    return _N_TRAIN[key]


def _describe(r: dict) -> str:
    c = r["config"]
    if r["group"] is None:
        return (f"{'probing' if c.get('probing', True) else 'RSA'} of {c['model']}"
                + (f" (text sample {c['seed']})" if "seed" in c else ""))
    if c is None:
        return f"{r['group'].name} [{r['group'].setting}] seed {r['seed']} (after its lr grid)"
    return f"{r['group'].name} [{r['group'].setting}] lr {c['lr']:.3g} seed {c['seed']}"
