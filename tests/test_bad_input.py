"""Bad input is rejected early and clearly, as a user meets it: `deltatune train` exits with code 2
and one line naming the problem, no traceback, and nothing written to --out.

- every option of every registered method, given a value of the wrong type, out of its range, or
  an unknown name, is refused before the engine, transformers or a model is even imported;
- bad trainer flags (--max-steps 0, --lr nan, ...) are refused before a model is loaded;
- bad data files (empty, wrong columns, labels out of range or of mixed kinds, non-UTF-8 bytes,
  malformed or deeply nested JSON, ragged CSV, ...) are refused before a model is loaded;
- a site that matches nothing, layers out of range, a method an architecture does not support,
  and generation data for an encoder are refused before anything is written;
- over-long inputs are truncated with one warning line; empty strings and any unicode train fine;
- hypothesis: method configs x tiny model shapes x tokenised batches (random lengths, padding side,
  empty strings, unicode) through dt.attach, a forward pass, save_adapter and load_adapter: the
  only exceptions that escape are DeltatuneErrors, and the loaded adapter computes the same.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune import cli
from deltatune.registry import REGISTRY
from deltatune.errors import DataError
from deltatune.tasks import load_task

from . import figures, tiny

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------ the cases

def option_cases() -> list[tuple[str, list[str], str]]:
    """(id, --set items, text the error must contain) for every option of every method."""
    bad_text = {"int": "abc", "float": "abc", "bool": "abc", "str": "1"}
    cases = []
    for method, cls in sorted(REGISTRY.items()):
        cases.append((f"{method}: unknown option", ["no_such_option=1"], "no_such_option"))
        for f in dataclasses.fields(cls):
            text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None) or str(f.type)
            kind = next(t.strip() for t in text.split("|") if t.strip() != "None")
            if kind == "list":
                bad = "1,2" if f.name.endswith("sites") else "-1,"
            else:
                bad = bad_text.get(kind)  # None: an option of any type (no wrong type to try)
            if bad is not None:
                cases.append((f"{method}: {f.name}={bad}", [f"{f.name}={bad}"], f.name))
            for bound, step in (("min", -1), ("max", 1)):
                limit = f.metadata.get(bound)
                if limit is not None:
                    value = limit + step if isinstance(limit, int) else limit + step * 0.5
                    cases.append((f"{method}: {f.name}={value}", [f"{f.name}={value}"], f.name))
            if f.metadata.get("choices"):
                cases.append((f"{method}: {f.name}=nope", [f"{f.name}=nope"], f.name))
    return cases


TRAINER_FLAGS = [  # (flags, text the error must contain)
    (["--max-steps", "0"], "max_steps"), (["--batch-size", "0"], "batch_size"), (["--eval-every", "0"], "eval_every"),
    (["--lr", "nan"], "lr"), (["--lr", "-1"], "lr"), (["--lr", "inf"], "lr"), (["--max-len", "1"], "max_len"),
    (["--max-train", "-1"], "max_train"), (["--max-eval", "-1"], "max_eval"), (["--max-train", "0"], "max_train"),
    (["--max-steps", "ten"], "invalid int"),
    # issue 10: a numpy traceback; zero evaluation examples scored as 0.0
    (["--seed", "-1"], "seed"), (["--seed", "18446744073709551616"], "seed"), (["--max-eval", "0"], "max_eval"),
]


def _jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = [{"text": f"word {i}", "label": i % 2} for i in range(20)]
DATA = {  # file name -> (content: str, bytes, or {split file: content} for a directory; text the error must contain)
    "empty.jsonl": ("", "is empty"),
    "blank-lines.jsonl": ("\n\n  \n", "is empty"),
    "header-only.csv": ("text,label\n", "is empty"),
    "wrong-columns.jsonl": (_jsonl([{"foo": "a", "bar": 1}] * 5), "no usable columns"),
    "column-missing-in-a-row.jsonl": (_jsonl(GOOD[:5] + [{"text": "x"}] + GOOD[5:]), "line 6: missing column 'label'"),
    "null-text.jsonl": (_jsonl(GOOD[:3] + [{"text": None, "label": 0}]), "line 4: column 'text' is null"),
    "number-as-text.jsonl": (_jsonl(GOOD[:3] + [{"text": 12, "label": 0}]), "must be a string"),
    "negative-label.jsonl": (_jsonl(GOOD[:3] + [{"text": "x", "label": -1}]), "line 4: label -1 is out of range"),
    "fractional-label.jsonl": (_jsonl(GOOD[:3] + [{"text": "x", "label": 0.5}]), "label 0.5 is neither"),
    "list-label.jsonl": (_jsonl(GOOD[:3] + [{"text": "x", "label": [1]}]), "label [1] is neither"),
    "mixed-labels.jsonl": (_jsonl(GOOD[:3] + [{"text": "x", "label": "pos"}]), "mixes with string labels"),
    "latin-1.jsonl": (_jsonl(GOOD[:3]).encode() + '{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"),
                      "not valid UTF-8 at byte offset"),
    "utf-16.jsonl": (_jsonl(GOOD[:3]).encode("utf-16"), "not valid UTF-8"),
    "malformed-json.jsonl": (_jsonl(GOOD[:3] + ['{"text": "x", "label": 0']), "line 4: malformed JSON"),
    "deeply-nested.jsonl": (_jsonl(GOOD[:3] + ["[" * 100_000 + "]" * 100_000]), "line 4: JSON nested too deeply"),
    "array-line.jsonl": (_jsonl(GOOD[:3] + ['["x", 0]']), "line 4: expected a JSON object"),
    "ragged.csv": ("text,label\nhello,0\nhello,world,1\n", "line 3"),
    "unquoted.tsv": ("text\tlabel\na\t0\nb\t1\tc\n", "line 3"),
    "notes.txt": ("text,label\nhello,0\n", "unsupported file type"),
    "no-train-file": ({"valid.jsonl": _jsonl(GOOD)}, "no train file"),
    "splits-of-two-kinds": ({"train.jsonl": _jsonl(GOOD), "test.jsonl": _jsonl([{"query": "q", "code": "c"}])},
                            "same columns"),
    "retrieval-without-code.jsonl": (_jsonl([{"query": "q", "code": "c"}] * 3 + [{"query": "q"}]),
                                     "line 4: missing column 'code'"),
    "train-file-empty": ({"train.jsonl": "", "test.jsonl": _jsonl(GOOD)}, "is empty"),
    # issue 10: resource bombs, a class per number, zero examples, and files that are not files
    "label-1e12.jsonl": (_jsonl(GOOD[:3] + [{"text": "x", "label": 1000000000000}]), "would make 1000000000001 classes"),
    "label-1e300.jsonl": (_jsonl(GOOD[:3] + [{"text": "x", "label": 1e300}]), "would make over 10^18 classes"),
    "label-50000.jsonl": (_jsonl(GOOD[:3] + [{"text": "x", "label": 50000}]), "would make 50001 classes"),
    "label-string-1e12.jsonl": (_jsonl(GOOD[:3] + [{"text": "x", "label": "1000000000000"}]), "classes"),
    "one-class.jsonl": (_jsonl([{"text": f"t{i}", "label": 0} for i in range(20)]), "at least two classes"),
    "one-class-by-name.jsonl": (_jsonl([{"text": f"t{i}", "label": "pos"} for i in range(20)]), "at least two classes"),
    "one-row.jsonl": (_jsonl([{"text": "x", "label": 0}]), "at least two classes"),
    "two-rows.jsonl": (_jsonl(GOOD[:2]), "the valid split has no examples (2 rows in all)"),
    "three-copies.jsonl": (_jsonl([GOOD[0]] * 3 + [GOOD[1]] * 3), "split has no examples"),
    "train-of-one-row": ({"train.jsonl": _jsonl(GOOD[:1]), "test.jsonl": _jsonl(GOOD)}, "the valid split has no examples"),
    "fifo.jsonl": (lambda path: os.mkfifo(path), "not a regular file (a FIFO)"),
    "dev-zero.jsonl": (lambda path: os.symlink("/dev/zero", path), "not a regular file (a character device)"),
    "dev-urandom.csv": (lambda path: os.symlink("/dev/urandom", path), "not a regular file (a character device)"),
    "symlink-loop.jsonl": (lambda path: os.symlink(path.name, path), "a symlink loop"),
    "dangling-link.jsonl": (lambda path: os.symlink("nowhere.jsonl", path), "a symlink to a missing file"),
    "too-big.jsonl": (_jsonl(GOOD * 2000), "set DELTATUNE_MAX_DATA_MB"),  # the probe runs with a 0.5 MB limit
    "train-fifo": ({"train.jsonl": lambda path: os.mkfifo(path), "test.jsonl": _jsonl(GOOD)}, "is a FIFO, not a regular file"),
}
PROBE_DATA_MB = "0.5"
# Cases only a loaded model can decide: refused before anything is written (then the model is loaded).
MODEL = [  # (id, argv changes, text the error must contain)
    ("site matches nothing", ["--set", "sites=re:nothing_here"], "matches no module"),
    ("unknown site", ["--set", "sites=attn.nowhere"], "unknown site 'attn.nowhere'"),
    ("layers out of range", ["--set", "layers=99,"], "layers [99] do not exist: BertModel has 2 blocks, numbered 0..1"),
    ("one layer of two out of range", ["--set", "layers=0,999"], "layers [999] do not exist"),
    ("a site pattern that backtracks", ["--set", "sites=re:(.|.)*\\d"], "took over 1 s"),
    ("a site pattern of nested counted repeats", ["--set", "sites=re:((a{1000}){1000}){1000}"], "counted repeats"),
    ("telly k above the depth", ["--method", "telly", "--set", "k=5"], "exceeds"),
    ("bitfit on llama (no biases)", ["--model", "tiny-llama", "--method", "bitfit"], "does not support llama"),
    ("generation data on an encoder", ["--task", "GEN"], "cannot generate"),
    ("unknown model", ["--model", "no-such-model"], "no-such-model"),
]


def _write(root: Path, name: str, content) -> Path:
    path = root / name
    if callable(content):  # a FIFO, a link to a device, a loop
        content(path)
    elif isinstance(content, dict):
        path.mkdir()
        for file, text in content.items():
            _write(path, file, text)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def base_argv(task, out) -> list[str]:
    return ["train", "--model", "tiny-bert", "--task", str(task), "--method", "lora", "--max-steps", "1",
            "--batch-size", "4", "--max-len", "16", "--out", str(out)]


def _with(argv: list[str], changes: list[str]) -> list[str]:
    """``argv`` with the flags in ``changes`` replaced or added."""
    argv = list(argv)
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in argv and flag != "--set":
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


PROBE = r'''
import contextlib, io, json, sys, os
from deltatune import cli
HEAVY = ("transformers", "deltatune.training.run", "deltatune.models", "deltatune.tasks")
results = []
for case in json.loads(sys.stdin.read()):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(case["argv"])
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = f"escaped {type(e).__name__}: {e}"
    results.append({"id": case["id"], "code": code, "stderr": err.getvalue(),
                    "loaded": [m for m in HEAVY if m in sys.modules], "out_exists": os.path.exists(case["out"])})
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Every case of this file through the CLI, in order of how much each may load, in one fresh process."""
    root = tmp_path_factory.mktemp("bad")
    good = _write(root, "good.jsonl", _jsonl(GOOD))
    gen = _write(root, "gen.jsonl", _jsonl([{"prompt": f"p{i}", "target": "t"} for i in range(10)]))
    cases = []

    def add(kind, case_id, argv, out):
        cases.append({"kind": kind, "id": case_id, "argv": argv, "out": str(out)})

    for i, (case_id, items, _) in enumerate(option_cases()):
        out = root / f"out-option-{i}"
        add("option", case_id, base_argv(good, out) + [x for item in items for x in ("--set", item)], out)
    for i, (flags, _) in enumerate(TRAINER_FLAGS):
        out = root / f"out-flag-{i}"
        add("flag", " ".join(flags), _with(base_argv(good, out), flags), out)
    for i, (name, (content, _)) in enumerate(DATA.items()):
        out = root / f"out-data-{i}"
        add("data", name, base_argv(_write(root, name, content), out), out)
    for i, (case_id, changes, _) in enumerate(MODEL):
        out = root / f"out-model-{i}"
        changes = [str(gen) if x == "GEN" else x for x in changes]
        add("model", case_id, _with(base_argv(good, out), changes), out)
    proc = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(cases), capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, "DELTATUNE_MAX_DATA_MB": PROBE_DATA_MB})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["id"]: {**r, "kind": c["kind"]} for c, r in zip(cases, json.loads(proc.stdout))}


def check_one_line_exit_2(result, expected: str) -> None:
    lines = result["stderr"].strip().splitlines()
    assert result["code"] == 2, result
    assert len(lines) == 1 and lines[0].startswith("deltatune train: error: "), lines
    assert expected in lines[0], (expected, lines[0])
    assert not result["out_exists"], "nothing may be written for a rejected input"


@pytest.mark.parametrize("case_id, items, expected", option_cases(), ids=[c[0] for c in option_cases()])
def test_every_option_of_every_method_is_checked_before_anything_loads(probe, case_id, items, expected):
    result = probe[case_id]
    check_one_line_exit_2(result, expected)
    assert result["loaded"] == [], "the engine or transformers was imported before the option was checked"
    figures.count("bad method options (CLI)")


@pytest.mark.parametrize("flags, expected", TRAINER_FLAGS, ids=[" ".join(f) for f, _ in TRAINER_FLAGS])
def test_bad_trainer_flags_are_checked_before_a_model_loads(probe, flags, expected):
    result = probe[" ".join(flags)]
    if "invalid int" in expected:  # argparse's own usage error
        assert result["code"] == 2 and expected in result["stderr"] and result["stderr"].count("\n") == 1
    else:
        check_one_line_exit_2(result, expected)
    assert "transformers" not in result["loaded"]
    figures.count("bad trainer flags (CLI)")


@pytest.mark.parametrize("name", list(DATA))
def test_bad_data_is_refused_before_a_model_loads(probe, name):
    result = probe[name]
    check_one_line_exit_2(result, DATA[name][1])
    assert name.split(".")[0] in result["stderr"] or "no train file" in result["stderr"]  # the file is named
    assert "transformers" not in result["loaded"]
    figures.count("bad data files (CLI)")


@pytest.mark.parametrize("case_id, changes, expected", MODEL, ids=[m[0] for m in MODEL])
def test_what_only_the_model_can_tell_is_refused_before_anything_is_written(probe, case_id, changes, expected):
    check_one_line_exit_2(probe[case_id], expected)
    figures.count("model-dependent bad inputs (CLI)")


def test_probe_order_held(probe):
    """The cases ran in order of what they may load, so 'not loaded' above means 'not loaded by this case'."""
    kinds = [r["kind"] for r in probe.values()]
    assert kinds == sorted(kinds, key=["option", "flag", "data", "model"].index)


def test_labels_out_of_range_for_named_classes(tmp_path):
    path = _write(tmp_path, "d.jsonl", _jsonl(GOOD[:5] + [{"text": "x", "label": 3}]))
    with pytest.raises(DataError, match=r"line 6: label 3 is out of range: with labels \['neg', 'pos'\]"):
        load_task(str(path), labels=["neg", "pos"])
    with pytest.raises(DataError, match="unknown label 'maybe'"):
        load_task(str(_write(tmp_path, "e.jsonl", _jsonl([{"text": "x", "label": "maybe"}]))), labels=["neg", "pos"])
    figures.count("bad data files (API)", 2)


# ------------------------------------------------------------------------ inputs that are fine

def test_over_long_inputs_are_truncated_with_one_warning(tmp_path, capsys):
    rows = GOOD[:10] + [{"text": "word " * 300, "label": 0}] + GOOD[10:]
    task = _write(tmp_path, "long.jsonl", _jsonl(rows))
    with pytest.warns(UserWarning) as seen:  # the CLI prints it as one line: "deltatune train: warning: ..."
        assert cli.main(base_argv(task, tmp_path / "out")) == 0
    assert [str(w.message) for w in seen if "max_len" in str(w.message)] == [
        "1 of 21 inputs were longer than max_len=16 tokens and were truncated; raise max_len to keep them whole"]
    assert "Traceback" not in capsys.readouterr().err


def test_empty_strings_and_any_unicode_train(tmp_path, capsys):
    texts = ["", " ", "héllo wörld", "😀🎉", "مرحبا بالعالم", "e\u0301\u0301", "\x00\x01\x7f", "日本語", "\u202eRTL",
             "\ud7ff\ue000\uffff", "tab\tand\nnewline", "\U0010ffff"]
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts * 2)]
    task = _write(tmp_path, "unicode.jsonl", _jsonl(rows))
    assert cli.main(base_argv(task, tmp_path / "out") + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1


# ------------------------------------------------------------------------ hypothesis: attach, forward, save, load

TEXT_FAMILIES = ["bert", "gpt2", "llama", "t5", "bart"]
SITES = ["attn.q", "attn.k", "attn.v", "attn.o", "attn.kv", "ffn.in", "ffn.out", "ln", "embed", "block",
         "re:.*query", "re:nothing_here", "attn.nowhere"]


def option_values(name: str, default):
    """Mostly plausible values for an option (so that many attaches succeed), sometimes junk."""
    junk = st.none() | st.text(max_size=4) | st.integers(-3, 3) | st.floats(allow_nan=True) | st.booleans()
    if name.endswith("sites"):
        plausible = st.lists(st.sampled_from(SITES), min_size=0, max_size=3, unique=True)
    elif name == "layers":
        plausible = st.none() | st.lists(st.integers(-1, 4), max_size=3)
    elif isinstance(default, bool):
        plausible = st.booleans()
    elif isinstance(default, int) or name == "k":
        plausible = st.integers(0, 24)
    elif isinstance(default, float):
        plausible = st.floats(0, 2 * default + 1)
    elif isinstance(default, str):
        plausible = st.just(default) | st.text(max_size=6)
    else:
        plausible = st.just(default)
    return st.one_of(plausible, plausible, plausible, junk)


@st.composite
def method_configs(draw):
    method = draw(st.sampled_from(sorted(REGISTRY)))
    fields = {f.name: f for f in dataclasses.fields(REGISTRY[method])}
    names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True))
    options = {}
    for name in names:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        options[name] = draw(st.sampled_from(choices) if choices and draw(st.booleans()) else option_values(name, default))
    if method == "prefix":  # keep the reparameterisation MLP small
        options.setdefault("hidden", draw(st.integers(1, 16)))
    return method, options


texts = st.text(st.characters(codec="utf-8"), max_size=20) | st.sampled_from(["", " ", "😀", "日本語", "\x00"])


@pytest.fixture(scope="module")
def tokenizer():
    from deltatune.models import load_backbone

    return load_backbone("tiny-bert")[1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=method_configs(), family=st.sampled_from(TEXT_FAMILIES), heads=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([2, 4, 8]), layers=st.integers(1, 3), batch=st.lists(texts, min_size=1, max_size=4),
       left_pad=st.booleans(), max_len=st.integers(2, 12))
def test_attach_forward_save_load_raise_only_deltatune_errors(tmp_path, tokenizer, config, family, heads, head_dim,
                                                              layers, batch, left_pad, max_len):
    method, options = config
    dims = dict(hidden=heads * head_dim, heads=heads, layers=layers, ffn=2 * heads * head_dim)
    tokenizer.padding_side = "left" if left_pad else "right"
    enc = tokenizer(batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"] % tiny.VOCAB, "attention_mask": enc["attention_mask"]}
    if family in ("t5", "bart"):
        inputs["decoder_input_ids"] = (enc["input_ids"][:, :3] % tiny.VOCAB).clamp(min=3)
    model = tiny.model(family, **dims)
    figures.count("hypothesis: attach/forward/save/load examples")
    try:
        dt.attach(model, method, **options)
    except dt.DeltatuneError:
        assert not hasattr(model, "deltatune")  # refused before the model was touched
        return
    figures.count("hypothesis: attach/forward/save/load examples that attached")
    with torch.no_grad():
        before = model(**inputs).logits
    path = dt.save_adapter(model, tmp_path / "a")
    fresh = dt.load_adapter(tiny.model(family, **dims), path)
    with torch.no_grad():
        after = fresh(**inputs).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4, equal_nan=True)


# ------------------------------------------------------------------------ issue 10: inputs that are fine after all

def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+0085 and \\x1c raw; records end at \\n only."""
    odd = ["a\u2028b", "c\u0085d", "e\x1cf", "g\u2029h", "i\x0bj", "k\x0cl", "m\x1dn\x1eo", "p\rq"]
    rows = [{"text": t + str(i), "label": i % 2} for i, t in enumerate(odd * 3)]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    data = load_task(str(path))
    assert sorted(r["text"] for r in data.train + data.valid + data.test) == sorted(r["text"] for r in rows)
    figures.count("bad data files (API)")


def test_copies_of_a_row_share_a_split(tmp_path):
    """The cut between splits moves to the end of a run of copies: no row is in train and in test."""
    for copies in range(2, 12):
        rows = [{"text": f"t{i}", "label": i % 2} for i in range(40)]
        rows += [{"text": f"t{i}", "label": i % 2} for i in range(0, 40, 3) for _ in range(copies - 1)]
        path = tmp_path / f"dup{copies}.jsonl"
        path.write_text(_jsonl(rows))
        data = load_task(str(path))
        seen = [{json.dumps(r, sort_keys=True) for r in split} for split in (data.train, data.valid, data.test)]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), copies
        assert sum(map(len, (data.train, data.valid, data.test))) == len(rows)
    folder = tmp_path / "dir"
    folder.mkdir()  # a test file and no valid file: valid is carved from train, copies included
    (folder / "train.jsonl").write_text(_jsonl(rows))
    (folder / "test.jsonl").write_text(_jsonl(GOOD))
    data = load_task(str(folder))
    assert not {json.dumps(r, sort_keys=True) for r in data.train} & {json.dumps(r, sort_keys=True) for r in data.valid}
    figures.count("bad data files (API)", 2)


def test_hf_specs_name_org_datasets_and_configs():
    from deltatune.tasks.files import parse_hf_spec

    assert parse_hf_spec("imdb") == ("imdb", None)
    assert parse_hf_spec("stanfordnlp/imdb") == ("stanfordnlp/imdb", None)  # not dataset 'stanfordnlp', config 'imdb'
    assert parse_hf_spec("nyu-mll/glue:sst2") == ("nyu-mll/glue", "sst2")
    assert parse_hf_spec("glue:sst2") == ("glue", "sst2")
    for bad in ["", ":x", "a/b/c", "a/b:", "/a", "a/", "a:b:c", "a:b/c"]:
        with pytest.raises(DataError, match="expected hf:<dataset>"):
            parse_hf_spec(bad)
    figures.count("bad data files (API)", 8)


def test_a_huge_line_is_cut_before_the_tokenizer_sees_it(tmp_path):
    """A 50 MB line once took GBs inside the tokenizer: text is cut to CHARS_PER_TOKEN x max_len characters
    first, and the tokens kept are those that truncating the whole text keeps."""
    from deltatune.models import load_backbone
    from deltatune.training import TrainConfig
    from deltatune.tasks.kinds import CHARS_PER_TOKEN, KINDS as OBJECTIVES

    tokenizer = load_backbone("tiny-bert")[1]
    longest = []

    class Recording:  # the real tokenizer, noting the longest text it is given
        def __call__(self, texts, pairs=None, **kw):
            longest.append(max(map(len, texts + (pairs or []))))
            return tokenizer(texts, pairs, **kw)

    cfg = TrainConfig(model="tiny-bert", max_len=16)
    words = " ".join(f"w{i % 977}ord" for i in range(60_000))  # about 500 kB
    objective = OBJECTIVES["classification"](Recording(), cfg)
    rows = objective.tokens([words, "short"])  # (pairs: see "Not covered" in docs/reliability.md)
    assert max(longest) <= CHARS_PER_TOKEN * cfg.max_len
    whole = tokenizer([words[:20_000], "short"], truncation=True, max_length=16)
    assert [r["input_ids"] for r in rows] == whole["input_ids"]
    assert objective.truncated == 1
