"""Nothing is lost when training is killed: `deltatune train` is SIGKILLed at seeded random moments
and right before seeded random file-system operations (inside checkpoint, best-adapter and log
writes), then run again with --resume until it finishes. After every kill the latest checkpoint and
the best adapter load; at the end the adapter tensors (best/ and the last checkpoint), the logged
losses, the test score and the set of files equal those of a run that was never interrupted, bit
for bit (CPU, same thread count).

The kill counts go to $DELTATUNE_FIGURES (a JSON file) when it is set; docs/reliability.md cites them.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.formats.native import read_adapter
from deltatune.training import TrainConfig, train
from deltatune.training.checkpoints import latest_checkpoint as _latest_checkpoint

from . import figures
from .crashpoint import ForkServer, run_process
from .test_train import write_task

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="SIGKILL and a fork server need POSIX")

STEPS, EVAL_EVERY = 12, 3


def argv(task, out, method, *extra):
    return ["train", "--model", "tiny-bert", "--task", str(task), "--method", method, "--max-steps", str(STEPS),
            "--eval-every", str(EVAL_EVERY), "--batch-size", "8", "--max-len", "32", "--lr", "0.01",
            "--out", str(out), *extra]


def assert_recoverable(out: Path) -> None:
    """What a kill leaves behind: a loadable latest checkpoint and a loadable best adapter (if any yet)."""
    checkpoint = _latest_checkpoint(out)
    if checkpoint is not None:
        read_adapter(checkpoint / "adapter")
        load_file(checkpoint / "trainer.safetensors")
        assert json.loads((checkpoint / "trainer.json").read_text())["step"] == int(checkpoint.name.split("-")[1])
    # Between the two renames that swap best/ in, the previous one is .best.old; resume puts it back.
    best = next((p for p in (out / "best", out / ".best.old") if p.is_dir()), None)
    if best is not None:
        read_adapter(best)


def _progress(out: Path) -> str:
    """How far a killed run had got, from its log: "log at step 6", or "nothing logged" (the log is
    written at validation steps)."""
    lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return f"log at step {max(steps)}" if steps and max(steps) else "nothing logged"


def assert_same_run(ref: Path, out: Path, steps: int = STEPS) -> None:
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # noqa: E731
    assert files(out) == files(ref)  # the same files: no temporary or stale copies left behind
    log = lambda root: [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]  # noqa: E731
    diverged = next(((a, b) for a, b in zip(log(ref), log(out)) if a.get("loss") != b.get("loss")), None)
    assert diverged is None and len(log(out)) == len(log(ref)), f"logs differ from {diverged}"
    for sub in ("best", f"checkpoints/step-{steps:06d}/adapter"):
        a, b = load_file(ref / sub / "adapter.safetensors"), load_file(out / sub / "adapter.safetensors")
        assert a.keys() == b.keys(), sub
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], sub
    metrics = lambda root: json.loads((root / "metrics.json").read_text())  # noqa: E731
    assert metrics(out)["value"] == metrics(ref)["value"] and metrics(out)["best_step"] == metrics(ref)["best_step"]


def crash_and_resume(server, task, root: Path, method: str, kills: int, seed: str) -> dict:
    """An uninterrupted run, then the same run killed up to ``kills`` times and resumed; returns the counts."""
    root.mkdir(parents=True, exist_ok=True)
    ref = server.run(argv(task, root / "ref", method), root / "ref.log", root / "ref")
    assert ref["code"] == 0, (root / "ref.log").read_text()[-3000:]
    rng = random.Random(seed)
    out, log = root / "crash", root / "crash.log"
    landed = []
    for attempt in range(kills + 1):
        extra = ["--resume"] if attempt else []
        # Kill points spread over what is left to do, so that most attempts die before they finish.
        left = 1 - (int(_latest_checkpoint(out).name[5:]) if _latest_checkpoint(out) else 0) / STEPS
        if attempt == kills:
            spec = {}
        elif attempt % 2 == 0:  # right before a file-system operation: inside checkpoint/adapter/log writes
            spec = {"kill_at_op": rng.randint(1, max(4, round(ref["ops"] * left)))}
        else:  # at a random moment (start-up, training, evaluation or a write)
            spec = {"kill_after": rng.uniform(0.1, 0.8 * ref["seconds"] * max(left, 0.3))}
        result = server.run(argv(task, out, method, *extra), log, out, **spec)
        if not result["killed"]:
            assert result["code"] == 0, log.read_text()[-3000:]
            break
        landed.append(result["op"] or f"at {spec['kill_after']:.2f} s ({_progress(out)})")
        assert_recoverable(out)
    try:
        assert_same_run(root / "ref", out)
    except AssertionError as err:
        raise AssertionError(f"{method}, killed at {landed}: {err}") from None
    return {"kills": len(landed), "kill_points": landed, "ops_per_run": ref["ops"]}


# ------------------------------------------------------------------ what a kill leaves, set up by hand

def _config(task, out, **over) -> TrainConfig:
    base = dict(model="tiny-bert", task=str(task), method="lora", max_steps=4, eval_every=2, batch_size=8, max_len=32,
                lr=0.01, out_dir=str(out), progress=False)
    return TrainConfig(**{**base, **over})


def test_resume_after_the_last_write_or_a_torn_log_line_changes_nothing(task, tmp_path):
    out = tmp_path / "run"
    first = train(_config(task, out))
    log = (out / "log.jsonl").read_text()
    (out / "metrics.json").unlink()  # killed after the final test score was logged, before metrics.json
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.12')  # and a line cut short by a kill in the middle of an append
    again = train(_config(task, out, resume=True))
    assert (out / "log.jsonl").read_text() == log and again["value"] == first["value"]


def test_the_leftovers_of_a_kill_are_cleaned_up_on_resume(task, tmp_path):
    ref = tmp_path / "ref"
    train(_config(task, ref))
    out = tmp_path / "run"
    train(_config(task, out, stop_after=2))
    # A kill between the two renames that swap best/ in, inside a checkpoint write, inside an atomic
    # file write, and while an older checkpoint was being removed:
    os.replace(out / "best", out / ".best.old")
    (out / ".best.tmp").mkdir()
    (out / ".best.tmp" / "adapter.safetensors").write_bytes(b"half")
    (out / "checkpoints" / ".step-000004.tmp").mkdir()
    (out / ".run.json.x1y2z3w4.tmp").write_text("{")  # mkstemp: 8 random characters
    (out / "checkpoints" / "step-000001").mkdir()
    train(_config(task, out, resume=True))
    assert_same_run(ref, out, steps=4)


FAST = ["lora", "bitfit", "prefix"]  # a low-rank delta, a selection method, a training-only reparameterisation
SLOW = ["lora", "bitfit", "telly", "ia3", "houlsby", "prompt", "prefix", "full"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), "classification")


def _crash_all(task, tmp_path, methods, kills, section):
    counts = {}
    with ForkServer() as server:
        for method in methods:
            counts[method] = crash_and_resume(server, task, tmp_path / method, method, kills, f"crash:{method}")
    figures.record(section, counts)
    total = sum(c["kills"] for c in counts.values())
    # Every method was killed at least once before it finished: the first attempt dies at a file-system
    # operation counted from the reference run, which does not depend on the machine's speed. The
    # later kills at a random moment may come after a resumed run has finished (it ran faster than the
    # reference did on a busy machine), so how many land is not asserted.
    assert total >= len(methods) and all(c["kills"] for c in counts.values()), counts
    return counts


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(task, tmp_path):
    _crash_all(task, tmp_path, FAST, kills=8, section="crash")


@pytest.mark.slow
def test_sigkill_many_methods_many_kills(task, tmp_path):
    _crash_all(task, tmp_path, SLOW, kills=16, section="crash_slow")


@pytest.mark.slow
def test_sigkill_real_processes(task, tmp_path):
    """The same with real `python -m deltatune` processes (each pays the start-up of Python and torch)."""
    with ForkServer() as server:
        assert server.run(argv(task, tmp_path / "ref", "lora"), tmp_path / "ref.log", tmp_path / "ref")["code"] == 0
    out, log = tmp_path / "crash", tmp_path / "crash.log"
    checkpoints = lambda: list((out / "checkpoints").glob("*step-*"))  # noqa: E731
    writing = lambda: any(p.name.endswith(".tmp") for p in checkpoints())  # noqa: E731
    plans = [(lambda: bool(checkpoints()), 0.3),  # soon after the first checkpoint appears
             (writing, 0.0),  # as soon as a checkpoint is being written
             (writing, 0.002)]
    kills = 0
    for attempt, (when, delay) in enumerate(plans + [(None, 0.0)]):
        result = run_process(argv(task, out, "lora", *(["--resume"] if attempt else [])), log, when, delay)
        if not result["killed"]:
            assert result["code"] == 0, log.read_text()[-3000:]
            break
        kills += 1
        assert_recoverable(out)
    assert_same_run(tmp_path / "ref", out)
    figures.record("crash_real_processes", {"lora": {"kills": kills}})
