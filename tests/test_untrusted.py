"""Untrusted files run no code and write nowhere else: adapters, checkpoints, run.json and model
folders are read as data (safetensors and JSON), names read from them never become paths, and
anything malformed is a DeltatuneError naming the file.

- the package source holds no pickle, no torch.load without weights_only=True, no eval/exec, no
  trust_remote_code=True, no shell=True (scanned with ast, and the scanner is tested on a plant);
- a run directory holds only .safetensors, .json and .jsonl files, and training writes nothing
  outside --out (not even in the working directory);
- an adapter name in a file ('../x', 'a/b', '.') is refused; evaluate() writes nothing;
- damaged checkpoints and run.json files are one-line errors with exit code 2;
- a model folder with custom Python code or a malicious pickle is refused without running either;
- hypothesis mutates the config inside a saved adapter: only DeltatuneErrors escape.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune import cli
from deltatune.formats.native import WEIGHTS
from deltatune.training import TrainConfig, evaluate, train

from . import figures, tiny
from .test_train import write_task

PACKAGE = Path(dt.__file__).resolve().parent


# ------------------------------------------------------------------------ no code from files

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """What in ``source`` could run code from a file: pickle-like modules, eval/exec, torch.load
    without weights_only=True, trust_remote_code=True, shell=True, allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if isinstance(func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                found.append(f"{line}: {name}(...)")
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{line}: torch.load without weights_only=True")
            for key in ("trust_remote_code", "shell", "allow_pickle"):
                value = keywords.get(key)
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{line}: {key}={ast.unparse(value)}")
    return found


def test_the_scanner_finds_what_it_looks_for():
    planted = """
import pickle
from dill import loads
import torch, subprocess
x = eval("1")
exec("y = 2")
torch.load("f.pt")
torch.load("f.pt", weights_only=False)
model = AutoModel.from_pretrained(p, trust_remote_code=True)
subprocess.run("ls", shell=True)
np.load("a.npy", allow_pickle=flag)
model.eval()                     # a method, not the builtin
torch.load("f.pt", weights_only=True)
AutoModel.from_pretrained(p, trust_remote_code=False)
"""
    assert len(unsafe_calls(planted)) == 9, unsafe_calls(planted)


def test_the_package_source_runs_no_code_from_files():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(PACKAGE)): unsafe_calls(f.read_text()) for f in files}
    assert {f: hits for f, hits in found.items() if hits} == {}
    # and nothing builds such a call from a string either
    text = "\n".join(f.read_text() for f in files)
    assert not re.search(r"trust_remote_code\s*=\s*True|weights_only\s*=\s*False", text)


# ------------------------------------------------------------------------ a run directory

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), "classification")


def small(task, out, **over) -> TrainConfig:
    base = dict(model="tiny-bert", task=str(task), method="prefix", max_steps=4, eval_every=2, batch_size=8,
                max_len=32, lr=1e-2, out_dir=str(out), progress=False)
    return TrainConfig(**{**base, **over})


@pytest.fixture(scope="module")
def stopped_run(task, tmp_path_factory):
    """A prefix run stopped after 2 of 4 steps: one checkpoint, resumable."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(small(task, out, stop_after=2))
    return out


def test_a_run_directory_holds_only_safetensors_and_json(task, tmp_path, monkeypatch):
    home = tmp_path / "cwd"
    home.mkdir()
    monkeypatch.chdir(home)
    out = tmp_path / "out"
    argv = ["train", "--model", "tiny-bert", "--task", str(task), "--method", "prefix", "--max-steps", "4",
            "--eval-every", "2", "--batch-size", "8", "--max-len", "32", "--out", str(out)]
    assert cli.main(argv) == 0
    assert list(home.iterdir()) == []  # nothing in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"]  # nothing next to --out
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json", ".jsonl"}, files
    checkpoint = out / "checkpoints" / "step-000004"
    assert sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()) == [
        "adapter/adapter.safetensors", "adapter/adapter_config.json", "trainer.json", "trainer.safetensors"]


def test_evaluate_writes_nothing_whatever_run_json_says(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    saved = json.loads((run / "run.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    (run / "run.json").write_text(json.dumps({**saved, "out_dir": str(elsewhere)}))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    evaluate(run / "best")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert not elsewhere.exists()


# ------------------------------------------------------------------------ names from files

def _set_adapter_name(path: Path, name) -> None:
    file = path / WEIGHTS
    with safe_open(str(file), framework="pt") as f:
        config = json.loads(f.metadata()["deltatune"])
    config["adapter"] = name
    save_file(load_file(str(file)), str(file), metadata={"deltatune": json.dumps(config)})


BAD_NAMES = ["../../escape", "a/b", "/abs", ".", "..", "", "a.b", "back\\slash", "nul\x00byte", "new\nline",
             "-leading-dash", "x" * 65, 7, None, ["a"]]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_an_adapter_name_from_a_file_is_never_a_path(tmp_path, name):
    model = dt.attach(tiny.model("bert"), "lora")
    dt.save_adapter(model, tmp_path / "a")
    _set_adapter_name(tmp_path / "a", name)
    fresh = tiny.model("bert")
    with pytest.raises(dt.AdapterFileError, match="adapter") as err:
        dt.load_adapter(fresh, tmp_path / "a")
    assert str(tmp_path / "a") in str(err.value) and not hasattr(fresh, "deltatune")
    figures.count("adapter names from files")


@pytest.mark.parametrize("name", ["a/b", "..", "x.y", ""])
def test_attach_refuses_path_like_adapter_names(name):
    with pytest.raises(dt.ConfigError, match="adapter name"):
        dt.attach(tiny.model("bert"), "lora", adapter=name)


@pytest.mark.parametrize("options", [{"r": 2**40}, {"r": 2**40, "sites": ["attn.q", "attn.k", "attn.v", "ffn.in"]}])
def test_options_asking_for_more_memory_than_there_is(tmp_path, options):
    model = dt.attach(tiny.model("bert"), "lora")
    dt.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / WEIGHTS
    with safe_open(str(file), framework="pt") as f:
        config = json.loads(f.metadata()["deltatune"])
    config["options"].update(options)
    save_file(load_file(str(file)), str(file), metadata={"deltatune": json.dumps(config)})
    fresh = tiny.model("bert")
    with pytest.raises(dt.AdapterFileError, match="cannot rebuild the adapter"):
        dt.load_adapter(fresh, tmp_path / "a")
    assert not hasattr(fresh, "deltatune")
    figures.count("oversized options in adapter files")


def _edit_options(folder: Path, **options) -> None:
    file = folder / WEIGHTS
    with safe_open(str(file), framework="pt") as f:
        config = json.loads(f.metadata()["deltatune"])
    config["options"].update(options)
    save_file(load_file(str(file)), str(file), metadata={"deltatune": json.dumps(config)})


@pytest.fixture
def attempt_adapter(tmp_path):
    prompt = dt.attach(tiny.model("bert"), "prompt", length=4, init="random")
    dt.save_adapter(prompt, tmp_path / "prompt")
    dt.save_adapter(dt.attach(tiny.model("bert"), "attempt", sources=[str(tmp_path / "prompt")]), tmp_path / "attempt")
    return tmp_path / "attempt"


@pytest.mark.parametrize("options", [{"r": 2**20}, {"rank_pattern": {".*": 2**20}}])
def test_options_far_beyond_the_tensors_are_refused_before_anything_is_built(tmp_path, options):
    """A few KB of file asking for r=2**20 (36 GiB on MiniLM) is refused by counting on the meta device first."""
    dt.save_adapter(dt.attach(tiny.model("bert"), "lora", r=4), tmp_path / "a")
    _edit_options(tmp_path / "a", **options)
    fresh = tiny.model("bert")
    with pytest.raises(dt.AdapterFileError, match=r"build deltas of [\d,]+ values, its tensors hold [\d,]+"):
        dt.load_adapter(fresh, tmp_path / "a")
    assert not hasattr(fresh, "deltatune")


def test_a_saved_attempt_of_a_huge_source_shape_is_refused_before_it_is_built(attempt_adapter):
    _edit_options(attempt_adapter, source_shape=[3000, 3000])
    with pytest.raises(dt.AdapterFileError, match="build deltas of"):
        dt.load_adapter(tiny.model("bert"), attempt_adapter)


def test_loading_reads_no_path_named_in_a_file(attempt_adapter, tmp_path):
    """A saved ATTEMPT carries its source prompts: sources in its options (a folder elsewhere, one that exists)
    are refused, never read; so in a stack's part. Saved as trained (fold=False) it names none either."""
    assert dt.adapters(dt.load_adapter(tiny.model("bert"), attempt_adapter)) == ["default"]
    _edit_options(attempt_adapter, sources=[str(tmp_path / "prompt")])
    with pytest.raises(dt.AdapterFileError, match="option 'sources' names files to read"):
        dt.load_adapter(tiny.model("bert"), attempt_adapter)
    unfolded = dt.attach(tiny.model("bert"), "attempt", sources=[str(tmp_path / "prompt")])
    dt.save_adapter(unfolded, tmp_path / "unfolded", fold=False)
    assert dt.adapters(dt.load_adapter(tiny.model("bert"), tmp_path / "unfolded")) == ["default"]
    stacked = dt.compose.stack(dt.load_adapter(tiny.model("bert"), tmp_path / "unfolded"), ["default"], "s")
    dt.save_adapter(stacked, tmp_path / "stack", adapter="s")
    file = tmp_path / "stack" / WEIGHTS
    with safe_open(str(file), framework="pt") as f:
        config = json.loads(f.metadata()["deltatune"])
    config["options"]["parts"][0]["options"]["sources"] = [str(tmp_path / "prompt")]
    save_file(load_file(str(file)), str(file), metadata={"deltatune": json.dumps(config)})
    with pytest.raises(dt.AdapterFileError, match=r"option 'parts\[0\].options.sources' names files"):
        dt.load_adapter(tiny.model("bert"), tmp_path / "stack")


@pytest.mark.parametrize("limit", ["inf", "1e308"])
def test_an_adapter_size_limit_beyond_memory_is_no_limit(tmp_path, monkeypatch, limit):
    from deltatune.formats.native import MAX_MB_ENV

    dt.save_adapter(dt.attach(tiny.model("bert"), "lora"), tmp_path / "a")
    monkeypatch.setenv(MAX_MB_ENV, limit)
    assert dt.adapters(dt.load_adapter(tiny.model("bert"), tmp_path / "a")) == ["default"]


def test_options_in_a_file_cannot_clash_with_attach_arguments(tmp_path):
    model = dt.attach(tiny.model("bert"), "lora")
    dt.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / WEIGHTS
    with safe_open(str(file), framework="pt") as f:
        config = json.loads(f.metadata()["deltatune"])
    config["options"]["adapter"] = "../x"
    save_file(load_file(str(file)), str(file), metadata={"deltatune": json.dumps(config)})
    with pytest.raises(dt.AdapterFileError, match="no option 'adapter'"):
        dt.load_adapter(tiny.model("bert"), tmp_path / "a")


# ------------------------------------------------------------------------ damaged checkpoints and run.json

def _json_edit(edit):
    def run(checkpoint: Path):
        meta = json.loads((checkpoint / "trainer.json").read_text())
        (checkpoint / "trainer.json").write_text(json.dumps(edit(meta)))
    return run


def _tensor_edit(edit):
    def run(checkpoint: Path):
        tensors = load_file(checkpoint / "trainer.safetensors")
        edit(tensors)
        save_file(tensors, str(checkpoint / "trainer.safetensors"))
    return run


def _first_optim(tensors):
    return next(k for k in tensors if k.startswith("optim/") and tensors[k].dim())


DAMAGED_CHECKPOINTS = {
    "trainer.json not JSON": lambda c: (c / "trainer.json").write_text("{not json"),
    "trainer.json a list": lambda c: (c / "trainer.json").write_text("[1, 2]"),
    "trainer.json nested 100k deep": lambda c: (c / "trainer.json").write_text("[" * 100_000 + "]" * 100_000),
    "trainer.json not UTF-8": lambda c: (c / "trainer.json").write_bytes(b'{"step": "\xff"}'),
    "step of another checkpoint": _json_edit(lambda m: {**m, "step": 99}),
    "step as a string": _json_edit(lambda m: {**m, "step": "2"}),
    "missing optimizer scalars": _json_edit(lambda m: {k: v for k, v in m.items() if k != "optim_scalars"}),
    "no param groups": _json_edit(lambda m: {**m, "param_groups": []}),
    "rng state garbage": _json_edit(lambda m: {**m, "rng_python": "x"}),
    "other trainable parameters": _json_edit(lambda m: {**m, "params": m["params"][:-1]}),
    "trainer.safetensors truncated": lambda c: (c / "trainer.safetensors").write_bytes(
        (c / "trainer.safetensors").read_bytes()[:100]),
    "trainer.safetensors a pickle": lambda c: (c / "trainer.safetensors").write_bytes(pickle.dumps({"a": 1})),
    "trainer.safetensors missing": lambda c: (c / "trainer.safetensors").unlink(),
    "optimizer key with a path": _tensor_edit(lambda t: t.update({"optim/../../etc/passwd/exp_avg": torch.zeros(1)})),
    "optimizer state of a wrong shape": _tensor_edit(lambda t: t.update({_first_optim(t): torch.zeros(3)})),
    "torch rng state missing": _tensor_edit(lambda t: t.pop("rng/torch")),
    "torch rng state of a wrong size": _tensor_edit(lambda t: t.update({"rng/torch": torch.zeros(5, dtype=torch.uint8)})),
    "checkpoint adapter missing": lambda c: shutil.rmtree(c / "adapter"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_CHECKPOINTS))
def test_a_damaged_checkpoint_is_a_one_line_error(stopped_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    DAMAGED_CHECKPOINTS[damage](run / "checkpoints" / "step-000002")
    saved = json.loads((run / "run.json").read_text())
    argv = ["train", "--model", "tiny-bert", "--task", saved["task"], "--method", "prefix", "--max-steps", "4",
            "--eval-every", "2", "--batch-size", "8", "--max-len", "32", "--lr", "0.01", "--out", str(run), "--resume"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deltatune train: error: ") and "step-000002" in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
    assert json.loads((run / "run.json").read_text()) == saved  # nothing was written before the error
    figures.count("damaged checkpoints")


BAD_RUN_JSON = {
    "not JSON": "{oops",
    "a list": "[]",
    "nested 100k deep": "[" * 100_000 + "]" * 100_000,
    "max_steps a string": lambda saved: {**saved, "max_steps": "many"},
    "max_steps 0": lambda saved: {**saved, "max_steps": 0},
    "lr NaN": lambda saved: {**saved, "lr": float("nan")},
    "unknown model": lambda saved: {**saved, "model": "no-such-model"},
    "model with custom code": None,  # filled in below with a folder path
}


@pytest.mark.parametrize("damage", list(BAD_RUN_JSON))
def test_a_damaged_run_json_is_a_one_line_error(stopped_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    saved = json.loads((run / "run.json").read_text())
    bad = BAD_RUN_JSON[damage]
    if bad is None:
        bad = {**saved, "model": str(_custom_code_folder(tmp_path))}
    elif callable(bad):
        bad = bad(saved)
    (run / "run.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
    assert cli.main(["eval", "--adapter", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deltatune eval: error: ") and "Traceback" not in "\n".join(err), err
    assert not (tmp_path / "PWNED").exists()
    figures.count("damaged run.json")


# ------------------------------------------------------------------------ model folders

def _custom_code_folder(root: Path) -> Path:
    """A model folder whose config asks for its own Python code, which would leave a marker file."""
    folder = root / "custom-code-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "not-a-registered-type", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    (folder / "modeling_evil.py").write_text(f"open({str(root / 'PWNED')!r}, 'w').write('ran')\n")
    return folder


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_the_payload_runs_code_when_unpickled(tmp_path):  # so its absence below means something
    pickle.loads(pickle.dumps(_Payload(tmp_path / "PWNED")))
    assert (tmp_path / "PWNED").exists()


def _pickle_weights_folder(root: Path) -> Path:
    folder = root / "pickle-model"
    folder.mkdir(exist_ok=True)
    config = tiny.config("bert")
    config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"embeddings.word_embeddings.weight": _Payload(root / "PWNED")}))
    return folder


@pytest.mark.parametrize("make", [_custom_code_folder, _pickle_weights_folder], ids=["custom code", "malicious pickle"])
def test_a_model_folder_runs_no_code(tmp_path, capsys, make):
    folder = make(tmp_path)
    with pytest.raises(dt.ConfigError, match="cannot be loaded"):
        from deltatune.models import load_backbone

        load_backbone(str(folder))
    assert not (tmp_path / "PWNED").exists()
    task = write_task(tmp_path / "task", "classification", n_train=8, n_eval=4)
    code = cli.main(["train", "--model", str(folder), "--task", task, "--method", "lora", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("deltatune train: error: ") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o").exists()
    figures.count("malicious model folders")


# ------------------------------------------------------------------------ fuzzed adapter configs

FIELDS = ["format", "format_version", "adapter", "method", "options", "folded", "base", "tensors"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.just([]) | st.just({}),
    lambda inner: st.lists(inner, min_size=1, max_size=4) | st.dictionaries(st.text(max_size=8), inner, min_size=1,
                                                                              max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    model = dt.attach(tiny.model("bert"), "lora")
    path = dt.save_adapter(model, tmp_path_factory.mktemp("fuzz") / "a")
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        return json.loads(f.metadata()["deltatune"]), load_file(str(path / WEIGHTS))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS + ["options.r", "options.sites", "base.hidden_size",
                                                           "base.family", "tensors.*"]), json_values),
                      min_size=1, max_size=3))
def test_fuzzed_adapter_configs_raise_only_deltatune_errors(saved_lora, tmp_path, edits):
    config, tensors = json.loads(json.dumps(saved_lora[0])), saved_lora[1]
    for field, value in edits:
        if field == "tensors.*":
            config["tensors"] = {k: value for k in config["tensors"]} if isinstance(config.get("tensors"), dict) else value
        elif "." in field and isinstance(config.get(field.split(".")[0]), dict):
            config[field.split(".")[0]][field.split(".")[1]] = value
        else:
            config[field] = value
    path = tmp_path / "a"
    path.mkdir(exist_ok=True)
    save_file(tensors, str(path / WEIGHTS), metadata={"deltatune": json.dumps(config)})
    model = tiny.model("bert")
    try:
        dt.load_adapter(model, path)
    except dt.DeltatuneError:
        assert not hasattr(model, "deltatune")
    figures.count("hypothesis: fuzzed adapter configs")


# ------------------------------------------------------------------------ issue 10: bombs in model folders, reports, task names

def _nested_config_folder(root: Path) -> Path:
    folder = root / "nested-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return folder


def _fifo_tokenizer_folder(root: Path) -> Path:
    folder = root / "fifo-model"
    folder.mkdir(exist_ok=True)
    tiny.config("bert").save_pretrained(folder)
    os.mkfifo(folder / "tokenizer.json")  # transformers would block on it, waiting for a writer
    return folder


def _dev_zero_config_folder(root: Path) -> Path:
    folder = root / "zero-model"
    folder.mkdir(exist_ok=True)
    os.symlink("/dev/zero", folder / "config.json")
    return folder


@pytest.mark.parametrize("make, message", [(_nested_config_folder, "nested too deeply"),
                                           (_fifo_tokenizer_folder, "not a regular file"),
                                           (_dev_zero_config_folder, "not a regular file")],
                         ids=["config.json nested 100k deep", "tokenizer.json a FIFO", "config.json -> /dev/zero"])
def test_a_model_folder_that_is_a_bomb_is_one_line(tmp_path, capsys, make, message):
    folder = make(tmp_path)
    task = write_task(tmp_path / "task", "classification", n_train=8, n_eval=4)
    code = cli.main(["train", "--model", str(folder), "--task", task, "--method", "lora", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("deltatune train: error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()
    figures.count("model folders that are bombs")


@pytest.mark.parametrize("content", [b"method,value\n\xff\xfe,1\n", "method,value\n\"" + "x" * 200_000 + "\",1\n"],
                         ids=["not UTF-8", "a cell over the csv field limit"])
def test_report_on_a_damaged_results_csv_is_one_line(tmp_path, capsys, content):
    (tmp_path / "results.csv").write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltatune report: error: ") and "results.csv" in err[0], err
    figures.count("damaged results.csv")


@pytest.mark.parametrize("make", [lambda p: os.mkfifo(p), lambda p: os.symlink("/dev/zero", p),
                                  lambda p: os.symlink(p.name, p)], ids=["a FIFO", "/dev/zero", "a symlink loop"])
def test_tasks_show_on_a_file_that_is_not_data_is_one_line(tmp_path, capsys, make):
    path = tmp_path / "data.jsonl"
    make(path)
    assert cli.main(["tasks", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.jsonl" in err[0] and "unknown task" not in err[0], err
    figures.count("tasks show on files that are not data")


def test_evaluating_on_a_split_with_no_examples_is_an_error(stopped_run, tmp_path, capsys):
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert cli.main(["eval", "--adapter", str(stopped_run), "--task", str(two), "--split", "valid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "has no examples" in err[-1] and "Traceback" not in "\n".join(err), err
    figures.count("zero-example evaluations")
