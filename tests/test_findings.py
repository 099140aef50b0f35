"""The findings harness (experiments/findings): run keys, resuming, parts, the learning-rate choice and its
extension, the intervals and the verdicts that read them, bad run files, and the page."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from deltatune.errors import ConfigError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # the harness is a script of the repository, not a module of the package
from findings import intervals as I  # noqa: E402
from findings import page as P  # noqa: E402
from findings import stats as S  # noqa: E402
from findings import suite as F  # noqa: E402
from findings import verdicts as V  # noqa: E402


def _script():
    """experiments/findings/run.py as a module (it is run as a script)."""
    spec = importlib.util.spec_from_file_location("findings_run", EXPERIMENTS / "findings" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = F.Setting("tiny", "tiny-bert", "code-search", steps=1, batch=2, max_len=24, max_train=8, max_eval=8, eval_every=1)


@pytest.fixture
def claim_t(monkeypatch):
    """A claim of our own on tiny-bert: one tuned group, one borrowing its lr."""
    monkeypatch.setitem(F.SETTINGS, "tiny", TINY)
    claim = F.Claim("T", "tiny", "a tiny claim", [F.group("tiny", "lora"),
                                                  F.group("tiny", "telly", "telly K=1", {"k": 1}, lr_from="tiny:lora")])
    monkeypatch.setitem(F.CLAIMS, "T", claim)
    monkeypatch.setattr(F, "ORDER", ["T"])
    return claim


def _record(value, valid, *, trainable=100, total=10_000, metric="mrr", zero=None, examples=None, zero_examples=None,
            n_test=8, **result):
    record = {"result": {"metric": metric, "value": value, "valid_value": valid, "trainable_params": trainable,
                         "total_params": total, "step_seconds_median": 0.5, "best_step": 1, "pool": 8,
                         "zero_shot_value": zero, **result},
              "wall_seconds": 3.0, "other_load": 0.0, "machine": {"cpu": "test cpu", "cores": 2, "ram_gb": 1.0},
              "finished": "2026-01-01 00:00 UTC", "n_test": n_test}
    if examples is not None:
        record["test_scores"] = {"values": list(examples), "zero_shot": None if zero_examples is None else list(zero_examples)}
        record["result"]["value"] = float(np.mean(examples))
        record["n_test"] = len(examples)
    return record


def test_run_keys_are_stable_and_distinct():
    g = F.group("cs", "lora", options={"r": 4, "alpha": 8.0})
    config = F.run_config(F.SETTINGS["cs"], g, 2e-3, 1)
    same = json.loads(json.dumps(dict(reversed(list(config.items())))))  # another key order, through JSON
    assert F.run_key(config) == F.run_key(same)
    # pinned: a key that changed between versions would orphan every committed run file
    assert F.run_key({"kind": "train", "model": "minilm", "task": "code-search", "method": "lora", "seed": 0,
                      "lr": 0.002}) == "train-minilm-code-search-lora-s0-" + __import__("hashlib").sha256(
        b'{"kind":"train","lr":0.002,"method":"lora","model":"minilm","seed":0,"task":"code-search"}').hexdigest()[:12]
    keys = {F.run_key(config)}
    for change in ({"seed": 2}, {"lr": 6e-3}, {"options": {"r": 8, "alpha": 8.0}}, {"steps": 31}, {"max_train": 500},
                   {"dp_epsilon": 8.0}, {"recycle": True}, {"task": "bug-detect"}):
        keys.add(F.run_key({**config, **change}))
    assert len(keys) == 9


def test_parts_partition_the_runs_and_keep_groups_together(tmp_path):
    store = F.Store(tmp_path)
    claims, seeds = list(F.CLAIMS), [0, 1, 2]

    def ident(r):
        return (r["group"].id if r["group"] else F.run_key(r["config"]), r["phase"],
                r["config"]["lr"] if r["config"] and "lr" in r["config"] else None, r.get("seed"))

    whole = [ident(r) for r in F.planned_runs(store, claims, seeds)]
    assert len(whole) == len(set(whole))
    parts = [[ident(r) for r in F.planned_runs(store, claims, seeds, part=(i, 3))] for i in (1, 2, 3)]
    assert sorted(x for p in parts for x in p) == sorted(whole)  # every run in exactly one part
    assert all(parts)
    groups = F.all_groups(claims)
    for g in groups.values():  # a group's grid, its seeds and the groups borrowing its lr: one part
        assert F.part_of(g, 3, groups) == F.part_of(groups[F.lr_root(g)], 3, groups)
    with pytest.raises(ConfigError, match="I/N"):
        _script()._parse_part("0/2")


def test_lr_is_chosen_on_validation_not_test(tmp_path, claim_t):
    store = F.Store(tmp_path)
    g = claim_t.groups[0]
    low, mid, high = F.grid_lrs(g)
    # validation prefers the middle lr, test the lowest: the choice must follow validation
    for lr, valid, test in ((low, 0.30, 0.90), (mid, 0.60, 0.50), (high, 0.40, 0.10)):
        store.put(F.run_config(TINY, g, lr, F.GRID_SEED), _record(test, valid))
    chosen, rows = F.choose_lr(store, TINY, g)
    assert chosen == mid and [r["valid"] for r in rows] == [0.30, 0.60, 0.40]
    runs = F.planned_runs(store, ["T"], [0, 1, 2])
    seed_runs = [r for r in runs if r["phase"] == "seed"]
    assert seed_runs and all(r["config"]["lr"] == mid for r in seed_runs)  # the borrowing group's too
    assert not any(r["phase"] == "seed" and r["config"]["seed"] == 0 and r["group"] is g for r in runs)
    assert not any(r["phase"] == "extension" for r in runs)  # an inner best: nothing to extend
    # while a grid run is missing nothing is chosen and the seed runs wait
    (store.runs / f"{F.run_key(F.run_config(TINY, g, low, 0))}.json").unlink()
    assert F.choose_lr(store, TINY, g)[0] is None
    assert all(r["config"] is None for r in F.planned_runs(store, ["T"], [0, 1]) if r["phase"] == "seed")


def test_page_mean_std_and_missing_runs(tmp_path, claim_t):
    store = F.Store(tmp_path / "out")
    lora, telly = claim_t.groups
    lrs = F.grid_lrs(lora)
    for lr, valid in zip(lrs, (0.1, 0.9, 0.2)):
        store.put(F.run_config(TINY, lora, lr, 0), _record(0.5 if lr == lrs[1] else 0.0, valid))
    for seed, value in ((1, 0.6), (2, 0.7)):
        store.put(F.run_config(TINY, lora, lrs[1], seed), _record(value, 0.5))
    store.put(F.run_config(TINY, telly, lrs[1], 0), _record(0.4, 0.5, trainable=5_000))
    page = tmp_path / "findings.md"
    P.render(["T"], [0, 1, 2], out=tmp_path / "out", page=page)
    text = page.read_text()
    assert "python experiments/findings/run.py --claims T --seeds 0,1,2" in text
    assert "mrr 0.6000 ± 0.1000" in text  # lora: 0.5, 0.6, 0.7 (sample std)
    assert "| tiny | lora | 3/3 |" in text and "| tiny | telly K=1 | 1/3 |" in text
    assert "mrr 0.4000 |" in text  # one seed: no std
    assert "Missing runs (2)" in text and "telly K=1 [tiny] lr 0.002 seed 1" in text
    assert "0.002: 0.9000" in text  # the grid's validation scores, the chosen lr
    assert "test cpu, 2 cores" in text
    assert S.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(1.5275252, rel=1e-6))


def test_resume_skips_finished_runs_and_a_failure_spares_the_others(tmp_path, monkeypatch):
    monkeypatch.setitem(F.SETTINGS, "tiny", TINY)
    good = F.group("tiny", "lora", fixed_lr=1e-3)
    bad = F.group("tiny", "lora", "bad", options={"dropout": 2.0}, fixed_lr=1e-3)  # refused when attached
    monkeypatch.setitem(F.CLAIMS, "R", F.Claim("R", "r", "r", [bad, good]))
    monkeypatch.setattr(F, "ORDER", ["R"])
    out, work = tmp_path / "out", tmp_path / "work"
    first = F.run_suite(["R"], [0, 1], out=out, work_dir=work, log=lambda _: None)
    assert len(first["ran"]) == 2 and len(first["failed"]) == 2
    files = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(files) == 2 and all("-lora-" in f for f in files)
    assert len((out / "failures.jsonl").read_text().splitlines()) == 2
    record = json.loads((out / "runs" / files[0]).read_text())
    assert record["config"]["model"] == "tiny-bert" and record["result"]["trainable_params"] > 0
    # each test query's reciprocal rank, and the untrained model's: their mean is the run's (and zero-shot) MRR
    scores = record["test_scores"]
    assert len(scores["values"]) == record["n_test"] == 8
    assert sum(scores["values"]) / 8 == pytest.approx(record["result"]["value"], abs=1e-6)
    assert sum(scores["zero_shot"]) / 8 == pytest.approx(record["result"]["zero_shot_value"], abs=1e-6)
    again = F.run_suite(["R"], [0, 1], out=out, work_dir=work, log=lambda _: None)
    assert again["ran"] == [] and sorted(again["skipped"]) == sorted(f[:-5] for f in files)
    (out / "runs" / files[0]).unlink()
    third = F.run_suite(["R"], [0, 1], out=out, work_dir=work, log=lambda _: None)
    assert third["ran"] == [files[0][:-5]]


def test_script_plan_and_bad_flags(capsys):
    main = _script().main
    assert main(["--claims", "5", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "compacter++" in out and "to do" in out
    assert main(["--claims", "99", "--plan"]) == 2
    assert "the claims are" in capsys.readouterr().err


def test_page_reads_the_layer_analysis(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "ORDER", ["2"])
    store = F.Store(tmp_path / "out")
    probe_cfg, rsa_cfg = [{"schema": F.SCHEMA, **e} for e in F.CLAIMS["2"].extra_runs[:2]]
    scores = {"lexical": [.5, .9, .8, .7, .6, .5, .4], "syntactic": [.3, .4, .6, .5, .4, .3, .3],
              "structural": [.3, .4, .4, .5, .4, .3, .6]}  # structural peaks at the top, lexical low: the paper's order
    # 100,000 test tokens: every peak stands clear of its neighbours (0.1 apart, a standard error near 0.002)
    probing = {k: {"metric": "accuracy", "score": v, "baseline": .2, "peak_layer": v.index(max(v)), "n_test": 100_000}
               for k, v in scores.items()}
    settings = {"n_train": 6, "n_valid": 2, "n_test": 3, "search_samples": 5}
    store.put(probe_cfg, {"result": {"model": "minilm", "blocks": 6, "settings": settings, "probing": probing},
                          "adapters": [], "wall_seconds": 60.0})
    rsa = [1, .99, .6, .97, .95, .8, .9]  # least similar: hidden states 2 and 5, not the top two
    store.put(rsa_cfg, {"result": {"model": "minilm", "blocks": 6, "similarity": {"samples": 9, "split": "valid", "models": {
        "full": {"rsa_spearman": rsa, "rsa_pearson": rsa, "cka": rsa}}}}, "adapters": [], "wall_seconds": 30.0})
    P.render(["2"], [0, 1, 2], out=tmp_path / "out", page=tmp_path / "p.md")
    text = (tmp_path / "p.md").read_text()
    assert "lexical 1, syntactic 2, structural 6" in text and "as the paper found" in text
    # one sample of texts: no interval, so the RSA's top two are undecided whatever they look like
    assert "the two least similar hidden states are [2, 5] of 0..6" in text and "give no interval: undecided" in text
    assert "RSA of minilm (text sample 1)" in text  # the samples that would give it an interval are planned
    assert (tmp_path / "out" / "probing-minilm.png").is_file() and (tmp_path / "out" / "rsa-minilm.png").is_file()

    # at 300 test functions the same probe scores overlap: the order is undecided, not "as the paper found"
    for p in probing.values():
        p["n_test"] = 30
    store.put(probe_cfg, {"result": {"model": "minilm", "blocks": 6, "settings": settings, "probing": probing},
                          "adapters": [], "wall_seconds": 60.0})
    P.render(["2"], [0, 1, 2], out=tmp_path / "out", page=tmp_path / "p.md")
    assert "the peaks overlap: the order is undecided" in (tmp_path / "p.md").read_text()

    # three samples of texts in which the top two stand clear of the rest: the RSA part holds
    for seed, shift in ((1, .01), (2, -.01)):
        extra = next(e for e in F.CLAIMS["2"].extra_runs if e.get("seed") == seed and e["model"] == "minilm")
        top = [1, .99, .98, .97, .95, .8 + shift, .7 - shift]
        store.put({"schema": F.SCHEMA, **extra}, {"result": {"model": "minilm", "blocks": 6, "similarity": {
            "samples": 9, "split": "valid", "models": {"full": {"rsa_spearman": top}}}}, "adapters": [],
            "wall_seconds": 30.0})
    store.put(rsa_cfg, {"result": {"model": "minilm", "blocks": 6, "similarity": {"samples": 9, "split": "valid", "models": {
        "full": {"rsa_spearman": [1, .99, .98, .97, .95, .8, .7]}}}}, "adapters": [], "wall_seconds": 30.0})
    P.render(["2"], [0, 1, 2], out=tmp_path / "out", page=tmp_path / "p.md")
    assert "over 3 text samples: [5, 6] of 0..6: the top two" in (tmp_path / "p.md").read_text()


# ----------------------------------------------------------------------------- intervals and verdicts

def test_interval_distributions_match_their_tables():
    assert I.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert I.t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert I.t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert I.t_quantile(0.975, math.inf) == pytest.approx(1.9600, abs=1e-4)
    assert I.f_quantile(0.975, 2, 2) == pytest.approx(39.0, abs=1e-6)
    assert I.f_quantile(0.975, 9, 9) == pytest.approx(4.026, abs=1e-3)


def test_a_paired_bootstrap_is_narrower_than_the_bound_and_both_hold_the_test_noise():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.7).astype(float)  # one method's per-example accuracy
    flip = rng.random(400) < 0.05
    a = I.Side("a", [], [0, 1, 2], 400, examples=[], bounds=[])
    b = I.Side("b", [], [0, 1, 2], 400, examples=[], bounds=[])
    for seed in range(3):  # b errs where a does, except on 5% of examples
        xa = base.copy()
        xb = np.where(flip, 1 - base, base)
        for side, x in ((a, xa), (b, xb)):
            side.values.append(float(x.mean()))
            side.examples.append(list(x))
            side.bounds.append(I.example_variance_bound("accuracy", float(x.mean())))
    paired = I.compare(a, b)
    assert paired.how == "paired bootstrap" and paired.covers(paired.diff)
    bound = I.compare(I.Side("a", a.values, a.seeds, 400, bounds=a.bounds), I.Side("b", b.values, b.seeds, 400, bounds=b.bounds))
    assert bound.how == "bound" and (bound.high - bound.low) > 3 * (paired.high - paired.low)
    # the seeds agree exactly here, so the whole width is the test sample's: about 2 x 1.96 x sd(d) / sqrt(n)
    d = np.asarray(b.examples[0]) - np.asarray(a.examples[0])
    assert (paired.high - paired.low) == pytest.approx(2 * 1.96 * d.std() / math.sqrt(400), rel=0.15)
    assert I.compare(a, I.Side("c", [0.5], [0], 400)) is None  # one seed: no interval
    same = I.compare(a, I.Side("a2", list(a.values), [0, 1, 2], 400), paired_seeds=True)
    assert same.how == "identical" and same.low == same.high == 0.0


def test_mrr_bound_uses_recall_at_1():
    # RR is 1 or at most 1/2: with recall@1 = 0.6 and MRR = 0.7, the variance is at most 0.6 + 0.05 - 0.49
    assert I.example_variance_bound("mrr", 0.7, {"recall@1": 0.6}) == pytest.approx(0.16)
    assert I.example_variance_bound("mrr", 0.7, None) == pytest.approx(0.21)  # Bhatia-Davis without it
    assert I.example_variance_bound("accuracy", 0.5) == pytest.approx(0.25)
    assert I.example_variance_bound("rouge", 0.5) is None


def _stats(store, groups, seeds=(0, 1, 2)):
    return {g.id: S.group_stats(store, g, groups, list(seeds)) for g in groups.values()}


def _examples(rng, n, p_full, p_other, p_zero, seed):
    """Per-example 0/1 scores of full, another method and the untrained model on one seed: the same examples are
    hard for every method (a fixed difficulty), a seed flips 1% of them."""
    hard = np.random.default_rng(99).random(n)  # the test set: the same for every seed and method
    flip = np.random.default_rng(seed).random(n) < 0.01

    def scores(p):
        return np.where(flip, 1.0 - (hard < p), (hard < p).astype(float))

    return scores(p_full), scores(p_other), (hard < p_zero).astype(float)


def test_verdict_reads_the_interval_undecided_holds_and_not_tested(tmp_path, monkeypatch):
    """Claim 5's rule: near = the interval of Compacter++ minus full lies above -2 points."""
    store = F.Store(tmp_path)
    full, comp = F.group("cs", "full", fixed_lr=1e-4), F.group("cs", "compacter++", fixed_lr=1e-3)
    groups = {g.id: g for g in (full, comp)}
    rng = np.random.default_rng(1)

    def put(p_full, p_other, p_zero, n=600):
        for seed in (0, 1, 2):
            f, o, z = _examples(rng, n, p_full, p_other, p_zero, seed)
            store.put(F.run_config(F.SETTINGS["cs"], full, 1e-4, seed),
                      _record(0, 0.5, trainable=10**6, total=10**6, zero=float(z.mean()), examples=f, zero_examples=z))
            store.put(F.run_config(F.SETTINGS["cs"], comp, 1e-3, seed),
                      _record(0, 0.5, trainable=10, total=10**6, zero=float(z.mean()), examples=o, zero_examples=z))
        V._CACHE.clear()
        return V.verdict_5(_stats(store, groups))

    # the same predictions: a difference of 0 well inside +-2 points, decided
    text = put(0.80, 0.80, 0.30)
    assert "**Verdict: holds on our tasks.**" in text and "paired bootstrap" in text
    # 1.8 points behind (the case): the interval covers -2 points: undecided, however the means look
    text = put(0.80, 0.782, 0.30, n=200)
    assert "**Verdict: undecided" in text and "covers -2 points" in text
    # nothing learned: the untrained model scores the same; the comparison is not tested
    text = put(0.50, 0.50, 0.50)
    assert "**Verdict: not tested" in text and "not shown to beat the untrained model" in text


def test_claim_3_reads_its_groups_whatever_options_they_carry(tmp_path):
    """DPS's group carries its option (dropout='released') in its id: the verdict finds both groups of each
    setting by setting and method, and reads the intervals (3 seeds: undecided)."""
    store = F.Store(tmp_path)
    groups = {g.id: g for g in (F.group(setting, method, options=F.DPS_AS_RELEASED if method == "dps" else None,
                                        fixed_lr=1e-4)
                                for setting in ("dm-dps", "dm500-dps") for method in ("full", "dps"))}
    assert {g.id for g in F.CLAIMS["3"].groups} == set(groups)  # the claim's own groups, an lr given
    for g in groups.values():
        for seed, score in enumerate((0.84, 0.85, 0.83) if g.method == "full" else (0.83, 0.87, 0.85)):
            store.put(F.run_config(F.SETTINGS[g.setting], g, 1e-4, seed),
                      _record(score, 0.8, metric="accuracy", zero=0.497, n_test=650))
    V._CACHE.clear()
    text = V.verdict_3(_stats(store, groups))
    assert "not enough runs" not in text and "**Verdict: undecided" in text
    assert "variance over 3 seeds DPS / full" in text and "500 examples: full" in text


def test_claim_7_prints_delta_beside_every_epsilon(tmp_path):
    store = F.Store(tmp_path)
    lora = F.group("dm", "lora", fixed_lr=2e-3)
    dp = F.group("dm", "lora", "lora, DP eps=8 delta=1e-4", extra={"dp_epsilon": 8.0}, fixed_lr=6.67e-4)
    groups = {g.id: g for g in (lora, dp)}
    for seed, (a, b) in enumerate(((0.84, 0.52), (0.82, 0.51), (0.86, 0.54))):
        store.put(F.run_config(F.SETTINGS["dm"], lora, 2e-3, seed), _record(a, 0.8, metric="accuracy", zero=0.497, n_test=650))
        store.put(F.run_config(F.SETTINGS["dm"], dp, 6.67e-4, seed),
                  _record(b, 0.5, metric="accuracy", zero=0.497, n_test=650, dp_epsilon=7.997, dp_delta=1e-4,
                          dp_noise_multiplier=0.52))
    st = _stats(store, groups)
    text = V.verdict_7(st)
    assert "epsilon spent 8.00 at delta 1e-4" in text
    # private LoRA is not shown to beat the untrained model (0.497) at n = 650: not tested, not "does not hold"
    assert "**Verdict: not tested" in text
    table = P.results_table(list(st.values()), groups, [("epsilon spent (delta)", lambda s: V._eps(s) or "–")])
    assert "at delta 1e-4" in table


def test_a_grid_whose_best_sits_at_its_edge_is_extended_before_seeds_run(tmp_path, claim_t):
    store = F.Store(tmp_path)
    g = claim_t.groups[0]
    low, mid, high = F.grid_lrs(g)
    for lr, valid in ((low, 0.3), (mid, 0.4), (high, 0.6)):  # the best at the high edge
        store.put(F.run_config(TINY, g, lr, F.GRID_SEED), _record(0.5, valid))
    assert F.choose_lr(store, TINY, g)[0] is None  # not chosen: the extension runs first
    runs = F.planned_runs(store, ["T"], [0, 1, 2])
    ext = [r for r in runs if r["phase"] == "extension"]
    assert [r["config"]["lr"] for r in ext] == [pytest.approx(high * F.GRID_STEP)] and not ext[0]["done"]
    assert all(r["config"] is None for r in runs if r["phase"] == "seed")  # the seeds wait for it
    assert F.group_lr(store, g, {x.id: x for x in claim_t.groups}, provisional=True) == high  # what the page shows
    # the extension is worse: the old edge is chosen, inside the grid now
    store.put(F.run_config(TINY, g, ext[0]["config"]["lr"], F.GRID_SEED), _record(0.5, 0.5))
    found = F.grid(store, TINY, g)
    assert found["lr"] == high and not found["edge"] and found["waiting"] is None
    # the extension is better, and so is the next: the limit stops it, the choice says it sits at an edge
    store.put(F.run_config(TINY, g, ext[0]["config"]["lr"], F.GRID_SEED), _record(0.5, 0.7))
    nxt = F.grid(store, TINY, g)
    assert nxt["waiting"] == "extension" and nxt["rows"][-1]["lr"] == pytest.approx(high * F.GRID_STEP ** 2)
    store.put(F.run_config(TINY, g, nxt["rows"][-1]["lr"], F.GRID_SEED), _record(0.5, 0.8))
    last = F.grid(store, TINY, g)
    assert last["lr"] == nxt["rows"][-1]["lr"] and last["edge"] and F.MAX_EXTEND == 2


def test_claim_3_is_planned_at_the_released_stage_length_without_dropout(tmp_path):
    import deltatune

    runs = F.planned_runs(F.Store(tmp_path), ["3"], [0, 1, 2])
    configs = [r["config"] for r in runs if r["config"] is not None]
    assert configs and all(c["steps"] == 460 for c in configs)
    groups = [g for g in F.CLAIMS["3"].groups if g.method == "dps"]
    assert groups and all(dict(g.options) == {"dropout": "released"} for g in groups)  # 0 below 2,000 steps
    stage = int(460 * deltatune.method_info("dps")["options"]["stage_fraction"])
    assert 23 <= stage <= 80  # as long as the released runs' stages
    assert {g.setting for g in F.CLAIMS["3"].groups} == {"dm-dps", "dm500-dps"}


def test_per_example_scores_are_read_where_their_mean_is_the_score(tmp_path):
    ranks = tmp_path / "r.jsonl"
    ranks.write_text("".join(json.dumps({"index": i, "rank": r}) + "\n" for i, r in enumerate((1, 2, 4))))
    assert F.example_scores(ranks, (1 + 0.5 + 0.25) / 3) == [1.0, 0.5, 0.25]
    labels = tmp_path / "c.jsonl"
    labels.write_text("".join(json.dumps({"reference": a, "prediction": b}) + "\n" for a, b in (("x", "x"), ("x", "y"))))
    assert F.example_scores(labels, 0.5) == [1.0, 0.0]
    assert F.example_scores(labels, 0.9) is None  # no mean of theirs is the score
    assert F.example_scores(tmp_path / "none.jsonl", 0.5) is None
    from deltatune.metrics import sentence_bleu4, smoothed_bleu4
    pairs = (("returns the sum of two numbers", "return the sum of two numbers"), ("open a file", "close the socket"))
    texts = tmp_path / "g.jsonl"
    texts.write_text("".join(json.dumps({"reference": a, "prediction": b}) + "\n" for a, b in pairs))
    bleu = F.example_scores(texts, smoothed_bleu4([a for a, _ in pairs], [b for _, b in pairs]))  # bleu4: its mean
    assert bleu == [float(f"{100 * sentence_bleu4(a, b):.6g}") for a, b in pairs] and bleu[0] > bleu[1] > 0


# ----------------------------------------------------------------------------- bad run files

@pytest.mark.parametrize("damage, words", [
    (lambda r: r["result"].update(value="high"), "result.value must be a number, not str"),
    (lambda r: r.update(result=[1, 2]), "'result' must be an object, not list"),
    (lambda r: r.update(test_scores={"values": [1, "x"]}), "test_scores.values must be a list of numbers"),
    (lambda r: r.update(wall_seconds=None), "wall_seconds must be a number, not null"),
    (lambda r: r.update(config={**r["config"], "seed": 7}), "is not the configuration its name stands for"),
    ("[1, 2]", "a run file holds a JSON object, not list"),
    ("{not json", "not a JSON run file"),
    ("fifo", "not a regular file"),
])
def test_a_bad_run_file_is_one_line_naming_it(tmp_path, claim_t, capsys, damage, words):
    store = F.Store(tmp_path / "out")
    g = claim_t.groups[0]
    config = F.run_config(TINY, g, F.grid_lrs(g)[0], 0)
    path = store.put(config, _record(0.5, 0.5))
    if callable(damage):
        record = json.loads(path.read_text())
        damage(record)
        path.write_text(json.dumps(record))
    elif damage == "fifo":
        path.unlink()
        os.mkfifo(path)  # read naively, this would block for ever
    else:
        path.write_text(damage)
    main = _script().main
    assert main(["--claims", "T", "--render-only", "--out", str(tmp_path / "out"), "--page", str(tmp_path / "p.md")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err and words in err
    assert main(["--claims", "T", "--plan", "--out", str(tmp_path / "out")]) == 2  # the planner reads it too
    assert str(path) in capsys.readouterr().err


# ----------------------------------------------------------------------------- the runs through deltatune.sweep

def test_the_runs_go_through_the_sweep_and_are_the_runs_trained_alone(tmp_path, claim_t):
    """The tiny claim run for real: the lr grid as one grid sweep over lr, the seeds as sweeps of one
    configuration; the run files are those the runner always wrote, and a run equals the same run trained alone."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = F.run_suite(["T"], [0, 1], out=out, work_dir=work, log=lambda _: None)
    store = F.Store(out)
    planned = F.planned_runs(store, ["T"], [0, 1])
    assert not result["failed"] and not result["waiting"] and all(r["done"] for r in planned)
    assert sorted(result["ran"]) == sorted(F.run_key(r["config"]) for r in planned)
    lora = claim_t.groups[0]
    chosen = F.grid(store, TINY, lora)["lr"]
    assert chosen is not None and all(r["config"]["lr"] == chosen for r in planned if r["phase"] == "seed")
    for path, record in store.records():  # checked as every reader checks them; the page's inputs are there
        assert path.name == F.run_key(record["config"]) + ".json"
        assert {"value", "valid_value", "zero_shot_value", "trainable_params", "metric"} <= set(record["result"])
        assert len(record["test_scores"]["values"]) == record["n_test"] == 8 and record["n_train"] == 8
        kept = record["config"]["method"] == "lora" and record["config"]["seed"] == 0
        assert bool(record["adapter_dir"]) == kept
        assert not kept or (Path(record["adapter_dir"]) / "adapter.safetensors").is_file()
    # the grid was one sweep: its trials are the grid's lrs at seed 0, and it scored no chosen test of its own
    grids = [p for p in (work / "sweeps").iterdir() if "-grid-" in p.name]
    assert len(grids) == 1 and (grids[0] / ".deltatune-sweep.json").is_file()
    trials = [json.loads(line) for line in (grids[0] / "trials.jsonl").read_text().splitlines()]
    assert [t["params"]["lr"] for t in trials] == F.grid_lrs(lora) and not (grids[0] / "test").exists()
    assert all(r["seed"] == 0 for t in trials for r in t["runs"])
    # the run folders whose adapter is not kept are gone once their run files are written
    assert not [p for p in work.glob("sweeps/*telly*/trials/*") if p.name.endswith("-s0") or p.name.endswith("-s1")]
    # one run trained alone, as --rescore trains it: the same numbers as its run file from the sweep
    config = F.run_config(TINY, lora, chosen, 1)
    alone = F._train_one(config, tmp_path / "alone", store)
    swept = store.get(config)
    for key in ("value", "valid_value", "zero_shot_value", "trainable_params", "best_step", "steps"):
        assert alone["result"][key] == swept["result"][key], key
    assert alone["test_scores"] == swept["test_scores"]
    # everything has its file: a second call trains nothing
    again = F.run_suite(["T"], [0, 1], out=out, work_dir=work, log=lambda _: None)
    assert again["ran"] == [] and not again["failed"]


def test_an_extension_is_its_own_sweep_at_the_rules_lr(tmp_path, claim_t):
    """The suite's rule (grid()) decides an extension, at its own lr to the last digit; the seeds wait for it."""
    store = F.Store(tmp_path)
    g = claim_t.groups[0]
    low, mid, high = F.grid_lrs(g)
    for lr, valid in ((low, 0.3), (mid, 0.4)):
        store.put(F.run_config(TINY, g, lr, F.GRID_SEED), _record(0.5, valid))
    todo = [r for r in F.planned_runs(store, ["T"], [0, 1]) if not r["done"] and r["config"] is not None]
    assert [[r["config"]["lr"] for r in b] for b in F.batches(todo)] == [[high]]  # the grid's missing point
    store.put(F.run_config(TINY, g, high, F.GRID_SEED), _record(0.5, 0.6))  # the best at the high edge
    todo = [r for r in F.planned_runs(store, ["T"], [0, 1]) if not r["done"] and r["config"] is not None]
    assert [[(r["phase"], r["config"]["lr"]) for r in b] for b in F.batches(todo)] == \
        [[("extension", F.grid(store, TINY, g)["rows"][-1]["lr"])]]
    assert F.batches(todo)[0][0]["config"]["lr"] == float(f"{F.default_lr('lora') * 9:.6g}")



@pytest.mark.slow
def test_on_a_ray_cluster_the_runs_and_their_files_are_the_same(tmp_path, claim_t):
    """The tiny claim on a local Ray cluster of two one-CPU workers (several sweeps in one process, logging with
    print itself) writes the run files it writes here: the same names and the same scores."""
    here = F.run_suite(["T"], [0, 1], out=tmp_path / "here", work_dir=tmp_path / "work-here", log=lambda _: None)
    ray_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"dtrf{os.getpid()}"  # Ray's sockets: a short path
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                           "object_store_memory": 80 * 2**20})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        there = F.run_suite(["T"], [0, 1], out=tmp_path / "there", work_dir=tmp_path / "work-there", log=print,
                            ray=cluster.address)
    finally:
        cluster.shutdown()
        os.environ.pop("RAY_TMPDIR", None)
    assert not there["failed"] and sorted(there["ran"]) == sorted(here["ran"])
    local, remote = F.Store(tmp_path / "here"), F.Store(tmp_path / "there")
    for path, record in remote.records():
        mine = local.get(record["config"])
        for key in ("value", "valid_value", "zero_shot_value", "best_step"):
            assert record["result"][key] == mine["result"][key], (path.name, key)
        assert record["test_scores"] == mine["test_scores"]


def test_every_groups_extra_fields_reach_the_run():
    """A group's extra TrainConfig fields (privacy, recycling, a quantized base) are all in the run it trains:
    none is recorded in the run file's configuration and then left out of the training."""
    from deltatune.training import TrainConfig

    seen = set()
    for claim in F.CLAIMS.values():
        for g in claim.groups:
            fields = F.train_fields(F.run_config(F.SETTINGS[g.setting], g, 1e-3, 0))
            TrainConfig(**fields, lr=1e-3, seed=0)  # every field is one TrainConfig has
            for name, value in g.extra:
                assert fields[name] == value, (g.id, name)
                seen.add(name)
    assert {"dp_epsilon", "recycle", "quantize"} <= seen
