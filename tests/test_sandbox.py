"""deltatune.sandbox: generated programs run confined in a child process, and this process is unaffected."""
import os
import signal
import socket
import sys
import textwrap
import threading
import time

import pytest

from deltatune.errors import ConfigError
from deltatune.sandbox import OUTPUT_LIMIT, protections, run_program, run_programs

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system")


def landlock() -> bool:
    return any(p.startswith("landlock") for p in protections().get("files", []))


needs_landlock = pytest.mark.skipif(not sys.platform.startswith("linux") or not landlock(),
                                    reason="file containment needs Linux with Landlock")


def run(source: str, **kw):
    return run_program(textwrap.dedent(source), **kw)


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


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run("while True:\n    pass\n", timeout=1.5)
    assert result.status == "timed out"
    assert time.monotonic() - start < 15  # killed, not waited for


def test_memory_bomb_is_stopped():
    result = run("""
        chunks = []
        while True:
            chunks.append(bytearray(50 * 2**20))
        """, memory=512 * 2**20, timeout=20)
    assert result.status == "failed" and result.error == "MemoryError"


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


def test_subprocess_is_refused():
    result = run("import subprocess\nsubprocess.run(['true'], check=True)\n")
    assert result.status == "failed"


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
    assert protections()["network"], "some network protection must apply"


@needs_landlock
def test_writes_outside_its_folder_are_refused(tmp_path):
    target = tmp_path / "written.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "Permission" in result.error
    assert not target.exists()
    inside = run("open('here.txt', 'w').write('x')\nimport os\nprint(os.getcwd())\nassert os.listdir('.') == ['here.txt']\n")
    assert inside.passed, inside.stderr
    assert not os.path.exists(inside.stdout.strip())  # its folder is removed afterwards


@needs_landlock
def test_deleting_files_cannot_touch_the_callers_files(tmp_path):
    keep = tmp_path / "keep" / "data.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    result = run(f"""
        import os, shutil
        errors = 0
        for step in (lambda: os.remove({str(keep)!r}), lambda: shutil.rmtree({str(keep.parent)!r}),
                     lambda: os.rename({str(keep)!r}, "stolen.txt"), lambda: open({str(keep)!r}, "w")):
            try:
                step()
            except OSError:
                errors += 1
        assert errors == 4, errors
        """)
    assert result.passed, result.stderr
    assert keep.read_text() == "precious"


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
        if "landlock-scope" in protections().get("signals", []):  # Landlock ABI 6+: no signal leaves the sandbox
            assert got == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.status in ("passed", "failed")
    stdin = run("input()\n")
    assert stdin.status == "failed" and stdin.error.startswith("EOFError")
    flood = run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 50000)\nraise ValueError('end')\n")
    assert flood.status == "failed" and flood.error == "ValueError: end"
    assert len(flood.stdout) <= OUTPUT_LIMIT and len(flood.stderr) <= OUTPUT_LIMIT
    isolated = run("import sys\nassert sys.flags.isolated and sys.stdin.read() == ''\n")
    assert isolated.passed, isolated.stderr
    assert threading.active_count() >= 1 and os.getcwd()  # still here, same working directory


def test_run_programs_in_parallel_keeps_order():
    sources = [f"import sys\nsys.exit({i % 2})\n" for i in range(6)]
    seen = []
    results = run_programs(sources, workers=3, timeout=20, progress=seen.append)
    assert [r.status for r in results] == ["passed", "failed"] * 3
    assert len(seen) == 6
    with pytest.raises(ConfigError, match="workers"):
        run_programs(["pass"], workers=-1)
