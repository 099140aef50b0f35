"""Run `deltatune train` in child processes and SIGKILL them: after a delay, or right before the n-th
file-system operation on the output directory (so inside checkpoint and adapter writes).

Starting Python and importing transformers takes 5 to 15 s on a small shared machine, so a fork
server pays it once: the server imports deltatune and the engine, then forks one child per run; the
child runs ``deltatune.cli.main(argv)``, which is all that ``python -m deltatune`` does. ``run()``
also runs a real ``python -m deltatune`` process, for the slow tests.

    with ForkServer() as server:
        result = server.run(argv, log, kill_at_op=5)   # {"code", "killed", "ops", "seconds"}
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The operations counted: every rename, directory creation, removal and fsync under the run's
# output directory (shutil.rmtree removes entries through dir_fd, so those count too).
COUNTED = ("replace", "rename", "mkdir", "unlink", "rmdir", "fsync")

SERVER = r'''
import json, os, signal, sys, time
import deltatune.cli, deltatune.training, deltatune.models  # the engine, imported once
from transformers import BertModel, LlamaModel  # noqa: F401  transformers loads model classes lazily

def count_ops(root, kill_at):
    """Wrap the counted os functions: count those on ``root``; SIGKILL this process before op ``kill_at``."""
    count = [0]
    def counted(name, args, kwargs):
        if name == "fsync" or "dir_fd" in kwargs:
            return True
        return bool(args) and isinstance(args[0], (str, os.PathLike)) and os.fspath(args[0]).startswith(root)
    def describe(name, args, kwargs):
        if name == "fsync":  # of a file or of a directory (after a rename); /proc names it on Linux
            try:
                return "fsync " + os.path.relpath(os.readlink(f"/proc/self/fd/{args[0]}"), root)
            except OSError:
                return "fsync"
        if kwargs.get("dir_fd") is not None:  # shutil.rmtree, one entry at a time
            return f"{name} {args[0]} (rmtree)"
        return f"{name} " + " -> ".join(os.path.relpath(os.fspath(a), root) for a in args[:2] if isinstance(a, (str, os.PathLike)))
    def wrap(fn):
        def inner(*args, **kwargs):
            if counted(fn.__name__, args, kwargs):
                count[0] += 1
                if count[0] == kill_at:  # say where, then die before the operation
                    with open(os.environ["CRASHPOINT_NOTE"], "w") as f:
                        f.write(describe(fn.__name__, args, kwargs))
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return inner
    for name in COUNTED:
        setattr(os, name, wrap(getattr(os, name)))
    return count

for line in sys.stdin:
    job = json.loads(line)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ["CRASHPOINT_NOTE"] = job["log"] + ".note"
        count = count_ops(os.path.abspath(job["root"]), job.get("kill_at_op") or 0)
        try:
            code = deltatune.cli.main(job["argv"])
        except SystemExit as e:
            code = e.code
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        with open(job["log"] + ".ops", "w") as f:
            f.write(str(count[0]))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    killed = False
    deadline = started + job["kill_after"] if job.get("kill_after") is not None else None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if deadline else 0)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = None
        else:
            time.sleep(0.005)
    signalled = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "killed": signalled,
                      "seconds": time.monotonic() - started}), flush=True)
'''.replace("COUNTED", repr(COUNTED))


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


class ForkServer:
    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=child_env(), cwd=ROOT)
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def run(self, argv: list[str], log: Path, root: Path, kill_at_op: int | None = None,
            kill_after: float | None = None) -> dict:
        """Run ``deltatune argv`` in a fresh child; ``root`` is the directory whose operations count."""
        job = {"argv": argv, "log": str(log), "root": str(root), "kill_at_op": kill_at_op, "kill_after": kill_after}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit code {self.proc.poll()})")
        result = json.loads(line)
        ops, note = Path(f"{log}.ops"), Path(f"{log}.note")
        result["ops"] = int(ops.read_text()) if ops.exists() else None
        result["op"] = note.read_text() if note.exists() else None  # the operation it was killed before
        ops.unlink(missing_ok=True)
        note.unlink(missing_ok=True)
        return result


def run_process(argv: list[str], log: Path, kill_when=None, kill_after: float = 0.0) -> dict:
    """A real `python -m deltatune` process; SIGKILLed ``kill_after`` s after ``kill_when()`` first holds."""
    started = time.monotonic()
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deltatune", *argv], stdout=out, stderr=out,
                                env=child_env(), cwd=ROOT)
        seen = None
        while proc.poll() is None:
            if kill_when is not None and seen is None and kill_when():
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    return {"code": None if killed else proc.returncode, "killed": killed, "seconds": time.monotonic() - started}
