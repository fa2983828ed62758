"""What this machine offers: the cores this process may run on, and its physical memory."""

from __future__ import annotations

import os

_FALLBACK_MEMORY_BYTES = 16 << 30  # where the OS does not say


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity on Linux, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def physical_memory_bytes() -> int:
    """Physical memory in bytes (16 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return _FALLBACK_MEMORY_BYTES
