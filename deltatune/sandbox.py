"""Run untrusted Python programs (generated code) in confined child processes, never in this one.

    from deltatune.sandbox import run_programs
    results = run_programs(["assert 1 + 1 == 2", "while True: pass"], timeout=3.0)
    [r.status for r in results]          # ['passed', 'timed out']

Each program runs in its own child process: a launcher (``python -I -S``, our code only) confines
itself and then ``exec``\\ s ``python -I program.py``, so the program starts already confined:

- time: a wall-clock limit (the whole process group is killed) and ``RLIMIT_CPU``;
- memory: ``RLIMIT_AS`` (an allocation beyond it raises MemoryError in the program);
- processes: ``RLIMIT_NPROC``, and on Linux a seccomp filter that refuses fork, vfork and clone
  without CLONE_THREAD (threads still work) -- the rlimit alone does not bind a root caller;
- files: ``RLIMIT_FSIZE`` bounds every file it writes (its captured output too); on Linux with
  Landlock (5.13+) it may write, create, rename and delete only beneath its own fresh, empty
  working directory (reading is allowed); from Landlock ABI 6 it cannot signal processes outside
  its sandbox, and ptrace of outside processes is refused by Landlock in any version;
- network: a new, empty network namespace where ``unshare`` works (as root, or with
  unprivileged user namespaces), and on Linux socket() is refused by the seccomp filter and TCP
  bind/connect by Landlock (ABI 4+); where none of these exist, an audit hook in the program's
  first line refuses socket creation (weaker: code that reaches ctypes can get around it);
- stdin closed (``/dev/null``), a minimal environment, isolated mode (``-I``: no user site, no
  PYTHON* variables, the script's folder not on sys.path), stdout/stderr captured to files and
  read back bounded (:data:`OUTPUT_LIMIT` bytes, the end of stderr where the traceback is).

The working directory is created by :func:`run_program` for the program and removed afterwards,
links not followed. Which protections applied is in every result (``protections``). Without
filesystem containment (not Linux, or no Landlock) :func:`run_programs` refuses to run unless
``allow_uncontained=True``: a generated program could otherwise delete the caller's files.
Several programs run in parallel, at most ``workers`` at a time (threads that only wait).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from deltatune.errors import ConfigError

__all__ = ["Result", "run_program", "run_programs", "protections", "OUTPUT_LIMIT"]

OUTPUT_LIMIT = 16 * 1024  # bytes of stdout and of stderr kept in a result
DEFAULT_MEMORY = 1 << 30  # RLIMIT_AS: 1 GiB of address space
DEFAULT_FILE_SIZE = 16 << 20  # RLIMIT_FSIZE: 16 MiB per file written (output files included)
DEFAULT_NPROC = 32


@dataclass
class Result:
    """What one program did. ``status``: "passed" (exit code 0 in time), "failed" (a non-zero exit,
    an uncaught exception, a signal) or "timed out" (wall clock or CPU limit). ``error`` is the
    last line of the traceback (e.g. ``AssertionError``, ``MemoryError``) or what killed it."""

    status: str
    error: str = ""
    returncode: int | None = None
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    protections: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


# The launcher: runs in the child with `python -I -S -c`, confines itself, then execs the program.
# argv[1] is a JSON object: program, workdir, report, limits. It writes which protections applied
# to `report` (a file outside the program's reach) before exec.
_LAUNCHER = r'''
import ctypes, json, os, platform, resource, struct, sys
cfg = json.loads(sys.argv[1])
report = open(cfg["report"], "w")  # opened before confinement; closed on exec
done = {"network": [], "processes": ["rlimit-nproc"], "files": ["rlimit-fsize"], "signals": []}
libc = ctypes.CDLL(None, use_errno=True)
def syscall(*args):
    r = libc.syscall(*args)
    return r, ctypes.get_errno()
for name, value in (("AS", cfg["memory"]), ("CPU", cfg["cpu"]), ("NPROC", cfg["nproc"]),
                    ("FSIZE", cfg["fsize"]), ("CORE", 0), ("NOFILE", 256)):
    res = getattr(resource, "RLIMIT_" + name, None)
    if res is not None:
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            done.setdefault("failed", []).append("rlimit-" + name.lower())
linux = sys.platform.startswith("linux")
if linux:
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags) == 0:
        if flags & CLONE_NEWUSER:  # map ourselves, so that files we create have an owner
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                               ("/proc/self/gid_map", f"{gid} {gid} 1")):
                try:
                    with open(path, "w") as f:
                        f.write(text)
                except OSError:
                    pass
        done["network"].append("namespace")
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: needed by Landlock and seccomp
    # Landlock: write-type rights handled, granted beneath the working directory only.
    abi, _ = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi >= 1:
        fs = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))
        fs |= (1 << 13) if abi >= 2 else 0  # REFER
        fs |= (1 << 14) if abi >= 3 else 0  # TRUNCATE
        net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, no rule: refused
        scoped = 3 if abi >= 6 else 0  # abstract unix sockets and signals outside the sandbox
        attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
        buf = ctypes.create_string_buffer(attr, len(attr))
        ruleset, err = syscall(444, buf, len(attr), 0)
        ok = ruleset >= 0
        for path, rights in ((cfg["workdir"], fs), ("/dev/null", (1 << 1) | ((1 << 14) if abi >= 3 else 0))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
            ok = ok and syscall(445, ruleset, 1, rule, 0)[0] == 0
            os.close(fd)
        if ok and syscall(446, ruleset, 0)[0] == 0:
            done["files"].append(f"landlock-abi{abi}")
            if net:
                done["network"].append("landlock-tcp")
            if scoped:
                done["signals"].append("landlock-scope")
    # seccomp: refuse new processes (clone without CLONE_THREAD, fork, vfork; clone3 -> ENOSYS so that
    # the C library falls back to clone), socket(), io_uring and other-ABI (x32) system calls.
    arch = {"x86_64": (0xC000003E, {"socket": 41, "clone": 56, "fork": 57, "vfork": 58, "io_uring_setup": 425}),
            "aarch64": (0xC00000B7, {"socket": 198, "clone": 220, "io_uring_setup": 425})}.get(platform.machine())
    if arch:
        audit, nr = arch
        ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
        deny = [nr[k] for k in ("fork", "vfork", "socket", "io_uring_setup") if k in nr]
        body = [(0x20, 0, 0, 0), (0x35, "EPERM", 0, 0x40000000)]  # ld nr; jge x32 -> EPERM
        body += [(0x15, "EPERM", 0, n) for n in deny]
        body += [(0x15, "ENOSYS", 0, 435), (0x15, 0, "ALLOW", nr["clone"]),
                 (0x20, 0, 0, 16), (0x45, "ALLOW", "EPERM", 0x00010000)]  # ld args[0]; jset CLONE_THREAD
        tail = {"ALLOW": ALLOW, "EPERM": EPERM, "ENOSYS": ENOSYS, "KILL": KILL}
        code = [(0x20, 0, 0, 4), (0x15, 0, "KILL", audit)] + body
        labels = {name: len(code) + i for i, name in enumerate(tail)}
        code += [(0x06, 0, 0, v) for v in tail.values()]
        def off(target, i):
            return labels[target] - i - 1 if isinstance(target, str) else target
        raw = b"".join(struct.pack("HBBI", op, off(jt, i), off(jf, i), k) for i, (op, jt, jf, k) in enumerate(code))
        filt = ctypes.create_string_buffer(raw, len(raw))
        fprog = struct.pack("HxxxxxxP" if struct.calcsize("P") == 8 else "HxxP", len(code), ctypes.addressof(filt))
        fbuf = ctypes.create_string_buffer(fprog, len(fprog))
        if libc.prctl(22, 2, fbuf, 0, 0) == 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            done["processes"].append("seccomp")
            done["network"].append("seccomp-socket")
program = cfg["program"]
if not done["network"]:  # no kernel means: an audit hook refuses socket creation in the program itself
    program = cfg["hook_program"]
    done["network"].append("audit-hook")
json.dump(done, report)
report.close()
os.execv(sys.executable, [sys.executable, "-I", program])
'''

# The program's first lines where no kernel means block the network (see the launcher).
_AUDIT_HOOK = ("import sys as _s\n"
               "def _no_net(event, args):\n"
               "    if event in ('socket.__new__', 'socket.connect', 'socket.bind', 'socket.getaddrinfo'):\n"
               "        raise PermissionError('network access is disabled in this sandbox')\n"
               "_s.addaudithook(_no_net)\n"
               "del _s, _no_net\n")


def _tail(path: Path, limit: int, keep_end: bool) -> str:
    """At most ``limit`` bytes of a captured output file: its start, or its end for stderr."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit) if keep_end else 0)
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def _remove(path: Path) -> None:
    """Remove the sandbox folder we made; links inside are removed, never followed."""
    def retry(func, p, _exc):  # a folder the program made unreadable or unwritable
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700, follow_symlinks=False)
        except (OSError, NotImplementedError):
            pass
        try:
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=retry)


def run_program(source: str, *, timeout: float = 10.0, memory: int = DEFAULT_MEMORY,
                file_size: int = DEFAULT_FILE_SIZE, nproc: int = DEFAULT_NPROC,
                output_limit: int = OUTPUT_LIMIT) -> Result:
    """Run one program confined (see the module docstring) and return its :class:`Result`."""
    outer = Path(tempfile.mkdtemp(prefix="deltatune-exec-"))
    try:
        work = outer / "work"
        work.mkdir(mode=0o700)
        program, hooked = outer / "program.py", outer / "program-hooked.py"
        program.write_text(source, encoding="utf-8")
        hooked.write_text(_AUDIT_HOOK + source, encoding="utf-8")
        report = outer / "protections.json"
        cfg = {"program": str(program), "hook_program": str(hooked), "workdir": str(work), "report": str(report),
               "memory": int(memory), "cpu": max(1, int(timeout + 1)), "nproc": int(nproc), "fsize": int(file_size)}
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        start = time.monotonic()
        with open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the program's whole process group (it can start no other)
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        stdout = _tail(outer / "stdout", output_limit, keep_end=False)
        stderr = _tail(outer / "stderr", output_limit, keep_end=True)
        try:
            protections = json.loads(report.read_text())
        except (OSError, ValueError):
            protections = {}
        code = proc.returncode
        if timed_out:
            return Result("timed out", f"wall-clock limit of {timeout:g} s", code, seconds, stdout, stderr, protections)
        if code == -signal.SIGXCPU or (code == -signal.SIGKILL and seconds >= timeout * 0.9):
            return Result("timed out", "CPU time limit", code, seconds, stdout, stderr, protections)
        if code == 0:
            return Result("passed", "", code, seconds, stdout, stderr, protections)
        error = _last_line(stderr) or (f"killed by signal {signal.Signals(-code).name}" if code < 0
                                       else f"exit code {code}")
        return Result("failed", error, code, seconds, stdout, stderr, protections)
    finally:
        _remove(outer)


@lru_cache(maxsize=1)
def protections() -> dict:
    """The protections that apply on this machine (from a trial run of an empty program)."""
    return run_program("pass", timeout=30.0).protections


def run_programs(sources: list[str], *, workers: int | None = None, timeout: float = 10.0,
                 memory: int = DEFAULT_MEMORY, allow_uncontained: bool = False, progress=None) -> list[Result]:
    """Run every program confined, at most ``workers`` at a time (default: the CPU count, at most 8).

    Refuses (ConfigError) where the programs' writes cannot be confined to their own folder, unless
    ``allow_uncontained``. ``progress``, if given, is called with each finished Result.
    """
    if os.name != "posix":
        raise ConfigError("executing generated programs needs a POSIX system (resource limits); "
                          "run the evaluation on Linux or macOS")
    if not allow_uncontained and not any(p.startswith("landlock") for p in protections().get("files", [])):
        raise ConfigError("this system cannot confine a generated program's file writes (Landlock needs Linux 5.13 "
                          "or later); run on such a system, or pass allow_uncontained=True to run them anyway")
    workers = workers or min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")

    def one(source):
        result = run_program(source, timeout=timeout, memory=memory)
        if progress is not None:
            progress(result)
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))
