"""Every command that writes owns only what it wrote: one rule (deltatune.storage.OwnedFolder) for
`train`, `bench`, `report`, `eval` (HumanEval too) and `analyze`.

- a folder deltatune did not write (no marker of its kind) is refused before any work, and nothing in
  it changes, whether the work would have succeeded or failed; `report DIR`, whose folder is its
  input, only adds its files there, never replacing one;
- nothing inside a folder deltatune owns is a symbolic link: a link there is refused, never followed,
  and nothing outside --out changes; a folder inside a deltatune folder (eval-<task>) is never a link;
- an empty --out is refused (it would be the working directory);
- a data directory's split file that is a FIFO, a device or a link out of the directory is refused,
  naming it (never silently replaced by a split carved from the others).

Every refusal is one line, exit code 2, no traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from deltatune import cli, report, storage
from deltatune.errors import DataError, StorageError
from deltatune.storage import ANALYSIS, BENCH, EVAL, OwnedFolder

from . import figures
from .test_storage import argv, one_line_error, tree
from .test_train import write_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), "classification", n_train=24, n_eval=8)


@pytest.fixture(scope="module")
def finished(task, tmp_path_factory):
    """A finished run folder of `train` (2 steps), copied per test."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(argv(task, out, "--max-steps", "2", "--eval-every", "2")) == 0
    return out


def copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target, symlinks=True)
    return target


def outside(tmp_path: Path) -> Path:
    """A folder of the user's beside --out, with a file in it: what must never change."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "precious.txt").write_text("not deltatune's")
    return folder


def user_folder(path: Path, files: dict) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def marked(path: Path, kind) -> Path:
    """A folder as an earlier command of ``kind`` left it: its marker in it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / kind.marker).write_text(json.dumps({"format": f"deltatune.{kind.name}", "version": 1}) + "\n")
    return path


def bench_argv(task, out, *extra):
    return ["bench", "--model", "tiny-bert", "--task", str(task), "--methods", "lora", "--max-steps", "1",
            "--batch-size", "4", "--max-len", "16", "--out", str(out), *extra]


# ------------------------------------------------------------------ bench --out

USER_BENCH_FILES = {"results.csv": "method,value\nmine,1\n", "results.md": "# my notes\n", "report.html": "<p>mine</p>",
                    "bench.json": '{"mine": true}'}


@pytest.mark.parametrize("runs", ["would succeed", "would fail"])
def test_bench_never_replaces_a_users_results(task, tmp_path, capsys, runs):
    out = user_folder(tmp_path / "mine", USER_BENCH_FILES)
    before = tree(tmp_path)
    extra = ["--model", "no-such-model"] if runs == "would fail" else []
    line = one_line_error(capsys, cli.main(bench_argv(task, out) + extra), "not a deltatune bench folder", str(out))
    assert BENCH.marker in line  # results.csv and bench.json: it says how to declare a bench folder of old
    assert tree(tmp_path) == before
    figures.count("owned folders: bench into a user's folder")


@pytest.mark.parametrize("name", ["results.md", "report.html", "bench.json", "results.csv", "runs"])
def test_bench_never_writes_through_a_link_in_its_folder(task, tmp_path, capsys, name):
    out = marked(tmp_path / "bench", BENCH)
    theirs = outside(tmp_path)
    (out / name).symlink_to(theirs / ("precious.txt" if name != "runs" else ""))
    before = tree(tmp_path)
    one_line_error(capsys, cli.main(bench_argv(task, out)), "symbolic link", name)
    assert tree(tmp_path) == before
    figures.count("owned folders: links in a bench folder")


def test_bench_into_a_bench_folder_in_use_is_one_line(task, tmp_path, capsys):
    out = tmp_path / "bench"
    with OwnedFolder(out, BENCH) as holder:
        holder.open()
        before = tree(tmp_path)
        one_line_error(capsys, cli.main(bench_argv(task, out)), "in use by another deltatune bench")
        assert tree(tmp_path) == before
    figures.count("owned folders: concurrent benches")


# ------------------------------------------------------------------ report DIR

def _results(folder: Path) -> Path:
    rows = [report.normalize_row({"method": m, "task": "t", "model": "tiny-bert", "metric": "accuracy", "value": v,
                                  "trainable_params": p, "total_params": 1000, "step_seconds_median": 0.1}, seed=0)
            for m, v, p in [("full", 0.5, 1000), ("lora", 0.4, 20)]]
    report.write_csv(rows, folder / "results.csv")
    return folder


@pytest.mark.parametrize("name", report.REPORT_FILES)
@pytest.mark.parametrize("target", ["a file", "a dangling path"])
def test_report_never_writes_through_a_link(tmp_path, capsys, name, target):
    """A bench folder of deltatune's whose report file is a link to a file elsewhere (or to where one
    would be created): refused, and the file elsewhere is as it was (or was never created)."""
    out = _results(marked(tmp_path / "bench", BENCH))
    theirs = outside(tmp_path)
    (out / name).symlink_to(theirs / ("precious.txt" if target == "a file" else "new-file"))
    before = tree(tmp_path)
    one_line_error(capsys, cli.main(["report", str(out)]), "symbolic link", name)
    assert tree(tmp_path) == before
    figures.count("owned folders: links in a report folder")


@pytest.mark.parametrize("name", ["results.md", "report.html"])
@pytest.mark.parametrize("what", ["a file of the user's", "a link"])
def test_report_in_a_folder_deltatune_did_not_write_replaces_nothing(tmp_path, capsys, name, what):
    out = _results(tmp_path / "theirs")
    out.mkdir(exist_ok=True)
    theirs = outside(tmp_path)
    if what == "a link":
        (out / name).symlink_to(theirs / "precious.txt")
    else:
        (out / name).write_text("my own report")
    before = tree(tmp_path)
    one_line_error(capsys, cli.main(["report", str(out)]), name, "never replaces a file it did not write")
    assert tree(tmp_path) == before
    figures.count("owned folders: report into a user's folder")


def test_report_only_adds_to_a_folder_deltatune_did_not_write(tmp_path, capsys):
    """A results.csv copied into a folder of one's own: the report files are added (no marker), and a
    second report, which would replace them, says how to declare the folder a bench folder."""
    out = _results(tmp_path / "theirs")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["report", str(out)]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "results.csv", *report.REPORT_FILES])
    before = tree(tmp_path)
    one_line_error(capsys, cli.main(["report", str(out)]), BENCH.marker)
    assert tree(tmp_path) == before
    (out / BENCH.marker).write_text("")  # declared: the report is rebuilt in place
    assert cli.main(["report", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    figures.count("owned folders: report into a user's folder", 2)


@pytest.mark.parametrize("make", [os.mkfifo, lambda p: os.symlink("/dev/zero", p)], ids=["a FIFO", "/dev/zero"])
@pytest.mark.parametrize("name", ["results.csv", "bench.json"])
def test_report_inputs_that_are_not_files_are_one_line(tmp_path, capsys, make, name):
    out = _results(marked(tmp_path / "bench", BENCH))
    if (out / name).exists():
        (out / name).unlink()
    make(out / name)
    code = []
    worker = threading.Thread(target=lambda: code.append(cli.main(["report", str(out)])), daemon=True)
    worker.start()
    worker.join(60)
    assert code, f"report hangs on {name} as {make}"
    one_line_error(capsys, code[0], name)
    figures.count("owned folders: report inputs that are not files")


# ------------------------------------------------------------------ eval

def test_eval_never_writes_through_an_eval_link_in_a_run_folder(finished, tmp_path, capsys):
    from deltatune.training import default_eval_dir

    run = copy(finished, tmp_path)
    theirs = outside(tmp_path)
    default = default_eval_dir(run)
    for target in (theirs, theirs / "empty"):  # a folder with the user's files, and an empty one
        target.mkdir(exist_ok=True)
        if default.is_symlink():
            default.unlink()
        default.symlink_to(target, target_is_directory=True)
        before = tree(tmp_path)
        one_line_error(capsys, cli.main(["eval", "--adapter", str(run)]), "symbolic link", default.name)
        assert tree(tmp_path) == before
        # named explicitly, a link inside a run folder is refused too
        one_line_error(capsys, cli.main(["eval", "--adapter", str(run), "--out", str(default)]), "symbolic link")
        assert tree(tmp_path) == before
    figures.count("owned folders: eval links", 4)


@pytest.mark.parametrize("files", [{"metrics-test.json": "{}", "predictions-test.jsonl": "mine\n"}, {"notes.txt": "x"}],
                         ids=["files eval writes", "other files"])
def test_eval_never_replaces_the_files_of_a_users_out(finished, tmp_path, capsys, files):
    run = copy(finished, tmp_path)
    out = user_folder(tmp_path / "mine", files)
    before = tree(tmp_path)
    one_line_error(capsys, cli.main(["eval", "--adapter", str(run), "--out", str(out)]), "not a deltatune eval folder")
    assert tree(tmp_path) == before
    from deltatune.training import evaluate

    with pytest.raises(StorageError, match="not a deltatune eval folder"):
        evaluate(run, out_dir=out)
    assert tree(tmp_path) == before
    figures.count("owned folders: eval into a user's folder", 2)


def test_eval_writes_and_rewrites_its_own_folder(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    out = tmp_path / "evals"
    for _ in range(2):  # the second eval replaces what the first wrote
        assert cli.main(["eval", "--adapter", str(run), "--out", str(out), "--max-eval", "3"]) == 0
    assert sorted(os.listdir(out)) == sorted([EVAL.marker, "metrics-test.json", "predictions-test.jsonl"])


def test_humaneval_never_replaces_a_users_predictions(tmp_path, capsys):
    out = user_folder(tmp_path / "mine", {"predictions-test.jsonl": '{"mine": 1}\n'})
    before = tree(tmp_path)
    args = ["eval", "--task", "humaneval", "--model", "tiny-llama", "--limit", "1", "--max-new-tokens", "2"]
    one_line_error(capsys, cli.main([*args, "--out", str(out)]), "not a deltatune eval folder")
    assert tree(tmp_path) == before
    linked = marked(tmp_path / "evals", EVAL)
    (linked / "predictions-test.jsonl").symlink_to(out / "predictions-test.jsonl")
    before = tree(tmp_path)
    one_line_error(capsys, cli.main([*args, "--out", str(linked)]), "symbolic link")
    assert tree(tmp_path) == before
    figures.count("owned folders: humaneval into a user's folder", 2)


# ------------------------------------------------------------------ analyze

ANALYZE = ["analyze", "--model", "tiny-bert", "--task", "code-search", "--no-probing", "--finetune-steps", "0",
           "--samples", "8"]


def test_analyze_never_replaces_a_users_analysis(tmp_path, capsys):
    out = user_folder(tmp_path / "mine", {"analysis.html": "<p>my analysis</p>"})
    before = tree(tmp_path)
    one_line_error(capsys, cli.main([*ANALYZE, "--out", str(out)]), "not a deltatune analysis folder")
    assert tree(tmp_path) == before
    from deltatune.analysis import analyze

    with pytest.raises(StorageError, match="not a deltatune analysis folder"):
        analyze("tiny-bert", "code-search", probing=False, finetune_steps=0, out_dir=out, progress=False)
    assert tree(tmp_path) == before
    figures.count("owned folders: analyze into a user's folder", 2)


@pytest.mark.parametrize("name", ["similarity.png", "analysis.html", "analysis.json"])
def test_analyze_never_follows_a_link_in_its_folder(tmp_path, capsys, name):
    out = marked(tmp_path / "analysis", ANALYSIS)
    theirs = outside(tmp_path)
    (out / name).symlink_to(theirs / "precious.txt")
    before = tree(tmp_path)
    one_line_error(capsys, cli.main([*ANALYZE, "--out", str(out)]), "symbolic link", name)
    assert tree(tmp_path) == before
    figures.count("owned folders: links in an analysis folder")


def test_the_analysis_files_are_checked_before_the_first_is_written(tmp_path):
    """A FIFO where a plot goes is found before analysis.html is written (nothing half-written)."""
    from deltatune.analysis import report as analysis_report

    out = marked(tmp_path / "analysis", ANALYSIS)
    os.mkfifo(out / "probing.png")
    with pytest.raises(StorageError, match="probing.png is a FIFO"):
        analysis_report.write({"model": "m", "task": "t", "probing": {}}, out)
    assert sorted(os.listdir(out)) == [ANALYSIS.marker, "probing.png"]


# ------------------------------------------------------------------ an empty --out

@pytest.mark.parametrize("command", ["train", "bench", "eval", "analyze", "humaneval"])
def test_an_empty_out_is_refused(task, finished, tmp_path, capsys, monkeypatch, command):
    home = tmp_path / "cwd"
    home.mkdir()
    monkeypatch.chdir(home)
    args = {"train": argv(task, ""), "bench": bench_argv(task, ""),
            "eval": ["eval", "--adapter", str(finished), "--out", ""], "analyze": [*ANALYZE, "--out", ""],
            "humaneval": ["eval", "--task", "humaneval", "--model", "tiny-llama", "--limit", "1", "--out", ""]}[command]
    before = tree(tmp_path)
    one_line_error(capsys, cli.main(args), "--out", "empty")
    assert tree(tmp_path) == before and list(home.iterdir()) == []
    figures.count("owned folders: an empty --out")


# ------------------------------------------------------------------ the rule itself

def test_a_folder_inside_an_owned_folder_is_never_a_link(tmp_path):
    parent = marked(tmp_path / "run", storage.RUN)
    theirs = outside(tmp_path)
    (parent / "eval-x").symlink_to(theirs, target_is_directory=True)
    with pytest.raises(StorageError, match="symbolic link .* inside the deltatune folder"):
        OwnedFolder(parent / "eval-x", EVAL).open()
    (tmp_path / "mine").symlink_to(theirs / "sub", target_is_directory=True)  # --out itself, outside: the user's choice
    (theirs / "sub").mkdir()
    OwnedFolder(tmp_path / "mine", EVAL).write_text("metrics-test.json", "{}")
    assert sorted(os.listdir(theirs / "sub")) == [EVAL.marker, "metrics-test.json"]


@pytest.mark.parametrize("depth", [1, 2])
def test_a_link_on_the_way_to_out_inside_an_owned_folder_is_refused(tmp_path, depth):
    """--out under a link that sits inside a deltatune folder (run/extra -> elsewhere, --out run/extra[/a]/ev)."""
    parent = marked(tmp_path / "run", storage.RUN)
    theirs = outside(tmp_path)
    (parent / "extra").symlink_to(theirs, target_is_directory=True)
    out = parent / "extra" / ("a/ev" if depth == 2 else "ev")
    before = tree(theirs)
    with pytest.raises(StorageError, match=r"run/extra is a symbolic link .* inside the deltatune folder"):
        OwnedFolder(out, EVAL).open()
    assert tree(theirs) == before


def test_an_append_never_reaches_a_file_through_a_hard_link(tmp_path):
    theirs = outside(tmp_path) / "precious.txt"
    os.link(theirs, tmp_path / "generations.jsonl")
    with pytest.raises(StorageError, match="hard link"):
        storage.append_text(tmp_path / "generations.jsonl", "{}\n")
    assert theirs.read_text() == "not deltatune's"


def test_export_builds_in_a_folder_of_its_own(tmp_path, capsys, monkeypatch):
    """The merged export's temporary folder is made new at an unpredictable name: a link or a user's folder
    planted at the old name (.OUT.tmp-PID) is neither followed nor removed."""
    import deltatune as dt
    from deltatune.models import load_backbone

    dt.save_adapter(dt.attach(load_backbone("tiny-bert")[0], "lora"), tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    theirs = outside(tmp_path)
    os.symlink(theirs, tmp_path / f".exp.tmp-{os.getpid()}")
    before = tree(theirs)
    export = ["export", "adapter", "--model", "tiny-bert", "--format"]
    assert cli.main([*export, "merged", "--out", "exp"]) == 0
    assert tree(theirs) == before and (tmp_path / "exp" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".exp.tmp-" + str(os.getpid()), "adapter",
                                                                 "elsewhere", "exp"])
    one_line_error(capsys, cli.main([*export, "peft", "--out", "x" * 300]), "cannot be used (File name too long)")


@pytest.mark.parametrize("args", [["eval", "--adapter", "", "--model", "tiny-bert", "--task", "code-search"],
                                  ["demo", "--out", ""], ["demo", "--quick", "--out", "  "]],
                         ids=["eval --adapter", "demo --out", "demo --out blank"])
def test_an_empty_value_never_means_the_default(tmp_path, capsys, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, cli.main(args), "is empty")
    assert list(tmp_path.iterdir()) == []


def test_owned_folder_files_refuse_fifos_folders_and_escapes(tmp_path):
    folder = OwnedFolder(tmp_path / "b", BENCH)
    folder.open()
    os.mkfifo(tmp_path / "b" / "results.md")
    (tmp_path / "b" / "report.html").mkdir()
    with pytest.raises(StorageError, match="results.md is a FIFO"):
        folder.write_text("results.md", "x")
    with pytest.raises(StorageError, match="report.html is a folder"):
        folder.write_text("report.html", "x")
    for bad in ("../x", "/etc/passwd", "", "a/../../x"):
        with pytest.raises(ValueError):
            folder.file(bad)
    folder.write_text("runs/a/notes.json", "{}")  # folders on the way are created, as real folders
    assert (tmp_path / "b" / "runs" / "a" / "notes.json").read_text() == "{}"


def test_a_marker_of_another_kind_does_not_make_a_folder_ours(tmp_path, capsys):
    out = marked(tmp_path / "run", storage.RUN)
    (out / "run.json").write_text("{}")
    with pytest.raises(StorageError, match="not a deltatune bench folder"):
        OwnedFolder(out, BENCH).check()


# ------------------------------------------------------------------ data folders

def _data_dir(tmp_path) -> Path:
    folder = Path(write_task(tmp_path / "data", "classification", n_train=24, n_eval=8))
    return folder


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _urandom(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/urandom")


def _outside_file(path: Path) -> None:
    target = path.parent.parent / f"outside-{path.name}"
    path.rename(target)
    path.symlink_to(target)


SPLIT_FILES = {"valid.jsonl a FIFO": ("valid.jsonl", _fifo), "test.jsonl -> /dev/urandom": ("test.jsonl", _urandom),
               "test.jsonl a link out of the folder": ("test.jsonl", _outside_file),
               "valid.jsonl a folder": ("valid.jsonl", lambda p: (p.unlink(), p.mkdir())),
               "train.jsonl a FIFO": ("train.jsonl", _fifo)}


@pytest.mark.parametrize("case", list(SPLIT_FILES))
def test_a_data_folder_with_a_split_that_is_not_a_file_is_refused(tmp_path, capsys, case):
    data = _data_dir(tmp_path)
    name, damage = SPLIT_FILES[case]
    damage(data / name)
    out = tmp_path / "out"
    code = []
    worker = threading.Thread(target=lambda: code.append(cli.main(argv(data, out))), daemon=True)
    worker.start()
    worker.join(120)
    assert code, f"training on a data folder whose {case} hangs"
    one_line_error(capsys, code[0], str(data / name))
    assert not out.exists()
    from deltatune.tasks import load_task

    with pytest.raises(DataError, match=name):
        load_task(str(data))
    figures.count("data folders with split files that are not files")


def test_a_split_file_linked_inside_its_folder_is_read(tmp_path):
    from deltatune.tasks import load_task

    data = _data_dir(tmp_path)
    (data / "valid.jsonl").rename(data / "my-valid.jsonl")
    (data / "valid.jsonl").symlink_to("my-valid.jsonl")
    assert len(load_task(str(data)).valid) == 8
