"""`deltatune sweep`: the space typed by the declarations and checked before any trial, the search algorithms'
decisions, a sweep killed and resumed, the grid that extends past an edge, median pruning, and the same sweep
on a local Ray cluster of two workers (one of which dies mid-trial)."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.sweep import SweepConfig, build_space, run_sweep
from deltatune.sweep.search import DONE, TPE, WAIT, Grid, MedianPruner, RandomSearch

from .crashpoint import run_process

WORDS = ("red green blue cat dog fish sun moon".split(), "star tree rock river cloud apple pear plum".split())
RUN = {"model": "tiny-bert", "method": "lora", "batch_size": 8, "max_len": 32}


def _task(folder: Path, n_train=64, n_eval=16) -> str:
    """A two-class task the tiny model learns in a few steps at lr 1e-2, and not at all at 1e-5."""
    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        rows = []
        for _ in range(n):
            y = rng.randrange(2)
            rows.append({"text": " ".join(rng.sample(WORDS[y], 3)), "label": y})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return _task(tmp_path_factory.mktemp("task"))


def _records(out) -> dict:
    return {r["number"]: r for r in map(json.loads, (Path(out) / "trials.jsonl").read_text().splitlines())}


def _quiet(_line):
    pass


# ----------------------------------------------------------------------------- the space, before any trial

@pytest.mark.parametrize("flags, words", [
    (["--set", "rank=4,8"], "method 'lora' has no option 'rank'; its options: layers, r, alpha, dropout, sites"),
    (["--lr", "1e-2..1e-4"], "--lr: the range 0.01..0.0001 is empty"),
    (["--lr", "log:0..1e-2"], "--lr: the log range log:0..0.01 reaches zero or below"),
    (["--lr", "log:-1e-3..1e-2"], "reaches zero or below"),
    (["--lr", "1e-3..20"], "--lr: 20 is outside what it takes: a finite number in [0.0, 10.0]"),
    (["--set", "r=0,4"], "--set r: 0 is outside what it takes"),
    (["--max-steps", "10,1.5"], "--max-steps: '1.5' is not a whole number"),
    (["--max-steps", "5..5"], "holds one value"),
    (["--set", "sites=log:1..2"], "log: takes a range"),
    (["--set", "r=4,,8"], "has an empty value"),
    (["--algorithm", "bayes"], "algorithm must be one of 'grid', 'random', 'tpe'"),
    (["--prune", "median", "--max-steps", "10"], "--prune median stops trials between validations"),
    (["--lr", "1e-4..1e-2:100000000"], "--lr: a range's grid takes 2 to 10000 points, got :100000000"),
    (["--seeds", "9" * 20], "give a count up to 10000"),
    (["--storage", ""], "--storage is empty"),
    (["--storage", "/dev/null"], "--storage /dev/null is not a folder"),
])
def test_a_bad_space_is_one_line_before_any_trial(task, tmp_path, capsys, flags, words):
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", "tiny-bert", "--task", task, "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("deltatune sweep: error: "), err
    assert words in err, err
    assert not out.exists()  # nothing written, nothing trained


def test_the_space_is_typed_by_the_declarations():
    space = build_space({"method": "lora", "max_steps": 30},
                        {"lr": "log:1e-5..1e-2", "batch_size": "8,16", "frozen_dropout": "true,false",
                         "options": {"r": "4|8|16", "sites": "attn.q,attn.v|attn.q,attn.k,attn.v,attn.o",
                                     "alpha": "32"}})
    dims = {d.key: d for d in space.dims}
    assert dims["lr"].kind == "range" and dims["lr"].log and not dims["lr"].integer
    assert dims["lr"].grid() == [1e-05, 0.0001, 0.001, 0.01]  # 4 points, the ends as given
    assert dims["batch_size"].values == (8, 16) and dims["frozen_dropout"].values == (True, False)
    assert dims["options.r"].values == (4, 8, 16)
    assert dims["options.sites"].values == (("attn.q", "attn.v"), ("attn.q", "attn.k", "attn.v", "attn.o"))
    assert space.base["options"] == {"alpha": 32.0}  # one value: fixed, of the option's type (float)
    point = space.config({"lr": 1e-3, "batch_size": 8, "frozen_dropout": False, "options.r": 8,
                          "options.sites": ["attn.q", "attn.v"]})
    assert point["options"] == {"alpha": 32.0, "r": 8, "sites": ["attn.q", "attn.v"]} and point["max_steps"] == 30
    assert build_space({}, {"max_steps": "10..40:4"}).dims[0].grid() == [10, 20, 30, 40]
    assert build_space({}, {"options": {"r": "log:2..64:6"}}).dims[0].grid() == [2, 4, 8, 16, 32, 64]
    with pytest.raises(ConfigError, match="seed cannot be set for a sweep's trials: the seeds are --seeds"):
        build_space({}, {"seed": "1,2"})
    with pytest.raises(ConfigError, match="no run setting 'learning_rate'"):
        build_space({}, {"learning_rate": "1e-3,1e-2"})
    with pytest.raises(ConfigError, match="a sweep searches one method"):
        build_space({}, {"method": "lora,ia3"})


# ----------------------------------------------------------------------------- the algorithms' decisions

def _done(number, params, value, status="complete", curve=()):
    return {"number": number, "params": params, "value": value, "status": status, "curve": list(curve)}


def test_grid_extends_past_the_edge_where_the_best_sits():
    space = build_space({"method": "lora"}, {"lr": "1e-3,1e-2", "options": {"r": "4,8"}})
    grid = Grid(space, extend=2)
    points = [grid.propose(n, {}) for n in range(4)]
    assert points == [{"lr": 1e-3, "options.r": 4}, {"lr": 1e-3, "options.r": 8},
                      {"lr": 1e-2, "options.r": 4}, {"lr": 1e-2, "options.r": 8}]
    history = {0: _done(0, points[0], 0.5), 1: _done(1, points[1], 0.6), 2: _done(2, points[2], 0.7)}
    assert grid.propose(4, history) == WAIT  # an extension reads every result before it
    history[3] = _done(3, points[3], 0.9)  # the best: the highest lr and the highest r
    assert grid.propose(4, history) == {"lr": 0.1, "options.r": 8}  # x10 past the lr edge, r at the best's
    history[4] = _done(4, {"lr": 0.1, "options.r": 8}, 0.95)
    assert grid.propose(5, history) == {"lr": 1.0, "options.r": 8}
    history[5] = _done(5, {"lr": 1.0, "options.r": 8}, 0.97)
    # lr has been extended twice (--extend 2); r is at its edge too: doubled
    assert grid.propose(6, history) == {"lr": 1.0, "options.r": 16}
    history[6] = _done(6, {"lr": 1.0, "options.r": 16}, 0.2)
    assert grid.propose(7, history) == DONE
    assert grid.notes(history) == ["the best trial sits at the highest lr tried (1): the grid was extended 2 times "
                                   "that way, the most --extend allows; a wider grid might find a better one"]
    # a step past the declared range is not tried: lr's range ends at 10
    wide = Grid(build_space({}, {"lr": "1,5"}), extend=2, valid=lambda p: p["lr"] <= 10)
    assert wide.propose(2, {0: _done(0, {"lr": 1}, 0.1), 1: _done(1, {"lr": 5}, 0.2)}) == DONE


def test_random_and_tpe_decide_from_the_trial_number_and_earlier_rounds():
    space = build_space({"method": "lora"}, {"lr": "log:1e-4..1e-1", "options": {"r": "4,8,16"}})
    draws = [RandomSearch(space, seed=3).propose(n, {}) for n in range(5)]
    assert draws == [RandomSearch(space, seed=3).propose(n, {}) for n in range(5)]  # any order, any process
    assert draws != [RandomSearch(space, seed=4).propose(n, {}) for n in range(5)]
    assert all(1e-4 <= d["lr"] <= 1e-1 and d["options.r"] in (4, 8, 16) for d in draws)
    finite = RandomSearch(build_space({}, {"options": {"r": "4,8"}}))
    assert sorted(finite.propose(n, {})["options.r"] for n in range(2)) == [4, 8] and finite.propose(2, {}) == DONE

    tpe = TPE(space, seed=0, concurrency=2, startup=2)
    history = {}
    for n in range(4):
        params = tpe.propose(n, history)
        assert params == TPE(space, seed=0, concurrency=2, startup=2).propose(n, history)
        history[n] = _done(n, params, 1.0 - abs(params["lr"] - 0.01))
    # trial 5 reads rounds {0,1} and {2,3}: trial 4 (its own round) running or not changes nothing
    assert tpe.propose(5, history) == tpe.propose(5, {**history, 4: _done(4, history[3]["params"], 0.0)})
    assert tpe.propose(7, history) == WAIT  # round {4,5} has not finished


def test_median_pruner_reads_the_curves_of_earlier_trials():
    space = build_space({}, {"lr": "1e-3,1e-2"})
    pruner = MedianPruner(space, concurrency=1, startup=2)
    history = {0: _done(0, {"lr": 1e-3}, 0.8, curve=[[5, 0.7], [10, 0.8]])}
    assert not pruner.should_prune(1, [[5, 0.1]], history)  # one finished trial: below startup
    history[1] = _done(1, {"lr": 1e-2}, 0.9, curve=[[5, 0.6], [10, 0.9]])
    assert pruner.should_prune(2, [[5, 0.5]], history)  # below the median (0.65) of the others at step 5
    assert not pruner.should_prune(2, [[5, 0.66]], history)


# ----------------------------------------------------------------------------- sweeps that train

STEPS = {"max_steps": 30, "eval_every": 6}
GRID = "1e-5,1e-3,1e-2"


@pytest.fixture(scope="module")
def straight(task, tmp_path_factory):
    """The grid lr 1e-5, 1e-3, 1e-2 (then 0.1: the best sits at the high edge), without pruning, never killed."""
    cfg = SweepConfig(base={**RUN, "task": task, **STEPS}, space={"lr": GRID}, algorithm="grid",
                      out=str(tmp_path_factory.mktemp("straight") / "sweep"))
    return run_sweep(cfg, log=_quiet)


def test_a_real_grid_extends_itself_and_scores_test_only_for_the_chosen(straight):
    trials = straight["trials"]
    assert trials[2]["value"] > max(trials[0]["value"], trials[1]["value"])  # the best at the high edge ...
    assert [t["params"]["lr"] for t in trials[:4]] == [1e-5, 1e-3, 1e-2, 0.1]  # ... so one more, x10 past it
    assert all(t["status"] == "complete" for t in trials)
    assert straight["chosen"]["value"] == max(t["value"] for t in trials)
    out = Path(straight["out"])
    for t in trials:  # every trial is a run folder without the test split
        run = Path(t["runs"][0]["out_dir"])
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["value"] is None and metrics["valid_value"] == t["value"]
        assert not (run / "predictions-test.jsonl").exists() and not (run / "predictions-test-zero-shot.jsonl").exists()
        assert (run / "best" / "adapter.safetensors").exists() and not (run / "checkpoints").exists()  # finished
        assert all(json.loads(line).get("split") != "test" for line in (run / "log.jsonl").read_text().splitlines())
    chosen_run = Path(straight["chosen"]["runs"][0]["out_dir"]).name
    assert sorted(p.name for p in (out / "test").iterdir()) == [chosen_run]  # only the chosen one met the test split
    assert isinstance(straight["test"]["value"], float)
    assert {"results.md", "results.csv", "sweep.png", "chosen.json"} <= {p.name for p in out.iterdir()}
    assert "test** (scored for this configuration only)" in (out / "results.md").read_text()


def test_a_killed_sweep_goes_on_where_it_stopped(task, tmp_path, straight):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "tiny-bert", "--task", task, "--method", "lora", "--batch-size", "8", "--max-len",
            "32", "--max-steps", "30", "--eval-every", "6", "--lr", GRID, "--algorithm", "grid", "--out", str(out)]
    second = out / "trials" / "t0001-s0" / "checkpoints" / "step-000006"
    killed = run_process(argv, tmp_path / "log", kill_when=second.exists)
    assert killed["killed"], (tmp_path / "log").read_text()[-2000:]
    before = _records(out)
    assert list(before) == [0] and not (out / "trials" / "t0001-s0" / "metrics.json").exists()
    first_log = (out / "trials" / "t0000-s0" / "log.jsonl").read_text()

    assert main(argv) == 0  # the same command goes on
    after = _records(out)
    assert after[0] == before[0]  # trial 0 was read back, not run again
    assert (out / "trials" / "t0000-s0" / "log.jsonl").read_text() == first_log
    assert after[1]["runs"][0]["resumed_from"] == 6  # trial 1 went on from the checkpoint the kill left
    for n, t in after.items():  # the very trials (and scores) of the sweep that was never killed
        assert (t["params"], t["value"], t["curve"]) == tuple(straight["trials"][n][k] for k in ("params", "value", "curve"))
    assert len(after) == len(straight["trials"])
    # a finished sweep run again trains nothing; another search space in its folder is refused
    assert main(argv) == 0 and _records(out) == after
    assert main([*argv, "--set", "r=4,8"]) == 2


def test_median_pruning_stops_a_trial_at_a_validation(task, tmp_path, straight):
    out = tmp_path / "sweep"
    cfg = SweepConfig(base={**RUN, "task": task, **STEPS}, space={"lr": "1e-2,1e-5"},
                      algorithm="grid", prune="median", prune_startup=1, extend=0, out=str(out))
    result = run_sweep(cfg, log=_quiet)
    good, bad = result["trials"]
    assert good["status"] == "complete" and bad["status"] == "pruned"
    assert bad["curve"] == [straight["trials"][0]["curve"][0]] and bad["curve"][0][0] == 6  # its first validation
    run = Path(bad["runs"][0]["out_dir"])
    assert not (run / "metrics.json").exists() and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006"]
    # trained in chunks (stop at each validation, resume), it is the run trained in one go
    assert (good["value"], good["curve"]) == (straight["trials"][2]["value"], straight["trials"][2]["curve"])
    assert result["chosen"] is good


# ----------------------------------------------------------------------------- Ray

def _holder(marker: Path) -> int | None:
    """The process holding the lock of a run folder (the Ray worker running that trial)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(marker):
                    return int(pid)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_the_same_sweep_on_a_ray_cluster_of_two_workers(task, tmp_path, straight):
    """Two worker nodes of one CPU each; the worker running trial 0 is killed mid-trial, Ray runs it again
    from its checkpoint, and the sweep ends with the trials and scores of the one run here."""
    ray_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"dtray{os.getpid()}"  # Ray's sockets: a short path
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                           "object_store_memory": 80 * 2**20})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        storage = tmp_path / "shared"
        cfg = SweepConfig(base={**RUN, "task": task, **STEPS}, space={"lr": GRID},
                          algorithm="grid", out=str(tmp_path / "sweep"), storage=str(storage), ray=cluster.address)
        import threading

        killed = []

        def kill_trial_0():  # once trial 0 has its first checkpoint, SIGKILL the worker process running it
            folder = next(iter(storage.glob("sweep-*")), None)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not killed:
                folder = folder or next(iter(storage.glob("sweep-*")), None)
                if folder and (folder / "t0000-s0" / "checkpoints" / "step-000006").exists():
                    pid = _holder(folder / "t0000-s0" / ".deltatune-run.json")
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                time.sleep(0.005)

        watcher = threading.Thread(target=kill_trial_0, daemon=True)
        watcher.start()
        result = run_sweep(cfg, log=_quiet)
        watcher.join(timeout=1)
    finally:
        cluster.shutdown()
        os.environ.pop("RAY_TMPDIR", None)
    assert killed, "the worker running trial 0 was never seen"
    trials = result["trials"]
    assert [(t["params"], t["value"], t["curve"]) for t in trials] == \
        [(t["params"], t["value"], t["curve"]) for t in straight["trials"]]
    assert trials[0]["runs"][0]["resumed_from"] == 6  # the retry went on from the dead worker's checkpoint
    folders = [Path(t["runs"][0]["out_dir"]) for t in trials]
    assert len(set(folders)) == len(folders) and all(f.parent.parent == storage for f in folders)
    assert result["chosen"]["number"] == max(trials, key=lambda t: (t["value"], -t["number"]))["number"]


# ----------------------------------------------------------------------------- deltatune report, the sweep's folder

def _copy(straight, where: Path) -> Path:
    import shutil

    shutil.copytree(straight["out"], where, symlinks=True)  # a sweep folder under another name: still a sweep's
    return where


def test_report_rebuilds_a_sweeps_table_and_plot_from_its_files(straight, tmp_path, capsys):
    original = Path(straight["out"])
    copy = _copy(straight, tmp_path / "anything")
    for name in ("results.md", "results.csv", "sweep.png"):
        (copy / name).unlink()
    assert main(["report", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"report: {copy / 'results.md'}" in out and "| trial | lr | status | accuracy (valid) |" in out
    # the same table as the sweep wrote when it ended (nothing trained, nothing scored again)
    assert (copy / "results.md").read_text() == (original / "results.md").read_text()
    assert (copy / "results.csv").read_text() == (original / "results.csv").read_text()
    assert (copy / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (copy / "report.html").exists() and not (copy / "metric_vs_params.png").exists()  # not a bench's

    # a sweep stopped before its end: the best trial so far, no test score, and it says so
    lines = (copy / "trials.jsonl").read_text().splitlines()
    (copy / "trials.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert main(["report", str(copy)]) == 0
    text = (copy / "results.md").read_text()
    assert "the sweep has not ended" in text and "test** (scored" not in text
    best = max(straight["trials"][:2], key=lambda t: (t["value"], -t["number"]))
    assert f"| {best['number']} **chosen** |" in text and text.count("**chosen**") == 1


def test_report_of_a_sweep_keeps_the_folder_rules(straight, tmp_path, capsys):
    from deltatune.storage import SWEEP, OwnedFolder

    copy = _copy(straight, tmp_path / "sweep")
    held = OwnedFolder(copy, SWEEP)
    held.check()  # what a sweep running in it holds
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use by another deltatune sweep" in err
    held.close()
    # without the marker (copied without hidden files) the report only adds files, never replacing one
    (copy / SWEEP.marker).unlink()
    before = (copy / "results.md").read_text()
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "never replaces a file it did not write" in err
    assert (copy / "results.md").read_text() == before


def test_a_sweep_refuses_a_folder_that_is_not_a_sweeps(task, tmp_path, capsys, straight):
    argv = ["sweep", "--model", "tiny-bert", "--task", task, "--lr", GRID, "--algorithm", "grid", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main([*argv, str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and is not a deltatune sweep folder" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    # a sweep's files without its marker: refused, saying how to declare it
    (mine / "notes.txt").unlink()
    for name in ("sweep.json", "trials.jsonl"):
        (mine / name).write_text("{}\n")
    assert main([*argv, str(mine)]) == 2
    assert "create an empty .deltatune-sweep.json in it" in capsys.readouterr().err
    # a link inside a sweep's folder is never followed: refused before anything is read or written there
    copy = _copy(straight, tmp_path / "copy")
    outside = tmp_path / "outside"
    outside.mkdir()
    (copy / "trials" / "elsewhere").symlink_to(outside)
    records = (copy / "trials.jsonl").read_text()
    assert main([*argv, str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symbolic link" in err
    assert (copy / "trials.jsonl").read_text() == records and list(outside.iterdir()) == []
