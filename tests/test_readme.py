"""Every fenced ``bash`` and ``python`` block of README.md runs as written, in README order, so the README
cannot drift from the code.

How: each block's lines run in one scratch folder that holds links to the checkout's files (so ``.venv``
and the scripts are there and the commands' ``runs/`` and ``out/`` stay out of the checkout; ``make``
lines run in the checkout, which ``make setup`` installs), each bash
line after the README's own set-up line (``source .venv/bin/activate``), each python block as a script
of that Python. A command must exit 0. Later lines use what earlier ones wrote (``eval`` and ``serve``
read the runs that ``train`` made), as a reader's would.

Budgets: a README line trains for minutes (``train``: 200 steps at batch 32) and a few for much longer
(``bench --seeds 3``, HumanEval). With ``DELTATUNE_README_SMOKE`` unset or 1 (the default) this test
appends small-budget flags to those commands (``SMALL`` below; argparse keeps an option's last value,
so they override the README's own); the code has no test mode. ``DELTATUNE_README_SMOKE=0`` runs every
line exactly as written (hours on 2 CPU cores). ``DELTATUNE_README_TIMES=FILE`` writes each line's wall
time there (JSON).

Lines that cannot run in a test by design are skipped with their reason (``SKIPPED``). ``serve`` does not
end by itself: it is started, asked for its adapters, and stopped.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SMOKE = os.environ.get("DELTATUNE_README_SMOKE", "1") != "0"
SETUP = "source .venv/bin/activate"  # the README's set-up line, run before every bash line

SKIPPED = {
    "make demo": "the 6-minute comparison; the `deltatune demo` line below runs the same command",
    "make test": "the test suite, which this test is part of",
    "torchrun --nnodes 2": "multi-node: needs a second machine at HOST; the `--nproc 2` line runs the same code",
}

_TRAIN = ["--max-steps", "2", "--eval-every", "2", "--batch-size", "4", "--max-train", "16", "--max-eval", "16",
          "--max-len", "32", "--max-new-tokens", "8"]
SMALL = {  # deltatune COMMAND -> flags appended under DELTATUNE_README_SMOKE
    "train": _TRAIN,
    "bench": ["--seeds", "1", *_TRAIN],
    "eval": ["--max-eval", "16"],
    "eval --task humaneval": ["--limit", "1", "--max-new-tokens", "16"],
    "demo": ["--quick"],
    "analyze": ["--functions", "24,8,16", "--samples", "16", "--search-samples", "16", "--finetune-steps", "2",
                "--max-len", "32", "--batch-size", "8"],
}
SERVE = ["--port", "0"]  # always: the README's default port may be taken on this machine


@dataclass
class Step:
    block: int
    kind: str  # "bash" or "python"
    text: str  # the line (bash) or the whole block (python)

    @property
    def id(self) -> str:
        first = self.text.strip().splitlines()[0] if self.kind == "python" else self.text
        return f"{self.block}-{self.kind}: {_command(first)[:60]}"

    @property
    def skip(self) -> str | None:
        return next((why for start, why in SKIPPED.items() if self.kind == "bash" and self.text.startswith(start)), None)


def _command(line: str) -> str:
    """The line without its trailing comment (the README's comments follow two or more spaces)."""
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip() if not line.lstrip().startswith("#") else ""


def steps() -> list[Step]:
    out = []
    blocks = re.findall(r"^```(bash|python)\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    for i, (kind, body) in enumerate(blocks, 1):
        if kind == "python":
            out.append(Step(i, kind, body))
            continue
        out += [Step(i, kind, line) for line in body.splitlines() if _command(line)]
    return out


STEPS = steps()
TIMES: dict = {}


def shrunk(command: str) -> str:
    """``command`` with the small budgets appended (and serve's port), as this test runs it."""
    words = command.split()
    if words[:1] != ["deltatune"] or len(words) < 2:
        return command
    extra = SERVE if words[1] == "serve" else []
    if SMOKE:
        key = "eval --task humaneval" if words[1] == "eval" and "humaneval" in words else words[1]
        extra = extra + SMALL.get(key, [])
    return " ".join([command, *extra])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder with links to the checkout's files: the README's relative paths work, its outputs land here."""
    work = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in (".git", "runs", "out"):
            (work / entry.name).symlink_to(entry)
    yield work
    target = os.environ.get("DELTATUNE_README_TIMES")
    if target:
        Path(target).write_text(json.dumps(TIMES, indent=1))


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _bash(command: str, cwd: Path, timeout: float | None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -e\n{SETUP}\n{command}"], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _serve(command: str, cwd: Path) -> None:
    """Start the server, check it answers with the README's adapters, stop it (Ctrl-C)."""
    import httpx

    proc = subprocess.Popen(["bash", "-c", f"set -e\n{SETUP}\nexec {command}"], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 600
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            found = re.search(r"deltatune serve: (http://\S+/) ", line)
            url = found.group(1) if found else None
        assert url is not None, "".join(lines)
        names = {a["name"] for a in httpx.get(url + "v1/adapters", timeout=30).json()["adapters"]}
        assert names == set(re.findall(r"--adapter (\w+)=", command)), names
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), "".join(lines) + proc.stdout.read()


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS, ids=[s.id for s in STEPS])
def test_the_readme_runs_as_written(step, workdir):
    if step.skip:
        pytest.skip(step.skip)
    timeout = 1800 if SMOKE else None
    started = time.monotonic()
    if step.kind == "python":
        script = workdir / f"readme-block-{step.block}.py"
        script.write_text(step.text)
        done = _bash(f"python {script.name}", workdir, timeout)
        ran = f"python block {step.block}"
    else:
        command = shrunk(_command(step.text))
        ran = command
        if command.startswith("deltatune serve"):
            _serve(command, workdir)
            done = None
        else:  # make runs in the checkout itself: setup.sh may install the checkout (editable) into .venv
            done = _bash(command, ROOT if command.startswith("make ") else workdir, timeout)
    TIMES[step.id] = {"ran": ran, "seconds": round(time.monotonic() - started, 1)}
    if done is not None:
        assert done.returncode == 0, f"{ran}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_the_readme_has_the_blocks_this_test_reads():
    """The test cannot pass by finding nothing: the README's set-up line, the API block and the CLI lines are seen."""
    texts = [s.text for s in STEPS]
    assert SETUP in [_command(t) for t in texts]
    assert any(s.kind == "python" and "load_backbone" in s.text for s in STEPS)
    assert sum(t.startswith("deltatune ") for t in texts) >= 15
    assert [s for s in STEPS if s.skip] and len([s for s in STEPS if s.skip]) == len(SKIPPED)


def test_small_budgets_are_appended_to_the_long_commands_only():
    small = (lambda flags: " " + " ".join(flags)) if SMOKE else (lambda flags: "")
    assert shrunk("deltatune methods") == "deltatune methods"
    assert shrunk("make setup") == "make setup"
    assert shrunk("deltatune serve --model minilm") == "deltatune serve --model minilm --port 0"
    assert shrunk("deltatune train --max-steps 50") == "deltatune train --max-steps 50" + small(_TRAIN)
    assert shrunk("deltatune eval --task humaneval --model smollm2") == \
        "deltatune eval --task humaneval --model smollm2" + small(SMALL["eval --task humaneval"])
