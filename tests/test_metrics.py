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


def test_every_score_names_its_candidate_pool():
    rng = np.random.default_rng(2)
    small = m.retrieval_scores(rng.normal(size=(656, 8)), rng.normal(size=(656, 8)))
    assert small["pool"] == 656 and small["pool_protocol"] == "whole-split"
    big = rng.normal(size=(1200, 8))
    out = m.retrieval_scores(big, big)
    assert out["pool"] == 1000 and out["pool_protocol"] == "1-in-1000"
    whole = m.retrieval_scores(big, big, n_distractors=None)
    assert whole["pool"] == 1200 and whole["pool_protocol"] == "whole-split"
    same = np.ones((1200, 4))  # every candidate ties: rank = pool, so MRR = 1 / pool
    assert m.retrieval_scores(same, same, n_distractors=None)["mrr"] == pytest.approx(1 / 1200)
    assert m.retrieval_scores(same, same, n_distractors=99) == pytest.approx(
        {"mrr": 1 / 100, "recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "pool": 100, "pool_protocol": "1-in-100"})
    assert m.retrieval_scores(np.zeros((0, 4)), np.zeros((0, 4)))["pool"] == 0


def test_identical_queries_are_not_penalised():
    # rows 0 and 1 have the same query (the same text, so the same embedding): code 0 and code 1 both
    # answer it. The query is closest to code 1, then code 0, then code 2.
    codes = np.array([[1.0, 0.2], [1.0, 0.0], [0.0, 1.0]])
    queries = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    plain = m.retrieval_scores(queries, codes)
    assert plain["mrr"] == pytest.approx((1 / 2 + 1 + 1) / 3)  # row 0 loses to its twin's code
    grouped = m.retrieval_scores(queries, codes, groups=["read it", "read it", "write it"])
    assert grouped["mrr"] == 1.0 and grouped["recall@1"] == 1.0
    # a wrong code above both right ones still counts once, against the best right one
    codes2 = np.array([[1.0, 0.3], [1.0, 0.5], [1.0, 0.0]])
    queries2 = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert m.retrieval_scores(queries2, codes2)["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    out = m.retrieval_scores(queries2, codes2, groups=["a", "a", "b"])
    assert out["mrr"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)  # code 2 beats code 0, the best of a's codes
    # the same rule in the sampled 1-in-k protocol: duplicated queries (pairs) all score 1
    rng = np.random.default_rng(3)
    base = rng.normal(size=(300, 16))
    q = np.repeat(base, 2, axis=0)  # rows 2k and 2k+1 share a query
    c = q + 1e-3 * rng.normal(size=q.shape)
    assert m.retrieval_scores(q, c, n_distractors=550)["mrr"] < 0.9  # the twin is drawn 92% of the time
    out = m.retrieval_scores(q, c, n_distractors=550, groups=np.arange(600) // 2)
    assert out["mrr"] == 1.0 and out["pool"] == 551
    with pytest.raises(ValueError, match="groups"):
        m.retrieval_scores(q, c, groups=[0, 1])


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


def test_bleu_tokens_match_codexglue_normalisation():
    # CodeXGLUE's bleu.py runs NIST normalisation after splitting punctuation: "_" is its own token
    assert m.bleu_tokens("Return the module_name.") == ["return", "the", "module", "_", "name", "."]
    assert m.bleu_tokens("__init__") == ["_", "_", "init", "_", "_"]
    # numbers: punctuation is split first, so "3.10" and "3-4" become three tokens each
    assert m.bleu_tokens("Use v3.10, not 3-4!") == ["use", "v3", ".", "10", ",", "not", "3", "-", "4", "!"]
    assert m.bleu_tokens("Don't split: a+b (x/y)") == ["don", "'", "t", "split", ":", "a", "+", "b", "(", "x",
                                                        "/", "y", ")"]
    assert m.bleu_tokens("Écrire les données") == ["écrire", "les", "données"]


def test_bleu_underscore_changes_the_score_by_hand():
    # reference: return the module _ name .  (6 tokens); hypothesis: return module name (3 tokens)
    # unigrams 3/3; bigrams (0+1)/(2+1); trigrams (0+1)/(1+1); 4-grams (0+1)/(0+1);
    # brevity penalty exp(1 - (6 + 1) / (3 + 1)) = exp(-0.75)
    got = m.sentence_bleu4("Return the module_name.", "return module name")
    assert got == pytest.approx((1 * 1 / 3 * 1 / 2 * 1) ** 0.25 * math.exp(-0.75))
    assert 100 * got == pytest.approx(30.18, abs=0.01)  # 37.81 when module_name was one token
    # with the identifier written the same way on both sides, the split costs nothing
    assert m.sentence_bleu4("Set module_name", "set module_name") == pytest.approx(1.0)
    # "module_name" vs "module name": 3 vs 2 tokens; unigrams 2/2, bigrams (0+1)/(1+1),
    # trigrams and 4-grams (0+1)/(0+1); penalty exp(1 - 4/3)
    got = m.sentence_bleu4("module_name", "module name")
    assert got == pytest.approx((1 / 2) ** 0.25 * math.exp(1 - 4 / 3))


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
    assert m.split_subtokens("HTTPServer_v2") == ["http", "server", "v2"]  # digits stay, as in code2seq
    assert m.split_subtokens("__init__") == ["init"]
    assert m.split_subtokens("getURL") == ["get", "url"]
    assert m.split_subtokens("utf_8_decode") == ["utf", "8", "decode"]
    assert m.split_subtokens("get file-name()") == ["get", "file", "name"]  # free text from a model


def test_split_subtokens_keeps_unicode_letters():
    assert m.split_subtokens("écrire_données") == ["écrire", "données"]
    assert m.split_subtokens("lireÉtat") == ["lire", "état"]
    assert m.split_subtokens("größe_ändern") == ["größe", "ändern"]


def test_subtoken_f1_by_hand():
    out = m.subtoken_prf(["get_file_path"], ["getFileName"])
    assert out["subtoken_precision"] == pytest.approx(2 / 3)
    assert out["subtoken_recall"] == pytest.approx(2 / 3)
    assert out["subtoken_f1"] == pytest.approx(2 / 3)
    assert m.subtoken_prf(["get_file_name"], ["getFileName"])["subtoken_f1"] == 1.0


def test_subtokens_that_join_to_the_reference_are_fully_right():
    # code2seq: "getfilename" is one subtoken, but it joins to the same string as get|file|name
    out = m.subtoken_prf(["getFileName", "get_name"], ["getfilename", "name"])
    # example 1: tp 3 (the reference's subtokens); example 2: tp 1 (name), fn 1 (get)
    assert out["subtoken_precision"] == 1.0 and out["subtoken_recall"] == pytest.approx(4 / 5)
    assert m.subtoken_prf(["écrire_données"], ["écriredonnées"])["subtoken_f1"] == 1.0


def test_subtoken_f1_is_micro_averaged():
    # tp = 2, fp = 1, fn = 4 summed over both examples -> P 2/3, R 1/3, F1 4/9
    out = m.subtoken_prf(["get_name", "a_b_c_d"], ["get_name", "x"])
    assert out["subtoken_precision"] == pytest.approx(2 / 3)
    assert out["subtoken_recall"] == pytest.approx(1 / 3)
    assert out["subtoken_f1"] == pytest.approx(4 / 9)


def test_subtokens_count_by_set_membership():
    # code2seq checks each predicted subtoken for membership in the reference (and vice versa),
    # so a repeated subtoken counts each time it is predicted
    out = m.subtoken_prf(["get"], ["get_get"])
    assert out["subtoken_precision"] == 1.0 and out["subtoken_recall"] == 1.0
    # reference a|b|a, prediction a|c: tp 1 (a), fp 1 (c), fn 1 (b; a is in the prediction)
    out = m.subtoken_prf(["a_b_a"], ["a_c"])
    assert out["subtoken_precision"] == 0.5 and out["subtoken_recall"] == 0.5


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
    assert out.pop("pool") == n and out.pop("pool_protocol") == "whole-split"
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
