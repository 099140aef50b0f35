"""deltatune.sandbox: generated programs run confined in a child process, and this process is unaffected.

Each attack is a program that would do harm uncontained (chmod of the caller's files, reading secrets, reboot,
memory the address-space limit does not count, text smuggled into the results); the tests assert that it fails
and that nothing outside changed. They run as whatever user runs pytest (root in our containers); a test skips
only where the kernel lacks the feature it needs, and says which.
"""
import hashlib
import json
import os
import platform
import signal
import socket
import stat
import sysconfig
import textwrap
import threading
import time

import pytest

from deltatune import sandbox
from deltatune.errors import ConfigError
from deltatune.sandbox import (
    DENIED_SYSCALLS,
    OUTPUT_LIMIT,
    protections,
    run_program,
    run_programs,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system")


def _applied() -> tuple[dict, str | None]:
    try:
        return protections(), None
    except ConfigError as e:  # root on a machine that cannot confine: every run is refused (tested below)
        return {}, str(e)


APPLIED, REFUSED = _applied()
runs = pytest.mark.skipif(REFUSED is not None, reason=f"programs are refused here: {REFUSED}")
needs_landlock = pytest.mark.skipif(not any(p.startswith("landlock") for p in APPLIED.get("files", [])),
                                    reason="file containment needs Linux with Landlock (5.13+)")
needs_seccomp = pytest.mark.skipif("seccomp" not in APPLIED.get("syscalls", []),
                                   reason="system-call filtering needs Linux seccomp on x86-64 or arm64")
COLUMN = {"x86_64": 0, "aarch64": 1}.get(platform.machine())


def nr(name: str) -> int:
    """This machine's number of a system call in the sandbox's table."""
    for group in DENIED_SYSCALLS.values():
        if name in group:
            return group[name][COLUMN]
    raise KeyError(name)


def run(source: str, **kw):
    return run_program(textwrap.dedent(source), **kw)


# A prelude for attack programs: `attempt(name, call)` records the errno name a call failed with ("OK" if it
# succeeded); `raw(name, *args)` makes a system call by number; the program prints the record as JSON at the end.
PRELUDE = """
import ctypes, errno, json, os, sys
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
outcome = {}
def attempt(name, call):
    try:
        call()
        outcome[name] = "OK"
    except OSError as e:
        outcome[name] = errno.errorcode.get(e.errno, str(e.errno))
def raw(number, *args):
    if _libc.syscall(number, *args) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
"""


def attack(body: str, **kw) -> dict:
    """Run PRELUDE + body confined; return {attempt: errno name or "OK"}."""
    result = run_program(PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(outcome))\n", timeout=30, **kw)
    assert result.passed, (result.error, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def snapshot(path) -> tuple:
    """Everything about a file that an attack on its metadata or content could change."""
    with open(path, "rb") as f:  # first: reading may move the access time (relatime), once
        content = f.read()
    st = os.stat(path, follow_symlinks=False)
    try:
        xattrs = {name: os.getxattr(path, name) for name in os.listxattr(path)}
    except OSError:
        xattrs = None
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns, xattrs, content


@runs
def test_correct_program_passes_and_wrong_one_fails():
    ok = run("""
        def add(a, b):
            return a + b
        assert add(2, 3) == 5
        print("fine")
        """)
    assert ok.status == "passed" and ok.passed and ok.returncode == 0 and ok.stdout.strip() == "fine"
    wrong = run("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert wrong.status == "failed" and wrong.error == "AssertionError"
    broken = run("def add(a, b)\n    return a\n")
    assert broken.status == "failed" and broken.error.startswith("SyntaxError")


@runs
def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run("while True:\n    pass\n", timeout=1.5)
    assert result.status == "timed out"
    assert time.monotonic() - start < 15  # killed, not waited for


@runs
def test_memory_bomb_is_stopped():
    result = run("""
        chunks = []
        while True:
            chunks.append(bytearray(50 * 2**20))
        """, memory=512 * 2**20, timeout=20)
    assert result.status == "failed" and result.error == "MemoryError"


@runs
def test_fork_bomb_is_stopped():
    # The program prints its process group, then forks for ever (a refused fork is retried); afterwards
    # nothing of that group may be left running.
    result = run("""
        import os, sys
        print(os.getpgid(0), flush=True)
        refused = 0
        while True:
            try:
                os.fork()
            except OSError:
                refused += 1
                if refused > 1000:
                    sys.exit("fork refused: " + str(refused))
        """, timeout=5)
    assert result.status in ("failed", "timed out") and result.status != "passed"
    pgid = int(result.stdout.split()[0])
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


@runs
def test_subprocess_is_refused():
    result = run("import subprocess\nsubprocess.run(['true'], check=True)\n")
    assert result.status == "failed"


@runs
def test_network_is_refused():
    # A server in this process on the loopback: the program must neither create a socket that reaches it
    # nor connect. (In a network namespace even a created socket sees an empty network.)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        result = run(f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            s.sendall(b"hello")
            """)
        assert result.status == "failed"
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert APPLIED["network"], "some network protection must apply"


@runs
@needs_landlock
def test_writes_outside_its_folder_are_refused(tmp_path):
    target = tmp_path / "written.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "Permission" in result.error
    assert not target.exists()
    # the installation it may read: a .pth file planted there would run in every later interpreter, deltatune's too
    planted = os.path.join(sysconfig.get_paths()["purelib"], "deltatune-planted.pth")
    result = run(f"open({planted!r}, 'w').write('import os')\n")
    assert result.status == "failed" and result.error == "PermissionError"
    assert not os.path.exists(planted)
    inside = run("open('here.txt', 'w').write('x')\nimport os\nprint(os.getcwd())\nassert os.listdir('.') == ['here.txt']\n")
    assert inside.passed, inside.stderr
    assert not os.path.exists(inside.stdout.strip())  # its folder is removed afterwards


@runs
@needs_landlock
def test_deleting_files_cannot_touch_the_callers_files(tmp_path):
    keep = tmp_path / "keep" / "data.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    result = run(f"""
        import os, shutil
        errors = 0
        for step in (lambda: os.remove({str(keep)!r}), lambda: shutil.rmtree({str(keep.parent)!r}),
                     lambda: os.rename({str(keep)!r}, "stolen.txt"), lambda: open({str(keep)!r}, "w"),
                     lambda: open(os.link({str(keep)!r}, "hard.txt") or "hard.txt", "w"),  # a way in from its folder
                     lambda: open(os.symlink({str(keep)!r}, "soft.txt") or "soft.txt", "w")):
            try:
                step()
            except OSError:
                errors += 1
        assert errors == 6, errors
        """)
    assert result.passed, result.stderr
    assert keep.read_text() == "precious"


@runs
def test_this_process_is_unaffected():
    # Signals sent at this process (by pid and as the parent), stdin, and a flood of output.
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    try:
        result = run(f"""
            import os, signal
            for pid in ({os.getpid()}, os.getppid()):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except OSError:
                    pass
            """)
        time.sleep(0.2)
        if APPLIED["signals"]:  # Landlock ABI 6+ or the seccomp filter: no signal leaves the sandbox  # Landlock ABI 6+: no signal leaves the sandbox
            assert got == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.status in ("passed", "failed")
    stdin = run("input()\n")
    assert stdin.status == "failed" and stdin.error.startswith("EOFError")
    flood = run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 50000)\nraise ValueError('end')\n")
    assert flood.status == "failed" and flood.error == "ValueError"  # the name, never the program's message
    assert len(flood.stdout) <= OUTPUT_LIMIT and len(flood.stderr) <= OUTPUT_LIMIT
    isolated = run("import sys\nassert sys.flags.isolated and sys.stdin.read() == ''\n")
    assert isolated.passed, isolated.stderr
    assert threading.active_count() >= 1 and os.getcwd()  # still here, same working directory


@runs
def test_run_programs_in_parallel_keeps_order():
    sources = [f"import sys\nsys.exit({i % 2})\n" for i in range(6)]
    seen = []
    results = run_programs(sources, workers=3, timeout=20, progress=seen.append)
    assert [r.status for r in results] == ["passed", "failed"] * 3
    assert len(seen) == 6
    with pytest.raises(ConfigError, match="workers"):
        run_programs(["pass"], workers=-1)


# ----------------------------------------------------------------------------- root's powers (issue 21, part 4)

@runs
@needs_seccomp
def test_no_capabilities_and_no_new_privileges():
    # Read back in the program: the capability sets (capget), the bounding set, no_new_privs.
    got = attack("""
        hdr = ctypes.create_string_buffer(b"\\x22\\x05\\x08\\x20" + bytes(4), 8)  # version 3, this process
        data = ctypes.create_string_buffer(24)
        assert _libc.capget(hdr, data) == 0
        outcome["capabilities"] = data.raw.hex()
        outcome["bounding"] = [c for c in range(64) if _libc.prctl(23, c, 0, 0, 0) == 1]  # PR_CAPBSET_READ
        outcome["no_new_privs"] = _libc.prctl(39, 0, 0, 0, 0)
        outcome["uid"] = os.getuid()
        attempt("setuid", lambda: os.setuid(os.getuid()))
        import resource
        try:  # raising a hard limit needs CAP_SYS_RESOURCE
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            outcome["raise_memory_limit"] = "OK"
        except (ValueError, OSError):
            outcome["raise_memory_limit"] = "refused"
        attempt("unshare", lambda: raw(UNSHARE, 0x10000000))
        """.replace("UNSHARE", str(nr("unshare"))))
    assert got["capabilities"] == "00" * 24 and got["bounding"] == [] and got["no_new_privs"] == 1
    assert got["setuid"] == got["unshare"] == "EPERM" and got["raise_memory_limit"] == "refused"
    assert {"no-capabilities", "empty-bounding-set", "no-new-privs"} <= set(APPLIED["privileges"])


@runs
@needs_seccomp
def test_metadata_of_files_outside_cannot_change(tmp_path):
    # The caller's file, mode 0600 with an extended attribute: every way to change its mode, owner, times or
    # attributes fails, by path and by descriptor (fchmodat2 on an O_PATH descriptor needs no read access).
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o600)
    try:
        os.setxattr(victim, "user.origin", b"caller")
    except OSError:
        pass  # a file system without user attributes: the attempts below still run
    before = snapshot(victim)
    v = str(victim)
    got = attack(f"""
        v = {v!r}
        attempt("chmod", lambda: os.chmod(v, 0o6777))
        attempt("chown", lambda: os.chown(v, 1234, 1234))
        attempt("lchown", lambda: os.chown(v, 1234, 1234, follow_symlinks=False))
        attempt("utime", lambda: os.utime(v, (0, 0)))
        attempt("utime_now", lambda: os.utime(v))
        attempt("setxattr", lambda: os.setxattr(v, "user.planted", b"1"))
        attempt("removexattr", lambda: os.removexattr(v, "user.origin"))
        attempt("fchmodat2", lambda: raw({nr("fchmodat2")}, -100, v.encode(), 0o6777, 0))
        fd = os.open(v, os.O_PATH)
        attempt("fchmodat2_fd", lambda: raw({nr("fchmodat2")}, fd, b"", 0o6777, 0x1000))  # AT_EMPTY_PATH
        attempt("fchownat_fd", lambda: raw({nr("fchownat")}, fd, b"", 1234, 1234, 0x1000))
        attempt("truncate", lambda: os.truncate(v, 0))
        # a file it may read (its own program): fchmod/fchown/futimens to the values it has, so that a
        # filter that let them through would still change nothing
        src = sys.argv[0]
        st = os.stat(src)
        with open(src, "rb") as f:
            attempt("fchmod", lambda: os.chmod(f.fileno(), st.st_mode & 0o7777))
            attempt("fchown", lambda: os.chown(f.fileno(), st.st_uid, st.st_gid))
            attempt("futimens", lambda: os.utime(f.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns)))
        # in its own folder too (documented: no metadata changes anywhere)
        open("mine.txt", "w").write("x")
        attempt("chmod_own", lambda: os.chmod("mine.txt", 0o777))
        """)
    assert snapshot(victim) == before
    assert {k: v for k, v in got.items() if v not in ("EPERM", "EACCES")} == {}, got


@runs
@needs_landlock
def test_secrets_outside_its_folder_cannot_be_read(tmp_path):
    # A secret of the caller's (owner-only, as root's files are), /etc/shadow, and this process's and the
    # launcher's parent's environment in /proc (the parent is this process: the launcher execs the program).
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-token")
    secret.chmod(0o600)
    targets = {"secret": str(secret), "environ": f"/proc/{os.getpid()}/environ", "parent_environ": None,
               "shadow": "/etc/shadow", "passwd": "/etc/passwd", "caller_dir": str(tmp_path)}
    with open(targets["environ"], "rb") as f:
        assert f.read()  # there is something to steal
    got = attack(f"""
        targets = {targets!r}
        targets["parent_environ"] = f"/proc/{{os.getppid()}}/environ"
        for name, path in targets.items():
            if name == "caller_dir":
                attempt(name, lambda: os.listdir(path))
            elif os.path.exists(path) or name != "shadow":
                attempt(name, lambda: open(path, "rb").read())
        import json as _j, hashlib, re, math, collections  # what HumanEval programs import still works
        open("inside.txt", "w").write("mine")
        attempt("own_file", lambda: open("inside.txt").read())
        """)
    own = got.pop("own_file")
    assert own == "OK"
    assert got and {k: v for k, v in got.items() if v not in ("EACCES", "EPERM")} == {}, got
    assert "landlock-read" in APPLIED["files"]


@runs
@needs_seccomp
def test_reboot_kexec_modules_and_mount_are_refused():
    # Arguments that are wrong even for a fully privileged caller (bad reboot magic, bad kexec flags, a null
    # module image, a module name that does not exist), so that nothing could happen if the filter were absent:
    # uncontained root gets EINVAL/EFAULT/ENOENT, confined it must be EPERM.
    got = attack(f"""
        attempt("reboot", lambda: raw({nr("reboot")}, 0, 0, 0, 0))
        attempt("kexec_load", lambda: raw({nr("kexec_load")}, 0, 0, 0, 0xDEAD0000))
        attempt("kexec_file_load", lambda: raw({nr("kexec_file_load")}, -1, -1, 0, 0, 0xDEAD0000))
        attempt("init_module", lambda: raw({nr("init_module")}, 0, 0, b""))
        attempt("finit_module", lambda: raw({nr("finit_module")}, -1, b"", 0))
        attempt("delete_module", lambda: raw({nr("delete_module")}, b"no_such_module_deltatune", 0x800))
        attempt("mount", lambda: raw({nr("mount")}, b"none", b"/nonexistent-deltatune", b"tmpfs", 0, 0))
        attempt("umount", lambda: raw({nr("umount2")}, b"/nonexistent-deltatune", 0))
        attempt("swapoff", lambda: raw({nr("swapoff")}, b"/nonexistent-deltatune"))
        attempt("sethostname", lambda: raw({nr("sethostname")}, b"x", 0x7FFFFFFF))
        attempt("ptrace", lambda: raw({nr("ptrace")}, 0xDEAD, os.getppid(), 0, 0))  # an unknown request: ESRCH
        attempt("bpf", lambda: raw({nr("bpf")}, 0xDEAD, 0, 0))
        """)
    assert got == {k: "EPERM" for k in got}, got


@runs
@needs_seccomp
def test_signals_reach_only_itself():
    got = attack("""
        import signal
        attempt("parent", lambda: os.kill(os.getppid(), 0))
        attempt("init", lambda: os.kill(1, 0))
        attempt("everyone", lambda: os.kill(-1, 0))
        attempt("parent_group", lambda: os.killpg(os.getpgid(os.getppid()), 0))
        attempt("self", lambda: os.kill(os.getpid(), 0))
        attempt("own_group", lambda: os.killpg(0, 0))
        attempt("thread", lambda: signal.pthread_kill(__import__("threading").get_ident(), 0))
        attempt("pidfd_parent", lambda: os.pidfd_open(os.getppid()))
        """)
    assert got == {"parent": "EPERM", "init": "EPERM", "everyone": "EPERM", "parent_group": "EPERM", "self": "OK",
                   "own_group": "OK", "thread": "OK", "pidfd_parent": "EPERM"}, got


@runs
@needs_seccomp
def test_limits_change_only_its_own_and_ipc_queues_are_refused():
    """prlimit on another process (as uid 0 the kernel allows it on every uid 0 process: the parent's CPU limit
    set to 1 s kills it) is refused; on itself it works. System V queues and semaphores (memory RLIMIT_AS does not
    count) are refused like shared memory. As uid 0 (exempt from RLIMIT_NPROC) no thread starts."""
    got = attack(f"""
        import resource, threading
        attempt("parent", lambda: resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE))
        attempt("self_pid", lambda: resource.prlimit(os.getpid(), resource.RLIMIT_NOFILE))
        attempt("self", lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
        attempt("msgget", lambda: raw({nr("msgget")}, 0, 0o1600))
        attempt("semget", lambda: raw({nr("semget")}, 0, 1, 0o1600))
        def start():
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()
        try:
            start()
            outcome["thread"] = "OK"
        except RuntimeError:
            outcome["thread"] = "refused"
        """)
    thread = "refused" if os.getuid() == 0 else "OK"
    assert got == {"parent": "EPERM", "self_pid": "OK", "self": "OK", "msgget": "EPERM", "semget": "EPERM",
                   "thread": thread}, got


# ----------------------------------------------------------------------------- memory the address-space limit misses

@runs
@needs_seccomp
def test_memfd_and_shared_memory_cannot_escape_the_memory_limit():
    # Uncontained, memfds (and System V / POSIX shared memory) hold memory that RLIMIT_AS does not count: here the
    # program tries to hold twice its limit that way and reports how much it got.
    limit = 256 << 20
    got = attack(f"""
        held, fds = 0, []
        def grab():
            global held
            while held < {2 * limit}:
                fd = os.memfd_create("hold")
                fds.append(fd)
                os.ftruncate(fd, 16 << 20)
                os.pwrite(fd, b"x" * (16 << 20), 0)
                held += 16 << 20
        attempt("memfd", grab)
        outcome["memfd_held"] = held
        attempt("shmget", lambda: raw({nr("shmget")}, 0, 64 << 20, 0o1600))  # IPC_PRIVATE, IPC_CREAT | 0600
        attempt("dev_shm", lambda: open("/dev/shm/deltatune-hold", "wb").write(b"x" * (1 << 20)))
        """, memory=limit)
    assert got["memfd"] == "EPERM" and got["memfd_held"] == 0
    assert got["shmget"] == "EPERM" and got["dev_shm"] in ("EACCES", "EPERM")
    assert not os.path.exists("/dev/shm/deltatune-hold")


@runs
@pytest.mark.skipif(not any(p.startswith("folder-tmpfs") for p in APPLIED.get("memory", [])),
                    reason="a size-bounded folder needs a mount namespace that maps the caller's uid (root with "
                           "CAP_SYS_ADMIN, or an unprivileged user where user namespaces are allowed)")
def test_files_in_its_folder_have_a_ceiling():
    got = attack("""
        written = 0
        def fill():
            global written
            for i in range(8):
                with open(f"block{i}", "wb") as f:
                    for _ in range(8):
                        f.write(b"x" * (1 << 20))
                        f.flush()
                        written += 1 << 20
        attempt("fill", fill)
        outcome["written"] = written
        """, folder_size=16 << 20)
    assert got["fill"] == "ENOSPC" and got["written"] <= 16 << 20


# ----------------------------------------------------------------------------- what reaches the results

@runs
def test_program_output_never_reaches_the_result_record():
    # The secret is computed at run time (it is in no program text): raised, printed as a forged traceback line,
    # passed to sys.exit, used as an exception class name, or written to every descriptor the program may hold.
    from deltatune.tasks.humaneval import prediction_record

    secret = hashlib.sha256(b"deltatune sandbox test").hexdigest()
    make = 'import hashlib, os, sys\nsecret = hashlib.sha256(b"deltatune sandbox test").hexdigest()\n'
    attacks = {
        "raise": "raise ValueError(secret)",
        "forged_builtin": "sys.stderr.write('AssertionError: ' + secret + '\\n')\nos._exit(1)",
        "forged_syntax": "sys.stderr.write('SyntaxError: ' + secret + '\\n')\nos._exit(1)",
        "exit_message": "sys.exit(secret)",
        "class_name": "E = type('Leak_' + secret, (Exception,), {})\nraise E(secret)",
        "descriptors": ("for fd in range(3, 256):\n    try:\n        os.write(fd, ('{\"syntax_error\": \"' + secret + "
                        "'\"}').encode())\n    except OSError:\n        pass\nraise KeyError(secret)"),
        "stdout": "print(secret)\nraise RuntimeError(secret)",
    }
    problem = {"task_id": "HumanEval/0", "entry_point": "f", "prompt": "def f():\n"}
    for name, body in attacks.items():
        result = run(make + body)
        assert result.status == "failed", name
        assert secret in result.stdout + result.stderr, name  # the program did say it
        line = json.dumps(prediction_record(problem, 0, 0, body, result))
        assert secret not in line and secret not in result.error, (name, result.error)
    assert run(make + attacks["raise"]).error == "ValueError"
    assert run(make + attacks["forged_builtin"]).error == "AssertionError"  # a name from a closed list, no text
    assert run(make + attacks["class_name"]).error == "exit code 1"
    broken = run("def f(:\n    pass\n")
    assert broken.error.startswith("SyntaxError: ") and "line 1" in broken.error  # the compiler's own words


# ----------------------------------------------------------------------------- where it cannot confine

def test_root_without_confinement_is_refused(monkeypatch):
    # No seccomp table (as on an architecture we have none for): a privileged caller is refused before any
    # program code runs, with the reason and the fix; an unprivileged one runs with the other protections.
    monkeypatch.setattr(sandbox, "_seccomp_table", lambda: None)
    sandbox._trial.cache_clear()
    try:
        if os.geteuid() == 0:
            with pytest.raises(ConfigError, match="root's privileges.*seccomp.*unprivileged user"):
                run_program("open('ran', 'w')\n")
            with pytest.raises(ConfigError, match="seccomp"):
                run_programs(["pass"], allow_uncontained=True)
        else:
            assert "seccomp" not in run_program("pass").protections.get("syscalls", [])
    finally:
        sandbox._trial.cache_clear()
    if REFUSED is not None:
        assert os.geteuid() == 0 and "unprivileged user" in REFUSED
