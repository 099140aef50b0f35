"""Metrics against hand-computed cases, plus property checks that they never crash and stay in range."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from deltatune import metrics as m


# --- retrieval ------------------------------------------------------------------------------

def test_perfect_ranking_has_mrr_one():
    emb = np.random.default_rng(0).normal(size=(50, 16))
    out = m.retrieval_scores(emb, emb)
    assert out["mrr"] == 1.0 and out["recall@1"] == 1.0 and out["recall@5"] == 1.0


def test_hand_computed_ranks():
    codes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # query 0 -> its code is best (rank 1); query 1 is closer to code 0 than to code 1 (rank 2);
    # query 2 is farthest from its own code (rank 3)
    queries = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.0]])
    out = m.retrieval_scores(queries, codes)
    assert out["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@5"] == 1.0


def test_ties_count_against_the_model():
    out = m.retrieval_scores(np.zeros((10, 4)), np.zeros((10, 4)))
    assert out["mrr"] == pytest.approx(1 / 10)  # every query ranked last among 10


def test_large_split_uses_999_seeded_distractors():
    n = 1500
    same = np.ones((n, 8))
    assert m.retrieval_scores(same, same)["mrr"] == pytest.approx(1 / 1000)  # true code + 999 distractors
    rng = np.random.default_rng(1)
    q, c = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    a, b = m.retrieval_scores(q, c), m.retrieval_scores(q, c)
    assert a == b  # distractors drawn with a fixed seed
    assert m.retrieval_scores(q, q)["mrr"] == 1.0


def test_retrieval_accepts_torch_and_checks_shapes():
    t = torch.randn(20, 8, dtype=torch.bfloat16)
    assert m.retrieval_scores(t, t.clone())["mrr"] == 1.0
    with pytest.raises(ValueError):
        m.retrieval_scores(np.zeros((3, 4)), np.zeros((4, 4)))


# --- classification -------------------------------------------------------------------------

def test_accuracy_and_macro_f1_by_hand():
    pred, gold = [0, 1, 1, 0], [0, 1, 0, 0]
    assert m.accuracy(pred, gold) == 0.75
    # class 0: tp 2, fp 0, fn 1 -> F1 4/5; class 1: tp 1, fp 1, fn 0 -> F1 2/3
    assert m.macro_f1(pred, gold) == pytest.approx((0.8 + 2 / 3) / 2)


def test_logits_are_argmaxed():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 0.5]])
    assert m.accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)


# --- generation -----------------------------------------------------------------------------

def test_bleu_identical_is_100():
    assert m.smoothed_bleu4(["Return the value of x."], ["return the value of x ."]) == pytest.approx(100.0)


def test_bleu_hand_computed():
    # unigram 5/6, bigram (3+1)/(5+1), trigram (2+1)/(4+1), 4-gram (1+1)/(3+1); equal lengths -> no penalty
    got = m.smoothed_bleu4(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got == pytest.approx(100 * (5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)
    assert got == pytest.approx(63.894, abs=1e-3)


def test_bleu_brevity_penalty_is_smoothed():
    # all n-gram precisions are 1; penalty exp(1 - (6 + 1) / (4 + 1))
    got = m.sentence_bleu4("a b c d e f", "a b c d")
    assert got == pytest.approx(math.exp(1 - 7 / 5))


def test_bleu_no_overlap_and_empty():
    assert m.sentence_bleu4("open the file", "zzz qqq") < 1e-6
    assert m.sentence_bleu4("open the file", "") == pytest.approx(math.exp(-3))
    assert m.smoothed_bleu4([], []) == 0.0


def test_bleu_averages_sentences():
    refs, hyps = ["a b c d", "a b c d"], ["a b c d", "x y z w"]
    assert m.smoothed_bleu4(refs, hyps) == pytest.approx(50.0, abs=1e-6)


def test_exact_match_strips_whitespace():
    assert m.exact_match(["get_name", "x"], [" get_name\n", "y"]) == 0.5
    with pytest.raises(ValueError):
        m.exact_match(["a"], [])


def test_split_subtokens():
    assert m.split_subtokens("getFileName") == ["get", "file", "name"]
    assert m.split_subtokens("get_file_path") == ["get", "file", "path"]
    assert m.split_subtokens("HTTPServer_v2") == ["http", "server", "v", "2"]
    assert m.split_subtokens("__init__") == ["init"]
    assert m.split_subtokens("getURL") == ["get", "url"]


def test_subtoken_f1_by_hand():
    out = m.subtoken_prf(["get_file_path"], ["getFileName"])
    assert out["subtoken_precision"] == pytest.approx(2 / 3)
    assert out["subtoken_recall"] == pytest.approx(2 / 3)
    assert out["subtoken_f1"] == pytest.approx(2 / 3)
    assert m.subtoken_prf(["get_file_name"], ["getFileName"])["subtoken_f1"] == 1.0


def test_subtoken_f1_is_micro_averaged():
    # tp = 2, fp = 1, fn = 4 summed over both examples -> P 2/3, R 1/3, F1 4/9
    out = m.subtoken_prf(["get_name", "a_b_c_d"], ["get_name", "x"])
    assert out["subtoken_precision"] == pytest.approx(2 / 3)
    assert out["subtoken_recall"] == pytest.approx(1 / 3)
    assert out["subtoken_f1"] == pytest.approx(4 / 9)


def test_subtoken_counts_repeats_as_a_multiset():
    out = m.subtoken_prf(["get"], ["get_get"])
    assert out["subtoken_precision"] == 0.5 and out["subtoken_recall"] == 1.0


# --- properties -----------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(texts, texts), max_size=6))
def test_bleu_and_exact_match_stay_in_range(pairs):
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    assert 0.0 <= m.smoothed_bleu4(refs, hyps) <= 100.0 + 1e-9
    assert 0.0 <= m.exact_match(refs, hyps) <= 1.0
    for r, h in pairs:
        assert m.sentence_bleu4(r, r) == pytest.approx(1.0) or not m.bleu_tokens(r)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(names | texts, names | texts), max_size=6))
def test_subtoken_scores_stay_in_range(pairs):
    out = m.subtoken_prf([r for r, _ in pairs], [h for _, h in pairs])
    assert all(0.0 <= v <= 1.0 for v in out.values())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_retrieval_scores_stay_in_range(n, d, seed):
    rng = np.random.default_rng(seed)
    out = m.retrieval_scores(rng.normal(size=(n, d)), rng.normal(size=(n, d)))
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["recall@1"] <= out["recall@5"] <= out["recall@10"]
    assert out["mrr"] >= 1 / n - 1e-12


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=30))
def test_classification_scores_stay_in_range(pairs):
    pred, gold = [p for p, _ in pairs], [g for _, g in pairs]
    assert 0.0 <= m.accuracy(pred, gold) <= 1.0
    assert 0.0 <= m.macro_f1(pred, gold, 5) <= 1.0
    assert m.accuracy(gold, gold) == 1.0 and m.macro_f1(gold, gold) == 1.0
