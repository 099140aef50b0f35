"""The command line, end to end: `--set` parsing, the registry listings, errors (one line, exit code 2),
`train --json` on a tiny model, and `report DIR` on synthetic rows."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import deltatune as dt
from deltatune import cli, machine, report

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = {"method", "task", "model", "metric", "value", "trainable_params", "total_params",
                 "train_seconds", "step_seconds_median", "peak_rss_mb"}


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr); argparse's own exits count too."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- --set

@pytest.mark.parametrize("text, value", [
    ("16", 16), ("-3", -3), ("0.1", 0.1), ("1e-3", 1e-3), ("true", True), ("False", False),
    ("none", None), ("attn.q", "attn.q"), ("attn.q,attn.v", ["attn.q", "attn.v"]),
    ("4,8", [4, 8]), ("ffn.out,", ["ffn.out"]), (" 7 ", 7),
])
def test_parse_value(text, value):
    assert cli.parse_value(text) == value
    assert type(cli.parse_value(text)) is type(value)


def test_parse_sets_later_key_wins():
    assert cli.parse_sets(["r=16", "sites=attn.q,attn.v", "alpha=32", "r=8", "bias=false"]) == {
        "r": 8, "sites": ["attn.q", "attn.v"], "alpha": 32, "bias": False}
    assert cli.parse_sets(None) == {}


@pytest.mark.parametrize("bad", ["r16", "=16", "r=", "1r=2", "r x=1"])
def test_bad_set_is_one_line_exit_2(capsys, bad):
    code, out, err = run(capsys, "train", "--model", "tiny-bert", "--task", "code-search", "--method", "lora",
                         "--set", bad)
    assert code == 2
    assert err.count("\n") == 1 and "KEY=VALUE" in err and repr(bad) in err
    assert "Traceback" not in err


def test_seeds_count_or_list():
    assert cli._seeds("3") == [0, 1, 2]
    assert cli._seeds("0,7,9") == [0, 7, 9]


# ----------------------------------------------------------------------------- listings and errors

def test_help_lists_every_command_without_loading_the_engine():
    # Fast help: neither transformers (the engine) nor matplotlib (the report) is imported for it.
    probe = ("import sys\nfrom deltatune import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in ('transformers', 'matplotlib', 'deltatune.training.run') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for command in ("methods", "tasks", "train", "eval", "bench", "report", "demo"):
        assert command in proc.stdout
    assert "LOADED []" in proc.stdout


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "deltatune", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "usage: deltatune" in proc.stdout


def test_unknown_command_is_one_line(capsys):
    code, out, err = run(capsys, "frobnicate")
    assert code == 2 and err.count("\n") == 1 and "methods" in err


def test_methods_json_lists_the_registry(capsys):
    code, out, err = run(capsys, "methods", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [m["name"] for m in listed] == dt.methods()
    for entry in listed:
        assert {"name", "paper", "options", "lr", "mergeable"} <= set(entry)


def test_methods_table_has_a_row_per_method(capsys):
    code, out, err = run(capsys, "methods")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[2:]]
    assert names == dt.methods()


def test_tasks_lists_and_shows_a_card(capsys):
    from deltatune.tasks import TASKS

    code, out, err = run(capsys, "tasks", "--json")
    assert code == 0 and [t["name"] for t in json.loads(out)] == list(TASKS)
    code, out, err = run(capsys, "tasks", "show", "code-search")
    assert code == 0 and out.strip()


@pytest.mark.parametrize("flag, value, listed", [
    ("--method", "no-such-method", "lora"),
    ("--task", "no-such-task", "code-search"),
])
def test_unknown_method_or_task_lists_the_choices(capsys, flag, value, listed):
    argv = {"--model": "tiny-bert", "--task": "code-search", "--method": "lora", flag: value}
    code, out, err = run(capsys, "train", *[x for kv in argv.items() for x in kv])
    assert code == 2
    assert err.count("\n") == 1 and value in err and listed in err and "Traceback" not in err


def test_unknown_model_lists_the_choices(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--model", "no-such-model", "--task", "code-search", "--method", "lora",
                         "--max-steps", "1", "--max-train", "8", "--max-eval", "8", "--out", str(tmp_path))
    assert code == 2
    assert err.count("\n") == 1 and "no-such-model" in err and "minilm" in err and "Traceback" not in err


def test_unknown_option_lists_the_valid_ones_before_loading_anything(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--model", "no-such-model", "--task", "code-search", "--method", "lora",
                         "--set", "rank=4", "--out", str(tmp_path))
    assert code == 2 and "'rank'" in err and "r=8" in err  # the option, not the model, is reported


def test_bench_checks_every_option_before_the_first_run(capsys, tmp_path):
    code, out, err = run(capsys, "bench", "--model", "tiny-bert", "--task", "code-search", "--methods", "lora,bitfit",
                         "--set", "r=4", "--out", str(tmp_path))
    assert code == 2 and "bitfit" in err and "--set bitfit:KEY=VALUE" in err
    assert not (tmp_path / "runs").exists()


def test_bench_rejects_scoped_set_for_a_method_not_benched(capsys, tmp_path):
    code, out, err = run(capsys, "bench", "--model", "tiny-bert", "--task", "code-search", "--methods", "lora",
                         "--set", "bitfit:r=4", "--out", str(tmp_path))
    assert code == 2 and "bitfit" in err


def test_eval_missing_adapter_dir(capsys, tmp_path):
    code, out, err = run(capsys, "eval", "--adapter", str(tmp_path / "nowhere"))
    assert code == 2 and "no adapter directory" in err


def test_summary_names_the_candidate_pool_beside_the_mrr(capsys):
    summary = {"method": "lora", "task": "code-search", "model": "minilm", "metric": "mrr", "value": 0.7,
               "zero_shot_value": 0.6, "pool": 200, "pool_protocol": "whole-split", "trainable_params": 10,
               "total_params": 100}
    cli._print_summary(summary, "runs/x")
    out = capsys.readouterr().out
    assert "mrr = 0.7000 (candidate pool 200, whole-split)" in out and "predictions-test.jsonl" in out


def test_other_load_sees_a_busy_core():
    # One process spinning on one of our cores for 1.5 s: at least a third of the cores' time
    # (half of 2 cores, a quarter of 4, ...) went to other work than ours.
    cores = len(os.sched_getaffinity(0))
    before, started = machine.machine_cpu(), time.monotonic()
    assert before is not None and before[2] == cores
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"])
    load = machine.other_load(before, machine.machine_cpu(), 0.0, time.monotonic() - started)
    assert 0.6 / cores <= load <= 1.0
    # (busy, steal, cores) readings: our own CPU time is not "other", stolen time is
    assert machine.other_load((10.0, 1.0, 2), (14.0, 1.0, 2), 4.0, 2.0) == 0.0
    assert machine.other_load((10.0, 1.0, 2), (14.0, 2.0, 2), 2.0, 2.0) == 0.75


def test_demo_runs_registered_methods_on_a_bench_budget():
    assert set(cli.DEMO_METHODS) <= set(dt.methods())
    for quick in (False, True):
        args = cli.build_parser().parse_args(cli.demo_argv(quick, out="somewhere"))
        assert args.run is cli.cmd_bench and args.out == "somewhere" and args.batch_size in (8, 32)
        assert args.max_len <= 128 and args.seeds == "1"


# ----------------------------------------------------------------------------- report DIR

def test_report_rebuilds_from_results_csv(capsys, tmp_path):
    rows = [report.normalize_row({"method": m, "task": "code-search", "model": "tiny-bert", "metric": "ndcg@10",
                                  "value": v, "trainable_params": p, "total_params": 1000, "train_seconds": 1.0,
                                  "step_seconds_median": 0.1, "peak_rss_mb": 300.0}, seed=0)
            for m, v, p in [("full", 0.5, 1000), ("lora", 0.4, 20)]]
    report.write_csv(rows, tmp_path / "results.csv")
    code, out, err = run(capsys, "report", str(tmp_path))
    assert code == 0, err
    assert "| lora |" in out and str(tmp_path / "report.html") in out
    for name in ("results.md", "metric_vs_params.png", "step_time.png", "report.html"):
        assert (tmp_path / name).is_file()


def test_report_without_results_is_exit_2(capsys, tmp_path):
    code, out, err = run(capsys, "report", str(tmp_path))
    assert code == 2 and "deltatune bench" in err


# ----------------------------------------------------------------------------- the engine, for real

@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="the machine's load is read from /proc/stat")
def test_bench_marks_runs_timed_while_the_machine_was_busy(capsys, tmp_path, monkeypatch):
    # Other work on the machine during a run: the bench measures it, the report marks that run's
    # time per step (table, note, plot, HTML) instead of showing it as a slow method.
    loads = iter([0.02, 0.5])
    monkeypatch.setattr(machine, "other_load", lambda *args: next(loads))
    code, out, err = run(capsys, "bench", "--model", "tiny-bert", "--task", "code-search", "--methods", "lora,bitfit",
                         "--max-steps", "1", "--batch-size", "4", "--max-train", "8", "--max-eval", "8",
                         "--out", str(tmp_path))
    assert code == 0, err
    rows = report.read_csv(tmp_path / "results.csv")
    assert [r["other_load"] for r in rows] == [0.02, 0.5]
    assert "other load 50% † time not trustworthy" in err and "candidate pool 8" in err
    md = (tmp_path / "results.md").read_text()
    assert "mrr (candidate pool 8, whole-split)" in md
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert " s †" in lines["bitfit"] and "†" not in lines["lora"]
    assert "bitfit seed 0 (50%)" in md and "bitfit seed 0 (50%)" in (tmp_path / "report.html").read_text()


def test_eval_scores_the_whole_split_says_what_it_used_and_keeps_predictions(capsys, tmp_path):
    from deltatune.tasks import load_task

    out_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny-bert", "--task", "code-search", "--method", "bitfit",
                       "--max-steps", "1", "--batch-size", "4", "--max-train", "8", "--max-eval", "8",
                       "--max-len", "16", "--out", str(out_dir))
    assert code == 0, err
    whole = len(load_task("code-search").test)
    code, out, err = run(capsys, "eval", "--adapter", str(out_dir), "--task", "code-search")
    assert code == 0, err
    # issue 27: the whole split (not the run's --max-eval 8) at the length the run trained at (its --max-len 16)
    assert f"used: {whole} examples (the whole split), max_len 16 (the run's training length;" in out
    assert f"candidate pool {min(whole, 1000)}" in out
    predictions = out_dir / "eval-code-search" / "predictions-test.jsonl"
    assert len(predictions.read_text().splitlines()) == whole
    code, out, err = run(capsys, "eval", "--adapter", str(out_dir), "--max-eval", "5", "--max-len", "24",
                         "--batch-size", "2", "--split", "valid", "--out", str(tmp_path / "mine"), "--json")
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert (metrics["examples"], metrics["max_len"], metrics["batch_size"], metrics["pool"]) == (5, 24, 2, 5)
    assert len((tmp_path / "mine" / "predictions-valid.jsonl").read_text().splitlines()) == 5
    assert json.loads((tmp_path / "mine" / "metrics-valid.json").read_text())["value"] == metrics["value"]


def test_train_json_last_line_then_eval(capsys, tmp_path):
    out_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "deltatune", "train", "--model", "tiny-bert", "--task",
                           "code-search", "--method", "lora", "--set", "r=2", "--max-steps", "3",
                           "--batch-size", "4", "--max-train", "16", "--max-eval", "8", "--out", str(out_dir),
                           "--json"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert REQUIRED_KEYS <= set(summary)
    assert summary["method"] == "lora" and 0 < summary["trainable_params"] < summary["total_params"]
    assert (out_dir / "metrics.json").is_file()

    code, out, err = run(capsys, "eval", "--adapter", str(out_dir), "--json")  # the run dir: its best/ adapter
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["metric"] == summary["metric"] and metrics["split"] == "test"


def test_bench_end_to_end_then_report_rebuilds_it(capsys, tmp_path):
    code, out, err = run(capsys, "bench", "--model", "tiny-bert", "--task", "code-search", "--methods", "lora,bitfit",
                         "--seeds", "1", "--max-steps", "2", "--batch-size", "4", "--max-train", "8", "--max-eval", "8",
                         "--set", "lora:r=2", "--out", str(tmp_path))
    assert code == 0, err
    rows = report.read_csv(tmp_path / "results.csv")
    assert [(r["method"], r["seed"]) for r in rows] == [("lora", 0), ("bitfit", 0)]
    assert json.loads(rows[0]["options"]) == {"r": 2} and rows[1]["options"] == "{}"
    assert all(r["run_seconds"] > 0 and r["max_steps"] == 2 for r in rows)
    meta = json.loads((tmp_path / "bench.json").read_text())
    assert meta["command"].startswith("deltatune bench --model tiny-bert") and meta["machine"]["cores"] >= 1
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("Measured on ") and "| zero-shot |" in md and "| bitfit |" in md
    assert md in out and str(tmp_path / "report.html") in out
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()

    (tmp_path / "results.md").unlink()
    code, out, err = run(capsys, "report", str(tmp_path))
    assert code == 0 and (tmp_path / "results.md").read_text() == md
