"""A full disk during a save: the previous adapter or checkpoint stays intact and loadable, and the
error is a StorageError (a DeltatuneError and an OSError) naming the path and the cause; `deltatune
train` reports it in one line with exit code 2, and resuming after space is freed gives the same
adapter as a run that never hit a full disk.

The disk is full for real: temporary files are opened on /dev/full (the kernel answers ENOSPC), and,
where this process may mount, a tiny tmpfs fills up during training.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune import cli
from deltatune.formats.native import CONFIG, WEIGHTS, atomic_write_json
from deltatune.training import TrainConfig, train
from deltatune.training.outdir import Log as _Log

from . import tiny
from .test_train import write_task

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def disk_full_from(monkeypatch, n: int) -> list:
    """From the n-th temporary file on, atomic writes go to /dev/full; returns the list of paths tried."""
    real = tempfile.mkstemp
    tried = []

    def mkstemp(*args, **kwargs):
        fd, path = real(*args, **kwargs)
        tried.append(path)
        if len(tried) >= n:
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return tried


def test_dev_full_is_a_full_disk():
    with pytest.raises(OSError) as err, open("/dev/full", "wb") as f:
        f.write(b"x")
        f.flush()
    assert err.value.errno == errno.ENOSPC


def _lora(seed_shift: float):
    model = dt.attach(tiny.model("bert"), "lora")
    with torch.no_grad():
        for p in model.deltatune.parameters():
            p.add_(seed_shift)
    return model


@pytest.mark.parametrize("failing_file", [1, 2])  # adapter.safetensors, then adapter_config.json
def test_full_disk_while_saving_an_adapter_keeps_a_whole_adapter(tmp_path, monkeypatch, failing_file):
    old, new = _lora(0.1), _lora(0.2)
    dt.save_adapter(old, tmp_path / "a")
    disk_full_from(monkeypatch, failing_file)
    with pytest.raises(dt.StorageError, match="disk is full") as err:
        dt.save_adapter(new, tmp_path / "a")
    assert isinstance(err.value, dt.DeltatuneError) and isinstance(err.value, OSError)
    assert str(tmp_path / "a") in str(err.value)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([WEIGHTS, CONFIG])  # no temporary files
    # adapter.safetensors carries its own config, so what loads is one whole adapter, the old or the new.
    loaded = dt.load_adapter(tiny.model("bert"), tmp_path / "a")
    expected = old if failing_file == 1 else new
    got, want = dt.formats.native.adapter_tensors(loaded)[0], dt.formats.native.adapter_tensors(expected)[0]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_atomic_json_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "x.json", {"v": 1})
    disk_full_from(monkeypatch, 1)
    with pytest.raises(dt.StorageError, match=r"x\.json: the disk is full"):
        atomic_write_json(tmp_path / "x.json", {"v": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_log_append_on_a_full_disk_is_a_storage_error():
    with pytest.raises(dt.StorageError, match="/dev/full: the disk is full"):
        _Log(Path("/dev/full"), keep_until=0).write({"step": 1, "loss": 0.5})


# ------------------------------------------------------------------------------ during training

STEPS = 12


def train_argv(task, out, *extra):
    return ["train", "--model", "tiny-bert", "--task", str(task), "--method", "lora", "--max-steps", str(STEPS),
            "--eval-every", "6", "--batch-size", "8", "--max-len", "32", "--lr", "0.01", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), "classification")


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(train_argv(task, out)) == 0
    return out


def same_adapters(a: Path, b: Path) -> bool:
    left, right = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


# Writes of the resumed half, in order: log.jsonl (cut back to the checkpoint), run.json, then at
# step 12 best/ (2 files, when validation improved), the checkpoint (4 files), metrics.json.
@pytest.mark.parametrize("failing_file", [1, 2, 3, 5, 7])
def test_full_disk_during_training_keeps_the_last_checkpoint(task, reference, tmp_path, monkeypatch, capsys,
                                                             failing_file):
    out = tmp_path / "run"
    train(TrainConfig(model="tiny-bert", task=str(task), method="lora", max_steps=STEPS, eval_every=6, batch_size=8,
                      max_len=32, lr=0.01, out_dir=str(out), stop_after=6, progress=False))
    before = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    tried = disk_full_from(monkeypatch, failing_file)
    assert cli.main(train_argv(task, out, "--resume")) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deltatune train: error: ") and "the disk is full" in err and str(out) in err, err
    assert len(tried) >= failing_file and "Traceback" not in err

    # The checkpoint of step 6 is untouched and loadable, nothing half-written is left, best/ loads.
    after = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    dt.read_adapter(out / "checkpoints" / "step-000006" / "adapter")
    dt.read_adapter(out / "best")

    # Space is back: resuming finishes the run exactly as if the disk had never been full.
    assert cli.main(train_argv(task, out, "--resume")) == 0
    assert same_adapters(out / "best", reference / "best")
    assert same_adapters(out / "checkpoints" / f"step-{STEPS:06d}" / "adapter",
                         reference / "checkpoints" / f"step-{STEPS:06d}" / "adapter")


def test_a_real_full_tmpfs_during_training(task, reference, tmp_path, capsys):
    """A tmpfs a little smaller than the run needs: training stops with a one-line error and exit code 2,
    the last checkpoint loads, and after space is freed --resume finishes with the same adapter."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        def used() -> int:
            st = os.statvfs(mount)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        assert cli.main(train_argv(task, mount / "sizing")) == 0  # what a whole run occupies on this tmpfs
        needed = used()
        shutil.rmtree(mount / "sizing")
        # Leave room for one whole run only: the first checkpoint fits, the second (written next to it) not.
        st = os.statvfs(mount)
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - needed))
        out = mount / "run"
        code = cli.main(train_argv(task, out))
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and "the disk is full" in err and "Traceback" not in err, err
        checkpoint = max((out / "checkpoints").glob("step-*"))
        dt.read_adapter(checkpoint / "adapter")
        (mount / "filler").unlink()
        assert cli.main(train_argv(task, out, "--resume")) == 0
        assert same_adapters(out / "best", reference / "best")
    finally:
        subprocess.run(["umount", str(mount)], check=False)
