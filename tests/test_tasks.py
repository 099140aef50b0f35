"""The stdlib code tasks (splits, dedup, balance, bugs, masking, cache) and the user-data loaders."""

import ast
import json
import random
import re
import sys
from collections import Counter

import numpy as np
import pytest

from deltatune.errors import DataError, DeltatuneError
from deltatune.tasks import TASKS, TaskData, load_task
from deltatune.tasks import code

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def corpus():
    return code.load_corpus()


@pytest.fixture(scope="module")
def tasks():
    return {name: load_task(name) for name in TASKS}


def rows_of(data: TaskData):
    return [(split, r) for split in SPLITS for r in data.split(split)]


# --- the stdlib tasks -----------------------------------------------------------------------

def test_every_task_has_a_builder_and_a_sane_shape(tasks):
    assert set(TASKS) == set(code._BUILDERS) | {"code-generation"}  # code-generation: tasks/codegen.py
    kinds = {"code-search": "retrieval", "code-summarization": "generation", "function-naming": "generation",
             "code-generation": "generation",
             "docstring-match": "classification", "exception-type": "classification", "bug-detect": "classification"}
    for name, data in tasks.items():
        assert data.kind == kinds[name] and data.name == name
        assert len(data.train) > 5 * len(data.test) > 0 and len(data.valid) > 0
        fields = {"retrieval": {"query", "code"}, "classification": {"text", "label"},
                  "generation": {"prompt", "target"}}[data.kind]
        for _, r in rows_of(data):
            assert fields <= set(r)
            if data.kind == "classification":
                assert 0 <= r["label"] < len(data.labels)
    assert len(tasks["code-search"].train) > 3000


def test_splits_are_disjoint_by_file(tasks):
    for data in tasks.values():
        paths = {s: {r["path"] for r in data.split(s)} for s in SPLITS}
        assert not paths["train"] & paths["valid"] and not paths["train"] & paths["test"]
        assert not paths["valid"] & paths["test"]
        for split, r in rows_of(data):
            assert code.split_of(r["path"]) == split
            assert not re.search(r"(^|/)(test|tests|idlelib|site-packages)/", r["path"])


def test_split_rule_is_about_80_10_10():
    counts = Counter(code.split_of(f"pkg/mod{i}.py") for i in range(5000))
    assert 0.77 < counts["train"] / 5000 < 0.83 and 0.08 < counts["valid"] / 5000 < 0.12


def test_builds_are_deterministic_and_match_the_cache(corpus, tasks):
    import dataclasses
    for name in ("docstring-match", "exception-type", "function-naming"):
        fresh = dataclasses.asdict(code._BUILDERS[name](corpus))
        again = dataclasses.asdict(code._BUILDERS[name](corpus))
        assert fresh == again
        cached = dataclasses.asdict(tasks[name])
        fresh["metrics"] = tuple(fresh["metrics"])
        assert cached == fresh
    assert load_task("bug-detect").test == tasks["bug-detect"].test


def test_code_is_deduplicated_and_bounded(tasks):
    search = tasks["code-search"]
    codes = [r["code"] for _, r in rows_of(search)]
    assert len(codes) == len(set(codes))
    for c in codes:
        assert c.count("\n") <= code.MAX_LINES and len(c) <= code.MAX_CHARS
    pairs = [(r["text"], r["label"]) for _, r in rows_of(tasks["exception-type"])]
    assert len(pairs) == len(set(pairs))


def test_near_duplicates_match_pairwise_jaccard():
    # random identifier sets with planted near-copies, checked against every pair
    rng = random.Random(0)
    vocab = [f"v{i}" for i in range(40)] + ["self", "x"] * 10
    functions = []
    for i in range(300):
        if functions and rng.random() < 0.3:  # a near-copy of an earlier function: drop or add an identifier
            ids = set(rng.choice(functions)["ids"])
            ids.symmetric_difference_update({rng.choice(vocab)})
        else:
            ids = set(rng.sample(vocab, rng.randint(1, 12)))
        functions.append({"path": f"m{i}.py", "ids": sorted(ids or {"x"})})
    rank = [code.SPLITS.index(code.split_of(f["path"])) for f in functions]
    expected = {}
    for i, a in enumerate(functions):
        best = None
        for j, b in enumerate(functions):
            if rank[j] < rank[i]:
                A, B = set(a["ids"]), set(b["ids"])
                jac = len(A & B) / len(A | B)
                if jac >= 0.8 and (best is None or jac > best[0]):
                    best = (jac, j)
        if best:
            expected[i] = best[1]
    found = code.near_duplicates(functions)
    assert found == expected and len(found) > 10
    assert all(rank[j] < rank[i] for i, j in found.items())


def test_near_duplicates_do_not_cross_the_splits(tasks, corpus):
    functions = corpus["functions"]
    ids = {(f["path"], f["line"]): set(f["ids"]) for f in functions}
    lzma = {f["name"]: f for f in functions if f["path"] == "lzma.py"}
    bz2 = {f["name"]: f for f in functions if f["path"] == "bz2.py"}
    assert code.split_of("lzma.py") == "test" and code.split_of("bz2.py") == "train"
    a, b = set(lzma["close"]["ids"]), set(bz2["close"]["ids"])
    assert len(a & b) / len(a | b) >= 0.8  # the review's example: lzma.close is a near-copy of bz2.close
    dropped = {(functions[i]["path"], functions[i]["line"]) for i in code.near_duplicates(functions)}
    assert (lzma["close"]["path"], lzma["close"]["line"]) in dropped
    train_codes = {f["code"] for f in functions if code.split_of(f["path"]) == "train"}
    for name, data in tasks.items():
        for split in ("valid", "test"):
            for r in data.split(split):
                assert (r["path"], r["line"]) not in dropped, (name, r["path"], r["name"])
                assert ids[(r["path"], r["line"])]  # every record carries its identifier set
        assert not [r for r in data.test if (r["path"], r["name"]) == ("lzma.py", "close")], name
        if name in ("code-search", "code-summarization"):
            field = "code" if name == "code-search" else "prompt"
            assert not train_codes & {r[field] for s in ("valid", "test") for r in data.split(s)}
        card = data.card()
        assert "near-duplicates across splits dropped" in card and "Jaccard >= 0.8" in card


def test_queries_seen_in_an_earlier_split_are_dropped(tasks):
    for name, field in (("code-search", "query"), ("code-summarization", "target")):
        data = tasks[name]
        key = {s: {" ".join(r[field].lower().split()) for r in data.split(s)} for s in SPLITS}
        assert not key["train"] & key["valid"] and not key["train"] & key["test"] and not key["valid"] & key["test"]
        assert re.search(r"summary \(case and spacing ignored\) is a summary in an earlier split is dropped: "
                         r"valid \d+, test \d+", data.card())


def test_identical_queries_in_a_split_count_all_their_codes(tasks):
    data = tasks["code-search"]
    queries = [r["query"] for r in data.test]
    repeated = len(queries) - len(set(queries))
    assert repeated > 0  # the stdlib has them ("Return the ..." summaries shared by several functions)
    # a model that embeds each query text and each code as the same vector: codes of an identical
    # query tie exactly, so only the group rule can give it a perfect score
    vec = {q: v for q, v in zip(sorted(set(queries)), np.random.default_rng(0).normal(size=(len(set(queries)), 16)))}
    emb = np.stack([vec[q] for q in queries])
    out = data.score((emb, emb))
    assert out["mrr"] == 1.0 and out["recall@1"] == 1.0
    assert out["pool"] == len(data.test) and out["pool_protocol"] == "whole-split"
    assert f"test {len(data.test)} candidates" in data.card()


def test_retrieval_pool_is_1_in_1000_on_a_large_split():
    rows = [{"query": f"query {i}", "code": f"code {i}"} for i in range(1200)]
    data = TaskData("big", "retrieval", "mrr", None, rows[:10], rows[:10], rows, metrics=("mrr",))
    emb = np.random.default_rng(0).normal(size=(1200, 8))
    out = data.score((emb, emb))
    assert out["pool"] == 1000 and out["pool_protocol"] == "1-in-1000" and out["mrr"] == 1.0
    assert "test 1000 candidates" in data.card()
    data.retrieval_pool = None
    assert data.score((emb, emb))["pool"] == 1200 and "test 1200 candidates" in data.card()
    data.retrieval_pool = 1
    with pytest.raises(DataError, match="retrieval_pool"):
        data.score((emb, emb))


def test_cache_key_carries_the_tasks_version(monkeypatch):
    before = code.cache_file("code-search")
    assert f"-v{code.TASKS_VERSION}-" in before.name and code.TASKS_VERSION >= 2
    monkeypatch.setattr(code, "TASKS_VERSION", code.TASKS_VERSION + 1)
    assert code.cache_file("code-search") != before


def test_code_keeps_the_def_and_drops_the_docstring(tasks, corpus):
    for _, r in rows_of(tasks["code-search"]):
        assert r["code"].startswith(("def ", "async def "))
        fn = ast.parse(r["code"]).body[0]  # dedented: parses on its own
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name == r["name"]
        assert len(r["query"].split()) >= 3
        doc = ast.get_docstring(fn) or ""
        assert r["query"] not in doc  # the docstring is gone


def test_docstring_match_is_balanced_and_negatives_are_wrong(tasks, corpus):
    data = tasks["docstring-match"]
    assert data.labels == ["mismatch", "match"]
    true_doc = {(f["path"], f["line"]): f["doc"] for f in corpus["functions"]}
    for split in SPLITS:
        rows = data.split(split)
        counts = Counter(r["label"] for r in rows)
        assert abs(counts[0] - counts[1]) <= 1
        for r in rows:
            assert (r["text"] == true_doc[(r["path"], r["line"])]) == (r["label"] == 1)


def test_bug_detect_is_balanced_and_bugs_are_real(tasks, corpus):
    data = tasks["bug-detect"]
    assert data.labels == ["correct", "buggy"]
    original = {(f["path"], f["line"]): f["code"] for f in corpus["functions"]}
    for split in SPLITS:
        counts = Counter(r["label"] for r in data.split(split))
        assert abs(counts[0] - counts[1]) <= 1
    rows = [r for _, r in rows_of(data)]
    assert Counter(r["bug"] for r in rows).keys() == {"", *code.BUG_KINDS}
    for r in random.Random(0).sample(rows, 600):  # a sample keeps this test fast; the rules are per row
        tree = ast.parse(r["text"])  # still parses
        assert ast.unparse(tree) + "\n" == r["text"]  # both classes in ast.unparse form: no formatting tell
        clean = ast.unparse(ast.parse(original[(r["path"], r["line"])])) + "\n"
        assert (r["text"] != clean) == (r["label"] == 1)


def test_each_bug_kind_on_a_small_function():
    src = "def f(a, b):\n    c = a - b\n    if a < b:\n        return c * a\n    return b\n"
    seen = set()
    for seed in range(60):
        buggy, kind = code.inject_bug(src, random.Random(seed))
        assert buggy != ast.unparse(ast.parse(src)) + "\n"
        ast.parse(buggy)
        seen.add(kind)
    assert seen == set(code.BUG_KINDS)
    assert code.inject_bug("def f():\n    return 1\n", random.Random(0)) is None  # nothing to break


def test_exception_types_never_leak_into_the_prompt(tasks):
    data = tasks["exception-type"]
    assert 2 <= len(data.labels) <= code.N_EXCEPTION_TYPES
    train_types = Counter(data.labels[r["label"]] for r in data.train)
    assert set(train_types) == set(data.labels)  # classes come from train
    for _, r in rows_of(data):
        answer = data.labels[r["label"]]
        assert r["answer"] == answer and code.HOLE in r["text"]
        assert not re.search(rf"(?<![\w.]){re.escape(answer)}(?!\w)", r["text"])
        fn = ast.parse(r["text"]).body[0]  # __HOLE__ is an identifier: the prompt still parses
        holes = [h for h in ast.walk(fn) if isinstance(h, ast.ExceptHandler) and isinstance(h.type, ast.Name)
                 and h.type.id == code.HOLE]
        assert holes


def test_function_naming_masks_every_mention(tasks):
    data = tasks["function-naming"]
    for _, r in rows_of(data):
        assert re.match(r"(async )?def __NAME__\s*\(", r["prompt"])
        assert not re.search(rf"(?<!\w){re.escape(r['target'])}(?!\w)", r["prompt"])
        assert not (r["target"].startswith("__") and r["target"].endswith("__"))


def test_scores_for_perfect_predictions(tasks):
    search = tasks["code-search"]
    emb = np.random.default_rng(0).normal(size=(len(search.test), 32))
    assert search.score((emb, emb))["mrr"] == 1.0
    for name in ("docstring-match", "bug-detect", "exception-type"):
        data = tasks[name]
        out = data.score([r["label"] for r in data.test])
        assert out["accuracy"] == 1.0 and out["macro_f1"] == 1.0
    summ = tasks["code-summarization"]
    out = summ.score([r["target"] for r in summ.test])
    assert out["bleu4"] == pytest.approx(100.0) and out["exact_match"] == 1.0
    naming = tasks["function-naming"]
    out = naming.score([r["target"] for r in naming.valid], split="valid")
    assert out["exact_match"] == 1.0 and out["subtoken_f1"] == 1.0
    with pytest.raises(DataError, match="predictions"):
        naming.score(["x"])


def test_cards_report_counts_and_rules(tasks):
    for name, data in tasks.items():
        card = data.card()
        for split in SPLITS:
            assert re.search(rf"^{split}\s+{len(data.split(split))}\s", card, re.M), (name, split)
        assert "CPython" in card and "split by module" in card and "2000 chars" in card
        if data.kind == "classification":
            assert "label balance" in card


def test_subsampling_is_seeded(tasks):
    a = load_task("code-search", seed=1, max_train=50, max_eval=20)
    b = load_task("code-search", seed=1, max_train=50, max_eval=20)
    c = load_task("code-search", seed=2, max_train=50, max_eval=20)
    assert (len(a.train), len(a.valid), len(a.test)) == (50, 20, 20)
    assert a.train == b.train and a.test == b.test and a.train != c.train
    full = tasks["code-search"].train
    assert all(r in full for r in a.train)
    assert len(tasks["code-search"].train) == len(full)  # the cached copy was not touched


# --- extraction and cache on a fake stdlib --------------------------------------------------

FAKE = {
    "mod.py": '''
class Box:
    def get_item(self, key, default=None):
        """Return the item stored under key."""
        try:
            return self._items[key]
        except KeyError:
            return default

    def only_doc(self):
        """This one has nothing but a docstring."""

def outer(x):
    """Compute something from x quickly."""
    def inner(y):
        """Add one to the value."""
        return y + 1
    return inner(x) * 2
''',
    "long.py": "def big():\n    \"\"\"A very long function body.\"\"\"\n" + "    x = 1\n" * 70,
    "broken.py": "def oops(:\n",
    "latin.py": "# -*- coding: latin-1 -*-\ndef caf\xe9():\n    \"\"\"Return the caf\xe9 name.\"\"\"\n    return 1\n",
    "test/test_mod.py": 'def test_x():\n    """Should be skipped entirely."""\n    return 1\n',
    "pkg/tests/t.py": 'def t():\n    """Should be skipped too."""\n    return 1\n',
    "idlelib/i.py": 'def i():\n    """Should be skipped too."""\n    return 1\n',
    "site-packages/s.py": 'def s():\n    """Should be skipped too."""\n    return 1\n',
}


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    for rel, text in FAKE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("latin-1" if rel == "latin.py" else "utf-8"))
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    code.load_corpus.cache_clear()
    yield root
    code.load_corpus.cache_clear()


def test_extraction_rules(fake_stdlib):
    corpus = code.extract_corpus(fake_stdlib)
    assert corpus["unparsable"] == ["broken.py"]
    by_name = {f["name"]: f for f in corpus["functions"]}
    assert set(by_name) == {"get_item", "outer", "inner", "café"}
    item = by_name["get_item"]
    assert item["code"] == ("def get_item(self, key, default=None):\n    try:\n        return self._items[key]\n"
                            "    except KeyError:\n        return default\n")
    assert item["doc"] == "Return the item stored under key."
    assert item["excepts"] == [["KeyError", item["code"].replace("KeyError", code.HOLE)]]
    assert "def inner" in by_name["outer"]["code"] and by_name["inner"]["code"].startswith("def inner(y):")


def test_corpus_cache_is_written_atomically_and_reused(fake_stdlib, monkeypatch):
    first = code.load_corpus(str(fake_stdlib))
    cache = code.cache_file("corpus", fake_stdlib)
    assert cache.is_file() and [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp files left
    assert f"py{sys.version.split()[0]}" in cache.name
    code.load_corpus.cache_clear()
    monkeypatch.setattr(code, "extract_corpus", lambda root: pytest.fail("cache not used"))
    assert code.load_corpus(str(fake_stdlib)) == first
    cache.write_text("{not json", encoding="utf-8")  # a corrupt cache is rebuilt, not fatal
    code.load_corpus.cache_clear()
    monkeypatch.setattr(code, "extract_corpus", lambda root: {"rebuilt": True})
    assert code.load_corpus(str(fake_stdlib))["rebuilt"] is True


# --- user data ------------------------------------------------------------------------------

def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_string_labels_are_sorted_and_split_80_10_10(tmp_path):
    rows = [{"text": f"example {i}", "label": ["pos", "neg", "mid"][i % 3]} for i in range(100)]
    data = load_task(jsonl(tmp_path / "d.jsonl", rows))
    assert data.kind == "classification" and data.metric == "accuracy"
    assert data.labels == ["mid", "neg", "pos"]
    assert (len(data.train), len(data.valid), len(data.test)) == (80, 10, 10)
    texts = [r["text"] for s in SPLITS for r in data.split(s)]
    assert sorted(texts) == sorted(r["text"] for r in rows)  # a partition
    for r in data.train:
        i = int(r["text"].split()[1])
        assert data.labels[r["label"]] == rows[i]["label"]
    again = load_task(tmp_path / "d.jsonl")
    assert again.train == data.train and again.test == data.test
    assert "user data" in data.card() and "label balance" in data.card()


def test_duplicate_rows_share_a_split(tmp_path):
    rows = [{"prompt": f"p{i % 20}", "target": f"t{i % 20}"} for i in range(60)]
    data = load_task(jsonl(tmp_path / "gen.jsonl", rows))
    assert data.kind == "generation" and data.metric == "bleu4"
    seen = {s: {r["prompt"] for r in data.split(s)} for s in SPLITS}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["valid"]


def test_csv_pairs_and_retrieval(tmp_path):
    write(tmp_path / "pairs.csv", 'text,text_pair,label\n"a, with comma",b,1\nc,d,0\ne,f,1\n')
    data = load_task(tmp_path / "pairs.csv")
    assert data.labels == ["0", "1"] and all("text_pair" in r for _, r in rows_of(data))
    assert any(r["text"] == "a, with comma" for _, r in rows_of(data))
    write(tmp_path / "ret.tsv", "query\tcode\n" + "".join(f"q{i}\tc{i}\n" for i in range(10)))
    ret = load_task(tmp_path / "ret.tsv")
    assert ret.kind == "retrieval" and ret.metric == "mrr" and len(ret.train) == 8


def test_directory_with_split_files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    jsonl(d / "train.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(20)])
    write(d / "validation.csv", "text,label\nv1,0\nv2,1\n")
    jsonl(d / "test.jsonl", [{"text": "x", "label": 1}])
    data = load_task(d)
    assert (len(data.train), len(data.valid), len(data.test)) == (20, 2, 1)
    assert data.valid[0] == {"text": "v1", "label": 0}
    (d / "test.jsonl").unlink()  # without a test file: validation is the test split, valid carved from train
    data = load_task(d)
    assert (len(data.train), len(data.valid), len(data.test)) == (18, 2, 2)


def test_label_list_checks_range(tmp_path):
    path = jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "yes"}, {"text": "c", "label": 1}])
    data = load_task(path, labels=["no", "yes"])  # names and int indices may mix when labels are given
    assert data.labels == ["no", "yes"]
    assert sorted((r["text"], r["label"]) for _, r in rows_of(data)) == [("a", 0), ("b", 1), ("c", 1)]
    jsonl(path, [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(DataError, match=r"l\.jsonl, line 2.*out of range.*0\.\.1"):
        load_task(path, labels=["no", "yes"])
    jsonl(path, [{"text": "a", "label": -1}])
    with pytest.raises(DataError, match="out of range"):
        load_task(path)
    jsonl(path, [{"text": "a", "label": "maybe"}])
    with pytest.raises(DataError, match="unknown label 'maybe'"):
        load_task(path, labels=["no", "yes"])
    jsonl(path, [{"text": "a", "label": "x"}, {"text": "b", "label": 1.5}])
    with pytest.raises(DataError, match="line 2"):
        load_task(path)


@pytest.mark.parametrize("name, content, pattern", [
    ("missing.jsonl", None, r"missing\.jsonl: no such file"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl is empty"),
    ("empty.csv", "", r"empty\.csv is empty"),
    ("header.csv", "text,label\n", r"header\.csv is empty"),
    ("cols.csv", "foo,bar\n1,2\n", r"cols\.csv: no usable columns \(found columns: bar, foo\); accepted.*query,code"),
    ("nolabel.jsonl", '{"text": "a", "lbl": 1}\n', r"nolabel\.jsonl: missing column 'label'.*found columns: lbl, text"),
    ("later.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', r"later\.jsonl, line 2: missing column 'label'"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b" "label": 0}\n', r"bad\.jsonl, line 2: malformed JSON"),
    ("list.jsonl", '[1, 2]\n', r"list\.jsonl, line 1: expected a JSON object"),
    ("binary.csv", b"text,label\nab\xff\xfecd,1\n", r"binary\.csv: not valid UTF-8 at byte offset 13 \(line 2"),
    ("ragged.csv", "text,label\na,1,extra\n", r"ragged\.csv, line 2"),
    ("number.jsonl", '{"text": 5, "label": 1}\n', r"number\.jsonl, line 1: column 'text' must be a string"),
    ("data.txt", "hello\n", r"data\.txt: unsupported file type"),
    ("huge.jsonl", '{"text": "a", "label": ' + "1" * 5000 + '}\n', r"huge\.jsonl, line 1: a number with more digits"),
    ("hugestr.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": "' + "1" * 5000 + '"}\n',
     r"hugestr\.jsonl, line 2: label '1{20}.*\(5002 characters\) would make over 10\^18 classes"),
    ("huge.csv", "text,label\na,0\nb," + "1" * 5000 + "\n", r"huge\.csv, line 3: label .* would make over 10\^18"),
    ("surrogate.jsonl", '{"text": "a", "label": 0}\n{"text": "b \\ud800", "label": 1}\n',
     r"surrogate\.jsonl, line 2: column 'text' holds a lone surrogate"),
])
def test_user_data_errors_name_the_problem(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=pattern) as info:
        load_task(path)
    assert isinstance(info.value, DeltatuneError)


def test_directory_without_train_file(tmp_path):
    write(tmp_path / "valid.jsonl", '{"text": "a", "label": 1}\n')
    with pytest.raises(DataError, match=r"no train file.*found: valid\.jsonl"):
        load_task(tmp_path)


def test_unknown_name_lists_the_tasks():
    with pytest.raises(DataError, match="code-search"):
        load_task("code-serch")


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_task("hf:glue/sst2")


def test_hf_local_glue_style_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"question": datasets.Value("string"), "sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})

    def part(n, hidden=False):
        return datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(n)],
                                           "sentence": [f"s{i}" for i in range(n)],
                                           "label": [-1 if hidden else i % 2 for i in range(n)]}, features=feats)

    datasets.DatasetDict({"train": part(30), "validation": part(4), "test": part(3, hidden=True)}).save_to_disk(
        str(tmp_path / "qnli"))
    data = load_task(f"hf:{tmp_path / 'qnli'}")
    assert data.labels == ["entailment", "not_entailment"] and data.kind == "classification"
    assert (len(data.train), len(data.valid), len(data.test)) == (27, 3, 4)  # GLUE: validation is the test split
    assert data.test[0] == {"text": "q0", "text_pair": "s0", "label": 0}


# --- task kinds and the task registry -------------------------------------------------------

def test_every_kind_is_registered_and_an_unknown_one_names_the_known():
    from deltatune.errors import ConfigError
    from deltatune.tasks.kinds import KINDS, TaskKind, get_kind

    assert {"retrieval", "classification", "generation", "humaneval"} <= set(KINDS)
    for name, kind in KINDS.items():
        assert issubclass(kind, TaskKind) and kind.name == name and get_kind(name) is kind and get_kind(kind) is kind
        if kind.trains:
            assert kind.columns is not None and set(kind.text_fields) <= set(sum(kind.columns, ()))
            assert kind.metric in kind.metrics and kind.text_field in kind.text_fields and kind.endpoints
    with pytest.raises(ConfigError, match=r"unknown task kind 'ranking'; known kinds: .*retrieval"):
        get_kind("ranking")
    assert get_kind("retrieval").private_refusal and get_kind("classification").private_refusal is None
    assert get_kind("generation").new_tokens(type("Cfg", (), {"max_new_tokens": 7})) == 7


def test_a_task_is_one_registration(tmp_path):
    from deltatune.errors import ConfigError
    from deltatune.tasks import REGISTRY, task

    rows = [{"query": f"find item {i}", "code": f"def item_{i}(): return {i}\n"} for i in range(40)]
    try:
        @task("toy-search", kind="retrieval", description="a toy search task, registered by the test")
        def build():
            return REGISTRY["toy-search"].data(None, rows[:30], rows[30:35], rows[35:], source="the test")

        assert "toy-search" in TASKS and list(TASKS)[-1] == "toy-search"  # deltatune tasks lists it
        data = load_task("toy-search", max_train=10)
        assert (data.name, data.kind, data.metric, data.metrics) == ("toy-search", "retrieval", "mrr",
                                                                     ("mrr", "recall@1", "recall@5", "recall@10"))
        assert len(data.train) == 10 and "a toy search task, registered by the test" in data.card()
        with pytest.raises(ValueError, match="already registered"):
            task("toy-search", kind="retrieval", description="again")(build)
    finally:
        REGISTRY.pop("toy-search", None)
    assert "toy-search" not in TASKS
    with pytest.raises(ConfigError, match="known kinds"):
        task("toy-ranking", kind="ranking", description="an unknown kind")


def test_a_new_kind_is_one_class_and_data_files_find_it(tmp_path):
    from deltatune.tasks.kinds import KINDS, TaskKind, register_kind

    try:
        @register_kind
        class Scoring(TaskKind):  # a kind whose rows hold a text and a value
            name = "toy-regression"
            columns = (("text", "value"), ())
            text_fields = ("text",)
            metric, metrics = "mse", ("mse",)

            @classmethod
            def score(cls, task, predictions, split):
                rows = task.split(split)
                return {"mse": sum((p - r["value"]) ** 2 for p, r in zip(predictions, rows)) / len(rows)}

        data = load_task(jsonl(tmp_path / "values.jsonl", [{"text": f"t{i}", "value": i / 10} for i in range(20)]))
        assert (data.kind, data.metric, data.labels) == ("toy-regression", "mse", None)
        assert data.score([r["value"] for r in data.test]) == {"mse": 0.0}
        assert "avg text chars/lines" in data.card()
        with pytest.raises(DataError, match=r"value \(toy-regression\)"):  # the accepted columns name the kind
            load_task(jsonl(tmp_path / "bad.jsonl", [{"other": "x"}] * 5))
    finally:
        KINDS.pop("toy-regression", None)


def test_humaneval_is_an_evaluation_not_a_dataset():
    from deltatune.tasks import REGISTRY

    assert REGISTRY["humaneval"].functional and "humaneval" not in TASKS
    with pytest.raises(DataError, match="deltatune eval --task humaneval"):
        load_task("humaneval")


@pytest.mark.parametrize("limit", ["inf", "1e300", "1e308", "100000"])
def test_a_data_size_limit_beyond_memory_reads_the_file(tmp_path, monkeypatch, limit):
    """A limit larger than memory (or 'inf') is no limit: the file is read in pieces, never by one read of the
    limit's size (a MemoryError or an OverflowError)."""
    monkeypatch.setenv("DELTATUNE_MAX_DATA_MB", limit)
    path = tmp_path / "d.jsonl"
    write(path, "".join(f'{{"text": "row {i}", "label": {i % 2}}}\n' for i in range(12)))
    assert len(load_task(path).split("train")) > 0
