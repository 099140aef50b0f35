"""Run untrusted Python programs (generated code) in confined child processes, never in this one.

    from deltatune.sandbox import run_programs
    results = run_programs(["assert 1 + 1 == 2", "while True: pass"], timeout=3.0)
    [r.status for r in results]          # ['passed', 'timed out']

Each program runs in its own child process: a launcher (``python -I -S``, our code only) confines
itself and then ``exec``\\ s ``python -I program.py``, so the program starts already confined:

- privileges: every capability is dropped (effective, permitted, inheritable, ambient and the
  bounding set, so that an ``exec`` cannot regain them either) and ``no_new_privs`` is set. The uid
  stays (a root caller's program is a uid 0 without root's powers: the interpreter may live where
  only root can reach, e.g. ``/root/.pyenv``); what uid 0 keeps, the rights of an owner over root's
  files, is closed by Landlock (reading, writing) and seccomp (metadata) below;
- time: a wall-clock limit (the whole process group is killed) and ``RLIMIT_CPU``;
- memory: ``RLIMIT_AS`` (an allocation beyond it raises MemoryError in the program); the memory
  that the address-space limit does not count is refused or bounded: ``memfd_create``,
  ``memfd_secret`` and System V shared memory, message queues and semaphores are refused by seccomp,
  POSIX message queues by
  ``RLIMIT_MSGQUEUE`` = 0, and the program's folder is a tmpfs of :data:`DEFAULT_FOLDER_SIZE` bytes
  in a private mount namespace (as root, or with unprivileged user namespaces), so its files too
  have a ceiling (elsewhere only ``RLIMIT_FSIZE`` per file);
- processes: ``RLIMIT_NPROC``, and on Linux a seccomp filter that refuses fork, vfork and clone
  without CLONE_THREAD (threads still work) -- the rlimit alone does not bind a root caller, whose
  program therefore gets no threads either (uid 0 is exempt from the rlimit); ``prlimit`` only on
  itself (uid 0 could otherwise change the limits of every uid 0 process, its parent's too);
- system calls (seccomp, Linux x86-64 and arm64): besides the above, every metadata change
  (chmod, chown, utime, xattr families, in its own folder too), reboot, kexec, module loading,
  mount and the new mount API, swap, clock and host-name setting, namespaces (unshare, setns),
  ptrace and process_vm_*, bpf, perf_event_open, userfaultfd, keyrings, uid/gid/capability
  changes, io_uring and other-ABI (x32) calls are refused with EPERM; signals may be sent only to
  itself (kill, tgkill, rt_sigqueueinfo, pidfd_open look at the target; F_SETOWN is refused);
- files: ``RLIMIT_FSIZE`` bounds every file it writes (its captured output too); on Linux with
  Landlock (5.13+) it may write, create, rename and delete only beneath its own fresh, empty
  working directory, and read only there, in the Python installation it runs on (the prefixes of
  ``sys``), the system's ``/usr`` and ``/lib*`` and a few device files (``/dev/null``,
  ``/dev/zero``, ``/dev/urandom``): ``/etc``, ``/proc``, home folders, the caller's files are
  unreadable; from Landlock ABI 6 it cannot signal processes outside its sandbox, and ptrace of
  outside processes is refused by Landlock in any version;
- network: a new, empty network namespace where ``unshare`` works (as root, or with
  unprivileged user namespaces), and on Linux socket() is refused by the seccomp filter and TCP
  bind/connect by Landlock (ABI 4+); where none of these exist, an audit hook in the program's
  first line refuses socket creation (weaker: code that reaches ctypes can get around it);
- stdin closed (``/dev/null``), a minimal environment, isolated mode (``-I``: no user site, no
  PYTHON* variables, the script's folder not on sys.path), stdout/stderr captured to files and
  read back bounded (:data:`OUTPUT_LIMIT` bytes, the end of stderr where the traceback is).

What comes back is chosen by the harness, never copied from the program's output: ``error`` is a
built-in exception's name read off the traceback's last line (``AssertionError``, never its
message, which the program writes), the compiler's message for a program that does not compile
(produced by the launcher before any of the program runs), or what ended it (exit code, signal,
time limit). ``stdout``/``stderr`` hold the program's own output for the caller's eyes; deltatune
writes neither into a results file.

The working directory is created by :func:`run_program` for the program and removed afterwards,
links not followed. Which protections applied is in every result (``protections``). Run as root
(or with any capability), the launcher refuses to start the program unless it could drop every
capability and apply both Landlock and seccomp; :func:`run_programs` then raises ConfigError
naming what is missing. Without filesystem containment (not Linux, or no Landlock) a non-root
caller is refused too unless ``allow_uncontained=True``: a generated program could otherwise
delete the caller's files. Several programs run in parallel, at most ``workers`` at a time
(threads that only wait).
"""
from __future__ import annotations

import builtins
import json
import os
import platform
import re
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

__all__ = ["DENIED_SYSCALLS", "OUTPUT_LIMIT", "Result", "protections", "run_program", "run_programs"]

OUTPUT_LIMIT = 16 * 1024  # bytes of stdout and of stderr kept in a result
DEFAULT_MEMORY = 1 << 30  # RLIMIT_AS: 1 GiB of address space
DEFAULT_FILE_SIZE = 16 << 20  # RLIMIT_FSIZE: 16 MiB per file written (output files included)
DEFAULT_FOLDER_SIZE = 64 << 20  # the program's folder: a tmpfs of 64 MiB (where a mount namespace is possible)
DEFAULT_NPROC = 32
REFUSED_EXIT = 125  # the launcher's exit status when it would not start the program unconfined

# System calls a program gets EPERM for, by (x86-64, arm64) number; None where the architecture has no such
# call (arm64 has only the *at forms). Taken from the kernel headers (asm/unistd_64.h, asm-generic/unistd.h), and
# for the calls newer than Linux 6.1 (fchmodat2 6.6, setxattrat/removexattrat 6.13, open_tree_attr 6.15,
# file_setattr 6.17) from the kernel's syscall tables, where both architectures share the numbers.
DENIED_SYSCALLS = {
    "metadata": {"chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452),
                 "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
                 "utime": (132, None), "utimes": (235, None), "futimesat": (261, None), "utimensat": (280, 88),
                 "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7), "setxattrat": (463, 463),
                 "removexattr": (197, 14), "lremovexattr": (198, 15), "fremovexattr": (199, 16),
                 "removexattrat": (466, 466), "file_setattr": (469, 469)},
    "system": {"reboot": (169, 142), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
               "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
               "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
               "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
               "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
               "open_tree_attr": (467, 467), "swapon": (167, 224), "swapoff": (168, 225),
               "sethostname": (170, 161), "setdomainname": (171, 162), "settimeofday": (164, 170),
               "clock_settime": (227, 112), "clock_adjtime": (305, 266), "adjtimex": (159, 171),
               "acct": (163, 89), "quotactl": (179, 60), "quotactl_fd": (443, 443), "syslog": (103, 116),
               "iopl": (172, None), "ioperm": (173, None), "vhangup": (153, 58), "unshare": (272, 97),
               "setns": (308, 268), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
               "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
               "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218)},
    "tracing": {"ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
                "kcmp": (312, 272), "pidfd_getfd": (438, 438), "tkill": (200, 130)},
    "identity": {"setuid": (105, 146), "setgid": (106, 144), "setreuid": (113, 145), "setregid": (114, 143),
                 "setresuid": (117, 147), "setresgid": (119, 149), "setgroups": (116, 159),
                 "setfsuid": (122, 151), "setfsgid": (123, 152), "capset": (126, 91)},
    "memory": {"memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "msgget": (68, 186),
               "semget": (64, 190)},
    "processes": {"fork": (57, None), "vfork": (58, None)},
    "network": {"socket": (41, 198), "io_uring_setup": (425, 425)},
}
# Calls whose arguments the filter reads: clone (allowed with CLONE_THREAD only), the signal senders (allowed
# towards the program itself), fcntl/ioctl (F_SETOWN and FIOSETOWN/SIOCSPGRP refused: they aim SIGIO elsewhere).
_CHECKED_SYSCALLS = {"clone": (56, 220), "clone3": (435, 435), "kill": (62, 129), "rt_sigqueueinfo": (129, 138),
                     "tgkill": (234, 131), "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434),
                     "fcntl": (72, 25), "ioctl": (16, 29), "prlimit64": (302, 261)}
_ARCHES = {"x86_64": (0, 0xC000003E, True), "aarch64": (1, 0xC00000B7, False)}  # column, AUDIT_ARCH, has x32


def _seccomp_table() -> dict | None:
    """The numbers the launcher's filter needs on this machine, or None where we have no table."""
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        return None
    column, audit, x32 = arch
    deny = sorted({nrs[column] for group in DENIED_SYSCALLS.values() for nrs in group.values()
                   if nrs[column] is not None})
    return {"audit": audit, "x32": x32, "deny": deny,
            **{name: nrs[column] for name, nrs in _CHECKED_SYSCALLS.items()}}


@dataclass
class Result:
    """What one program did. ``status``: "passed" (exit code 0 in time), "failed" (a non-zero exit,
    an uncaught exception, a signal) or "timed out" (wall clock or CPU limit). ``error`` is chosen by
    the harness: a built-in exception's name (e.g. ``AssertionError``, ``MemoryError``), the
    compiler's message for a program that does not compile, or what ended it (exit code, signal,
    limit); never text the program wrote. ``stdout``/``stderr``: the program's own output (bounded,
    untrusted)."""

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


# The launcher: runs in the child with `python -I -S -c`, confines itself, then execs the program. argv[1] is a
# JSON object (see run_program). It writes what it did to the pipe `report_fd` and closes it before the exec, so
# everything read from that pipe comes from the launcher, none from the program.
_LAUNCHER = r'''
import ctypes, json, os, resource, stat, struct, sys
cfg = json.loads(sys.argv[1])
report = os.fdopen(cfg["report_fd"], "w")
done = {"privileges": [], "memory": ["rlimit-as"], "processes": ["rlimit-nproc"], "files": ["rlimit-fsize"],
        "syscalls": [], "network": [], "signals": []}
failed = []
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def syscall(*args):
    r = libc.syscall(*args)
    return r, ctypes.get_errno()
linux = sys.platform.startswith("linux")
def capabilities():  # (effective, permitted, inheritable) as 64-bit masks, from capget (version 3)
    hdr = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8)
    data = ctypes.create_string_buffer(24)
    if libc.capget(hdr, data) != 0:
        return None
    words = struct.unpack("6I", data.raw)
    return tuple(words[i] | words[i + 3] << 32 for i in range(3))
caps_at_start = capabilities() if linux else None
privileged = os.geteuid() == 0 or bool(caps_at_start and any(caps_at_start))
for name, value in (("AS", cfg["memory"]), ("CPU", cfg["cpu"]), ("NPROC", cfg["nproc"]), ("FSIZE", cfg["fsize"]),
                    ("CORE", 0), ("NOFILE", 256), ("MSGQUEUE", 0)):
    res = getattr(resource, "RLIMIT_" + name, None)
    if res is not None:
        try:
            resource.setrlimit(res, (value, value))
            if name == "MSGQUEUE":
                done["memory"].append("rlimit-msgqueue")
        except (ValueError, OSError):
            failed.append("rlimit-" + name.lower())
if linux:
    # Namespaces: network (empty), mount (a private tmpfs as the folder), IPC (no shared System V objects).
    # As root (CAP_SYS_ADMIN) directly, else inside a new user namespace that maps only ourselves.
    CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x08000000, 0x10000000, 0x40000000
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC
    uid, gid = os.getuid(), os.getgid()
    unshared = mapped = libc.unshare(flags) == 0
    if not unshared and libc.unshare(CLONE_NEWUSER | flags) == 0:
        unshared = mapped = True
        done["privileges"].append("user-namespace")
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            try:
                with open(path, "w") as f:
                    f.write(text)
            except OSError:  # uid 0 without CAP_SETFCAP may not map itself (Linux 5.12+)
                mapped = False
    if unshared:
        done["network"].append("namespace")
    if mapped:  # unmapped, we could create no file on a file system mounted in the namespace (EOVERFLOW)
        MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
        options = f"size={cfg['folder_size']},nr_inodes=4096,mode=0700".encode()  # owned by us
        if (libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
                and libc.mount(b"tmpfs", cfg["workdir"].encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                               options) == 0):
            os.chdir(cfg["workdir"])  # the tmpfs now mounted there, not the folder beneath it
            done["memory"].append(f"folder-tmpfs-{cfg['folder_size'] >> 20}mib")
    try:
        last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        last_cap = 63
    # Landlock: writing only beneath the folder; reading there, in the Python installation, the system
    # libraries and a few devices; nothing else (no /etc, /proc, home folders, the caller's files).
    abi, _ = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    ruleset = -1
    if abi >= 1:
        EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
        write = WRITE_FILE | sum(1 << b for b in range(4, 13))  # REMOVE_DIR/FILE, MAKE_CHAR/DIR/REG/SOCK/FIFO/BLOCK/SYM
        write |= (1 << 13) if abi >= 2 else 0  # REFER
        truncate = (1 << 14) if abi >= 3 else 0
        write |= truncate
        read = EXECUTE | READ_FILE | READ_DIR
        on_files = EXECUTE | WRITE_FILE | READ_FILE | truncate  # the rights a rule on a non-directory may carry
        net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, no rule: refused
        scoped = 3 if abi >= 6 else 0  # abstract unix sockets and signals outside the sandbox
        attr = struct.pack("QQQ", read | write, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
        buf = ctypes.create_string_buffer(attr, len(attr))
        ruleset, _ = syscall(444, buf, len(attr), 0)
        ok = ruleset >= 0
        rules = [(cfg["workdir"], write | READ_FILE | READ_DIR, True), (cfg["program"], READ_FILE, True),
                 (cfg["hook_program"], READ_FILE, True), ("/dev/null", READ_FILE | WRITE_FILE | truncate, False)]
        rules += [(path, read, False) for path in cfg["readable"]]
        rules += [(path, READ_FILE, False) for path in ("/dev/zero", "/dev/urandom", "/dev/random")]
        for path, rights, required in rules:
            if not ok:
                break
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                ok = not required
                continue
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                rights &= on_files
            rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
            added = syscall(445, ruleset, 1, rule, 0)[0] == 0
            ok = added or not required
            os.close(fd)
        if not ok:
            ruleset = -1
    # Capabilities: bounding set (so an exec gains none), ambient, securebits (no root fix-ups), then the sets.
    for cap in range(last_cap + 1):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    libc.prctl(28, 0x2F, 0, 0, 0)  # PR_SET_SECUREBITS: NOROOT, NO_SETUID_FIXUP, no KEEP_CAPS; locked
    libc.capset(ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8), ctypes.create_string_buffer(24))
    if capabilities() == (0, 0, 0):  # the ambient set is a subset of permitted: empty too
        done["privileges"].append("no-capabilities")
    if all(libc.prctl(23, cap, 0, 0, 0) == 0 for cap in range(last_cap + 1)):  # PR_CAPBSET_READ
        done["privileges"].append("empty-bounding-set")
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: needed by Landlock and seccomp
    if libc.prctl(39, 0, 0, 0, 0) == 1:
        done["privileges"].append("no-new-privs")
    if ruleset >= 0 and syscall(446, ruleset, 0)[0] == 0:
        done["files"] += [f"landlock-abi{abi}", "landlock-read"]
        if net:
            done["network"].append("landlock-tcp")
        if scoped:
            done["signals"].append("landlock-scope")
    # seccomp: refused calls -> EPERM (clone3 -> ENOSYS so that the C library falls back to clone, which is read).
    table = cfg["seccomp"]
    if table:
        LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
        pid = os.getpid()
        code, labels = [], {}
        def op(kind, k, jt=0, jf=0):
            code.append([kind, jt, jf, k])
        def label(name):
            labels[name] = len(code)
        def arg(i):  # the low 32 bits of argument i (little-endian): the kernel reads these as int
            op(LD, 16 + 8 * i)
        op(LD, 4)
        op(JEQ, table["audit"], 0, "KILL")
        op(LD, 0)
        if table["x32"]:
            op(JGE, 0x40000000, "EPERM", 0)
        op(JEQ, table["clone3"], "ENOSYS", 0)
        op(JEQ, table["clone"], "CLONE", 0)
        for name in ("kill", "rt_sigqueueinfo"):
            op(JEQ, table[name], "TO_SELF_OR_GROUP", 0)
        for name in ("tgkill", "rt_tgsigqueueinfo", "pidfd_open"):
            op(JEQ, table[name], "TO_SELF", 0)
        op(JEQ, table["prlimit64"], "SELF_OR_ZERO", 0)  # uid 0 may set any uid 0 process's limits otherwise
        op(JEQ, table["fcntl"], "FCNTL", 0)
        op(JEQ, table["ioctl"], "IOCTL", 0)
        for nr in table["deny"]:
            op(JEQ, nr, "EPERM", 0)
        op(RET, 0x7FFF0000)
        label("CLONE")
        if os.getuid() == 0:  # uid 0 is exempt from RLIMIT_NPROC: its threads could not be bounded, so none
            op(RET, 0x00050001)
        else:
            arg(0); op(JSET, 0x00010000, "ALLOW", "EPERM")  # CLONE_THREAD
        label("TO_SELF_OR_GROUP"); arg(0); op(JEQ, pid, "ALLOW", 0); op(JEQ, 0, "ALLOW", 0)
        op(JEQ, -pid & 0xFFFFFFFF, "ALLOW", "EPERM")  # its own process group (it leads its own session)
        label("TO_SELF"); arg(0); op(JEQ, pid, "ALLOW", "EPERM")
        label("SELF_OR_ZERO"); arg(0); op(JEQ, pid, "ALLOW", 0); op(JEQ, 0, "ALLOW", "EPERM")
        label("FCNTL"); arg(1); op(JEQ, 8, "EPERM", 0); op(JEQ, 15, "EPERM", "ALLOW")  # F_SETOWN, F_SETOWN_EX
        label("IOCTL"); arg(1); op(JEQ, 0x8901, "EPERM", 0); op(JEQ, 0x8902, "EPERM", "ALLOW")  # FIOSETOWN, SIOCSPGRP
        for name, value in (("ALLOW", 0x7FFF0000), ("EPERM", 0x00050001), ("ENOSYS", 0x00050026),
                            ("KILL", 0x80000000)):
            label(name)
            op(RET, value)
        raw = b""
        for i, (kind, jt, jf, k) in enumerate(code):
            jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
            assert 0 <= jt < 256 and 0 <= jf < 256
            raw += struct.pack("HBBI", kind, jt, jf, k)
        filt = ctypes.create_string_buffer(raw, len(raw))
        fprog = struct.pack("HxxxxxxP" if struct.calcsize("P") == 8 else "HxxP", len(code), ctypes.addressof(filt))
        fbuf = ctypes.create_string_buffer(fprog, len(fprog))
        if libc.prctl(22, 2, fbuf, 0, 0) == 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            done["syscalls"].append("seccomp")
            done["processes"].append("seccomp")
            done["network"].append("seccomp-socket")
            done["memory"].append("seccomp-memfd-shm")
            done["signals"].append("seccomp-self-only")
program = cfg["program"]
if not done["network"]:  # no kernel means: an audit hook refuses socket creation in the program itself
    program = cfg["hook_program"]
    done["network"].append("audit-hook")
if failed:
    done["failed"] = failed
out = {"protections": done}
if privileged:  # root's powers: start the program only with all of these
    missing = [what for what, present in (
        ("dropping every capability", {"no-capabilities", "empty-bounding-set", "no-new-privs"}
         <= set(done["privileges"])),
        ("Landlock (Linux 5.13 or later, enabled in the lsm= boot list)", "landlock-read" in done["files"]),
        ("seccomp (a Linux kernel built with CONFIG_SECCOMP_FILTER, x86-64 or arm64)", "seccomp" in done["syscalls"]),
    ) if not present]
    if missing:
        out["refused"] = ("this machine cannot confine a generated program run with root's privileges (missing: "
                          + "; ".join(missing) + "); run deltatune as an unprivileged user, or on a kernel that has them")
if "refused" not in out:
    try:
        with open(program, "rb") as f:
            compile(f.read(), program, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:  # the compiler's message: nothing of the program has run yet
        line = getattr(e, "lineno", None)
        message = f"{type(e).__name__}: {getattr(e, 'msg', None) or e}"[:300] + (f" (line {line})" if line else "")
        out["syntax_error"] = message
        sys.stderr.write(message + "\n")
json.dump(out, report)
report.close()
if "refused" in out:
    os._exit(cfg["refused_exit"])
if "syntax_error" in out:
    os._exit(1)
os.execv(sys.executable, [sys.executable, "-I", program])
'''

# The program's first lines where no kernel means block the network (see the launcher).
_AUDIT_HOOK = ("import sys as _s\n"
               "def _no_net(event, args):\n"
               "    if event in ('socket.__new__', 'socket.connect', 'socket.bind', 'socket.getaddrinfo'):\n"
               "        raise PermissionError('network access is disabled in this sandbox')\n"
               "_s.addaudithook(_no_net)\n"
               "del _s, _no_net\n")

# The names `error` may carry from a traceback: only built-in exception types (a closed list, so a program that
# forges its last stderr line can choose among these names and say nothing else).
_BUILTIN_EXCEPTIONS = frozenset(name for name, value in vars(builtins).items()
                                if isinstance(value, type) and issubclass(value, BaseException))
_TRACEBACK_LAST_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?::|$)")


def _readable_paths() -> list[str]:
    """What a program may read besides its folder: the Python installation it runs on (this interpreter's
    prefixes and its executable's folder) and the system's shared libraries; never ``/`` itself."""
    paths = []
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                   os.path.dirname(os.path.realpath(sys.executable))):
        prefix = os.path.realpath(prefix)
        paths += [prefix] if prefix != "/" else ["/lib", "/bin"]  # an interpreter installed at the root
    paths += ["/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime"]
    return list(dict.fromkeys(p for p in paths if os.path.exists(p)))


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


def _error(stderr: str, code: int) -> str:
    """The error of a failed run, in the harness's words: a built-in exception's name from the traceback's last
    line (the message after it is the program's text and stays out), else the exit code or the signal."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    match = _TRACEBACK_LAST_LINE.match(lines[-1]) if lines and code == 1 else None
    if match and match.group(1).rsplit(".", 1)[-1] in _BUILTIN_EXCEPTIONS:
        return match.group(1).rsplit(".", 1)[-1]
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _read_report(fd: int, limit: int = 1 << 16) -> dict:
    """What the launcher wrote to its pipe (it closed its end before the program started)."""
    data = b""
    with os.fdopen(fd, "rb") as pipe:
        while len(data) <= limit:
            chunk = pipe.read(limit)
            if not chunk:
                break
            data += chunk
    try:
        report = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


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
                file_size: int = DEFAULT_FILE_SIZE, folder_size: int = DEFAULT_FOLDER_SIZE, nproc: int = DEFAULT_NPROC,
                output_limit: int = OUTPUT_LIMIT) -> Result:
    """Run one program confined (see the module docstring) and return its :class:`Result`.

    Raises ConfigError where the launcher refused to start it (root's privileges it could not drop)."""
    outer = Path(tempfile.mkdtemp(prefix="deltatune-exec-"))
    try:
        work = outer / "work"
        work.mkdir(mode=0o700)
        program, hooked = outer / "program.py", outer / "program-hooked.py"
        program.write_text(source, encoding="utf-8")
        hooked.write_text(_AUDIT_HOOK + source, encoding="utf-8")
        report_read, report_write = os.pipe()
        cfg = {"program": str(program), "hook_program": str(hooked), "workdir": str(work), "report_fd": report_write,
               "memory": int(memory), "cpu": max(1, int(timeout + 1)), "nproc": int(nproc), "fsize": int(file_size),
               "folder_size": int(folder_size), "readable": _readable_paths(), "seccomp": _seccomp_table(),
               "refused_exit": REFUSED_EXIT}
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        start = time.monotonic()
        try:
            with open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err:
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)], cwd=work,
                                        env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                        pass_fds=(report_write,), start_new_session=True)
        except BaseException:
            os.close(report_read)
            raise
        finally:
            os.close(report_write)
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
        report = _read_report(report_read)
        stdout = _tail(outer / "stdout", output_limit, keep_end=False)
        stderr = _tail(outer / "stderr", output_limit, keep_end=True)
        protections = report.get("protections", {})
        code = proc.returncode
        if "refused" in report:
            raise ConfigError(str(report["refused"]))
        if timed_out:
            return Result("timed out", f"wall-clock limit of {timeout:g} s", code, seconds, stdout, stderr, protections)
        if code == -signal.SIGXCPU or (code == -signal.SIGKILL and seconds >= timeout * 0.9):
            return Result("timed out", "CPU time limit", code, seconds, stdout, stderr, protections)
        if code == 0:
            return Result("passed", "", code, seconds, stdout, stderr, protections)
        error = str(report["syntax_error"]) if "syntax_error" in report else _error(stderr, code)
        return Result("failed", error, code, seconds, stdout, stderr, protections)
    finally:
        _remove(outer)


@lru_cache(maxsize=1)
def _trial() -> dict:
    """An empty program's run: the protections, or why programs cannot run here."""
    try:
        result = run_program("pass", timeout=30.0)
    except ConfigError as e:
        return {"refused": str(e)}
    if not result.passed:  # e.g. the interpreter lies outside what the program may read: every program would fail
        detail = (result.stderr.strip().splitlines() or [""])[-1][:300]  # the interpreter's words: no program ran
        return {"refused": f"the sandbox cannot start even an empty program here ({result.error}: {detail}); "
                           "report it with the output of `python -c 'import sys; print(sys.prefix, sys.executable)'`"}
    return {"protections": result.protections}


def protections() -> dict:
    """The protections that apply on this machine (from a trial run of an empty program).

    Raises ConfigError where programs would run with root's privileges that the launcher cannot drop."""
    trial = _trial()
    if "refused" in trial:
        raise ConfigError(trial["refused"])
    return trial["protections"]


def run_programs(sources: list[str], *, workers: int | None = None, timeout: float = 10.0,
                 memory: int = DEFAULT_MEMORY, allow_uncontained: bool = False, progress=None) -> list[Result]:
    """Run every program confined, at most ``workers`` at a time (default: the CPU count, at most 8).

    Refuses (ConfigError) where programs would keep root's privileges (always), or where a non-root caller's
    files cannot be protected from the programs' writes (unless ``allow_uncontained``). ``progress``, if
    given, is called with each finished Result.
    """
    if os.name != "posix":
        raise ConfigError("executing generated programs needs a POSIX system (resource limits); "
                          "run the evaluation on Linux or macOS")
    applied = protections()  # raises where root's privileges cannot be dropped, allow_uncontained or not
    if not allow_uncontained and not any(p.startswith("landlock") for p in applied.get("files", [])):
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
