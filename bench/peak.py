"""Run a command in a child Python and return its wall time and its own peak RSS.

NOTE: ``os.wait4``'s ``ru_maxrss`` for a child counts the parent's RSS at the fork (Linux keeps
the high-water mark of the memory the child had before exec), so a child of a parent holding
torch and a model "peaks" at the parent's size whatever it does. The child's own ``VmHWM``
(per address space, so reset by exec) is read instead, just before it exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEAK_WRAPPER = """
import os, resource, runpy, sys
try:
    runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status:
        peak_kib = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.environ["GEOSEG_BENCH_PEAK"], "w") as out:
        out.write(f"{peak_kib} {usage.ru_utime + usage.ru_stime}")
"""


@dataclass(frozen=True)
class Measured:
    """One child run: wall clock, CPU time of all its threads (not its child processes), own peak RSS."""

    wall_s: float
    cpu_s: float
    peak_mib: float


def run_measured(module_args: list[str]) -> Measured:
    """Run ``python -m MODULE ARGS`` from the repository root and measure it.

    Raises:
        SystemExit: The command failed.
    """
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        cmd = [sys.executable, "-c", PEAK_WRAPPER, *module_args]
        start = time.perf_counter()
        status = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"GEOSEG_BENCH_PEAK": str(peak_file)}).returncode
        wall = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"failed (status {status}): {' '.join(module_args)}")
        peak_kib, cpu = peak_file.read_text().split()
        return Measured(wall, float(cpu), int(peak_kib) / 1024)


def run_with_peak(module_args: list[str]) -> tuple[float, float]:
    """Run ``python -m MODULE ARGS``; returns (wall seconds, peak RSS in MiB)."""
    measured = run_measured(module_args)
    return measured.wall_s, measured.peak_mib
