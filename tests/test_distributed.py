"""Data-parallel training (deltatune.training.distributed): 2 processes with gloo on the CPU, tiny random models.

The 2-process runs of a fixture share one launch of 2 processes (they start once, then train each
job in turn), so the module costs one process start-up for the fast tests, not one per test.

The tolerance. Both sides train in float64 on tiny-llama, which has no dropout, so the two runs
compute the same sums in a different order only (the batch's rows split between two processes,
then added): their gradients differ by rounding of about 1e-16 of the summands. AdamW divides by
sqrt(v) + eps (eps = 1e-8), which can turn a gradient difference d into an update difference of
at most lr * d / eps: about 1e-10 at lr 1e-2, far below ATOL = 1e-8 on any CPU, however its SIMD
width orders the sums. The float32 steps inside the model (the classification loss's logits, the
attention softmax) round the same float64 value the same way, unless it lies within 1e-16 of a
float32 rounding boundary. A missing all-reduce, a wrong share of the loss or a misplaced batch
changes the adapter by about lr (1e-2 to 1e-3) per step: the test sees it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune import cli
from deltatune.training import distributed
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.training import TrainConfig, train
from tests.test_train import write_task

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-8
STEPS = 4


@contextlib.contextmanager
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _cfg(root: Path, tasks: dict, name: str, kind="classification", **over) -> TrainConfig:
    base = dict(model="tiny-llama", task=tasks[kind], method="lora", max_steps=STEPS, eval_every=STEPS, batch_size=8,
                lr=1e-2, max_len=24, max_new_tokens=3, max_eval=8, out_dir=str(root / "runs" / name), progress=False)
    return TrainConfig(**{**base, **over})


def _final(cfg: TrainConfig) -> dict:
    """The adapter of the last step (the checkpoint keeps it unfolded, whatever validation chose)."""
    return load_file(Path(cfg.out_dir) / "checkpoints" / f"step-{cfg.max_steps:06d}" / "adapter" / "adapter.safetensors")


def _ranks(jobs: list[TrainConfig], watched: str) -> dict:
    """In each of the 2 processes: every job in turn (float64), and what this process opened,
    created, renamed or removed under ``watched`` (Python's audit events)."""
    touched = []

    def audit(event, args):
        if event in ("open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.unlink",
                     "os.listdir", "os.scandir", "shutil.rmtree", "os.chmod", "os.truncate"):
            for arg in args:
                if isinstance(arg, (str, Path)) and str(arg).startswith(watched):
                    touched.append((event, str(arg)))

    sys.addaudithook(audit)  # this process ends with the launch
    errors = []
    with float64():
        for cfg in jobs:
            try:
                train(cfg)
                errors.append(None)
            except DeltatuneError as err:
                errors.append(f"{type(err).__name__}: {err}")
    return {"touched": touched, "errors": errors}


def _launch(root: Path, tasks: dict, same: dict, extra: list, name: str) -> dict:
    """The 2-process runs of ``same`` then ``extra`` in one launch, and the 1-process run of each of ``same``."""
    ranks = distributed.launch(_ranks, ([*same.values(), *extra], str(root / "runs")), 2)
    with float64():
        one = {key: dataclasses.replace(cfg, out_dir=str(root / "runs" / f"1p-{name}-{key}")) for key, cfg in same.items()}
        for cfg in one.values():
            train(cfg)
    return {"root": root, "two": same, "one": one, "ranks": ranks}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return root, {kind: write_task(root / "tasks" / kind, kind) for kind in ("classification", "retrieval", "generation")}


@pytest.fixture(scope="module")
def runs(tasks):
    """lora (classification, retrieval), prefix from 2 processes resumed by 1, houlsby from 1 resumed by 2, sift."""
    root, paths = tasks
    same = {"lora": _cfg(root, paths, "2p-lora"), "retrieval": _cfg(root, paths, "2p-retrieval", "retrieval")}
    cut = _cfg(root, paths, "2p-then-1p", method="prefix", stop_after=2)  # 2 processes, then resumed by 1
    back = _cfg(root, paths, "1p-then-2p", method="houlsby", stop_after=2)  # 1 process, then resumed by 2
    with float64():
        train(back)
    fsdp = _cfg(root, paths, "2p-fsdp", fsdp=True)  # the frozen base sharded over the 2 processes
    out = _launch(root, paths, same, [fsdp, cut, dataclasses.replace(back, resume=True, stop_after=None),
                                      _cfg(root, paths, "2p-sift", method="sift")], "fast")
    with float64():
        train(dataclasses.replace(cut, resume=True, stop_after=None))
        whole = {m: _cfg(root, paths, f"1p-{m}", method=m) for m in ("prefix", "houlsby")}
        for cfg in whole.values():
            train(cfg)
    return {**out, "cut": cut, "back": back, "whole": whole, "fsdp": fsdp}


@pytest.fixture(scope="module")
def slow_runs(tasks):
    root, paths = tasks
    same = {m: _cfg(root, paths, f"2p-{m}", method=m) for m in ("houlsby", "prefix", "full")}
    same.update({"generation": _cfg(root, paths, "2p-generation", "generation", method="full", lr=3e-3),
                 "dps": _cfg(root, paths, "2p-dps", method="dps", lr=1e-3)})
    return _launch(root, paths, same, [], "slow")


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")


def _log(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]


def _check_same(runs, key):
    assert runs["ranks"][0]["errors"][list(runs["two"]).index(key)] is None
    one, two = _final(runs["one"][key]), _final(runs["two"][key])
    _assert_same(one, two)
    assert all(v.dtype == torch.float64 for v in one.values() if v.is_floating_point())
    losses = [r["loss"] for r in _log(runs["two"][key]) if "loss" in r]
    assert len(losses) == STEPS  # one line per step: rank 1 writes none
    # The classification and generation losses are float32 means (their terms added in another order): a few ulps.
    assert losses == pytest.approx([r["loss"] for r in _log(runs["one"][key]) if "loss" in r], rel=1e-6)
    assert json.loads((Path(runs["two"][key].out_dir) / "run.json").read_text())["nproc"] == 2


@pytest.mark.parametrize("key", ["lora", "retrieval"])
def test_two_processes_train_the_same_adapter_as_one(runs, key):
    _check_same(runs, key)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["houlsby", "prefix", "full", "generation", "dps"])
def test_two_processes_train_the_same_adapter_as_one_every_method(slow_runs, key):
    _check_same(slow_runs, key)


def test_only_rank_0_touches_the_run_folder(runs):
    rank0, rank1 = runs["ranks"]
    assert rank1["touched"] == []
    written = {Path(path).relative_to(runs["root"] / "runs").parts[0] for _, path in rank0["touched"]}
    assert {Path(c.out_dir).name for c in runs["two"].values()} <= written  # the audit sees rank 0's writes
    for key, cfg in runs["two"].items():  # the same files as one process writes
        assert sorted(p.name for p in Path(cfg.out_dir).iterdir()) == sorted(
            p.name for p in Path(runs["one"][key].out_dir).iterdir())


def test_fsdp_of_the_frozen_base_trains_the_same_adapter(runs):
    assert runs["ranks"][0]["errors"][len(runs["two"])] is None
    _assert_same(_final(runs["fsdp"]), _final(runs["one"]["lora"]))
    valid = [r for r in _log(runs["fsdp"]) if r.get("split") == "valid"]  # validated by both ranks' shards
    assert valid == [r for r in _log(runs["one"]["lora"]) if r.get("split") == "valid"]


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    assert runs["ranks"][0]["errors"][len(runs["two"]) + 1] is None
    _assert_same(_final(runs["cut"]), _final(runs["whole"]["prefix"]))
    assert [r["step"] for r in _log(runs["cut"]) if "loss" in r] == list(range(1, STEPS + 1))


def test_a_one_process_checkpoint_resumes_in_two(runs):
    assert runs["ranks"][0]["errors"][len(runs["two"]) + 2] is None
    _assert_same(_final(runs["back"]), _final(runs["whole"]["houlsby"]))
    assert json.loads((Path(runs["back"].out_dir) / "run.json").read_text())["nproc"] == 2


def test_sift_is_refused_with_two_processes(runs):
    for rank in runs["ranks"]:
        assert "sift picks its entries" in rank["errors"][-1] and "without --nproc" in rank["errors"][-1]


# ----------------------------------------------------------------------------- errors before any process starts


def _cli(capsys, tmp_path, *flags):
    task = write_task(tmp_path / "task", "classification", n_train=8, n_eval=4)
    try:
        code = cli.main(["train", "--model", "tiny-llama", "--task", task, "--method", "lora", "--max-steps", "2",
                         "--out", str(tmp_path / "run"), *flags])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--nproc", "0"], "nproc must be a whole number in [1, 1024], got 0"),
    (["--nproc", "3", "--batch-size", "8"], "batch_size 8 does not divide among 3 processes"),
    (["--nproc", "2", "--batch-size", "8", "--dp-epsilon", "4"], "private training (--dp-epsilon) runs in one process"),
    (["--nproc", "2", "--batch-size", "8", "--recycle"], "--recycle builds its cache in one process"),
    (["--nproc", "two"], "argument --nproc: invalid int value: 'two'"),
])
def test_bad_nproc_is_one_line_before_any_process_starts(capsys, tmp_path, flags, message):
    code, err = _cli(capsys, tmp_path, *flags)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_nproc_inside_torchrun_must_match_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = TrainConfig(nproc=2)
    with pytest.raises(ConfigError, match="nproc 2 inside a run of 4 processes"):
        distributed.spawns(cfg)
    assert not distributed.spawns(dataclasses.replace(cfg, nproc=4))  # torchrun started them: train() is one


@pytest.mark.slow
def test_under_torchrun_rank_0_prints_and_writes(tmp_path):
    task = write_task(tmp_path / "task", "classification", n_train=16, n_eval=4)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "deltatune", "train", "--model", "tiny-llama", "--task", task, "--method", "lora",
                           "--max-steps", "2", "--batch-size", "4", "--max-len", "24", "--out", str(out), "--json"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["steps"] == 2
    assert json.loads((out / "run.json").read_text())["nproc"] == 2
    assert [r["step"] for r in _log(TrainConfig(out_dir=str(out))) if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_an_error_on_rank_0_ends_every_process_with_its_line(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a run")  # only rank 0 checks --out, then tells the others
    code, err = _cli(capsys, tmp_path, "--nproc", "2", "--batch-size", "4")
    assert code == 2 and "is not empty and is not a deltatune run folder" in err, err
    assert err.count("error:") == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


def test_one_process_calls_no_collective(tmp_path):
    assert distributed.size() == 1 and not distributed.active()
    assert distributed.rank0(lambda: 7) == 7 and distributed.result({"a": 1}) == {"a": 1}


TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29511"}


@pytest.mark.parametrize("changes,named", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"), ({"WORLD_SIZE": "1e3"}, "WORLD_SIZE"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "-3"}, "WORLD_SIZE"), ({"RANK": "abc"}, "RANK"), ({"RANK": "5"}, "RANK"), ({"RANK": "-1"}, "RANK"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK"), ({"LOCAL_WORLD_SIZE": "x"}, "LOCAL_WORLD_SIZE"),
    ({"MASTER_ADDR": None, "MASTER_PORT": None}, "MASTER_ADDR"), ({"MASTER_PORT": None}, "MASTER_PORT"),
    ({"MASTER_ADDR": "junk..host"}, "MASTER_ADDR"),
])
def test_a_wrong_torchrun_environment_is_one_line(capsys, tmp_path, monkeypatch, changes, named):
    """Each of torchrun's variables is checked before torch.distributed is asked to connect: a rank outside the
    world or a host that does not resolve would otherwise wait for hours, a word a traceback."""
    for name, value in {**TORCHRUN, **changes}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    code, err = _cli(capsys, tmp_path, "--batch-size", "8")
    assert code == 2 and named in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("port", ["99999", "abc", ""])
def test_a_torchrun_environment_with_no_port_is_one_line(capsys, tmp_path, monkeypatch, port):
    """Started as one of torchrun's processes (RANK/WORLD_SIZE set) with MASTER_PORT that is no TCP port:
    a one-line error naming the variable and the fix, before torch.distributed is asked to connect."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    code, err = _cli(capsys, tmp_path, "--batch-size", "8")
    assert code == 2 and "MASTER_PORT" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
