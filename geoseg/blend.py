"""Weighted blending of overlapping tile logits, tile by tile, holding only the overlaps.

Each tile adds ``taper * logits`` into a running sum; a pixel's blended logits are that sum
divided by the sum of the tapers that covered it (the-lay/tiler's ``Merger`` does the same
over a whole image). Because the taper is separable and the tiles form a grid, the weight sum
is separable too, ``W(y, x) = Wy(y) * Wx(x)``, so it needs no per-pixel array. The class
labels need no division at all: ``argmax(sum / W) == argmax(sum)`` for ``W > 0``.

Tiles arrive in row-major grid order. Once tile ``(r, c)`` is added, the pixels it covers
above the next tile row and left of the next tile column are final: they are reduced to class
indexes at once. What later tiles still touch is carried: the tile's right edge to the next
tile (a column carry, tile-sized) and its bottom edge to the next tile row (a row carry, as
wide as the scene but only as tall as the overlap, read and rewritten in place). So the float
state is about ``K x overlap x width``, not ``K x tile x width``, and never depends on the
scene's height.
The finished rows of a tile row come out together, in order.

The same algorithm runs on numpy arrays (the CPU path) or on torch tensors on a GPU
(``device=``): there the logits never leave the GPU; only the finished rows' class indexes and
validity (and logit sums, if kept) are copied back, once per tile row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .tiling import Tile, TileGrid, taper_1d, taper_2d


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
    vectorised compares are faster and keep the first maximum on ties, as argmax does. Class ``k``
    is recorded as ``max(labels, k * greater)``, which is right because ``k`` only grows and needs
    no branches: ``np.putmask`` was 4x slower on random scores, though on real logits, where the
    mask is predictable, both are memory-bound (docs/performance.md).
    """
    best = scores[0].copy()
    labels = np.zeros(scores.shape[1:], index_dtype(scores.shape[0]))
    greater = np.empty(scores.shape[1:], bool)
    step = np.empty_like(labels)
    for k in range(1, scores.shape[0]):
        np.greater(scores[k], best, out=greater)
        np.maximum(best, scores[k], out=best)
        np.multiply(greater, labels.dtype.type(k), out=step)
        np.maximum(labels, step, out=labels)
    return labels


def index_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """The smallest unsigned integer type that holds class indexes ``0 .. num_classes - 1``."""
    return np.uint8 if num_classes <= 256 else np.uint16


class _HostArrays:
    """numpy arrays in host memory: the CPU path."""

    def zeros(self, shape: tuple[int, ...], kind: str) -> Any:
        return np.zeros(shape, np.float32 if kind == "float" else bool)

    def labels(self, shape: tuple[int, ...], num_classes: int) -> Any:
        return np.zeros(shape, index_dtype(num_classes))

    def constant(self, array: npt.NDArray[Any]) -> Any:
        return array

    def copy(self, array: Any) -> Any:
        return array.copy()

    def argmax(self, scores: Any) -> Any:
        return argmax_classes(scores)

    def to_host(self, array: Any, dtype: Any = None) -> Any:
        return array


class _DeviceArrays:
    """torch tensors on ``device`` (a GPU): blending and argmax run there, next to the network."""

    def __init__(self, device: Any):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def zeros(self, shape: tuple[int, ...], kind: str) -> Any:
        dtype = self.torch.float32 if kind == "float" else self.torch.bool
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def labels(self, shape: tuple[int, ...], num_classes: int) -> Any:
        # NOTE: torch has no uint16 arithmetic on every build; int32 past 256 classes, narrowed on the host.
        dtype = self.torch.uint8 if num_classes <= 256 else self.torch.int32
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def constant(self, array: npt.NDArray[Any]) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def copy(self, array: Any) -> Any:
        return array.clone()

    def argmax(self, scores: Any) -> Any:
        # torch.argmax returns the first maximal index on ties, as numpy (and argmax_classes) do.
        return self.torch.argmax(scores, dim=0)

    def to_host(self, array: Any, dtype: Any = None) -> Any:
        host = array.cpu().numpy()
        return host if dtype is None else host.astype(dtype, copy=False)


@dataclass
class FinishedRows:
    """Finished rows ``row .. row + n`` of the scene (arrays of their own, not views of a buffer).

    Attributes:
        row: First scene row.
        labels: ``(n, width)`` index of the winning class; meaningless where not ``valid``.
        valid: ``(n, width)``: some tile with a valid pixel there covered it.
        sums: ``(K, n, width)`` weighted logit sums; only from a blender that keeps logits.
        row_weights: The separable weight sum's ``(n,)`` row factor.
        col_weights: Its ``(width,)`` column factor.
    """

    row: int
    labels: npt.NDArray[np.uint8 | np.uint16]
    valid: npt.NDArray[np.bool_]
    sums: npt.NDArray[np.float32] | None
    row_weights: npt.NDArray[np.float32]
    col_weights: npt.NDArray[np.float32]

    @property
    def height(self) -> int:
        return int(self.labels.shape[0])

    def logits(self) -> npt.NDArray[np.float32]:
        """Blended logits ``(K, n, width)`` (a new array)."""
        if self.sums is None:
            raise AssertionError("the blender was not asked to keep logits (keep_logits=True)")
        return self.sums / (self.row_weights[:, None] * self.col_weights[None, :])[None]

    def split(self, max_rows: int) -> Iterator[FinishedRows]:
        """The same rows as blocks of at most ``max_rows`` (views of these arrays)."""
        for top in range(0, self.height, max_rows):
            rows = slice(top, min(top + max_rows, self.height))
            yield FinishedRows(
                row=self.row + top,
                labels=self.labels[rows],
                valid=self.valid[rows],
                sums=None if self.sums is None else self.sums[:, rows],
                row_weights=self.row_weights[rows],
                col_weights=self.col_weights,
            )


class TileBlender:
    """Blends tile logits given in grid order; hands out each tile row's finished rows.

    Tiles may be left out (all-nodata tiles never reach the network): they contribute nothing,
    and pixels only they cover come out invalid.

    Args:
        grid: The tile grid of the scene.
        num_classes: K, the number of logit channels.
        taper_floor: The taper's floor (see :func:`geoseg.tiling.taper_1d`).
        keep_logits: Also hand out the weighted logit sums of finished rows (for probabilities
            or a CRF); costs ``K`` float32 values per pixel of a tile row.
        device: ``None``: numpy arrays in host memory. A torch device (``"cuda:0"``): logits
            and validity are given as tensors on it, the state lives there, and finished rows are
            handed out as numpy arrays all the same.
    """

    def __init__(
        self,
        grid: TileGrid,
        num_classes: int,
        taper_floor: float,
        keep_logits: bool = False,
        device: Any = None,
    ):
        self._xp = _HostArrays() if device is None else _DeviceArrays(device)
        self.grid = grid
        self.num_classes = num_classes
        self.keep_logits = keep_logits
        self._floor = taper_floor
        self._taper = self._xp.constant(taper_2d(grid.tile_px, taper_floor))
        self._rows = grid.row_starts
        self._cols = grid.col_starts
        self._col_weights = weight_sum_1d(self._cols, grid.tile_px, taper_floor, grid.width, 0, grid.width)
        self._next = 0  # grid index of the next tile position to blend
        # Sums (and validity) of the rows the next tile row shares with those blended so far, in
        # one buffer as tall as the largest overlap between tile rows. A tile row reads its
        # incoming rows and writes its outgoing ones in place: tile c writes only columns left
        # of the next tile, which it (or an earlier tile) has already read.
        shared = max([y + grid.tile_px - below for y, below in zip(self._rows, self._rows[1:])], default=0)
        self._carry = self._xp.zeros((num_classes, shared, grid.width), "float")
        self._carry_valid = self._xp.zeros((shared, grid.width), "bool")
        self._carry_in = 0  # rows of the buffer that hold what earlier tile rows left for this one
        self._peak_nbytes = 0

    @property
    def nbytes(self) -> int:
        """The most bytes of blending state held at once so far (carries and the tile row's output)."""
        return self._peak_nbytes

    @property
    def device(self) -> Any:
        """Where logits and validity must be given: a torch device, or ``None`` for numpy arrays."""
        return getattr(self._xp, "device", None)

    def on_device(self, host: Any) -> Any:
        """``host`` (arrays, or a sequence of same-shaped arrays) where :meth:`add` wants it: as it is
        without a ``device``, else stacked into one tensor on the device."""
        return self._xp.constant(host)

    def add(self, tile: Tile, logits: Any, valid: Any) -> list[FinishedRows]:
        """Blend one tile's logits ``(K, h, w)`` and validity ``(h, w)``, cropped to the scene.

        numpy arrays, or tensors on the blender's ``device``.

        Returns the rows this tile (or tiles skipped before it) finished, top to bottom.
        """
        if tile.index < self._next:
            raise AssertionError(f"tile {tile.index} comes after tile {self._next - 1}: tiles must come in grid order")
        finished = self._skip_until(tile.index)
        finished += self._blend(tile.index, logits, valid)
        return finished

    def finish(self) -> list[FinishedRows]:
        """No more tiles: the rows still waiting (those of tiles never added)."""
        return self._skip_until(len(self.grid))

    def _skip_until(self, index: int) -> list[FinishedRows]:
        finished: list[FinishedRows] = []
        while self._next < index:
            finished += self._blend(self._next, None, None)
        return finished

    def _blend(self, index: int, logits: Any, valid: Any) -> list[FinishedRows]:
        xp, grid, rows, cols = self._xp, self.grid, self._rows, self._cols
        r, c = divmod(index, len(cols))
        y, x = rows[r], cols[c]
        h, w = min(grid.tile_px, grid.height - y), min(grid.tile_px, grid.width - x)
        # Rows above the next tile row and columns left of the next tile column are final now.
        done_h = (rows[r + 1] if r + 1 < len(rows) else grid.height) - y
        done_w = (cols[c + 1] if c + 1 < len(cols) else grid.width) - x
        if c == 0:
            self._start_tile_row(done_h, h)
        if logits is None:
            window = xp.zeros((self.num_classes, h, w), "float")
            window_valid = xp.zeros((h, w), "bool")
        else:
            if tuple(logits.shape) != (self.num_classes, h, w) or valid is None or tuple(valid.shape) != (h, w):
                raise AssertionError(f"tile {index} at ({y}, {x}) needs ({self.num_classes}, {h}, {w}) logits")
            window = logits * self._taper[:h, :w]
            window_valid = xp.copy(valid)
        # What earlier tiles of this row left on its left edge (the row carry already included) ...
        carried = self._col_carry.shape[2]
        window[:, :, :carried] += self._col_carry
        window_valid[:, :carried] |= self._col_carry_valid
        # ... and what the tile rows above left on its top edge, for the columns new to this row.
        above = self._carry_in
        window[:, :above, carried:] += self._carry[:, :above, x + carried : x + w]
        window_valid[:above, carried:] |= self._carry_valid[:above, x + carried : x + w]

        done = window[:, :done_h, :done_w]
        self._labels[:, x : x + done_w] = xp.argmax(done)
        self._valid[:, x : x + done_w] = window_valid[:done_h, :done_w]
        if self._sums is not None:
            self._sums[:, :, x : x + done_w] = done
        self._carry[:, : h - done_h, x : x + done_w] = window[:, done_h:, :done_w]
        self._carry_valid[: h - done_h, x : x + done_w] = window_valid[done_h:, :done_w]
        self._col_carry = xp.copy(window[:, :, done_w:])
        self._col_carry_valid = xp.copy(window_valid[:, done_w:])
        self._next = index + 1
        self._peak_nbytes = max(self._peak_nbytes, self._held_nbytes())
        if c + 1 < len(cols):
            return []
        band = FinishedRows(
            row=y,
            labels=xp.to_host(self._labels, index_dtype(self.num_classes)),
            valid=xp.to_host(self._valid),
            sums=None if self._sums is None else xp.to_host(self._sums),
            row_weights=weight_sum_1d(rows, grid.tile_px, self._floor, grid.height, y, y + done_h),
            col_weights=self._col_weights,
        )
        self._carry_in = h - done_h
        return [band]

    def _start_tile_row(self, done_h: int, h: int) -> None:
        """Fresh arrays for a tile row's finished rows (handed out, never reused) and an empty column carry."""
        xp, k, width = self._xp, self.num_classes, self.grid.width
        self._labels = xp.labels((done_h, width), k)
        self._valid = xp.zeros((done_h, width), "bool")
        self._sums = xp.zeros((k, done_h, width), "float") if self.keep_logits else None
        self._col_carry = xp.zeros((k, h, 0), "float")
        self._col_carry_valid = xp.zeros((h, 0), "bool")

    def _held_nbytes(self) -> int:
        """Bytes of blending state, wherever it lives (on the GPU with ``device``)."""
        arrays = [self._carry, self._carry_valid, self._col_carry, self._col_carry_valid, self._labels, self._valid]
        if self._sums is not None:
            arrays.append(self._sums)
        return sum(a.nbytes for a in arrays)
