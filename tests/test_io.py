"""Untrusted adapter files: every damaged or mismatched file is a DeltatuneError naming the file and
the problem, raised before the model is touched."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.formats.native import CONFIG, MAX_MB_ENV, WEIGHTS, atomic_write_bytes

from . import figures, tiny


@pytest.fixture
def saved(tmp_path):
    model = dt.attach(tiny.model("bert"), "lora")
    with torch.no_grad():
        for p in model.deltatune.parameters():
            p.add_(0.1)
    return dt.save_adapter(model, tmp_path / "good")


def _rewrite(path, mutate_tensors=None, mutate_config=None):
    file = path / WEIGHTS
    tensors = load_file(str(file))
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        config = json.loads(f.metadata()["deltatune"])
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_config:
        mutate_config(config)
    save_file(tensors, str(file), metadata={"deltatune": json.dumps(config)})


def _untouched(model):
    return not hasattr(model, "deltatune")


def _corrupt(kind):
    def run(path):
        file = path / WEIGHTS
        data = file.read_bytes()
        if kind == "truncated":
            file.write_bytes(data[: len(data) // 2])
        elif kind == "garbage":
            file.write_bytes(os.urandom(len(data)))
        elif kind == "empty":
            file.write_bytes(b"")
        elif kind == "header":
            file.write_bytes(b"\xff" * 8 + data[8:])
        elif kind == "pickle":
            file.write_bytes(pickle.dumps({"a": 1}))
        elif kind == "missing":
            file.unlink()
    return run


BAD = {
    "truncated file": (_corrupt("truncated"), "truncated or corrupted"),
    "random bytes": (_corrupt("garbage"), "truncated or corrupted"),
    "empty file": (_corrupt("empty"), "truncated or corrupted"),
    "bad header length": (_corrupt("header"), "truncated or corrupted"),
    "a pickle instead": (_corrupt("pickle"), "truncated or corrupted"),
    "missing file": (_corrupt("missing"), "no adapter at"),
    "missing tensor": (lambda p: _rewrite(p, lambda t: t.pop(next(iter(t)))), "missing"),
    "extra tensor": (lambda p: _rewrite(p, lambda t: t.update({"delta.x.y": torch.zeros(2)})), "extra"),
    "NaN weights": (lambda p: _rewrite(p, lambda t: next(iter(t.values())).fill_(float("nan"))), "NaN"),
    "Inf weights": (lambda p: _rewrite(p, lambda t: next(iter(t.values())).fill_(float("inf"))), "NaN or Inf"),
    "wrong shape": (lambda p: _rewrite(p, lambda t: t.update({k: torch.zeros(3) for k in list(t)[:1]})), "shape"),
    "unknown method": (lambda p: _rewrite(p, mutate_config=lambda c: c.update(method="nope")), "not registered"),
    "bad option": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(r="eight")), "cannot rebuild"),
    "options not a dict": (lambda p: _rewrite(p, mutate_config=lambda c: c.update(options=[1])), "options"),
    "newer format": (lambda p: _rewrite(p, mutate_config=lambda c: c.update(format_version=99)), "newer"),
    "not an adapter": (lambda p: _rewrite(p, mutate_config=lambda c: c.update(format="other")), "not a deltatune adapter"),
    "version as string": (lambda p: _rewrite(p, mutate_config=lambda c: c.update(format_version="1")), "format_version"),
    "no metadata": (lambda p: save_file(load_file(str(p / WEIGHTS)), str(p / WEIGHTS)), "no deltatune config"),
    "other hidden size": (lambda p: _rewrite(p, mutate_config=lambda c: c["base"].update(hidden_size=64)), "hidden_size"),
    "other base weights": (lambda p: _rewrite(p, mutate_config=lambda c: c["base"].update(fingerprint="0" * 16)), "base weights differ"),
    # issue 10: options and tensors that loaded, then broke the model or escaped as raw errors
    "alpha Infinity": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(alpha=float("inf"))), "finite"),
    "alpha 1e308": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(alpha=1e308)), "'alpha' must be <="),
    "r 10**30": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(r=10**30)), "'r' must be <="),
    "complex64 holding NaN": (lambda p: _rewrite(p, _retype(torch.complex64, complex(float("nan"), 0))), "stored as C64"),
    "int64 tensor": (lambda p: _rewrite(p, _retype(torch.int64, 1)), "stored as I64"),
    "bool tensor": (lambda p: _rewrite(p, _retype(torch.bool, True)), "stored as BOOL"),
    "float8 tensor": (lambda p: _rewrite(p, _retype(torch.float8_e4m3fn, 1.0)), "stored as F8_E4M3"),
    "float64 beyond float32": (lambda p: _rewrite(p, _retype(torch.float64, 1e300)), "beyond the range"),
    "a FIFO": (lambda p: _replace_file(p, lambda f: os.mkfifo(f)), "not a regular file"),
    "a link to /dev/zero": (lambda p: _replace_file(p, lambda f: os.symlink("/dev/zero", f)), "not a regular file"),
    "a link to /dev/urandom": (lambda p: _replace_file(p, lambda f: os.symlink("/dev/urandom", f)), "not a regular file"),
    "a directory": (lambda p: _replace_file(p, lambda f: f.mkdir()), "not a regular file"),
    "a site pattern that backtracks": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(
        sites=["re:(.|.)*\\d"])), "took over"),
    "a counted repeat of 10**9": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(
        sites=["re:((a{1000}){1000}){1000}"])), "counted repeats"),
    "a site pattern of 100,000 characters": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(
        sites=["re:" + "a" * 100_000])), "at most 1000"),
    "a 'layer' group matching words": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(
        sites=["re:(?P<layer>.*)"])), "group 'layer'"),
    "layers beyond the depth": (lambda p: _rewrite(p, mutate_config=lambda c: c["options"].update(layers=[0, 999])),
                                "layers \\[999\\] do not exist"),
}


def _retype(dtype, value):
    """Replace the first tensor by one of ``dtype`` filled with ``value``."""
    def mutate(tensors):
        key = next(iter(tensors))
        tensors[key] = torch.full(tensors[key].shape, value, dtype=dtype)
    return mutate


def _replace_file(path, make):
    (path / WEIGHTS).unlink()
    make(path / WEIGHTS)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_adapter_files_are_rejected_cleanly(saved, name):
    damage, message = BAD[name]
    damage(saved)
    model = tiny.model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dt.DeltatuneError, match=message) as err:
        dt.load_adapter(model, saved)
    assert str(saved) in str(err.value)
    assert _untouched(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    figures.count("damaged or mismatched adapter files")


@pytest.mark.parametrize("method, options, edit, message", [
    ("houlsby", {}, {"bottleneck": 10**30}, "'bottleneck' must be <="),
    ("prompt", {"init": "random"}, {"seed": 2**70}, "'seed' must be <="),
    ("telly", {}, {"k": 10**30}, "'k' must be <=|exceeds the model"),
    ("prefix", {"hidden": 4}, {"length": 10**30}, "'length' must be <="),
    ("parallel", {}, {"scale": float("inf")}, "finite"),
    ("lora", {}, {"dropout": float("nan")}, "NaN|finite"),
], ids=["houlsby bottleneck 10**30", "prompt seed 2**70", "telly k 10**30", "prefix length 10**30",
        "parallel scale inf", "lora dropout NaN"])
def test_options_beyond_the_api_bounds_are_refused_in_files(tmp_path, method, options, edit, message):
    model = dt.attach(tiny.model("bert"), method, **options)
    path = dt.save_adapter(model, tmp_path / "a")
    _rewrite(path, mutate_config=lambda c: c["options"].update(edit))
    fresh = tiny.model("bert")
    with pytest.raises(dt.AdapterFileError, match=message):
        dt.load_adapter(fresh, path)
    assert _untouched(fresh)
    with pytest.raises(dt.ConfigError, match=message):  # the same bound as the API's
        dt.attach(tiny.model("bert"), method, **{**options, **edit})
    figures.count("damaged or mismatched adapter files")


def test_an_adapter_file_larger_than_the_limit_says_how_to_raise_it(saved, monkeypatch):
    monkeypatch.setenv(MAX_MB_ENV, "0.001")
    with pytest.raises(dt.AdapterFileError, match=f"more than the 0.001 MB limit.*set {MAX_MB_ENV}"):
        dt.load_adapter(tiny.model("bert"), saved)
    monkeypatch.setenv(MAX_MB_ENV, "10")
    dt.load_adapter(tiny.model("bert"), saved)
    figures.count("damaged or mismatched adapter files")


# ------------------------------------------------------------------------ precision of the base weights

def test_an_adapter_trained_on_fp16_weights_loads_into_the_fp32_model(tmp_path):
    half = dt.attach(tiny.model("bert").half(), "lora")
    with torch.no_grad():
        for p in half.deltatune.parameters():
            p.add_(0.01)
    path = dt.save_adapter(half, tmp_path / "a")
    full = dt.load_adapter(tiny.model("bert"), path)  # compared at float16, the precision it was trained at
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits,
                                   half.float()(input_ids=ids).logits, atol=2e-3, rtol=2e-3)
    with pytest.raises(dt.AdapterFileError, match="differ .* even compared at float16.*float32"):
        dt.load_adapter(tiny.model("bert", seed=7), path)  # other weights: still refused, naming both dtypes
    figures.count("damaged or mismatched adapter files")


def test_an_fp32_adapter_on_an_fp16_model_names_both_dtypes(saved):
    model = tiny.model("bert").half()
    with pytest.raises(dt.AdapterFileError, match="trained on float32 base weights and this model holds float16"):
        dt.load_adapter(model, saved)
    assert _untouched(model)
    dt.load_adapter(model, saved, check_base=False)
    figures.count("damaged or mismatched adapter files")


def test_loading_onto_another_architecture_is_refused(saved):
    with pytest.raises(dt.AdapterFileError, match="family"):
        dt.load_adapter(tiny.model("gpt2"), saved)


def test_check_base_false_allows_a_different_init(saved):
    model = dt.load_adapter(tiny.model("bert", seed=7), saved, check_base=False)
    assert dt.adapters(model) == ["default"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_saved_files_are_safetensors_and_json(saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted([WEIGHTS, CONFIG])
    config = json.loads((saved / CONFIG).read_text())
    assert config["method"] == "lora" and config["format_version"] == 1
    assert config["base"]["family"] == "bert" and len(config["base"]["fingerprint"]) == 16


def _sift_adapter(tmp_path):
    """A sparse delta (sift at init: fixed positions, trainable values) saved to disk."""
    model = dt.attach(tiny.model("bert"), "sift")
    with torch.no_grad():
        for n, p in model.deltatune.named_parameters():
            p.add_(0.1)
    dt.save_adapter(model, tmp_path / "s")
    return model, tmp_path / "s"


def test_sparse_deltas_round_trip_and_merge_exactly(tmp_path):
    model, path = _sift_adapter(tmp_path)
    batch = tiny.inputs("bert")
    fresh = dt.load_adapter(tiny.model("bert"), path)
    with torch.no_grad():
        want = tiny.outputs(model, batch)
        torch.testing.assert_close(tiny.outputs(fresh, batch), want, atol=1e-5, rtol=1e-5)
        dt.merge(fresh)
        torch.testing.assert_close(tiny.outputs(fresh, batch), want, atol=1e-5, rtol=1e-5)
    config, tensors = dt.read_adapter(path)
    idx = [k for k in tensors if k.endswith(".indices")]
    assert idx and all(tensors[k].dtype == torch.int64 for k in idx)


@pytest.mark.parametrize("damage", ["negative", "repeated", "beyond"])
def test_damaged_sparse_positions_are_refused(tmp_path, damage):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    _, path = _sift_adapter(tmp_path)
    file = path / "adapter.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith(".indices") and tensors[k].numel() > 1)  # a weight's, not a bias's
    t = tensors[key].clone()
    if damage == "negative":
        t[0] = -1
    elif damage == "repeated":
        t[1] = t[0]
    else:
        t[0] = 10**9
    tensors[key] = t
    save_file(tensors, str(file), metadata=meta)
    fresh = tiny.model("bert")
    with pytest.raises(dt.AdapterFileError, match="positions"):
        dt.load_adapter(fresh, path)
    assert not hasattr(fresh, "deltatune")
