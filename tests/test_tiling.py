"""Tile grid and taper: every pixel covered, edge tiles inside the scene, weights positive."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.tiling import TileGrid, taper_1d, taper_2d, tile_starts


@st.composite
def axes(draw: st.DrawFn, max_length: int = 600) -> tuple[int, int, int]:
    """(length, tile, overlap) with 0 <= overlap < tile, as TileGrid accepts."""
    tile = draw(st.integers(1, 128))
    overlap = draw(st.integers(0, tile - 1))
    length = draw(st.integers(1, max_length))
    return length, tile, overlap


@settings(max_examples=300, deadline=None)
@given(axes())
def test_tile_starts_cover_every_position(axis: tuple[int, int, int]) -> None:
    length, tile, overlap = axis
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    assert starts[0] == 0
    assert starts == sorted(set(starts)), "starts must be strictly increasing"


@settings(max_examples=300, deadline=None)
@given(axes())
def test_tiles_lie_inside_a_scene_bigger_than_the_tile(axis: tuple[int, int, int]) -> None:
    length, tile, overlap = axis
    starts = tile_starts(length, tile, overlap)
    if length > tile:
        assert all(0 <= s and s + tile <= length for s in starts)
        assert starts[-1] + tile == length, "the last tile ends exactly at the scene edge"
    else:
        assert starts == [0], "a scene no bigger than one tile gets a single tile"


@settings(max_examples=300, deadline=None)
@given(axes())
def test_neighbours_share_at_least_the_overlap(axis: tuple[int, int, int]) -> None:
    length, tile, overlap = axis
    starts = tile_starts(length, tile, overlap)
    for a, b in zip(starts, starts[1:], strict=False):
        assert b - a <= tile - overlap
        assert b - a >= 1


@settings(max_examples=100, deadline=None)
@given(axes(max_length=150), axes(max_length=150))
def test_grid_covers_every_pixel_in_row_major_order(
    rows: tuple[int, int, int], cols: tuple[int, int, int]
) -> None:
    height, tile, overlap = rows
    width = cols[0]
    grid = TileGrid(height, width, tile, overlap)
    tiles = list(grid)
    assert len(tiles) == len(grid) == len(grid.row_starts) * len(grid.col_starts)
    assert [t.index for t in tiles] == list(range(len(tiles)))
    assert [(t.y, t.x) for t in tiles] == sorted((t.y, t.x) for t in tiles)
    hits = np.zeros((height, width), np.int32)
    for t in tiles:
        assert t.size == tile
        assert (t.y, t.x) == (grid.row_starts[t.row], grid.col_starts[t.col])
        hits[t.y : t.y + tile, t.x : t.x + tile] += 1
    assert hits.min() >= 1


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(0, 10, 8, 0), (10, 0, 8, 0), (10, 10, 0, 0), (10, 10, 8, 8), (10, 10, 8, -1)],
)
def test_grid_refuses_nonsense(height: int, width: int, tile: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        TileGrid(height, width, tile, overlap)


def test_known_grid_spreads_the_slack_over_every_step() -> None:
    # 200 px, tile 64, overlap 16 -> steps of at most 48 px; 136 px to go: 3 steps of 45-46 px,
    # not 48, 48, 40 (which would leave the last pair overlapping by 24 px instead of 16).
    assert tile_starts(200, 64, 16) == [0, 45, 90, 136]
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(65, 64, 16) == [0, 1]
    assert tile_starts(30, 64, 16) == [0]


@settings(max_examples=300, deadline=None)
@given(axes())
def test_steps_are_as_even_as_integers_allow(axis: tuple[int, int, int]) -> None:
    # Every overlap is then close to the requested one: no tile overlaps its neighbour by much
    # more (the blender carries the largest overlap between tile rows across the whole width).
    length, tile, overlap = axis
    starts = tile_starts(length, tile, overlap)
    steps = np.diff(starts)
    if len(steps):
        assert steps.max() - steps.min() <= 1
        assert len(steps) == -(-(length - tile) // (tile - overlap)), "no more tiles than needed"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1024), st.floats(1e-3, 1.0))
def test_taper_is_positive_bounded_and_symmetric(size: int, floor: float) -> None:
    w = taper_1d(size, floor)
    assert w.shape == (size,)
    assert w.dtype == np.float32
    assert (w > 0).all()
    assert w.min() >= np.float32(floor) * (1 - 1e-6)
    assert w.max() <= 1.0
    np.testing.assert_allclose(w, w[::-1], rtol=1e-6)
    if size > 2:
        assert w[size // 2] >= w[0], "the centre weighs at least as much as the edge"


def test_taper_is_hann_lifted_to_the_floor() -> None:
    w = taper_1d(8, 0.25)
    centres = (np.arange(8) + 0.5) / 8
    np.testing.assert_allclose(w, 0.25 + 0.75 * np.sin(np.pi * centres) ** 2, rtol=1e-6)
    assert taper_1d(1, 0.1).tolist() == [1.0]
    np.testing.assert_array_equal(taper_1d(16, 1.0), np.ones(16, np.float32))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 96), st.floats(1e-3, 1.0))
def test_taper_2d_is_the_outer_product(size: int, floor: float) -> None:
    w2 = taper_2d(size, floor)
    w1 = taper_1d(size, floor)
    assert w2.shape == (size, size)
    assert (w2 > 0).all()
    np.testing.assert_allclose(w2, np.outer(w1, w1), rtol=1e-6)
