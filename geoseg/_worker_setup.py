"""Set-up run in each local dask worker process as it starts (dask's ``preload``)."""

from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    """Leave Ctrl-C to the batch's driver.

    A terminal's Ctrl-C reaches the whole foreground process group. The driver then records what
    is done and closes the workers; a worker that took the KeyboardInterrupt itself died printing
    dask's tracebacks on the terminal.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
