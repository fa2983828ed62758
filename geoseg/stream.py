"""The seam between the engine and what it produces: finished row blocks, stages and sinks.

The engine hands finished rows, top to bottom, to a chain of *stages* (which may hold rows
back and change them, e.g. a CRF that needs a halo below a block) and then to every *sink*
(the class raster, a probability raster, area statistics, ...). Sinks write under temporary
names and only :meth:`RowSink.commit` makes an output appear; :meth:`RowSink.abort` removes
every trace. All of it runs on the engine's writer thread, so the network never waits on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


@dataclass
class RowBlock:
    """Scene rows ``row .. row + n`` as the engine (or an earlier stage) finished them.

    Attributes:
        row: First scene row of the block.
        classes: ``(n, width)`` class ids in the output dtype, ``output_nodata`` where not valid.
        valid: ``(n, width)``; False where the input is nodata (or outside the area of interest).
        probabilities: ``(K, n, width)`` float32 softmax of the blended logits, in model class
            order; only present when a stage or sink asked for them (``needs_probabilities``).
    """

    row: int
    classes: npt.NDArray[np.integer]
    valid: npt.NDArray[np.bool_]
    probabilities: npt.NDArray[np.float32] | None = None

    @property
    def height(self) -> int:
        return int(self.classes.shape[0])


@runtime_checkable
class RowSink(Protocol):
    """Consumes every row block in scene order and writes one output atomically."""

    needs_probabilities: bool

    def write(self, block: RowBlock) -> None: ...

    def commit(self) -> None:
        """Move the finished output to its final name."""
        ...

    def abort(self) -> None:
        """Remove temporary files; never touches the final name; safe to call twice or after commit."""
        ...


@runtime_checkable
class RowStage(Protocol):
    """Transforms the stream of row blocks; may hold rows back (blocks out stay in scene order)."""

    needs_probabilities: bool

    def push(self, block: RowBlock) -> Iterator[RowBlock]:
        """Take one block; yield the blocks now finished (possibly none)."""
        ...

    def finish(self) -> Iterator[RowBlock]:
        """No more input: yield everything still held."""
        ...

    def close(self) -> None:
        """Release workers and buffers (called on success and on failure)."""
        ...


def needs_probabilities(stages: Sequence[RowStage], sinks: Sequence[RowSink]) -> bool:
    """Whether any stage or sink needs the softmax probabilities (they cost a pass over K bands)."""
    return any(s.needs_probabilities for s in (*stages, *sinks))


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Softmax over the leading (class) axis, in place on ``logits``, which it returns."""
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits


def run_chain(stages: Sequence[RowStage], block: RowBlock | None) -> Iterator[RowBlock]:
    """Pass ``block`` through ``stages`` in order (``None``: flush them all); yield what comes out."""
    blocks: list[RowBlock] = [] if block is None else [block]
    for stage in stages:
        out: list[RowBlock] = []
        for item in blocks:
            out.extend(stage.push(item))
        if block is None:
            out.extend(stage.finish())
        blocks = out
    yield from blocks
