"""The memory allocator of a process that runs a network batch after batch.

tcmalloc, preloaded by re-running the ``geoseg`` program, where installed (:func:`tcmalloc_environment`);
otherwise glibc's malloc with the thresholds below (:func:`reuse_freed_memory`, a no-op elsewhere).

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


# Where geoseg looks for tcmalloc (gperftools), by library name: the minimal build first (Debian
# and Ubuntu's libtcmalloc-minimal4), then the full one (conda's gperftools, Fedora's gperftools-libs).
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
# GEOSEG_ALLOCATOR: "auto" (default: tcmalloc when installed), "tcmalloc" (warn when missing), or
# "system" (the C library's malloc, glibc's with the thresholds above).
ALLOCATOR_VARIABLE = "GEOSEG_ALLOCATOR"
ALLOCATORS = ("auto", "tcmalloc", "system")
# Commands that run networks for long enough for the allocator to matter.
HEAVY_COMMANDS = frozenset({"predict", "batch", "train", "evaluate"})


def find_tcmalloc() -> str | None:
    """The name of an installed tcmalloc shared library (for ``LD_PRELOAD``), or None."""
    import ctypes.util

    for name in TCMALLOC_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def loaded_allocator() -> str:
    """``tcmalloc`` when this process runs on it (seen in its memory map), else ``system``."""
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if any("libtcmalloc" in line for line in maps) else "system"
    except OSError:
        return "system"


def tcmalloc_environment(environ: dict[str, str], args: list[str]) -> dict[str, str] | None:
    """The environment to re-run this command with tcmalloc preloaded, or None to run it as it is.

    glibc's malloc keeps a heap per thread and cannot give back memory freed under a block still in
    use, so ``geoseg predict``'s peak memory rose in unpredictable steps with the network's large
    activations between the reader's and writer's smaller arrays: 495-616 MiB on a 2048 px scene and
    563-748 MiB on an 8192 px one over the same runs; with tcmalloc 457-461 and 523-527 MiB, at the
    same speed (docs/performance.md). A malloc can only be replaced before the process starts,
    hence ``LD_PRELOAD`` and a re-run of the same command.

    Nothing changes when: ``GEOSEG_ALLOCATOR=system``; the command is not one of
    ``HEAVY_COMMANDS``; ``LD_PRELOAD`` is already set (the user's choice, or this re-run); the
    platform is not Linux; no tcmalloc is installed (see :func:`missing_tcmalloc_warning`).

    Raises:
        ValueError: ``GEOSEG_ALLOCATOR`` has an unknown value.
    """
    if allocator_choice(environ) == "system" or not runs_networks(args):
        return None
    if not sys.platform.startswith("linux") or environ.get("LD_PRELOAD"):
        return None
    library = find_tcmalloc()
    if library is None:
        return None
    # tcmalloc reports every allocation of 1 GiB or more on stderr; a big CRF window is not news.
    return environ | {"LD_PRELOAD": library, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def allocator_choice(environ: dict[str, str]) -> str:
    """``GEOSEG_ALLOCATOR``'s value, one of ``ALLOCATORS`` (``auto`` when unset or empty).

    Raises:
        ValueError: An unknown value.
    """
    choice = environ.get(ALLOCATOR_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in ALLOCATORS:
        raise ValueError(f"{ALLOCATOR_VARIABLE}={choice!r}: expected one of {', '.join(ALLOCATORS)}")
    return choice


def runs_networks(args: list[str]) -> bool:
    """Whether the ``geoseg`` arguments ``args`` name one of ``HEAVY_COMMANDS``."""
    return next((arg for arg in args if not arg.startswith("-")), None) in HEAVY_COMMANDS


def missing_tcmalloc_warning(environ: dict[str, str], args: list[str]) -> str | None:
    """A warning for ``GEOSEG_ALLOCATOR=tcmalloc`` on a heavy command without tcmalloc, else None."""
    if allocator_choice(environ) != "tcmalloc" or not runs_networks(args) or find_tcmalloc() is not None:
        return None
    return (f"{ALLOCATOR_VARIABLE}=tcmalloc, but no tcmalloc library was found; using the system malloc "
            "(Debian/Ubuntu: apt install libtcmalloc-minimal4; conda: gperftools)")
