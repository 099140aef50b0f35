"""Layer analysis (probes, RSA, CKA, freeze depth) and embedding recycling, on tiny random models."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scipy import stats

import deltatune as dt
from deltatune.analysis import labels as LB
from deltatune.training.freeze import recommend_k
from deltatune.training.recycle import RecycleError
from deltatune.analysis.similarity import linear_cka, per_layer, rsa, standardize, top_dimension_share
from deltatune.errors import ConfigError
from deltatune.models import load_backbone
from deltatune.training import TrainConfig, train
from tests.test_train import losses, write_task


# ------------------------------------------------------------------------------------ labels

CODE = 'def f(x, y=2):\n    if x and y or not x:\n        return [i for i in x if i]\n    s = "é" + str(x)\n    return f(x.a)\n'


def test_token_types_and_enclosing_nodes():
    toks = LB.python_tokens(CODE)
    nodes = LB.enclosing_nodes(CODE, toks)
    got = {(t["text"], t["type"], n[0]) for t, n in zip(toks, nodes)}
    assert ("def", "keyword", "FunctionDef") in got
    assert ("2", "number", "FunctionDef") in got
    assert ('"é"', "string", "BinOp") in got  # offsets past a non-ASCII character stay right
    assert ("+", "operator", "BinOp") in got
    assert ("str", "name", "Call") in got
    assert ("a", "name", "Attribute") in got
    assert ("s", "name", "Assign") in got  # the Name node itself is the token, so its parent encloses it
    assert all(CODE[t["start"]:t["end"]] == t["text"] for t in toks)
    assert {t["type"] for t in toks} == set(LB.TOKEN_TYPES)


def test_cyclomatic_complexity_counts_decisions():
    assert LB.cyclomatic_complexity("def f():\n    return 1\n") == 1
    # if, and/or (2 extra operands), comprehension for + if
    assert LB.cyclomatic_complexity(CODE) == 6
    assert LB.complexity_bucket(6) == ">5" and LB.complexity_bucket(3) == "3"
    assert LB.cyclomatic_complexity("def f(:\n") is None


# ------------------------------------------------------------------------------------ similarity


def test_rsa_and_cka_match_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert rsa(x, x)["pearson"] == pytest.approx(1.0) and rsa(x, x)["spearman"] == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # invariant to rotation and isotropic scale
    assert rsa(x, 2.0 * x @ q)["pearson"] == pytest.approx(1.0)  # cosine similarity is too
    y = x + rng.normal(scale=1.0, size=x.shape)
    xs = x / np.linalg.norm(x, axis=1, keepdims=True)
    ys = y / np.linalg.norm(y, axis=1, keepdims=True)
    iu = np.triu_indices(40, k=1)
    a, b = (xs @ xs.T)[iu], (ys @ ys.T)[iu]
    r = rsa(x, y)
    assert r["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert r["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic)
    z = rng.normal(size=(40, 8))
    assert linear_cka(x, z) < 0.5 and abs(rsa(x, z)["spearman"]) < 0.3


def test_a_rogue_dimension_decides_plain_rsa_and_standardising_removes_it():
    """One huge dimension varying alike in both models (SmolLM2 has one from block 12 on) makes the plain RSA
    and CKA of two otherwise unrelated representations near 1; z-scoring each dimension first gives the
    rest their say."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16))
    y = rng.normal(size=(60, 16))  # unrelated to x
    rogue = 1000.0 * np.exp(rng.normal(size=60))  # the same values in both models
    xr, yr = x.copy(), y.copy()
    xr[:, 0], yr[:, 0] = rogue, rogue
    scores = per_layer([x, xr], [y, yr])
    assert abs(scores["rsa_spearman"][0]) < 0.2 and scores["rsa_spearman"][1] > 0.9  # the rogue dimension's doing
    assert scores["cka"][1] > 0.99  # linear CKA too: the variance is all in that dimension
    assert abs(scores["rsa_spearman_std"][1]) < 0.3  # standardised: the unrelated rest decides again
    assert standardize(xr).std(0) == pytest.approx(np.ones(16))
    assert top_dimension_share(xr) > 0.99 and top_dimension_share(x) < 0.5
    assert top_dimension_share(np.eye(4)) == pytest.approx(1.0)


def test_recommend_k_is_the_deepest_run_above_the_threshold():
    assert recommend_k([1.0, 0.99, 0.95, 0.5, 0.99], 0.9) == 2
    assert recommend_k([1.0, 0.5, 0.99, 0.99], 0.9) == 0
    assert recommend_k([1.0] * 13, 0.9) == 11  # at most L-1: one block is still trained
    assert recommend_k([1.0, float("nan"), 1.0], 0.9) == 0


# ------------------------------------------------------------------------------------ analyze


def test_analyze_cli_writes_json_plots_and_html(tmp_path, capsys):
    from deltatune.cli import main

    out = tmp_path / "an"
    task = write_task(tmp_path / "retrieval", "retrieval")  # the fine-tunes' data; probing reads the stdlib corpus
    rc = main(["analyze", "--model", "tiny-bert", "--task", task, "--functions", "24,12,16", "--samples", "16",
               "--search-samples", "64", "--finetune", "full,lora",
               "--finetune-steps", "2", "--max-len", "48", "--batch-size", "8", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "analysis.json").read_text())
    probing = result["probing"]
    assert set(probing) == {"lexical", "syntactic", "syntactic-depth", "structural", "semantic"}
    for prop, r in probing.items():
        assert len(r["score"]) == 3  # embeddings + 2 blocks
        assert all(0.0 <= v <= 1.0 for v in r["score"]) and 0.0 < r["baseline"] < 1.0, prop
    assert probing["lexical"]["classes"] == sorted(LB.TOKEN_TYPES)
    assert math.isclose(sum(probing["lexical"]["weighted"]["layer_weights"]), 1.0, rel_tol=1e-5)
    models = result["similarity"]["models"]
    assert set(models) == {"full (2 steps)", "lora (2 steps)"}
    assert models["lora (2 steps)"]["rsa_spearman"][0] == pytest.approx(1.0)  # lora leaves the embeddings alone
    assert models["full (2 steps)"]["rsa_spearman"][0] > 0.99  # two small steps barely move them
    for r in models.values():
        assert all(-1.0 <= v <= 1.0 + 1e-9 for v in r["cka"] + r["rsa_pearson"])
    assert result["freeze"]["k"] in (0, 1) and "K = the deepest k" in result["freeze"]["rule"]
    for name in ("probing.png", "similarity.png", "analysis.html"):
        assert (out / name).stat().st_size > 1000
    assert "Recommended freeze depth" in (out / "analysis.html").read_text()
    assert "recommended freeze depth K" in capsys.readouterr().out


def test_analyze_compares_a_trained_adapter(tmp_path):
    from deltatune.analysis import analyze

    task = write_task(tmp_path / "retrieval", "retrieval")
    train(TrainConfig(model="tiny-bert", task=task, method="lora", max_steps=2, batch_size=8, eval_every=2, lr=1e-2,
                      max_len=32, out_dir=str(tmp_path / "lora"), progress=False))
    result = analyze("tiny-bert", task, [str(tmp_path / "lora")], probing=False, finetune_steps=0, samples=16,
                     max_len=32, progress=False)
    (name, r), = result["similarity"]["models"].items()
    assert r["method"] == "lora" and len(r["cka"]) == 3
    with pytest.raises(ConfigError, match="trained on model 'tiny-bert'"):
        analyze("tiny-llama", task, [str(tmp_path / "lora")], probing=False, finetune_steps=0, samples=16, progress=False)


# ------------------------------------------------------------------------------------ telly k=auto


def test_telly_k_auto_is_resolved_by_train_and_refused_by_attach(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    model, _ = load_backbone("tiny-bert", "base")
    with pytest.raises(ConfigError, match="k=auto"):
        dt.attach(model, "telly", k="auto")
    with pytest.raises(ConfigError, match="whole number >= 0 or 'auto'"):
        dt.attach(model, "telly", k="half")
    task = write_task(tmp_path / "retrieval", "retrieval")
    cfg = dict(model="tiny-bert", task=task, method="telly", options={"k": "auto"}, max_steps=2, batch_size=8,
               eval_every=2, lr=1e-2, max_len=32, progress=False)
    summary = train(TrainConfig(**cfg, out_dir=str(tmp_path / "a")))
    assert summary["options"]["k"] in (0, 1)
    assert "telly k=auto: K=" in capsys.readouterr().err
    train(TrainConfig(**cfg, out_dir=str(tmp_path / "b")))
    assert "cached analysis" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ recycling


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "recycle"


def _run(tmp_path, task, name, **over):
    cfg = dict(model="tiny-bert", task=task, method="telly", options={"k": 1}, max_steps=4, batch_size=8, eval_every=2,
               lr=1e-2, max_len=32, out_dir=str(tmp_path / name), progress=False)
    return train(TrainConfig(**{**cfg, **over}))


@pytest.mark.parametrize("kind, method, options", [("retrieval", "telly", {"k": 1}),
                                                   ("classification", "lora", {"layers": [1]})])
def test_recycling_gives_the_uncached_results_in_fp32(tmp_path, cache, kind, method, options):
    task = write_task(tmp_path / kind, kind)
    a = _run(tmp_path, task, "plain", method=method, options=options)
    b = _run(tmp_path, task, "recycled", method=method, options=options, recycle=True)
    assert len(list(cache.glob("*.safetensors"))) == 3  # train, valid, test
    assert b["value"] == a["value"] and b["valid_value"] == a["valid_value"] and b["best_step"] == a["best_step"]
    # the cached states are the uncached ones bit for bit; only the order of float sums in batches of
    # another padding width may differ
    np.testing.assert_allclose(losses(tmp_path / "recycled"), losses(tmp_path / "plain"), rtol=1e-5)
    wa, wb = load_file(tmp_path / "plain" / "best" / "adapter.safetensors"), load_file(tmp_path / "recycled" / "best" / "adapter.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        # atol: the attention key bias has a zero gradient in exact arithmetic (softmax ignores a constant
        # per query), so Adam (lr 1e-2) turns float noise into ~1e-5 steps in both runs alike
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-4)


def test_recycling_cache_is_reused_and_invalidated(tmp_path, cache):
    task = write_task(tmp_path / "retrieval", "retrieval", n_train=24, n_eval=8)
    _run(tmp_path, task, "r1", recycle=True, max_steps=2)
    first = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    _run(tmp_path, task, "r2", recycle=True, max_steps=2, seed=1)  # another seed: same frozen part, same data
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == first
    _run(tmp_path, task, "r3", recycle=True, max_steps=2, max_len=16)  # max_len
    _run(tmp_path, task, "r4", recycle=True, max_steps=2, method="lora", options={"layers": [1]})  # K=1 again: reused
    assert len(list(cache.glob("*.safetensors"))) == 6
    other = write_task(tmp_path / "other", "retrieval", n_train=20, n_eval=8)  # data
    _run(tmp_path, other, "r6", recycle=True, max_steps=2)
    assert len(list(cache.glob("*.safetensors"))) == 9
    _run(tmp_path, task, "r7", recycle=True, max_steps=2, recycle_dtype="float16")
    half = sorted(cache.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)[-3:]
    full = [p for p in cache.glob("*.safetensors") if p.name in first]
    assert len(list(cache.glob("*.safetensors"))) == 12
    with safe_open(str(half[0]), framework="pt") as f:  # a plain safetensors file
        assert f.get_tensor("hidden").dtype == torch.float16 and f.get_tensor("offsets").dtype == torch.int64
    assert sum(p.stat().st_size for p in half) < 0.6 * sum(p.stat().st_size for p in full)


def test_recycling_cache_follows_the_frozen_depth(tmp_path, cache):
    from transformers import BertConfig, BertModel

    _, tokenizer = load_backbone("tiny-bert", "base")
    torch.manual_seed(0)
    folder = tmp_path / "bert3"  # three blocks, so that K can be 1 or 2
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    task = write_task(tmp_path / "retrieval", "retrieval", n_train=24, n_eval=8)
    _run(tmp_path, task, "k1", model=str(folder), recycle=True, max_steps=2)
    _run(tmp_path, task, "k2", model=str(folder), recycle=True, max_steps=2, options={"k": 2})
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 6 and {safe_open(str(p), "pt").metadata()["k"] for p in files} == {"1", "2"}


def test_recycling_refuses_what_it_cannot_cache(tmp_path, cache):
    task = write_task(tmp_path / "retrieval", "retrieval", n_train=16, n_eval=8)
    with pytest.raises(RecycleError, match="trains the embeddings or block 0"):
        _run(tmp_path, task, "lora", method="lora", options={}, recycle=True)
    with pytest.raises(RecycleError, match="trains the embeddings or block 0"):
        _run(tmp_path, task, "telly0", options={"k": 0}, recycle=True)
    with pytest.raises(RecycleError, match="adds tokens to the input"):
        _run(tmp_path, task, "prompt", method="prompt", options={"init": "random"}, recycle=True)
    gen = write_task(tmp_path / "generation", "generation", n_train=16, n_eval=8)
    with pytest.raises(RecycleError, match="generation"):
        _run(tmp_path, gen, "gen", model="tiny-llama", recycle=True)
    with pytest.raises(ConfigError, match="recycle_dtype"):
        _run(tmp_path, task, "dtype", recycle=True, recycle_dtype="int8")


def test_recycling_benchmark_script_runs_on_a_tiny_model(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import recycle as bench_recycle

    task = write_task(tmp_path / "retrieval", "retrieval", n_train=24, n_eval=8)
    assert bench_recycle.main(["--model", "tiny-bert", "--task", task, "--max-train", "24", "--batch-size", "8",
                               "--max-len", "32", "--configs", "telly-half,full", "--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())
    telly, full = rows
    assert telly["steps_per_epoch"] == 3 and telly["cache_mb"] > 0 and telly["recycled_epoch_s"] > 0
    assert "vs_full_with_build" in telly and "epoch_s" in full
    assert "| telly-half" in (tmp_path / "b" / "results.md").read_text()


def test_an_unknown_freeze_score_is_refused_before_any_work(tmp_path):
    from deltatune.analysis import analyze

    with pytest.raises(ConfigError, match="rsa_spearman_std"):
        analyze("tiny-bert", "no-such-task", score="spearman", out_dir=tmp_path / "an")
    assert not (tmp_path / "an").exists()
