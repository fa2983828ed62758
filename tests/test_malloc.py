"""glibc malloc thresholds: freed activation-sized blocks are reused, not faulted back in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from geoseg._malloc import find_tcmalloc

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


# tcmalloc, preloaded by re-running the ``geoseg`` program (geoseg.cli.run).

TCMALLOC = find_tcmalloc() if sys.platform.startswith("linux") else None
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="no tcmalloc (apt install libtcmalloc-minimal4)")


def test_allocator_choice_follows_the_variable_the_command_and_ld_preload() -> None:
    from geoseg._malloc import tcmalloc_environment

    assert tcmalloc_environment({"GEOSEG_ALLOCATOR": "system"}, ["predict", "a.tif", "b.tif"]) is None
    assert tcmalloc_environment({}, ["--help"]) is None, "only commands that run a network"
    assert tcmalloc_environment({}, ["info", "m.safetensors"]) is None
    mine = {"LD_PRELOAD": "libmine.so"}
    assert tcmalloc_environment(mine, ["predict", "a", "b"]) is None, "the user's preload wins"
    with pytest.raises(ValueError, match="GEOSEG_ALLOCATOR='jemalloc'"):
        tcmalloc_environment({"GEOSEG_ALLOCATOR": "jemalloc"}, ["predict", "a", "b"])


@needs_tcmalloc
def test_auto_preloads_the_installed_tcmalloc_for_heavy_commands() -> None:
    from geoseg._malloc import tcmalloc_environment

    for command in ("predict", "batch", "train", "evaluate"):
        env = tcmalloc_environment({"PATH": "/usr/bin", "GEOSEG_ALLOCATOR": "auto"}, [command, "x"])
        assert env is not None and env["LD_PRELOAD"] == TCMALLOC and env["PATH"] == "/usr/bin"
    # The re-run itself has LD_PRELOAD set, so it runs the command instead of re-running again.
    assert tcmalloc_environment(env, ["predict", "x"]) is None


def test_asking_for_a_missing_tcmalloc_warns_and_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from geoseg import _malloc

    monkeypatch.setattr(_malloc, "TCMALLOC_NAMES", ("geoseg_no_such_library",))
    asked = {"GEOSEG_ALLOCATOR": "tcmalloc"}
    assert _malloc.tcmalloc_environment(asked, ["predict", "a", "b"]) is None, "runs on the system malloc"
    predict = ["predict", "a", "b"]
    assert "no tcmalloc library was found" in _malloc.missing_tcmalloc_warning(asked, predict)
    assert _malloc.missing_tcmalloc_warning(asked, ["info", "m.sft"]) is None, "only where it would run"
    assert _malloc.tcmalloc_environment({}, predict) is None
    assert _malloc.missing_tcmalloc_warning({}, predict) is None, "auto stays quiet without tcmalloc"


def _predict_in_a_real_process(tmp_path, make_scene, model: Path, **env: str) -> subprocess.CompletedProcess:
    src = make_scene("scene.tif", width=64, height=64)
    dst = tmp_path / "out.tif"
    cmd = [sys.executable, "-m", "geoseg", "predict", str(src), str(dst), "--model", str(model),
           "--device", "cpu", "--threads", "1", "-v", "--overwrite"]
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GEOSEG_ALLOCATOR")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=base | env)


@needs_tcmalloc
def test_geoseg_predict_runs_on_tcmalloc_unless_told_otherwise(tmp_path, make_scene, tiny_model_file) -> None:
    proc = _predict_in_a_real_process(tmp_path, make_scene, tiny_model_file)
    assert proc.returncode == 0, proc.stderr
    assert "memory allocator: tcmalloc" in proc.stderr, "read from the process's own memory map"
    assert (tmp_path / "out.tif").exists()
    proc = _predict_in_a_real_process(tmp_path, make_scene, tiny_model_file, GEOSEG_ALLOCATOR="system")
    assert proc.returncode == 0, proc.stderr
    assert "memory allocator: system" in proc.stderr


def test_an_unknown_allocator_is_a_one_line_error(tmp_path: Path, make_scene, tiny_model_file: Path) -> None:
    proc = _predict_in_a_real_process(tmp_path, make_scene, tiny_model_file, GEOSEG_ALLOCATOR="jemalloc")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "Error: GEOSEG_ALLOCATOR='jemalloc': expected one of auto, tcmalloc, system"
    ]
    assert not (tmp_path / "out.tif").exists()
