"""glibc malloc thresholds: freed activation-sized blocks are reused, not faulted back in."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Allocates, touches and frees a 64 MiB block (above glibc's largest dynamic mmap threshold,
# like a decoder activation) and prints how much of it the process still holds afterwards:
# held memory is what the next batch reuses without the kernel zero-filling new pages.
SCRIPT = """
import sys
import numpy as np
from geoseg._malloc import reuse_freed_memory
def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
if sys.argv[1] == "reuse":
    assert reuse_freed_memory(children=False)
before = rss_kib()
block = np.ones(64 << 18, np.float32)
del block
print(rss_kib() - before)
"""


def _kept_after_free_kib(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* variables from the test's environment
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout)


def test_freed_blocks_are_kept_for_reuse_instead_of_unmapped() -> None:
    assert _kept_after_free_kib("default") < 8 << 10, "glibc's default unmaps a freed 64 MiB block"
    assert _kept_after_free_kib("reuse") > 56 << 10, "kept in the heap for the next allocation"


def test_children_get_the_same_thresholds_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from geoseg import _malloc

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # the user's own setting wins
    _malloc.reuse_freed_memory()
    import os

    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(_malloc.MMAP_THRESHOLD_BYTES)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
