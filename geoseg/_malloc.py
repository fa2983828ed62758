"""glibc malloc settings for a process that runs a network batch after batch (no-op elsewhere).

Each forward pass frees the activations of the last one and allocates the same sizes again.
glibc hands blocks above its mmap threshold (dynamic, at most 32 MiB) straight back to the
kernel and maps fresh zeroed pages for the next batch, so every batch page-faults its largest
activations in again. On 2 cores (bench/bench_predict.py, B0, 256 px tiles, batch 4) that was
3 s of system time in 12 s of forward passes: model alone 28.7-29.6 tiles/s with glibc's
defaults, 31.9-35.3 with the thresholds below; ``geoseg predict`` on the 8192 px mosaic 50.9 s
against 42.3-43.3 s, with the same peak memory (it is the peak that is kept, not more).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused; freed memory above the heap's top
# goes back to the kernel only past TRIM_THRESHOLD_BYTES.
MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 512 << 20


def reuse_freed_memory(children: bool = True) -> bool:
    """Set glibc's mmap and trim thresholds so freed activations are reused, not unmapped.

    Also undoes the small fixed thresholds a dask nanny gives its workers
    (``MALLOC_TRIM_THRESHOLD_=65536``, under which every tile-sized array was a fresh mmap and
    a scene took 1.5-2x as long). With ``children``, the same settings go into the environment
    (unless already set) for processes started from here, such as CRF workers.

    Returns:
        Whether the thresholds were set (False where the C library is not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    if children:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD_BYTES))
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):  # not glibc (musl): its malloc has no such thresholds
        log.debug("mallopt unavailable; malloc thresholds left as they are")
        return False
