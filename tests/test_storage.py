"""deltatune removes only what it wrote, writes only inside --out, follows no link there, and a run
folder is used by one run at a time; every refusal is one line with exit code 2 and leaves every file
as it was.

- a folder deltatune did not write (no marker) is refused unless empty; a previous run is kept unless
  --overwrite, and settings that cannot work are refused before anything in --out changes;
- a symbolic link anywhere in a run folder is refused, and nothing outside is read, created or removed;
- a second run into a locked folder gets one line;
- --out that is a file, a device, under a file or on a read-only file system is one line; so is bench's;
- run.json and trainer.json are checked field by field.

The counts go to $DELTATUNE_FIGURES (see tests/figures.py); docs/reliability.md cites them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import deltatune as dt
from deltatune import cli, storage
from deltatune.errors import ConfigError, StorageError
from deltatune.storage import MARKER, RunFolder
from deltatune.training import TrainConfig, train

from . import figures
from .test_train import write_task

ROOT = Path(__file__).resolve().parent.parent


def argv(task, out, *extra, method="lora"):
    return ["train", "--model", "tiny-bert", "--task", str(task), "--method", method, "--max-steps", "4",
            "--eval-every", "2", "--batch-size", "8", "--max-len", "32", "--lr", "0.01", "--out", str(out), *extra]


def tree(root: Path) -> dict:
    """Every entry under ``root`` (never following a link): bytes of files, targets of links."""
    found = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = "special"
    return found


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("deltatune "), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), "classification")


@pytest.fixture(scope="module")
def finished(task, tmp_path_factory):
    """A finished run folder (4 steps, checkpoints at 2 and 4, best/, metrics.json), copied per test."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(argv(task, out)) == 0
    return out


@pytest.fixture(scope="module")
def stopped(task, tmp_path_factory):
    """A run stopped after 2 of 4 steps: one checkpoint, resumable."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(TrainConfig(model="tiny-bert", task=str(task), method="lora", max_steps=4, eval_every=2, batch_size=8,
                      max_len=32, lr=0.01, out_dir=str(out), stop_after=2, progress=False))
    return out


def copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target, symlinks=True)
    return target


# ------------------------------------------------------------------ folders deltatune did not write

FOREIGN = {  # the folder of issue 10, and its siblings
    "another tool's run": {"checkpoints/lightning/epoch=9.ckpt": "x", "best/README.txt": "keep me",
                           ".drafts.tmp/draft.txt": "draft", ".notes.txt.tmp": "notes", "log.jsonl": "{}\n",
                           "metrics.json": "{}"},
    "one hidden file": {".env": "SECRET=1"},
    "an empty subfolder": {"data/": None},
    "a run of an older deltatune (no marker)": {"run.json": "{}", "checkpoints/step-000002/trainer.json": "{}"},
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_folder_deltatune_did_not_write_is_refused(task, tmp_path, capsys, case):
    out = tmp_path / "theirs"
    for rel, text in FOREIGN[case].items():
        path = out / rel
        if text is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    before = tree(out)
    for extra in ([], ["--overwrite"], ["--resume"]):
        line = one_line_error(capsys, cli.main(argv(task, out, *extra)), "not a deltatune run folder", "choose another")
        assert tree(out) == before
    if case.startswith("a run of an older"):
        assert MARKER in line  # says how to declare it a deltatune run folder
    figures.count("storage: folders deltatune did not write", 3)


def test_an_empty_folder_is_used_and_marked(task, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli.main(argv(task, out)) == 0
    assert RunFolder(out).is_run() and json.loads((out / MARKER).read_text())["format"] == "deltatune.run"


# ------------------------------------------------------------------ a previous run is never lost

# Settings that passed the checks in issue 10, wiped the previous run, then failed: each is refused
# now before anything in --out changes, with --overwrite too.
BAD_SETTINGS = {
    "--lr 1e308": ["--lr", "1e308"],
    "alpha=inf": ["--set", "alpha=inf"],
    "parallel scale=inf": ["--method", "parallel", "--set", "scale=inf"],
    "prompt length=600 beyond the positions": ["--method", "prompt", "--set", "length=600"],
    "--max-len 100000": ["--max-len", "100000"],
    "--batch-size 1000000000": ["--batch-size", "1000000000"],
    "--seed -1": ["--seed", "-1"],
    "--seed 2**64": ["--seed", str(2**64)],
}


def _with(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with ``extra`` flags replacing those it already has (``--method`` included)."""
    args = list(args)
    i = 0
    while i < len(extra):
        flag, value = extra[i], extra[i + 1]
        if flag in args and flag != "--set":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        i += 2
    return args


def test_a_previous_run_is_kept_unless_overwrite(task, finished, tmp_path, capsys):
    out = copy(finished, tmp_path)
    before = tree(out)
    one_line_error(capsys, cli.main(argv(task, out)), "holds a finished run", "--overwrite", "--resume")
    assert tree(out) == before
    assert cli.main(argv(task, out, "--overwrite", "--seed", "3")) == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 3
    figures.count("storage: reruns into a previous run")


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_never_cost_the_previous_run(task, finished, tmp_path, capsys, case):
    out = copy(finished, tmp_path)
    before = tree(out)
    for extra in ([], ["--overwrite"]):
        one_line_error(capsys, cli.main(_with(argv(task, out, *extra), BAD_SETTINGS[case])))
        assert tree(out) == before, extra
    figures.count("storage: bad settings into a previous run", 2)


def test_alpha_1e308_never_costs_the_previous_run(task, finished, tmp_path, capsys):
    """Without --overwrite the previous run is kept whatever the options; with it, the user asked."""
    out = copy(finished, tmp_path)
    before = tree(out)
    one_line_error(capsys, cli.main(argv(task, out, "--set", "alpha=1e308")))
    assert tree(out) == before
    figures.count("storage: bad settings into a previous run")


def test_resume_without_a_checkpoint_keeps_a_run_of_other_settings(task, finished, tmp_path, capsys):
    out = copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")  # best/, log and metrics stay: a run of other settings
    before = tree(out)
    one_line_error(capsys, cli.main(argv(task, out, "--resume", "--set", "alpha=32")), "cannot resume", "alpha")
    assert tree(out) == before
    figures.count("storage: reruns into a previous run")


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(task, finished, tmp_path):
    out = copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")  # the same settings: what it wrote is recomputed the same way
    (out / "metrics.json").unlink()
    with pytest.warns(UserWarning, match="no checkpoint yet"):
        assert cli.main(argv(task, out, "--resume")) == 0
    assert storage.read_bytes(out / "best" / "adapter.safetensors") == (finished / "best" / "adapter.safetensors").read_bytes()


def test_overwrite_removes_only_what_deltatune_wrote(task, finished, tmp_path):
    out = copy(finished, tmp_path)
    mine = {"notes.txt": "mine", ".notes.txt.tmp": "mine too", "best.txt": "and this"}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert cli.main(argv(task, out, "--overwrite", "--seed", "1")) == 0
    assert {name: (out / name).read_text() for name in mine} == mine
    figures.count("storage: reruns into a previous run")


@pytest.mark.parametrize("where", ["best/README.md", "checkpoints/step-000004/notes.txt",
                                   "checkpoints/step-000004/adapter/x.json", "checkpoints/mine/a.txt"])
@pytest.mark.parametrize("extra", [["--overwrite"], ["--resume", "--max-steps", "6"]])
def test_a_file_of_the_users_inside_best_or_checkpoints_is_refused(task, finished, tmp_path, capsys, where, extra):
    """best/ and checkpoints/ are replaced whole (--overwrite, a better adapter, a newer checkpoint): a file of the
    user's inside them is named and refused before anything changes."""
    out = copy(finished, tmp_path)
    (out / where).parent.mkdir(parents=True, exist_ok=True)
    (out / where).write_text("mine")
    before = tree(out)
    named = where.rsplit("/", 1)[0] if "mine/" in where else where  # a folder of the user's is named itself
    one_line_error(capsys, cli.main(argv(task, out, *extra)), named, "is not what a run writes there")
    assert tree(out) == before


def test_an_overwrite_that_fails_gives_the_previous_run_back(task, finished, tmp_path, monkeypatch):
    """The run an --overwrite replaces is kept aside until the new run's first checkpoint: an error (or Ctrl-C)
    before it brings the old run back whole, and so does the next command after a kill."""
    from deltatune.training import run as run_module

    out = copy(finished, tmp_path)
    before = tree(out)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(run_module, "run_loop", broken)
        with pytest.warns(UserWarning, match="stopped with an error; the run it was"):
            assert cli.main(argv(task, out, "--overwrite", "--seed", "5")) != 0  # the CLI's answer to Ctrl-C
    assert tree(out) == before
    kept = out / ".replaced"  # a kill midway: the replaced run aside, the new one's first files in place
    kept.mkdir()
    from deltatune.training.outdir import RUN_FILES

    for name in RUN_FILES:
        os.replace(out / name, kept / name)
    (out / "log.jsonl").write_text('{"step": 0}\n')
    with pytest.warns(UserWarning, match="was killed before its first checkpoint; the run it was replacing is back"):
        assert cli.main(argv(task, out)) == 2  # then refused as ever: a finished run is there
    assert tree(out) == before


# ------------------------------------------------------------------ no links inside a run folder

def _outside(tmp_path: Path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "precious.txt").write_text("not deltatune's")
    return folder


LINKS = {  # name in the run folder -> what it points to (relative to the folder outside)
    "log.jsonl, dangling": ("log.jsonl", "new-file.jsonl"),
    "checkpoints, to a folder": ("checkpoints", "."),
    "best, to a folder": ("best", "."),
    "run.json, to a file": ("run.json", "precious.txt"),
    "metrics.json, to a file": ("metrics.json", "precious.txt"),
    "the marker, to a file": (MARKER, "precious.txt"),
    "a checkpoint's adapter file": ("checkpoints/step-000002/adapter/adapter.safetensors", "precious.txt"),
    "a checkpoint folder": ("checkpoints/step-000002", "."),
}


@pytest.mark.parametrize("case", list(LINKS))
def test_a_link_in_a_run_folder_is_never_followed(task, stopped, tmp_path, capsys, case):
    out = copy(stopped, tmp_path)
    outside = _outside(tmp_path)
    rel, target = LINKS[case]
    link = out / rel
    if os.path.lexists(link):
        shutil.rmtree(link) if link.is_dir() and not link.is_symlink() else link.unlink()
    link.symlink_to(outside / target)
    before, theirs = tree(out), tree(outside)
    for extra in (["--resume"], ["--overwrite"], []):
        one_line_error(capsys, cli.main(argv(task, out, *extra)), "symbolic link")
        assert tree(out) == before and tree(outside) == theirs, extra
    figures.count("storage: links in a run folder", 3)


def test_out_itself_may_be_a_link_to_a_folder(task, tmp_path):
    real = tmp_path / "big-disk" / "runs"
    real.mkdir(parents=True)
    (tmp_path / "runs").symlink_to(real)
    assert cli.main(argv(task, tmp_path / "runs" / "a")) == 0
    assert (real / "a" / "metrics.json").is_file()


# ------------------------------------------------------------------ one run at a time

def test_a_second_run_into_a_locked_folder_is_one_line(task, stopped, tmp_path, capsys):
    out = copy(stopped, tmp_path)
    before = tree(out)
    with RunFolder(out) as holder:  # another run holds the folder
        holder.open()
        for extra in (["--resume"], ["--overwrite"]):
            one_line_error(capsys, cli.main(argv(task, out, *extra)), "in use by another deltatune run")
            assert tree(out) == before
    assert cli.main(argv(task, out, "--resume")) == 0  # released: the run goes on
    figures.count("storage: concurrent runs", 2)


def test_a_fresh_folder_taken_meanwhile_is_refused(task, tmp_path, capsys):
    """Two fresh runs into one new folder: the second to get there finds it locked."""
    out = tmp_path / "new"
    holder = RunFolder(out)
    real_open = RunFolder.open

    def open_after_the_other(self):  # the other run creates and locks the folder between check and open
        if self is not holder and not holder._lock_fd:
            holder.open()
        return real_open(self)

    try:
        RunFolder.open = open_after_the_other
        one_line_error(capsys, cli.main(argv(task, out)), "in use by another deltatune run")
    finally:
        RunFolder.open = real_open
        holder.close()
    assert sorted(os.listdir(out)) == [MARKER]
    figures.count("storage: concurrent runs")


@pytest.mark.slow
def test_two_real_processes_into_one_folder(task, tmp_path):
    """Two `python -m deltatune train` at once, different seeds: one trains, the other gets one line."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    args = [a if a != "4" else "60" for a in argv(task, out)] + ["--eval-every", "20"]
    procs = [subprocess.Popen([sys.executable, "-m", "deltatune", *args, "--seed", str(seed)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "Traceback" not in err and ("in use by another deltatune run" in err or "holds" in err), err
    seed = json.loads((out / "run.json").read_text())["seed"]
    assert json.loads((out / "metrics.json").read_text())["seed"] == seed
    steps = [json.loads(line).get("step") for line in (out / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 61))  # every step logged once
    figures.count("storage: concurrent runs")


# ------------------------------------------------------------------ --out that cannot be a folder

def test_out_that_cannot_be_a_folder_is_one_line(task, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {afile: "is a file, not a folder", Path("/dev/null"): "is a character device, not a folder",
             afile / "sub": "afile is a file, not a folder", fifo: "is a FIFO, not a folder",
             fifo / "sub" / "deeper": "fifo is a FIFO, not a folder"}
    for out, says in cases.items():
        one_line_error(capsys, cli.main(argv(task, out)), says)
    assert afile.read_text() == "mine"
    bench = ["bench", "--model", "tiny-bert", "--task", str(task), "--methods", "lora", "--max-steps", "1"]
    for out, says in ((afile, "is a file, not a folder"), (afile / "sub", "is a file, not a folder")):
        one_line_error(capsys, cli.main([*bench, "--out", str(out)]), says)
    figures.count("storage: --out that cannot be a folder", len(cases) + 2)


def test_out_on_a_read_only_file_system_is_one_line(task, tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        for out in (mount, mount / "run", mount / "a" / "b"):
            one_line_error(capsys, cli.main(argv(task, out)), "read-only")
        bench = ["bench", "--model", "tiny-bert", "--task", str(task), "--methods", "lora", "--out", str(mount / "b")]
        one_line_error(capsys, cli.main(bench), "read-only")
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    figures.count("storage: --out that cannot be a folder", 4)


# ------------------------------------------------------------------ run files are data, field by field

def _trainer(edit):
    def run(checkpoint: Path):
        path = checkpoint / "trainer.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return run


DAMAGED_TRAINER_JSON = {
    "consumed=10**30": _trainer(lambda m: {**m, "consumed": 10**30}),
    "consumed=-5": _trainer(lambda m: {**m, "consumed": -5}),
    "consumed off by one": _trainer(lambda m: {**m, "consumed": m["consumed"] + 1}),
    "best_value 'high'": _trainer(lambda m: {**m, "best_value": "high"}),
    "best_value NaN": _trainer(lambda m: {**m, "best_value": float("nan")}),
    "best_step beyond the step": _trainer(lambda m: {**m, "best_step": 99}),
    "train_seconds 'x'": _trainer(lambda m: {**m, "train_seconds": "x"}),
    "betas 'xy'": _trainer(lambda m: {**m, "param_groups": [{**m["param_groups"][0], "betas": "xy"}]}),
    "lr a list": _trainer(lambda m: {**m, "param_groups": [{**m["param_groups"][0], "lr": [1]}]}),
    "eps 0": _trainer(lambda m: {**m, "param_groups": [{**m["param_groups"][0], "eps": 0}]}),
    "an unknown optimizer setting": _trainer(lambda m: {**m, "param_groups": [{**m["param_groups"][0], "x": 1}]}),
    "step_seconds {}": _trainer(lambda m: {**m, "step_seconds": {}}),
    "step_seconds too short": _trainer(lambda m: {**m, "step_seconds": m["step_seconds"][:1]}),
    "bad_evals null": _trainer(lambda m: {**m, "bad_evals": None}),
    "bad_evals true": _trainer(lambda m: {**m, "bad_evals": True}),
    "optim_scalars a list": _trainer(lambda m: {**m, "optim_scalars": []}),
    "zero_shot_value Infinity": _trainer(lambda m: {**m, "zero_shot_value": float("inf")}),
    "trainer.json a FIFO": lambda c: ((c / "trainer.json").unlink(), os.mkfifo(c / "trainer.json")),
}


@pytest.mark.parametrize("damage", list(DAMAGED_TRAINER_JSON))
def test_a_damaged_trainer_json_is_one_line(task, stopped, tmp_path, capsys, damage):
    out = copy(stopped, tmp_path)
    DAMAGED_TRAINER_JSON[damage](out / "checkpoints" / "step-000002")
    before = tree(out)
    one_line_error(capsys, cli.main(argv(task, out, "--resume")), "step-000002")
    assert tree(out) == before
    figures.count("storage: damaged trainer.json")


DAMAGED_RUN_JSON = {
    "bf16 'yes'": {"bf16": "yes"},
    "max_eval 1.5": {"max_eval": 1.5},
    "model a list": {"model": ["tiny-bert"]},
    "max_len 100000": {"max_len": 100000},
    "seed -1": {"seed": -1},
    "lr 1e308": {"lr": 1e308},
    "options a list": {"options": ["r", 8]},
    "batch_size true": {"batch_size": True},
    "warmup_ratio 2": {"warmup_ratio": 2},
}


@pytest.mark.parametrize("damage", list(DAMAGED_RUN_JSON))
def test_a_damaged_run_json_is_one_line(task, finished, tmp_path, capsys, damage):
    out = copy(finished, tmp_path)
    saved = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**saved, **DAMAGED_RUN_JSON[damage]}))
    key = next(iter(DAMAGED_RUN_JSON[damage]))
    one_line_error(capsys, cli.main(["eval", "--adapter", str(out)]), key)
    before = tree(out)
    one_line_error(capsys, cli.main(argv(task, out, "--resume")), key)  # resuming reads it too
    assert tree(out) == before
    figures.count("storage: damaged run.json", 2)


def test_run_files_that_are_not_regular_files_are_one_line(task, stopped, tmp_path, capsys):
    """A FIFO where run.json or log.jsonl belongs would make a plain read wait forever."""
    for name, says in (("run.json", "run.json"), ("log.jsonl", "log.jsonl")):
        out = copy(stopped, tmp_path, name)
        (out / name).unlink()
        os.mkfifo(out / name)
        code = []
        worker = threading.Thread(target=lambda: code.append(cli.main(argv(task, out, "--resume"))), daemon=True)
        worker.start()
        worker.join(120)
        assert code, f"a FIFO as {name} hangs the run"
        one_line_error(capsys, code[0], says)
    figures.count("storage: damaged run files", 2)


# ------------------------------------------------------------------ the API checks the same

@pytest.mark.parametrize("field, value", [("seed", -1), ("seed", 2**64), ("lr", 1e308), ("lr", float("nan")),
                                          ("bf16", "yes"), ("max_steps", 2.5), ("batch_size", True),
                                          ("max_grad_norm", float("inf")), ("overwrite", 1), ("max_eval", 0)])
def test_train_config_fields_are_checked_before_out_dir_exists(task, tmp_path, field, value):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=field):
        train(TrainConfig(model="tiny-bert", task=str(task), method="lora", out_dir=str(out), **{field: value}))
    assert not out.exists()
    figures.count("storage: TrainConfig fields")


# ------------------------------------------------------------------ the storage helpers themselves

def test_leftovers_are_only_deltatune_names():
    ours = [".run.json.abcd1234.tmp", ".log.jsonl.a_b_c_d_.tmp", ".best.tmp", ".best.del.tmp", ".step-000004.tmp",
            ".step-000004.del.tmp", ".checkpoints.del.tmp", ".adapter.safetensors.0123abcd.tmp",
            ".predictions-test.jsonl.zzzzzzzz.tmp"]
    theirs = [".notes.txt.tmp", ".drafts.tmp", ".run.json.tmp", "best.tmp", ".best.old", ".run.json.x1y2.tmp",
              ".step-x.tmp", "..tmp", ".tmp"]
    assert [n for n in ours if not storage._is_leftover(n)] == []
    assert [n for n in theirs if storage._is_leftover(n)] == []


def test_read_bytes_refuses_links_devices_and_huge_files(tmp_path):
    (tmp_path / "f").write_bytes(b"12345")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert storage.read_bytes(tmp_path / "f") == b"12345"
    for path in (tmp_path / "link", Path("/dev/zero"), tmp_path):
        with pytest.raises(OSError):
            storage.read_bytes(path)
    with pytest.raises(OSError, match="larger than 4"):
        storage.read_bytes(tmp_path / "f", limit=4)


def test_append_text_never_writes_through_a_link(tmp_path):
    (tmp_path / "log").symlink_to(tmp_path / "outside")
    with pytest.raises(StorageError, match="symbolic link"):
        storage.append_text(tmp_path / "log", "x\n")
    assert not (tmp_path / "outside").exists()


def test_remove_dir_removes_a_link_not_its_target(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "link").symlink_to(target)
    storage.replace_dir(tmp_path / "link", lambda tmp: (tmp / "new").write_text("y"))
    assert (target / "keep").read_text() == "x" and (tmp_path / "link" / "new").read_text() == "y"
    assert not (tmp_path / "link").is_symlink()


def test_storage_helpers_stay_importable_from_io():
    assert dt.formats.native.atomic_write_json is storage.atomic_write_json and dt.formats.native.storage_error is storage.storage_error


# ------------------------------------------------------------------ found in the adversarial pass

def test_a_marker_that_is_a_folder_is_one_line(task, stopped, tmp_path, capsys):
    out = copy(stopped, tmp_path)
    (out / MARKER).unlink()
    (out / MARKER).mkdir()
    before = tree(out)
    one_line_error(capsys, cli.main(argv(task, out, "--resume")), MARKER, "is a folder")
    assert tree(out) == before
    figures.count("storage: adversarial run folders")


def test_an_empty_marker_left_by_a_kill_still_marks_the_folder(task, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_bytes(b"")  # killed between creating the marker and writing it
    assert cli.main(argv(task, out)) == 0
    figures.count("storage: adversarial run folders")


def test_a_hard_link_to_the_log_is_not_written_through(task, stopped, tmp_path):
    """Appends go to a log that resuming first rewrites (a new file), never to another name of the old one."""
    out = copy(stopped, tmp_path)
    other = tmp_path / "other-name.jsonl"
    os.link(out / "log.jsonl", other)
    before = other.read_bytes()
    assert cli.main(argv(task, out, "--resume")) == 0
    assert other.read_bytes() == before and (out / "log.jsonl").read_bytes() != before
    figures.count("storage: adversarial run folders")


def test_checkpoints_that_is_a_file_is_replaced_on_restart(task, finished, tmp_path):
    out = copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("deltatune's name, not a folder")
    (out / "metrics.json").unlink()
    with pytest.warns(UserWarning, match="no checkpoint yet"):
        assert cli.main(argv(task, out, "--resume")) == 0
    assert (out / "checkpoints" / "step-000004").is_dir()
    figures.count("storage: adversarial run folders")
