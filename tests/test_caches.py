"""Caches are untrusted input: every entry of deltatune's cache folder (zero-shot scores, built tasks, the
recycling cache, converted models, freeze-depth analyses, layer features) is used only when it is a regular
file of this user (never a link, FIFO or device), within its size bound, of the expected structure and
shapes, with finite values, carrying the key it was asked for. Anything else is rebuilt with a
CacheWarning and gives the result a fresh computation gives; nothing hangs, nothing is a traceback, and a
build never writes through a link planted where its temporary file would go.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch

from deltatune import storage
from deltatune.storage import CacheEntry, CacheWarning

from . import figures
from .test_train import write_task

OTHER_UID = 54321  # a user that is not us


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def within(seconds: float, fn):
    """``fn()``'s result, or a failure if it has not returned after ``seconds`` (a FIFO read would block)."""
    box = []
    worker = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert box, f"{fn} did not return within {seconds} s"
    return box[0]


def _precious(tmp_path: Path) -> Path:
    path = tmp_path / "precious.txt"
    path.write_text("the user's file")
    return path


# Ways to spoil an entry at ``path`` (a file deltatune wrote there first), each leaving something that must
# not be trusted.
def _other_user(path: Path) -> None:
    os.chown(path, OTHER_UID, OTHER_UID)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _link_to_a_copy(path: Path) -> None:
    copy = path.with_name("copy-elsewhere")
    shutil.copy(path, copy)
    path.unlink()
    path.symlink_to(copy)


def _huge(path: Path) -> None:
    os.truncate(path, storage.MAX_CACHE_ENTRY + 1)  # sparse: costs no disk


def _not_json(path: Path) -> None:
    path.write_text("{not json")


def _deeply_nested(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _json_edit(edit):
    def spoil(path: Path) -> None:
        path.write_text(json.dumps(edit(json.loads(path.read_text())), allow_nan=True))
    return spoil


SPOILED_JSON = {
    "owned by another user": _other_user,
    "a FIFO": _fifo,
    "a link to /dev/zero": _dev_zero,
    "a link to a copy of itself": _link_to_a_copy,
    "larger than its bound": _huge,
    "not JSON": _not_json,
    "nested 100k deep": _deeply_nested,
    "the key of another entry": _json_edit(lambda e: {**e, "key": "0" * 32}),
    "no key inside (the format of old)": _json_edit(lambda e: e["value"]),
    "a list": _json_edit(lambda e: [e]),
}


# ------------------------------------------------------------------ the helper itself

def test_a_cache_entry_round_trips_and_a_missing_one_is_quiet(tmp_path, recwarn):
    entry = CacheEntry(tmp_path / "c" / "a.json", "k1", "test entry", root=tmp_path)
    assert entry.read_json() is None and not recwarn.list
    assert entry.write_json({"x": [1, 2]}) and entry.read_json() == {"x": [1, 2]}
    assert not recwarn.list
    assert oct((tmp_path / "c" / "a.json").stat().st_mode & 0o777) == "0o600"  # a temporary of mkstemp, renamed


@pytest.mark.parametrize("spoil", list(SPOILED_JSON))
def test_a_spoiled_cache_entry_is_not_trusted(tmp_path, spoil):
    entry = CacheEntry(tmp_path / "a.json", "k1", "test entry")
    entry.write_json({"x": 1})
    SPOILED_JSON[spoil](tmp_path / "a.json")
    with pytest.warns(CacheWarning, match="not trusted and is rebuilt"):
        assert within(30, entry.read_json) is None
    assert entry.write_json({"x": 2}) and entry.read_json() == {"x": 2}  # rebuilt in its place, a file of ours
    assert not (tmp_path / "a.json").is_symlink()
    figures.count("caches: spoiled entries")


def test_a_check_that_fails_is_a_rebuild(tmp_path):
    entry = CacheEntry(tmp_path / "a.json", "k1", "test entry")
    entry.write_json({"rows": "not a list"})

    def check(value):
        if not isinstance(value["rows"], list):
            raise TypeError("rows must be a list")

    with pytest.warns(CacheWarning, match="rows must be a list"):
        assert entry.read_json(check) is None


def test_writes_never_go_through_a_link_planted_at_a_predictable_name(tmp_path):
    precious = _precious(tmp_path)
    folder = tmp_path / "cache"
    folder.mkdir()
    for name in (f".a.json.tmp-{os.getpid()}", ".a.json.tmp", f".a.json.{os.getpid()}.tmp", "a.json"):
        (folder / name).symlink_to(precious)
    entry = CacheEntry(folder / "a.json", "k", "test entry", root=folder)
    assert entry.write_json({"x": 1}) and entry.read_json() == {"x": 1}
    assert precious.read_text() == "the user's file"
    names = set()
    for _ in range(2):  # unpredictable: a random tail after the pid
        with entry.temporary() as f:
            names.add(Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).name)
    assert len(names) == 2 and all(n.startswith(f".a.json.tmp-{os.getpid()}-") for n in names)


def test_a_cache_folder_that_is_a_link_or_not_ours_is_not_written(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "zero-shot").symlink_to(elsewhere, target_is_directory=True)
    entry = CacheEntry(root / "zero-shot" / "a.json", "k", "test entry", root=root)
    with pytest.warns(CacheWarning, match="symbolic link"):
        assert not entry.write_json({"x": 1})
    assert list(elsewhere.iterdir()) == []
    (root / "zero-shot").unlink()
    (root / "zero-shot").mkdir()
    os.chown(root / "zero-shot", OTHER_UID, OTHER_UID)
    with pytest.warns(CacheWarning, match="another user"):
        assert not entry.write_json({"x": 1})


# ------------------------------------------------------------------ the zero-shot cache

@pytest.fixture(scope="module")
def cls_task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("cls"), "classification", n_train=24, n_eval=8)


def _train(tmp_path, task, name, **over):
    from deltatune.training import TrainConfig, train

    cfg = dict(model="tiny-bert", task=task, method="lora", max_steps=2, batch_size=8, eval_every=2, lr=1e-2,
               max_len=32, out_dir=str(tmp_path / name), progress=False)
    return train(TrainConfig(**{**cfg, **over}))


def _planted_score(path: Path) -> None:
    """A well-formed entry with another score, as another user could plant it in a shared cache folder."""
    entry = json.loads(path.read_text())
    metric = next(iter(entry["value"]["metrics"]))
    entry["value"]["metrics"] = {k: 0.999 if k == metric else v for k, v in entry["value"]["metrics"].items()}
    path.write_text(json.dumps(entry))
    os.chown(path, OTHER_UID, OTHER_UID)


SPOILED_ZERO_SHOT = {
    **{k: SPOILED_JSON[k] for k in ("a FIFO", "a link to /dev/zero", "nested 100k deep", "the key of another entry",
                                    "no key inside (the format of old)")},
    "a planted score owned by another user": _planted_score,
    "metrics not an object": _json_edit(lambda e: {**e, "value": {**e["value"], "metrics": 5}}),
    "no records": _json_edit(lambda e: {**e, "value": {"metrics": e["value"]["metrics"]}}),
    "a NaN score": _json_edit(lambda e: {**e, "value": {**e["value"], "metrics": {
        k: float("nan") for k in e["value"]["metrics"]}}}),
    "records of another split": _json_edit(lambda e: {**e, "value": {**e["value"], "records": e["value"]["records"][:1]}}),
}


@pytest.mark.parametrize("spoil", list(SPOILED_ZERO_SHOT))
def test_a_spoiled_zero_shot_entry_is_scored_again(cls_task, tmp_path, cache, monkeypatch, spoil):
    monkeypatch.setenv("DELTATUNE_ZERO_SHOT_CACHE", "1")
    first = _train(tmp_path, cls_task, "a")
    [path] = (cache / "zero-shot").glob("*.json")
    SPOILED_ZERO_SHOT[spoil](path)
    with pytest.warns(CacheWarning, match=r"zero-shot.*not trusted"):
        again = within(300, lambda: _train(tmp_path, cls_task, "b"))
    assert again["zero_shot_cached"] is False and again["zero_shot_value"] == first["zero_shot_value"]
    assert _train(tmp_path, cls_task, "c")["zero_shot_cached"] is True  # the rebuilt entry is used
    figures.count("caches: spoiled zero-shot entries")


# ------------------------------------------------------------------ the task cache

@pytest.fixture
def small_stdlib(tmp_path):
    """A few real modules standing in for the standard library: a corpus built in seconds."""
    import json as json_module
    import shlex
    import textwrap

    root = tmp_path / "stdlib"
    root.mkdir()
    shutil.copy(textwrap.__file__, root)
    shutil.copy(shlex.__file__, root)
    shutil.copytree(Path(json_module.__file__).parent, root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    return str(root)


def _fresh_task(root):
    from deltatune.tasks import code

    code._built.cache_clear()
    code.load_corpus.cache_clear()
    return code.build_task("code-search", root=root)


SPOILED_TASK = {
    "no splits (KeyError 'train' before)": _json_edit(lambda e: {**e, "value": {}}),
    "rows that are not objects": _json_edit(lambda e: {**e, "value": {**e["value"], "train": [1, 2]}}),
    **{k: SPOILED_JSON[k] for k in ("a FIFO", "owned by another user", "larger than its bound", "the key of another entry",
                                    "a link to /dev/zero")},
}


@pytest.mark.parametrize("spoil", list(SPOILED_TASK))
@pytest.mark.parametrize("what", ["code-search", "corpus"])
def test_a_spoiled_task_cache_is_built_again(small_stdlib, cache, spoil, what):
    from deltatune.tasks import code

    first = _fresh_task(small_stdlib)
    path = code.cache_file(what, small_stdlib)
    assert path.is_file()
    if what == "corpus":  # read only when a task is built from it
        code.cache_file("code-search", small_stdlib).unlink()
    corpus_spoils = {"no splits (KeyError 'train' before)": [{"name": 1}], "rows that are not objects": [1, 2]}
    if what == "corpus" and spoil in corpus_spoils:  # the corpus's own structure: its functions
        _json_edit(lambda e: {**e, "value": {**e["value"], "functions": corpus_spoils[spoil]}})(path)
    else:
        SPOILED_TASK[spoil](path)
    with pytest.warns(CacheWarning, match="not trusted"):
        again = within(120, lambda: _fresh_task(small_stdlib))
    assert (again.train, again.valid, again.test) == (first.train, first.valid, first.test)
    assert path.is_file() and not path.is_symlink()
    figures.count("caches: spoiled task caches")


# ------------------------------------------------------------------ the recycling cache

@pytest.fixture(scope="module")
def recycled(tmp_path_factory):
    """A telly k=1 run trained from the recycling cache, with the cache folder it built."""
    root = tmp_path_factory.mktemp("recycled")
    old = os.environ.get("DELTATUNE_CACHE")
    os.environ["DELTATUNE_CACHE"] = str(root / "cache")
    try:
        task = write_task(root / "retrieval", "retrieval", n_train=24, n_eval=12)
        summary = _train(root, task, "run", method="telly", options={"k": 1}, recycle=True)
    finally:
        os.environ.pop("DELTATUNE_CACHE") if old is None else os.environ.__setitem__("DELTATUNE_CACHE", old)
    return root, summary


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n, header = _header(path)
    new = json.dumps(edit(header), separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n:])


def _nan_state(path: Path) -> None:
    n, header = _header(path)
    begin = 8 + n + header["hidden"]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(begin + 4 * 5)
        f.write(struct.pack("<f", float("nan")))


def _other_width(path: Path) -> None:
    def edit(header):
        total, d = header["hidden"]["shape"]
        header["hidden"]["shape"] = [total * 2, d // 2]  # the same bytes, read as another width
        return header
    _rewrite_header(path, edit)


def _huge_header(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + raw[8:])


def _other_key(path: Path) -> None:
    _rewrite_header(path, lambda h: {**h, "__metadata__": {**h["__metadata__"], "key": "f" * 24}})


SPOILED_RECYCLE = {"a NaN state": _nan_state, "states of another width": _other_width,
                   "a header of 2**40 bytes": _huge_header, "the key of another cache": _other_key,
                   "owned by another user": _other_user, "a FIFO": _fifo, "a link to a copy of itself": _link_to_a_copy,
                   "truncated": lambda p: os.truncate(p, p.stat().st_size // 2)}


@pytest.mark.parametrize("spoil", list(SPOILED_RECYCLE))
def test_a_spoiled_recycling_cache_is_built_again(recycled, tmp_path, monkeypatch, spoil):
    from deltatune.training import evaluate

    root, summary = recycled
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache, symlinks=True)
    monkeypatch.setenv("DELTATUNE_CACHE", str(cache))
    [path] = (cache / "recycle").glob("test-*.safetensors")
    SPOILED_RECYCLE[spoil](path)
    with pytest.warns(CacheWarning, match="recycling cache of these inputs|not trusted"):
        result = within(300, lambda: evaluate(root / "run", max_len=32))
    assert result["value"] == summary["value"]
    assert path.is_file() and not path.is_symlink() and path.stat().st_uid == os.geteuid()
    figures.count("caches: spoiled recycling caches")


def test_the_recycling_build_never_writes_through_a_planted_link(recycled, tmp_path, monkeypatch, recwarn):
    from deltatune.training import evaluate

    root, summary = recycled
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache, symlinks=True)
    monkeypatch.setenv("DELTATUNE_CACHE", str(cache))
    [path] = (cache / "recycle").glob("test-*.safetensors")
    path.unlink()
    precious = _precious(tmp_path)
    planted = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # the name a build wrote to before
    planted.symlink_to(precious)
    assert evaluate(root / "run", max_len=32)["value"] == summary["value"]
    assert precious.read_text() == "the user's file" and planted.is_symlink() and path.is_file()


# ------------------------------------------------------------------ the freeze-depth analysis cache

@pytest.fixture(scope="module")
def freeze_task(tmp_path_factory):
    from deltatune.tasks import load_task

    return load_task(write_task(tmp_path_factory.mktemp("freeze"), "classification", n_train=24, n_eval=12))


def _freeze(task):
    from deltatune.training.freeze import freeze_depth

    torch.manual_seed(0)  # the classifier head around the backbone is drawn from the global generator
    return freeze_depth("tiny-bert", task, steps=2, samples=12, max_len=32, batch_size=8, progress=False)


def _deeper(entry: dict, more: int) -> dict:
    """The entry with ``more`` layers' scores added and the K the rule gives for them (K beyond this model)."""
    from deltatune.training.freeze import SCORE, THRESHOLD, recommend_k

    scores = {k: v + [v[-1]] * more for k, v in entry["value"]["scores"].items()}
    return {**entry, "value": {**entry["value"], "scores": scores, "k": recommend_k(scores[SCORE], THRESHOLD)}}


SPOILED_FREEZE = {
    "a K that its scores do not give": _json_edit(lambda e: {**e, "value": {**e["value"], "k": e["value"]["k"] + 5}}),
    "NaN scores": _json_edit(lambda e: {**e, "value": {**e["value"], "scores": {
        k: [float("nan")] * len(v) for k, v in e["value"]["scores"].items()}}}),
    "the analysis of other settings": _json_edit(lambda e: {**e, "value": {**e["value"], "settings": {}}}),
    "scores of a deeper model, with the K they give": _json_edit(lambda e: _deeper(e, 48)),
    **{k: SPOILED_JSON[k] for k in ("owned by another user", "a FIFO", "not JSON", "no key inside (the format of old)")},
}


@pytest.mark.parametrize("spoil", list(SPOILED_FREEZE))
def test_a_spoiled_freeze_depth_analysis_is_run_again(freeze_task, cache, spoil):
    first = _freeze(freeze_task)
    assert first["cached"] is False and _freeze(freeze_task)["cached"] is True
    SPOILED_FREEZE[spoil](Path(first["cache_file"]))
    with pytest.warns(CacheWarning, match="freeze-depth analysis|not trusted"):
        again = within(300, lambda: _freeze(freeze_task))
    assert again["cached"] is False and again["k"] == first["k"] and again["scores"] == first["scores"]
    figures.count("caches: spoiled freeze-depth analyses")


# ------------------------------------------------------------------ the layer-feature cache

def _extract():
    from deltatune.analysis import features
    from deltatune.models import load_backbone

    model, tokenizer = load_backbone("tiny-bert", "base")
    texts = [f"def f{i}(x): return x + {i}" for i in range(6)]
    return features.extract(model, tokenizer, texts, model_name="tiny-bert", max_len=16, batch_size=4, progress=False)


def _layer(edit, key: str | None = None):
    """Rewrite layer 1's file of an entry folder with ``edit(tensors)`` (and another key inside, if given)."""
    def spoil(folder: Path) -> None:
        from safetensors.torch import load, save

        path = folder / "layer-1.safetensors"
        data = path.read_bytes()
        meta = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
        path.write_bytes(save(edit(load(data)), metadata={**meta, **({"key": key} if key else {})}))
    return spoil


SPOILED_FEATURES = {
    "a NaN feature": _layer(lambda t: {"pooled": t["pooled"].index_fill(0, torch.tensor([0]), float("nan"))}),
    "features of fewer texts": _layer(lambda t: {"pooled": t["pooled"][:3].contiguous()}),
    "float64 features": _layer(lambda t: {"pooled": t["pooled"].double()}),
    "another entry's key inside": _layer(lambda t: t, key="x/y"),
    "a layer file owned by another user": lambda f: _other_user(f / "layer-1.safetensors"),
    "a FIFO as a layer file": lambda f: _fifo(f / "layer-1.safetensors"),
    "index.json a FIFO": lambda f: _fifo(f / "index.json"),
    "index.json naming spans of no text": _json_edit(lambda e: {**e, "value": {**e["value"], "token_index": [[99, 0]]}}),
}


@pytest.mark.parametrize("spoil", list(SPOILED_FEATURES))
def test_spoiled_layer_features_are_extracted_again(cache, monkeypatch, spoil):
    from deltatune.analysis import features

    first = _extract()
    [folder] = [p.parent for p in (cache / "representations").rglob("index.json")]
    runs = []
    real = features._run
    monkeypatch.setattr(features, "_run", lambda *a, **k: runs.append(1) or real(*a, **k))
    _extract()
    assert runs == []  # a trusted entry is read, not extracted
    target = folder / "index.json" if spoil.startswith("index.json naming") else folder
    SPOILED_FEATURES[spoil](target)
    with pytest.warns(CacheWarning, match="not trusted"):
        again = within(120, _extract)
    assert runs == [1]
    assert all(torch.equal(a, b) for a, b in zip(first["pooled"], again["pooled"]))
    figures.count("caches: spoiled layer features")


# ------------------------------------------------------------------ converted models

def _convert(calls):
    def convert(folder: Path) -> None:
        calls.append(folder)
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"weights")
    return convert


def _link_elsewhere(target: Path) -> None:
    elsewhere = target.parent.parent / "elsewhere-model"
    shutil.copytree(target, elsewhere)
    shutil.rmtree(target)
    target.symlink_to(elsewhere, target_is_directory=True)


SPOILED_MODEL = {
    "the folder a link to a copy": _link_elsewhere,
    "a FIFO inside": lambda t: os.mkfifo(t / "tokenizer.json"),
    "a link inside": lambda t: (t / "model.safetensors").unlink() or (t / "model.safetensors").symlink_to("/dev/zero"),
    "a file of another user": lambda t: _other_user(t / "model.safetensors"),
    "weights changed after the conversion": lambda t: (t / "model.safetensors").write_bytes(b"other weights!"),
    "a stamp of another entry": lambda t: _json_edit(lambda e: {**e, "key": "x"})(t / "deltatune-cache.json"),
}


@pytest.mark.parametrize("spoil", list(SPOILED_MODEL))
def test_a_spoiled_converted_model_is_converted_again(cache, tmp_path, spoil):
    from deltatune.models import converted_model

    calls = []
    target = converted_model("some-model", "key1", _convert(calls))
    assert converted_model("some-model", "key1", _convert(calls)) == target and len(calls) == 1  # reused
    SPOILED_MODEL[spoil](target)
    elsewhere = tmp_path / "elsewhere-model"
    theirs = sorted(os.listdir(elsewhere)) if elsewhere.exists() else None
    with pytest.warns(CacheWarning, match="not trusted"):
        assert converted_model("some-model", "key1", _convert(calls)) == target
    assert len(calls) == 2 and target.is_dir() and not target.is_symlink()
    assert (target / "model.safetensors").read_bytes() == b"weights"
    if theirs is not None:
        assert sorted(os.listdir(elsewhere)) == theirs  # what the link pointed at is left alone
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    figures.count("caches: spoiled converted models")


def test_a_converted_model_of_another_key_is_converted_again_quietly(cache, recwarn):
    from deltatune.models import converted_model

    calls = []
    converted_model("some-model", "key1", _convert(calls))
    converted_model("some-model", "key2", _convert(calls))  # a new source or converter: a new conversion
    assert len(calls) == 2 and not [w for w in recwarn.list if w.category is CacheWarning]
