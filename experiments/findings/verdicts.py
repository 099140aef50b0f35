"""The verdicts: each claim's comparisons, their 95% intervals, and the verdict read from them (rules of 2026-12-06).

A verdict reads the interval, never the means alone: a claim's threshold inside the interval is "undecided"; a
comparison with a group that is not shown to beat the untrained model is "not tested" at that budget.
"""
from __future__ import annotations

import math
import statistics

from . import intervals as I
from . import suite as F
from .stats import RULES_DATE, _lowest_two, _pct, _pm, _point, _ranges, _side, _untrained
from .suite import Store



# ----------------------------------------------------------------------------- verdicts (rules of 2026-12-06)
#
# Every comparison carries a 95% interval (experiments/findings/intervals.py: the seeds' spread and the test
# sample's noise), and a verdict reads the interval, not the means: a claim's threshold inside the interval
# is "undecided"; a comparison whose group does not beat the untrained model (its interval over the
# zero-shot score reaching 0) is "not tested" at that budget and counts neither way.

HOLDS, NOT, UNDECIDED, NOT_TESTED = "holds", "does not hold", "undecided", "not tested"
_HOW = {"paired bootstrap": "seeds + paired bootstrap of the test examples",
        "bound": "seeds + test-sample bound", "seeds only": "seeds only: no test-sample term for this metric",
        "identical": "the same score on every seed"}
_CACHE: dict = {}


def _complete(*stats) -> bool:
    return all(s is not None and s["mean"] is not None for s in stats)


def compare(a: dict, b: dict, paired_seeds: bool = False) -> I.Interval | None:
    """The interval of b's mean test score minus a's (None below two seeds)."""
    if not _complete(a, b):
        return None
    key = (a["group"].id, b["group"].id, tuple(a["values"]), tuple(b["values"]), paired_seeds)
    if key not in _CACHE:
        _CACHE[key] = I.compare(_side(a), _side(b), paired_seeds)
    return _CACHE[key]


def learned(s: dict) -> tuple[bool | None, I.Interval | None]:
    """Whether the group beats the untrained model (the interval of its score minus the zero-shot score lies above
    0), and that interval; (None, None) where it cannot be told (no zero-shot score, fewer than two seeds)."""
    if s["mean"] is None:
        return None, None
    key = ("untrained", s["group"].id, tuple(s["values"]))
    if key not in _CACHE:
        u = _untrained(s)
        _CACHE[key] = None if u is None else I.compare(u, _side(s))
    iv = _CACHE[key]
    return (None if iv is None else iv.low > 0), iv


def _iv_text(iv: I.Interval | None, digits: int = 4) -> str:
    if iv is None:
        return "no interval (fewer than two seeds)"
    if iv.how == "identical":
        return "0 on every seed (the same scores)"
    return f"{iv.diff:+.{digits}f}, 95% CI [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}] ({_HOW[iv.how]})"


def _diff_text(a: dict, b: dict, iv: I.Interval | None = None) -> str:
    """'a 0.7500 ± 0.0100 vs b 0.7400 ± 0.0200: b - a -0.0100, 95% CI [...]'."""
    iv = iv if iv is not None else compare(a, b)
    return f"{a['group'].name} {_pm(a)} vs {b['group'].name} {_pm(b)}: difference {_iv_text(iv)}"


def _not_tested(*stats) -> str:
    """'' when every group beats the untrained model (or it cannot be told), else what says it does not."""
    out = []
    for s in stats:
        ok, iv = learned(s)
        if ok is False:
            out.append(f"{s['group'].name} [{s['setting'].name}] is not shown to beat the untrained model: {_iv_text(iv)}")
    return "; ".join(out)


def _at_least(iv: I.Interval | None, threshold: float) -> str:
    """Outcome of "the difference is at least ``threshold``" read from its interval."""
    if iv is None:
        return UNDECIDED
    if iv.low >= threshold:
        return HOLDS
    if iv.high < threshold:
        return NOT
    return UNDECIDED


def _outcome(outcome: str, words: dict) -> str:
    return words.get(outcome, outcome)


def _tested(outcome: str, *stats) -> tuple[str, str]:
    """(outcome, suffix): "not tested" with the reason when a group does not beat the untrained model."""
    why = _not_tested(*stats)
    return (NOT_TESTED, f" ({why})") if why else (outcome, "")


def verdict_1(st: dict) -> str:
    parts = []
    for setting in ("cs", "bd", "dm"):
        full = st.get(f"{setting}:full")
        peft = [st[k] for k in (f"{setting}:lora", f"{setting}:houlsby") if k in st and st[k]["mean"] is not None]
        if not _complete(full) or not peft:
            parts.append((None, f"{setting}: not enough runs yet"))
            continue
        best = max(peft, key=lambda s: s["mean"])
        iv = compare(full, best)
        outcome, why = _tested(_at_least(iv, -_point(full["metric"])), full, best)
        st_ = full["setting"]
        parts.append((outcome, f"{st_.task} ({st_.steps} steps x {st_.per_step}), full vs the better PEFT method: "
                               f"{_diff_text(full, best, iv)}: " + _outcome(outcome, {
                                   HOLDS: "matches full fine-tuning (the interval lies above -1 point)",
                                   NOT: "falls behind full fine-tuning (the interval lies below -1 point)",
                                   UNDECIDED: "undecided (the interval covers -1 point)"}) + why))
    full, lora = st.get("sum:full"), st.get("sum:lora")
    if _complete(full, lora):
        iv = compare(full, lora)
        behind = {HOLDS: NOT, NOT: HOLDS}.get(_at_least(iv, -_point(full["metric"])), UNDECIDED)
        outcome, why = _tested(behind, full, lora)
        parts.append((outcome, f"code-summarization (SmolLM2, tiny budget): {_diff_text(full, lora, iv)}: " + _outcome(
            outcome, {HOLDS: "LoRA falls behind full fine-tuning by more than a point",
                      NOT: "LoRA does not fall behind full fine-tuning by more than a point",
                      UNDECIDED: "undecided (the interval covers -1 point)"}) + why))
    else:
        parts.append((None, "code-summarization (SmolLM2): not run yet"))
    return _verdict(parts, "matches = the interval of (better of LoRA/Houlsby) minus full fine-tuning lies above -1 point "
                    "(0.01; BLEU: 1); falls behind (generation) = the interval of LoRA minus full lies below -1 point; "
                    "an interval covering -1 point: undecided")


def verdict_3(st: dict) -> str:
    parts = []
    for setting in ("dm-dps", "dm500-dps"):
        # by setting and method: a group's id also carries its options (DPS's dropout='released')
        full, dps = (next((s for k, s in st.items() if k.split(":")[:2] == [setting, m]), None) for m in ("full", "dps"))
        if not _complete(full, dps) or full["std"] is None or dps["std"] is None:
            parts.append((None, f"{setting}: not enough runs yet"))
            continue
        what = f"{full['setting'].task}, {full['setting'].max_train or 'all'} training examples"
        ratio = I.variance_ratio(_side(full), _side(dps))
        if ratio is None:
            stable, text = UNDECIDED, "variance ratio undefined (full fine-tuning's seeds agree exactly)"
        else:
            stable = HOLDS if ratio[2] < 1 else NOT if ratio[1] > 1 else UNDECIDED
            text = (f"variance over {dps['n']} seeds DPS / full = {ratio[0]:.3g}, 95% CI [{ratio[1]:.3g}, {ratio[2]:.3g}] "
                    f"(F distribution, std DPS {dps['std']:.4f} vs full {full['std']:.4f})")
        stable, why = _tested(stable, full, dps)
        parts.append((stable, f"{what}: {text}: " + _outcome(stable, {
            HOLDS: "DPS is more stable", NOT: "DPS is less stable", UNDECIDED: "undecided (the interval covers 1)"}) + why))
        if setting.startswith("dm500"):
            iv = compare(full, dps)
            better, why = _tested(HOLDS if iv and iv.low > 0 else NOT if iv and iv.high < 0 else UNDECIDED, full, dps)
            parts.append((better, f"500 examples: {_diff_text(full, dps, iv)}: " + _outcome(better, {
                HOLDS: "DPS is better", NOT: "DPS is worse", UNDECIDED: "undecided (the interval covers 0)"}) + why))
    return _verdict(parts, "more stable = the 95% interval of the seed-variance ratio DPS / full lies below 1 (with 3 "
                    "seeds only a ratio below 1/39 can show it); better = the interval of DPS minus full lies above 0")


def verdict_4(st: dict) -> str:
    pool = [s for k, s in st.items() if k.startswith("cs:") and s["mean"] is not None and s["pct"] is not None
            and s["pct"] < 0.1]
    ln = st.get("cs:ln")
    if not _complete(ln) or len(pool) < 2:
        return "**Verdict: not enough runs yet.**"
    ranked = sorted(pool, key=lambda s: -s["mean"])
    order = "; ".join(f"{s['group'].name} {_pm(s)} ({_pct(s['pct'])})" for s in ranked)
    parts = [(None, f"methods under 0.1% on code-search, by mean: {order}")]
    for other in (s for s in ranked if s is not ln):
        iv = compare(other, ln)  # ln - other
        outcome, why = _tested(HOLDS if iv and iv.low > 0 else NOT if iv and iv.high < 0 else UNDECIDED, ln, other)
        parts.append((outcome, f"{_diff_text(other, ln, iv)}: " + _outcome(outcome, {
            HOLDS: "LN-tuning is better", NOT: f"{other['group'].name} is better",
            UNDECIDED: "undecided (the interval covers 0)", NOT_TESTED: "not tested"}) + why))
    return _verdict(parts, "holds = the interval of LN-tuning minus each other method under 0.1% of MiniLM's "
                    "parameters lies above 0 (the % measured by count_parameters); does not hold = some method's "
                    "interval lies below it; an interval covering 0: undecided")


def verdict_5(st: dict) -> str:
    c, full = st.get("cs:compacter++"), st.get("cs:full")
    if not _complete(c, full):
        return "**Verdict: not enough runs yet.**"
    under = c["pct"] is not None and c["pct"] < 0.1
    iv = compare(full, c)
    near = _at_least(iv, -2 * _point(full["metric"])) if under else NOT
    near, why = _tested(near, full, c)
    shortfall = (" (the shortfall itself is outside the noise: the interval lies below 0)" if iv and iv.high < 0 else
                 " (the interval covers 0)" if iv and iv.low <= 0 <= iv.high else "")
    return _verdict([(near, f"code-search: {_diff_text(full, c, iv)}{shortfall}; compacter++ trains {_pct(c['pct'])}: "
                            + _outcome(near, {HOLDS: "near (the interval lies above -2 points)",
                                              NOT: "not near" + ("" if under else " (not under 0.1%)"),
                                              UNDECIDED: "undecided (the interval covers -2 points)"}) + why)],
                    "near = the interval of Compacter++ minus full fine-tuning lies above -2 points (0.02 MRR), with "
                    "under 0.1% of the parameters; an interval covering -0.02: undecided")


def verdict_8(st: dict) -> str:
    lora, full = st.get("cs:lora"), st.get("cs:full")
    if not _complete(lora):
        return "**Verdict: not enough runs yet.**"
    parts = []
    for key, claimed in (("cs:lora:use_dora=True", "beats"), ("cs:vera", "matches"), ("cs:loha", "matches"),
                         ("cs:loreft", "matches")):
        other = st.get(key)
        if not _complete(other):
            parts.append((None, f"{key.split(':', 1)[1]}: not enough runs yet"))
            continue
        iv = compare(lora, other)  # other - lora
        threshold = 0.0 if claimed == "beats" else -_point(lora["metric"])
        outcome, why = _tested(_at_least(iv, threshold), lora, other)
        size = f"; trains {_pct(other['pct'])} against LoRA's {_pct(lora['pct'])}" if other["pct"] and lora["pct"] else ""
        parts.append((outcome, f"{_diff_text(lora, other, iv)}{size}: " + _outcome(outcome, {
            HOLDS: f"{other['group'].name} {claimed} LoRA", NOT: f"{other['group'].name} falls behind LoRA",
            UNDECIDED: f"undecided (the interval covers {threshold:+g})"}) + why))
    if _complete(full):
        parts.append((None, f"for reference, {_diff_text(full, lora)}"))
    return _verdict(parts, "beats (DoRA) = the interval of DoRA minus LoRA lies above 0; matches (VeRA, LoHa, LoReFT) = "
                    "the interval of the method minus LoRA lies above -1 point (0.01 MRR); falls behind = the interval "
                    "lies below that threshold; else undecided")


def verdict_9(st: dict) -> str:
    lora = st.get("sum:lora")
    if not _complete(lora):
        return "**Verdict: not enough runs yet.**"
    parts = []
    for scheme in ("nf4", "int8"):
        other = st.get(f"sum:lora:quantize={scheme}")
        if not _complete(other):
            parts.append((None, f"{scheme}: not enough runs yet"))
            continue
        iv = compare(lora, other)  # quantized - float32
        threshold = -_point(lora["metric"])
        outcome, why = _tested(_at_least(iv, threshold), lora, other)
        parts.append((outcome, f"code-summarization (SmolLM2, tiny budget): {_diff_text(lora, other, iv)}: " + _outcome(
            outcome, {HOLDS: f"LoRA on the {scheme} base matches LoRA on the float32 base",
                      NOT: f"LoRA on the {scheme} base falls behind",
                      UNDECIDED: f"undecided (the interval covers {threshold:+g})"}) + why))
    return _verdict(parts, "matches = the interval of LoRA on the quantized base minus LoRA on the float32 base lies "
                    "above -1 point (BLEU: 1); below it: does not hold; covering it: undecided")


def _eps(s: dict) -> str:
    """'epsilon spent 8.00 at delta 1e-4' (delta from the run files, beside every epsilon)."""
    if s["dp_epsilon"] is None:
        return ""
    delta = f" at delta {s['dp_delta']:.0e}".replace("e-0", "e-") if s.get("dp_delta") is not None else " (delta not recorded)"
    return f"epsilon spent {s['dp_epsilon']:.2f}{delta}"


def verdict_7(st: dict) -> str:
    """At each private budget measured: private LoRA against LoRA at the same budget."""
    parts = []
    for setting in ("dm", "dm-dp"):
        lora = st.get(f"{setting}:lora")
        dp = next((s for k, s in st.items() if k.startswith(f"{setting}:lora:dp_epsilon")), None)
        if lora is None or dp is None:
            continue
        budget = f"{lora['setting'].steps} steps x {lora['setting'].per_step}"
        if not _complete(lora, dp):
            parts.append((None, f"docstring-match at {budget}: not enough runs yet"))
            continue
        iv = compare(lora, dp)
        outcome, why = _tested(_at_least(iv, -0.03), lora, dp)
        noise = f", noise multiplier {dp['dp_noise']:.3f}" if dp.get("dp_noise") is not None else ""
        parts.append((outcome, f"docstring-match at {budget}: {_diff_text(lora, dp, iv)}; {_eps(dp)}{noise}: " + _outcome(
            outcome, {HOLDS: "within 3 points", NOT: "more than 3 points below",
                      UNDECIDED: "undecided (the interval covers -3 points)"}) + why))
    if not parts:
        return "**Verdict: not enough runs yet.**"
    return _verdict(parts, "within a few points = the interval of private minus non-private LoRA at the same budget "
                    "lies above -3 accuracy points (-0.03); below it: does not hold; covering it: undecided")


def _speedup(plain: dict, rec: dict) -> tuple[float, float, float] | None:
    """Median s/step of the plain run over the recycled one, paired by seed, with a t interval on the log ratio."""
    seeds = sorted(set(plain["records"]) & set(rec["records"]))
    logs = []
    for k in seeds:
        a, b = plain["records"][k]["result"].get("step_seconds_median"), rec["records"][k]["result"].get("step_seconds_median")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
            logs.append(math.log(a / b))
    if len(logs) < 2:
        return None
    mean, se = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    half = I.t_quantile(0.975, len(logs) - 1) * se
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def verdict_6(st: dict) -> str:
    parts = []
    for k in (3, 4):
        plain = st.get(f"cs-telly:telly:k={k}")
        rec = st.get(f"cs-telly:telly:k={k}:recycle=True")
        if not _complete(plain, rec) or not plain["step_s"] or not rec["step_s"]:
            parts.append((None, f"K={k}: not enough runs yet"))
            continue
        speed = _speedup(plain, rec)
        wall = plain["wall_s"] / rec["wall_s"] if rec["wall_s"] else None
        iv = compare(plain, rec, paired_seeds=True)
        quality = _at_least(iv, -_point(plain["metric"]))
        fast = UNDECIDED if speed is None else HOLDS if speed[1] >= 1.8 else NOT if speed[2] < 1.8 else UNDECIDED
        outcome = NOT if NOT in (fast, quality) else HOLDS if fast == quality == HOLDS else UNDECIDED
        speed_text = (f"{speed[0]:.2f}x faster steps, 95% CI [{speed[1]:.2f}, {speed[2]:.2f}] over seeds"
                      if speed else f"{plain['step_s'] / rec['step_s']:.2f}x faster steps (no interval)")
        parts.append((outcome, f"telly K={k}: {speed_text} (median s/step {plain['step_s']:.3f} -> {rec['step_s']:.3f}), "
                               f"whole run (cache build, evaluations, loading included) {wall:.2f}x; test "
                               f"{_diff_text(plain, rec, iv)}"))
    plain, half = st.get("cs-telly:telly:k=3"), st.get("cs-telly:telly:k=3:recycle=True:recycle_dtype=float16")
    if _complete(plain, half):
        iv = compare(plain, half, paired_seeds=True)
        parts.append((None, f"an fp16 cache (half the disk) for telly K=3: test {_diff_text(plain, half, iv)} ("
                      + _outcome(_at_least(iv, -_point(plain["metric"])), {HOLDS: "within 1 point of the uncached run",
                                                                            NOT: "more than 1 point below the uncached run",
                                                                            UNDECIDED: "undecided against 1 point"}) + ")"))
    return _verdict(parts, "holds = the interval of the speed-up (per-seed median s/step, paired by seed) lies at or "
                    "above 1.8x and the interval of the test MRR difference (paired by seed: same seeds, same data "
                    "order) above -1 point; timings on a shared machine: see the load column")


def _verdict(parts: list, rule: str) -> str:
    """The head read from the parts' outcomes, then one line per part, then the criterion."""
    outcomes = [o for o, _ in parts if o is not None]
    counted = [o for o in outcomes if o != NOT_TESTED]
    n = {o: counted.count(o) for o in (HOLDS, NOT, UNDECIDED)}
    if not outcomes:
        head = "not measured yet"
    elif not counted:
        head = "not tested at these budgets (in every comparison a group is not shown to beat the untrained model)"
    elif n[HOLDS] == len(counted):
        head = "holds on our tasks"
    elif n[NOT] == len(counted):
        head = "does not hold on our tasks"
    elif n[UNDECIDED] == len(counted):
        head = "undecided at these budgets and seeds"
    elif n[HOLDS] and n[NOT]:
        head = "holds only in part on our tasks" + (f" ({n[UNDECIDED]} of {len(counted)} undecided)" if n[UNDECIDED] else "")
    elif n[HOLDS]:
        head = f"holds where decided; {n[UNDECIDED]} of {len(counted)} undecided"
    else:
        head = f"does not hold where decided; {n[UNDECIDED]} of {len(counted)} undecided"
    if counted and len(counted) < len(outcomes):
        head += f"; {len(outcomes) - len(counted)} not tested"
    lines = [f"- {'**' + o + '**: ' if o else ''}{text}" for o, text in parts]
    return f"**Verdict: {head}.**\n\n" + "\n".join(lines) + f"\n\nCriterion (rules of {RULES_DATE}): {rule}."


VERDICTS = {"1": verdict_1, "3": verdict_3, "4": verdict_4, "5": verdict_5, "6": verdict_6, "7": verdict_7,
            "8": verdict_8, "9": verdict_9}


# ----------------------------------------------------------------------------- claim 2

_PROPERTY_ORDER = ["lexical", "syntactic", "syntactic-depth", "structural", "semantic"]


def _seed0(extra: dict) -> bool:
    """The analysis run the page's tables show (the text samples of the other seeds feed the RSA interval)."""
    return "seed" not in extra


def _peak_layers(p: dict) -> list[int] | None:
    """The hidden states whose probe score the peak's 95% interval does not exclude (the test sample's noise;
    one probe fit per layer), or None without a test size or a bound for the metric."""
    scores, n = p["score"], p.get("n_test")
    if not isinstance(n, int) or n < 2:
        return None
    peak = max(range(len(scores)), key=scores.__getitem__)

    def side(j):
        return I.Side(f"layer {j}", [scores[j]], [0], n, bounds=[I.example_variance_bound(p.get("metric"), scores[j])],
                      exact=True)

    out = []
    for j in range(len(scores)):
        iv = I.compare(side(j), side(peak)) if j != peak else None
        if j == peak or (iv is not None and iv.low <= 0):
            out.append(j)
    return out if all(I.example_variance_bound(p.get("metric"), x) is not None for x in scores) else None


def _probe_verdict(store: Store, claim) -> list:
    """(outcome, text) parts for the probing order and the RSA's top two hidden states."""
    from .suite import SCHEMA

    parts = []
    samples: dict = {}  # (model, name) -> per text sample: RSA per hidden state
    for extra in claim.extra_runs:
        record = store.get({"schema": SCHEMA, **extra})
        if record is None:
            continue
        a = record["result"]
        for name, c in ((a.get("similarity") or {}).get("models") or {}).items():
            samples.setdefault((a["model"], name), []).append(c["rsa_spearman"])
        if not _seed0(extra):
            continue
        probing = a.get("probing") or {}
        top = (a.get("blocks") or 0)
        peaks = {k: _peak_layers(p) for k, p in probing.items()}
        if top and {"lexical", "syntactic", "structural"} <= set(probing) and all(
                peaks[k] for k in ("lexical", "syntactic", "structural")):
            L, S, T = (peaks[k] for k in ("lexical", "syntactic", "structural"))
            if max(L) <= min(S) and max(S) <= min(T):
                outcome = HOLDS
            elif not any(min(L) <= s <= max(T) for s in S):
                outcome = NOT
            else:
                outcome = UNDECIDED
            named = sorted(probing, key=lambda k: (_PROPERTY_ORDER.index(k) if k in _PROPERTY_ORDER else 9, k))
            parts.append((outcome, f"{a['model']} probing peaks (of hidden states 0..{top}; every state the peak's 95% "
                                   "interval does not exclude, test-sample noise of one probe fit): "
                          + ", ".join(f"{k} {_ranges(peaks[k]) if peaks[k] else probing[k].get('peak_layer')}"
                                      for k in named) + ": " + _outcome(outcome, {
                                          HOLDS: "lexical <= syntactic <= structural, as the paper found",
                                          NOT: "not the paper's lexical < syntactic < structural order",
                                          UNDECIDED: "the peaks overlap: the order is undecided"})))
    for (model, name), runs in samples.items():
        r = runs[0]
        low2, last = _lowest_two(r), len(r) - 1
        if len(runs) < 2:
            parts.append((UNDECIDED, f"{model} {name}: the two least similar hidden states are {low2} of 0..{last} "
                                     f"(the next is {sorted(r)[2] - sorted(r)[1]:.3f} above the second); one sample of "
                                     "texts and one seed give no interval: undecided"))
            continue
        # every other hidden state against each of the top two, paired by text sample (a t interval over samples)
        arr, worst = list(zip(*runs)), None
        outcome = HOLDS
        for j in range(last - 1):
            for t in (last - 1, last):
                d = [x - y for x, y in zip(arr[j], arr[t])]
                mean, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
                half = I.t_quantile(0.975, len(d) - 1) * se
                if mean + half < 0:
                    outcome = NOT
                elif mean - half <= 0 and outcome == HOLDS:
                    outcome, worst = UNDECIDED, (j, t, mean, half)
        parts.append((outcome, f"{model} {name}: the two least similar hidden states over {len(runs)} text samples: "
                               f"{low2} of 0..{last}: " + _outcome(outcome, {
                                   HOLDS: "the top two, each below every other state (95% intervals over the samples)",
                                   NOT: "not the top two (a lower state's interval lies below a top one's)",
                                   UNDECIDED: "undecided" + (f" (state {worst[0]} vs {worst[1]}: {worst[2]:+.4f} "
                                                             f"± {worst[3]:.4f})" if worst else "")})))
    return parts


def _k(s: dict):
    return dict(s["group"].options).get("k")


def _rule_check(store: Store, claim, stats: list[dict]) -> list[str]:
    """The freeze depth the RSA rule recommends against what Telly-K measured at (or nearest) that K."""
    from .suite import SCHEMA

    out = []
    for extra in claim.extra_runs:
        record = store.get({"schema": SCHEMA, **extra}) if _seed0(extra) else None
        k = ((record or {}).get("result") or {}).get("freeze", {}).get("k")
        if k is None:
            continue
        model = record["result"]["model"]
        measured = [s for s in stats if s["setting"].model == model and s["mean"] is not None]
        if not measured:
            continue
        near = min(measured, key=lambda s: abs(_k(s) - k))
        best = max(measured, key=lambda s: s["mean"])
        zero = near.get("zero_shot")
        iv = compare(best, near) if best is not near else None
        outcome = _at_least(iv, -_point(best["metric"])) if iv is not None else None
        out.append(f"{model}: the RSA rule recommends K={k}; Telly-K measured at K={_k(near)}: {_pm(near)}"
                   + (f" (the untrained model: {zero:.4f})" if zero is not None else "")
                   + (f", against the best measured K={_k(best)}: {_pm(best)}, difference {_iv_text(iv)}"
                      if best is not near else ", the best K measured")
                   + (": at these budgets the similarity after fine-tuning does not tell how deep freezing is cheap"
                      if outcome == NOT else ": undecided against 1 point" if outcome == UNDECIDED else ""))
    return out


def _telly_parts(stats: list[dict]) -> list:
    """(outcome, text) parts: each K against K=0 (within 1 point), and the line of the pretrained model."""
    done = [s for s in stats if s["mean"] is not None]
    if not done:
        return []
    base = next((s for s in done if _k(s) == 0), None)
    parts = []
    for s in done:
        if base is None or s is base:
            parts.append((None, f"Telly-K at K={_k(s)}: {_pm(s)}"))
            continue
        iv = compare(base, s)
        outcome, why = _tested(_at_least(iv, -_point(base["metric"])), base, s)
        parts.append((outcome, f"Telly-K at K={_k(s)} against K=0: {_diff_text(base, s, iv)}: " + _outcome(outcome, {
            HOLDS: "costs at most 1 point", NOT: "costs more than 1 point",
            UNDECIDED: "undecided (the interval covers -1 point)"}) + why))
    last = max(_k(s) or 0 for s in done)
    zero = next((s["zero_shot"] for s in done if s.get("zero_shot") is not None), None)
    if zero is not None and F.SETTINGS[done[0]["group"].setting].task == "code-search":
        parts.append((None, f"K={last + 1} (every block frozen: a bi-encoder has nothing left to train) = the "
                            f"pretrained model, {zero:.4f}"))
    return parts
