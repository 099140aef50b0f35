"""Embedding recycling: evaluation from the cache, and the cache folder's pruning (tiny random models)."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from deltatune import sites as S
from deltatune.training import scoring as T
from deltatune.training import recycle
from deltatune.errors import ConfigError
from deltatune.training import TrainConfig, evaluate, train
from tests.test_train import write_task


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    for env in (recycle.MAX_GB_ENV, recycle.MAX_FILES_ENV):
        monkeypatch.delenv(env, raising=False)
    return tmp_path / "cache" / "recycle"


def _run(tmp_path, task, name, **over):
    cfg = dict(model="tiny-bert", task=task, method="telly", options={"k": 1}, max_steps=4, batch_size=8, eval_every=2,
               lr=1e-2, max_len=32, out_dir=str(tmp_path / name), progress=False)
    return train(TrainConfig(**{**cfg, **over}))


def _block0_calls(monkeypatch) -> list:
    """Count the forward passes of block 0's first sub-module in every scoring (_score)."""
    calls, score = [], T.score

    def counted(model, *args, **kwargs):
        block = next(t.module for t in S.resolve(model, "block") if t.layer == 0)
        handle = next(block.children()).register_forward_hook(lambda *a: calls.append(1))
        try:
            return score(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(T, "score", counted)
    return calls


@pytest.mark.parametrize("kind, method, options", [("retrieval", "telly", {"k": 1}),
                                                   ("classification", "lora", {"layers": [1]})])
def test_evaluate_of_a_recycled_run_scores_from_the_cache_with_the_uncached_result(tmp_path, cache, monkeypatch,
                                                                                   kind, method, options):
    task = write_task(tmp_path / kind, kind, n_train=24, n_eval=12)
    summary = _run(tmp_path, task, "run", method=method, options=options, recycle=True)
    built = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(built) == 3  # train, valid, test
    calls = _block0_calls(monkeypatch)
    # max_len=32: the run's length (evaluate's default is the longest input the model takes, which keys
    # another cache); with it, the run's own cache and scores are reproduced.
    cached = evaluate(tmp_path / "run", split="test", max_len=32, out_dir=tmp_path / "eval-cached")
    assert calls == []  # block 0 never ran: its output came from the cache
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == built  # the run's cache, reused
    valid = evaluate(tmp_path / "run", split="valid", max_len=32)
    assert calls == [] and valid["value"] == summary["valid_value"]
    plain = evaluate(tmp_path / "run", split="test", max_len=32, recycle=False, out_dir=tmp_path / "eval-plain")
    assert calls  # computed through block 0
    assert cached["value"] == plain["value"] == summary["value"]
    for key in cached:
        if isinstance(cached[key], float):
            assert cached[key] == plain[key], key
    read = lambda d: [json.loads(line) for line in (d / "predictions-test.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "eval-cached"), read(tmp_path / "eval-plain")
    assert [r.get("rank", r.get("prediction")) for r in a] == [r.get("rank", r.get("prediction")) for r in b]


def test_evaluate_builds_the_cache_of_a_split_the_run_did_not_cache(tmp_path, cache, monkeypatch):
    task = write_task(tmp_path / "retrieval", "retrieval", n_train=24, n_eval=12)
    summary = _run(tmp_path, task, "run", recycle=True)
    for p in cache.glob("test-*.safetensors"):
        p.unlink()
    calls = _block0_calls(monkeypatch)
    assert evaluate(tmp_path / "run", max_len=32)["value"] == summary["value"]
    assert calls == [] and len(list(cache.glob("test-*.safetensors"))) == 1


# ------------------------------------------------------------------------------------ pruning


def _fake(path, marker=True, key=None, size=4096):
    """A file laid out like a cache: an 8-byte header length, the JSON header, then bytes."""
    meta = {"format": "1", "key": key or path.name.rsplit("-", 1)[1].split(".")[0]}
    if marker:
        meta[recycle.MARKER[0]] = recycle.MARKER[1]
    raw = json.dumps({"__metadata__": meta}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * size)
    return path


def _used(path, when: int) -> None:
    os.utime(path, ns=(when * 10**9, path.stat().st_mtime_ns))


def test_prune_removes_the_least_recently_used_of_its_own_files_only(tmp_path):
    folder = tmp_path / "recycle"
    folder.mkdir()
    ours = [_fake(folder / f"train-{i:024x}.safetensors") for i in range(5)]
    for i, p in enumerate(ours):
        _used(p, 1000 + [3, 0, 4, 1, 2][i])  # least recently used first: 1, 3, 4, 0, 2
    foreign = _fake(folder / f"valid-{9:024x}.safetensors", marker=False)  # no marker: not ours
    wrong_key = _fake(folder / f"test-{8:024x}.safetensors", key="0" * 24)  # the marker, but not its own key
    other = folder / "notes.txt"
    other.write_text("mine")
    outside = _fake(tmp_path / f"train-{7:024x}.safetensors")
    link = folder / f"train-{7:024x}.safetensors"
    link.symlink_to(outside)  # named like a cache, a link: never followed, never removed
    for p in (foreign, wrong_key, outside):
        _used(p, 1)
    removed = recycle.prune(folder, max_files=3, max_gb=1.0, keep=[ours[1]])
    assert sorted(removed) == sorted([ours[3], ours[4]])  # ours[1] is in use: kept although the oldest
    assert all(p.exists() for p in (ours[0], ours[1], ours[2], foreign, wrong_key, other, outside)) and link.is_symlink()
    size = ours[0].stat().st_size
    removed = recycle.prune(folder, max_files=100, max_gb=2.5 * size / 2**30)
    assert removed == [ours[1]] and ours[0].exists() and ours[2].exists()  # by size: the least recently used goes
    assert recycle.prune(folder, max_files=1, max_gb=1.0) == [ours[0]]


def test_prune_removes_the_files_of_killed_builds_only(tmp_path):
    """A build killed by SIGKILL leaves its temporary file; the next prune removes it once its writer is gone
    and it has not changed for an hour, and nothing else named like one."""
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid with no process behind it
    folder = tmp_path / "recycle"
    folder.mkdir()
    key = f"{5:024x}"
    old = time.time() - 2 * recycle.STALE_AFTER_S

    def tmp(pid, when, **kw):
        path = _fake(folder / f".train-{key}.safetensors.tmp-{pid}", key=key, **kw)
        os.utime(path, (when, when))
        return path

    stale = tmp(dead.pid, old)
    recent = tmp(dead.pid + 10**6, time.time())  # its writer gone, but written to a moment ago
    running = tmp(os.getpid(), old)  # its writer is alive
    foreign = _fake(folder / f".valid-{key}.safetensors.tmp-{dead.pid}", key=key, marker=False)
    os.utime(foreign, (old, old))
    outside = tmp_path / "elsewhere"
    outside.write_text("not ours")
    link = folder / f".test-{key}.safetensors.tmp-{dead.pid}"
    link.symlink_to(outside)
    assert recycle.prune(folder, max_files=100, max_gb=1.0) == [stale]
    assert all(p.exists() for p in (recent, running, foreign, outside)) and link.is_symlink() and not stale.exists()


def test_prune_leaves_a_linked_folder_alone(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    files = [_fake(real / f"train-{i:024x}.safetensors") for i in range(3)]
    (tmp_path / "recycle").symlink_to(real, target_is_directory=True)
    assert recycle.prune(tmp_path / "recycle", max_files=1, max_gb=1.0) == []
    assert all(p.exists() for p in files)


def test_training_prunes_the_cache_folder_to_its_limits(tmp_path, cache, monkeypatch, capsys):
    task = write_task(tmp_path / "retrieval", "retrieval", n_train=24, n_eval=8)
    _run(tmp_path, task, "a", recycle=True, max_steps=2)
    first = sorted(cache.glob("*.safetensors"))
    monkeypatch.setenv(recycle.MAX_FILES_ENV, "4")
    _run(tmp_path, task, "b", recycle=True, max_steps=2, max_len=16)  # three new caches; one old one may stay
    now = sorted(cache.glob("*.safetensors"))
    assert len(now) == 4 and len(set(now) & set(first)) == 1
    assert "least recently used" in capsys.readouterr().err
    # a reuse counts as a use: the run's own caches are the most recent, so a limit of 3 keeps them
    monkeypatch.setenv(recycle.MAX_FILES_ENV, "3")
    _run(tmp_path, task, "c", recycle=True, max_steps=2, max_len=16, seed=1)
    assert sorted(cache.glob("*.safetensors")) == sorted(set(now) - set(first))
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv(recycle.MAX_FILES_ENV, bad)
        with pytest.raises(ConfigError, match=recycle.MAX_FILES_ENV):
            _run(tmp_path, task, "d", recycle=True, max_steps=2)
    monkeypatch.setenv(recycle.MAX_FILES_ENV, "10")
    monkeypatch.setenv(recycle.MAX_GB_ENV, "nan")
    with pytest.raises(ConfigError, match=recycle.MAX_GB_ENV):
        _run(tmp_path, task, "e", recycle=True, max_steps=2)


def test_every_cache_file_carries_the_marker(tmp_path, cache):
    from safetensors import safe_open

    task = write_task(tmp_path / "retrieval", "retrieval", n_train=24, n_eval=8)
    _run(tmp_path, task, "a", recycle=True, max_steps=2)
    for p in cache.glob("*.safetensors"):
        meta = safe_open(str(p), "pt").metadata()
        assert meta[recycle.MARKER[0]] == recycle.MARKER[1] and p.name.endswith(f"-{meta['key']}.safetensors")
    assert np.all([recycle._ours(p, p.stat()) for p in cache.glob("*.safetensors")])
