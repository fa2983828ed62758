"""Weighted blending of overlapping tile logits in a rolling band of rows.

Each tile adds ``taper * logits`` into a running sum; a pixel's blended logits are that sum
divided by the sum of the tapers that covered it (the-lay/tiler's ``Merger`` does the same
over a whole image). Because the taper is separable and the tiles form a grid, the weight sum
is separable too, ``W(y, x) = Wy(y) * Wx(x)``, so it needs no per-pixel array. The class
labels need no division at all: ``argmax(sum / W) == argmax(sum)`` for ``W > 0``.

Only the rows that tiles in flight still touch are held: once no later tile covers a row it
is handed out and dropped, so memory depends on the scene's width and the tile size, never on
its height.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .tiling import taper_1d


def weight_sum_1d(starts: Sequence[int], tile_px: int, floor: float, length_px: int, lo: int, hi: int) -> npt.NDArray[np.float32]:
    """Sum of the 1-D tapers of tiles starting at ``starts``, over positions ``lo..hi``.

    Positions past ``length_px`` (reflection padding of a scene smaller than a tile) are not
    part of the scene and are never asked for.
    """
    taper = taper_1d(tile_px, floor)
    total = np.zeros(hi - lo, np.float32)
    for start in starts:
        a, b = max(start, lo), min(start + tile_px, hi, length_px)
        if a < b:
            total[a - lo : b - lo] += taper[a - start : b - start]
    return total


def argmax_classes(scores: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8 | np.uint16]:
    """``np.argmax(scores, axis=0)`` for ``(K, ...)`` scores, as uint8 (uint16 past 256 classes).

    NOTE: numpy's argmax over a short leading axis is strided and slow; K passes of
    vectorised compares are about twice as fast and keep the first maximum on ties, as argmax does.
    """
    best = scores[0].copy()
    labels = np.zeros(scores.shape[1:], np.uint8 if scores.shape[0] <= 256 else np.uint16)
    greater = np.empty(scores.shape[1:], bool)
    for k in range(1, scores.shape[0]):
        np.greater(scores[k], best, out=greater)
        np.maximum(best, scores[k], out=best)
        np.putmask(labels, greater, k)
    return labels


@dataclass
class FinishedRows:
    """Finished rows ``row .. row + n`` of the scene.

    ``sums`` is ``(K, n, width)``, the weighted logit sums (a view into the accumulator, valid
    only until the next call into it); ``valid`` is ``(n, width)``; ``weights`` is the
    separable weight sum, as ``(n, 1)`` and ``(1, width)`` factors.
    """

    row: int
    sums: npt.NDArray[np.float32]
    valid: npt.NDArray[np.bool_]
    row_weights: npt.NDArray[np.float32]
    col_weights: npt.NDArray[np.float32]

    def labels(self) -> npt.NDArray[np.uint8 | np.uint16]:
        """Index of the winning class per pixel ``(n, width)``; meaningless where not valid."""
        return argmax_classes(self.sums)

    def logits(self) -> npt.NDArray[np.float32]:
        """Blended logits ``(K, n, width)`` (a new array)."""
        return self.sums / (self.row_weights[:, None] * self.col_weights[None, :])[None]

    def split(self, max_rows: int) -> Iterator[FinishedRows]:
        """The same rows as blocks of at most ``max_rows`` (views, valid as long as this block)."""
        n = self.sums.shape[1]
        for top in range(0, n, max_rows):
            bottom = min(top + max_rows, n)
            yield FinishedRows(
                row=self.row + top,
                sums=self.sums[:, top:bottom],
                valid=self.valid[top:bottom],
                row_weights=self.row_weights[top:bottom],
                col_weights=self.col_weights,
            )


class LogitAccumulator:
    """Running weighted logit sums over a band of scene rows.

    Args:
        num_classes: K, the number of logit channels.
        height: Scene height in pixels.
        width: Scene width in pixels.
        capacity_rows: Rows held at once; tiles must lie within ``origin .. origin + capacity``.
        row_starts: Tile-row offsets of the grid (for the separable weight sum).
        col_starts: Tile-column offsets of the grid.
        tile_px: Tile edge in pixels.
        taper_floor: The taper's floor (see :func:`geoseg.tiling.taper_1d`).
    """

    def __init__(
        self,
        num_classes: int,
        height: int,
        width: int,
        capacity_rows: int,
        row_starts: Sequence[int],
        col_starts: Sequence[int],
        tile_px: int,
        taper_floor: float,
    ):
        self.height = height
        self.width = width
        self.capacity_rows = min(capacity_rows, height)
        self.origin = 0  # scene row held at index 0 of the band
        self._row_starts = list(row_starts)
        self._tile_px = tile_px
        self._floor = taper_floor
        self._col_weights = weight_sum_1d(col_starts, tile_px, taper_floor, width, 0, width)
        self._sums = np.zeros((num_classes, self.capacity_rows, width), np.float32)
        self._valid = np.zeros((self.capacity_rows, width), bool)

    @property
    def nbytes(self) -> int:
        """Bytes held for the band (sums, mask and column weights)."""
        return self._sums.nbytes + self._valid.nbytes + self._col_weights.nbytes

    def add(
        self,
        y: int,
        x: int,
        logits: npt.NDArray[np.float32],
        taper: npt.NDArray[np.float32],
        valid: npt.NDArray[np.bool_],
    ) -> None:
        """Blend one tile's logits ``(K, h, w)`` at scene position (``y``, ``x``).

        ``taper`` and ``valid`` are ``(h, w)``, already cropped to the scene.
        """
        _, h, w = logits.shape
        top = y - self.origin
        if top < 0 or top + h > self.capacity_rows:
            raise AssertionError(
                f"tile rows {y}..{y + h} fall outside the held band {self.origin}..{self.origin + self.capacity_rows}"
            )
        self._sums[:, top : top + h, x : x + w] += logits * taper
        self._valid[top : top + h, x : x + w] |= valid

    def pop_until(self, row: int) -> Iterator[FinishedRows]:
        """Yield the finished rows above scene row ``row``, then drop them.

        Each yielded block is a view: use it inside the loop body. Rows no tile touched
        (skipped all-nodata tiles) come out invalid.
        """
        while self.origin < min(row, self.height):
            n = min(row, self.height, self.origin + self.capacity_rows) - self.origin
            lo, hi = self.origin, self.origin + n
            yield FinishedRows(
                row=lo,
                sums=self._sums[:, :n],
                valid=self._valid[:n],
                row_weights=weight_sum_1d(self._row_starts, self._tile_px, self._floor, self.height, lo, hi),
                col_weights=self._col_weights,
            )
            # Shift the band up by n rows and clear what comes into view at the bottom.
            keep = self.capacity_rows - n
            self._sums[:, :keep] = self._sums[:, n:]
            self._sums[:, keep:] = 0
            self._valid[:keep] = self._valid[n:]
            self._valid[keep:] = False
            self.origin = hi
