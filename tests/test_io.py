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
from deltatune.io import CONFIG, WEIGHTS, atomic_write_bytes

from . import tiny


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
}


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
