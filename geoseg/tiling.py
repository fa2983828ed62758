"""Tile grids over a scene and the taper that blends overlapping tiles (numpy only).

Like NVlabs SegFormer's ``slide_inference``, tiles step by at most ``tile - overlap`` and the
last row and column end exactly at the scene edge rather than being dropped or padded, so every
tile except those of a scene smaller than one tile is read fully from real pixels. Unlike it,
the slack is spread evenly over all steps instead of shifting only the last tile back: every
overlap is then close to the requested one, so the blender's carried overlap stays small
(one last tile overlapping its neighbour by up to a whole tile would set its size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


def tile_starts(length_px: int, tile_px: int, overlap_px: int) -> list[int]:
    """Offsets of the tiles along one axis of ``length_px`` pixels.

    As few tiles as keep every step at most ``tile_px - overlap_px`` (so neighbours share at
    least ``overlap_px`` pixels), the first at 0 and the last ending exactly at the scene edge,
    with the steps as even as integers allow. An axis shorter than one tile gets a single tile
    at 0 (padded by the reader).
    """
    if length_px <= tile_px:
        return [0]
    span = length_px - tile_px
    steps = -(-span // (tile_px - overlap_px))
    return [i * span // steps for i in range(steps + 1)]


@dataclass(frozen=True)
class Tile:
    """One tile: its position in the grid and its pixel window (may extend past a small scene)."""

    index: int
    row: int
    col: int
    y: int
    x: int
    size: int


@dataclass(frozen=True)
class TileGrid:
    """Tiles covering a ``height x width`` scene, in row-major order."""

    height: int
    width: int
    tile_px: int
    overlap_px: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"scene must have at least one pixel, got {self.height}x{self.width}")
        if self.tile_px < 1 or not 0 <= self.overlap_px < self.tile_px:
            raise ValueError(f"need 0 <= overlap < tile, got tile {self.tile_px}, overlap {self.overlap_px}")

    @property
    def row_starts(self) -> list[int]:
        """Top offsets of the tile rows."""
        return tile_starts(self.height, self.tile_px, self.overlap_px)

    @property
    def col_starts(self) -> list[int]:
        """Left offsets of the tile columns."""
        return tile_starts(self.width, self.tile_px, self.overlap_px)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def __iter__(self):
        cols = self.col_starts
        for r, y in enumerate(self.row_starts):
            for c, x in enumerate(cols):
                yield Tile(index=r * len(cols) + c, row=r, col=c, y=y, x=x, size=self.tile_px)


def taper_1d(size_px: int, floor: float) -> npt.NDArray[np.float32]:
    """A raised-cosine (Hann) window lifted to a positive floor: ``floor + (1 - floor) * hann``.

    The floor keeps every pixel's weight positive, so scene-border pixels seen by one tile
    only are still normalised to their own logits instead of fading out.
    """
    if size_px == 1:
        return np.ones(1, np.float32)
    # NOTE: sample at pixel centres so the window is symmetric and never exactly 0 or 1 at the ends.
    centres = (np.arange(size_px, dtype=np.float64) + 0.5) / size_px
    hann = np.sin(np.pi * centres) ** 2
    return (floor + (1.0 - floor) * hann).astype(np.float32)


def taper_2d(size_px: int, floor: float) -> npt.NDArray[np.float32]:
    """Separable 2-D taper ``(size_px, size_px)``, the outer product of two :func:`taper_1d`."""
    w = taper_1d(size_px, floor)
    return np.outer(w, w).astype(np.float32)
