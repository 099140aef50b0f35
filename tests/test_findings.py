"""`deltatune findings`: run keys, resuming, parts, the learning-rate choice and the page."""
from __future__ import annotations

import json

import pytest

import deltatune.findings as F
from deltatune.errors import ConfigError
from deltatune.findings import page as P

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


def _record(value, valid, *, trainable=100, total=10_000, metric="mrr"):
    return {"result": {"metric": metric, "value": value, "valid_value": valid, "trainable_params": trainable,
                       "total_params": total, "step_seconds_median": 0.5, "best_step": 1, "pool": 8},
            "wall_seconds": 3.0, "other_load": 0.0, "machine": {"cpu": "test cpu", "cores": 2, "ram_gb": 1.0},
            "finished": "2026-01-01 00:00 UTC"}


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
        F._parse_part("0/2")


def test_lr_is_chosen_on_validation_not_test(tmp_path, claim_t):
    store = F.Store(tmp_path)
    g = claim_t.groups[0]
    low, mid, high = F.grid_lrs(g)
    # validation prefers the highest lr, test the lowest: the choice must follow validation
    for lr, valid, test in ((low, 0.30, 0.90), (mid, 0.40, 0.50), (high, 0.60, 0.10)):
        store.put(F.run_config(TINY, g, lr, F.GRID_SEED), _record(test, valid))
    chosen, rows = F.choose_lr(store, TINY, g)
    assert chosen == high and [r["valid"] for r in rows] == [0.30, 0.40, 0.60]
    runs = F.planned_runs(store, ["T"], [0, 1, 2])
    seed_runs = [r for r in runs if r["phase"] == "seed"]
    assert seed_runs and all(r["config"]["lr"] == high for r in seed_runs)  # the borrowing group's too
    assert not any(r["phase"] == "seed" and r["config"]["seed"] == 0 and r["group"] is g for r in runs)
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
    assert "mrr 0.6000 ± 0.1000" in text  # lora: 0.5, 0.6, 0.7 (sample std)
    assert "| tiny | lora | 3/3 |" in text and "| tiny | telly K=1 | 1/3 |" in text
    assert "mrr 0.4000 |" in text  # one seed: no std
    assert "Missing runs (2)" in text and "telly K=1 [tiny] lr 0.002 seed 1" in text
    assert "0.002: 0.9000" in text  # the grid's validation scores, the chosen lr
    assert "test cpu, 2 cores" in text
    assert P.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(1.5275252, rel=1e-6))


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
    again = F.run_suite(["R"], [0, 1], out=out, work_dir=work, log=lambda _: None)
    assert again["ran"] == [] and sorted(again["skipped"]) == sorted(f[:-5] for f in files)
    (out / "runs" / files[0]).unlink()
    third = F.run_suite(["R"], [0, 1], out=out, work_dir=work, log=lambda _: None)
    assert third["ran"] == [files[0][:-5]]


def test_cli_plan_and_bad_flags(capsys):
    from deltatune.cli import main

    assert main(["findings", "--claims", "5", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "compacter++" in out and "to do" in out
    assert main(["findings", "--claims", "9", "--plan"]) == 2
    assert "the claims are" in capsys.readouterr().err


def test_page_reads_the_layer_analysis(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "ORDER", ["2"])
    store = F.Store(tmp_path / "out")
    probe_cfg, rsa_cfg = [{"schema": F.SCHEMA, **e} for e in F.CLAIMS["2"].extra_runs[:2]]
    scores = {"lexical": [.5, .9, .8, .7, .6, .5, .4], "syntactic": [.3, .4, .6, .5, .4, .3, .3],
              "structural": [.3, .4, .4, .5, .4, .3, .6]}  # structural peaks at the top, lexical low: the paper's order
    probing = {k: {"metric": "accuracy", "score": v, "baseline": .2, "peak_layer": v.index(max(v))} for k, v in scores.items()}
    settings = {"n_train": 6, "n_valid": 2, "n_test": 3, "search_samples": 5}
    store.put(probe_cfg, {"result": {"model": "minilm", "blocks": 6, "settings": settings, "probing": probing},
                          "adapters": [], "wall_seconds": 60.0})
    rsa = [1, .99, .6, .97, .95, .8, .9]  # least similar: hidden states 2 and 5, not the top two
    store.put(rsa_cfg, {"result": {"model": "minilm", "blocks": 6, "similarity": {"samples": 9, "split": "valid", "models": {
        "full": {"rsa_spearman": rsa, "rsa_pearson": rsa, "cka": rsa}}}}, "adapters": [], "wall_seconds": 30.0})
    P.render(["2"], [0, 1, 2], out=tmp_path / "out", page=tmp_path / "p.md")
    text = (tmp_path / "p.md").read_text()
    assert "lexical 1, syntactic 2, structural 6" in text and "as the paper found" in text
    assert "the two least similar hidden states are [2, 5] of 0..6 (not the top two)" in text
    assert "some differ from the paper" in text
    assert (tmp_path / "out" / "probing-minilm.png").is_file() and (tmp_path / "out" / "rsa-minilm.png").is_file()


def test_a_comparison_where_nothing_beats_the_untrained_model_says_so():
    from deltatune.findings.page import _unlearned
    at_chance = {"mean": 0.505, "zero_shot": 0.524, "metric": "accuracy"}
    learned = {"mean": 0.62, "zero_shot": 0.524, "metric": "accuracy"}
    assert "not learned" in _unlearned(at_chance, dict(at_chance, mean=0.50))
    assert _unlearned(at_chance, learned) == ""
