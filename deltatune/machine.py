"""The machine a number was measured on, and how busy other work kept it: written once, read by
``deltatune bench``, the report and the experiment harnesses (``experiments/findings``, ``bench/``).

    from deltatune.machine import machine_info, machine_cpu, other_load
    before = machine_cpu(); ...; share = other_load(before, machine_cpu(), own_cpu_seconds, wall_seconds)

A time measured on a shared machine means little without the load beside it, so every timing this
project prints carries :func:`other_load`, read from ``/proc/stat`` (nothing where there is none).
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

__all__ = ["machine_cpu", "machine_info", "other_load"]


def machine_info() -> dict:
    """CPU model, core count and RAM of this machine, python/torch/transformers versions and the date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        ram_gb = None
    # the cores this process may run on (a container's or taskset's share), not the host's count
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deltatune"):
        module = sys.modules.get(name)
        found = getattr(module, "__version__", None)
        if found is None:
            try:
                from importlib.metadata import version

                found = version(name)
            except ImportError:  # PackageNotFoundError: not installed as a distribution (run from a checkout)
                continue
        versions[name] = found
    return {
        "machine": {"cpu": cpu, "cores": cores, "ram_gb": ram_gb, "os": platform.platform()},
        "versions": versions,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def machine_cpu() -> tuple[float, float, int] | None:
    """(busy, steal) CPU seconds so far on the cores this process may run on, and their number,
    from /proc/stat; None where there is no /proc/stat (macOS, Windows)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy = steal = cores = 0
    for line in lines:
        name, *fields = line.split() or [""]
        if not re.fullmatch(r"cpu\d+", name) or (allowed is not None and int(name[3:]) not in allowed):
            continue
        user, nice, system, _idle, _iowait, irq, softirq, stolen = ([int(x) for x in fields[:8]] + [0] * 8)[:8]
        busy, steal, cores = busy + user + nice + system + irq + softirq, steal + stolen, cores + 1
    return (busy / tick, steal / tick, cores) if cores else None


def other_load(before, after, own_cpu_seconds: float, wall_seconds: float) -> float | None:
    """The share of the CPU time of our cores that other processes used (or the hypervisor stole)
    between two :func:`machine_cpu` readings, while our own processes used ``own_cpu_seconds``."""
    if before is None or after is None or wall_seconds <= 0:
        return None
    others = max(0.0, after[0] - before[0] - own_cpu_seconds) + max(0.0, after[1] - before[1])
    return round(min(1.0, others / (wall_seconds * after[2])), 3)
