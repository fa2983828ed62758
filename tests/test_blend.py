"""Tile-by-tile logit blend: exact weighted averages, no darkened border, rows out once and in order."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.blend import TileBlender, argmax_classes, weight_sum_1d
from geoseg.tiling import Tile, TileGrid, taper_1d, taper_2d

TileLogits = Callable[[Tile, int, int], np.ndarray]


def blend(
    grid: TileGrid,
    num_classes: int,
    tile_logits: TileLogits,
    floor: float,
    *,
    valid: np.ndarray | None = None,
    skip: Callable[[Tile], bool] = lambda tile: False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, TileBlender]:
    """Drive a TileBlender (keeping logits) and one that does not, tile by tile, as the pipeline does.

    Returns the blended logits ``(K, H, W)``, labels and validity gathered from the finished rows,
    and the blender. Checks that rows come out once each, in order, and that both blenders agree.
    """
    height, width = grid.height, grid.width
    blender = TileBlender(grid, num_classes, floor, keep_logits=True)
    labels_only = TileBlender(grid, num_classes, floor)
    logits = np.full((num_classes, height, width), np.nan, np.float32)
    labels = np.full((height, width), -1, np.int64)
    valid_out = np.zeros((height, width), bool)
    if valid is None:
        valid = np.ones((height, width), bool)
    next_row = 0

    def gather(bands: list, plain: list) -> None:
        nonlocal next_row
        assert len(bands) == len(plain)
        for finished, other in zip(bands, plain, strict=True):
            n = finished.height
            assert finished.row == next_row, "finished rows must come out in order, each once"
            assert finished.sums.shape == (num_classes, n, width)
            assert finished.valid.shape == finished.labels.shape == (n, width)
            assert other.sums is None and other.row == finished.row
            np.testing.assert_array_equal(other.labels, finished.labels)
            np.testing.assert_array_equal(other.valid, finished.valid)
            rows = slice(finished.row, finished.row + n)
            logits[:, rows] = finished.logits()
            labels[rows] = finished.labels
            valid_out[rows] = finished.valid
            next_row += n

    for tile in grid:
        if skip(tile):
            continue
        h, w = min(tile.size, height - tile.y), min(tile.size, width - tile.x)
        tile_valid = valid[tile.y : tile.y + h, tile.x : tile.x + w]
        values = tile_logits(tile, h, w)
        gather(blender.add(tile, values, tile_valid), labels_only.add(tile, values, tile_valid))
    gather(blender.finish(), labels_only.finish())
    assert next_row == height, "every row must come out"
    return logits, labels, valid_out, labels_only


@st.composite
def grids(draw: st.DrawFn, max_side: int = 160) -> TileGrid:
    tile = draw(st.integers(2, 64))
    overlap = draw(st.integers(0, (tile - 1) // 2))
    return TileGrid(draw(st.integers(1, max_side)), draw(st.integers(1, max_side)), tile, overlap)


floors = st.floats(0.01, 1.0)


@settings(max_examples=150, deadline=None)
@given(grids(), floors, st.lists(st.floats(-50, 50), min_size=1, max_size=4))
def test_blending_constant_logits_gives_back_the_constant(
    grid: TileGrid, floor: float, values: list[float]
) -> None:
    const = np.asarray(values, np.float32)[:, None, None]
    logits, _, valid, _ = blend(
        grid, len(values), lambda t, h, w: np.broadcast_to(const, (len(values), h, w)), floor
    )
    # The border (seen by fewer tiles, at the taper's low edge) must not be darkened.
    np.testing.assert_allclose(logits, np.broadcast_to(const, logits.shape), rtol=1e-5, atol=1e-5)
    assert valid.all()


@settings(max_examples=100, deadline=None)
@given(grids(), floors, st.integers(0, 2**31 - 1))
def test_tiles_that_agree_blend_to_the_whole_image(grid: TileGrid, floor: float, seed: int) -> None:
    # A pointwise model: every tile predicts the same logits for the same pixel.
    field = np.random.default_rng(seed).normal(0, 3, (3, grid.height, grid.width)).astype(np.float32)
    logits, labels, _, _ = blend(grid, 3, lambda t, h, w: field[:, t.y : t.y + h, t.x : t.x + w], floor)
    np.testing.assert_allclose(logits, field, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, np.argmax(logits, axis=0))


@settings(max_examples=60, deadline=None)
@given(grids(max_side=90), floors)
def test_blend_is_the_taper_weighted_mean_of_the_tiles(grid: TileGrid, floor: float) -> None:
    # Each tile predicts its own constant (its index): the blend must be sum(w_t * t) / sum(w_t).
    tiles = list(grid)
    num = np.zeros((grid.height, grid.width), np.float64)
    den = np.zeros_like(num)
    taper = taper_2d(grid.tile_px, floor).astype(np.float64)
    for t in tiles:
        h, w = min(t.size, grid.height - t.y), min(t.size, grid.width - t.x)
        num[t.y : t.y + h, t.x : t.x + w] += taper[:h, :w] * t.index
        den[t.y : t.y + h, t.x : t.x + w] += taper[:h, :w]
    logits, _, _, _ = blend(grid, 1, lambda t, h, w: np.full((1, h, w), t.index, np.float32), floor)
    np.testing.assert_allclose(logits[0], num / den, rtol=1e-4, atol=1e-4)


@settings(max_examples=200, deadline=None)
@given(grids(), floors, st.data())
def test_weight_sum_matches_brute_force(grid: TileGrid, floor: float, data: st.DataObject) -> None:
    starts = grid.row_starts
    lo = data.draw(st.integers(0, grid.height - 1))
    hi = data.draw(st.integers(lo + 1, grid.height))
    brute = np.zeros(grid.height, np.float64)
    taper = taper_1d(grid.tile_px, floor)
    for s in starts:
        end = min(s + grid.tile_px, grid.height)
        brute[s:end] += taper[: end - s]
    got = weight_sum_1d(starts, grid.tile_px, floor, grid.height, lo, hi)
    np.testing.assert_allclose(got, brute[lo:hi], rtol=1e-5)
    assert (got > 0).all(), "every pixel of the scene is covered with a positive weight"


@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("height", [100, 1000, 10_000])
def test_live_size_depends_on_the_overlap_and_width_not_on_the_scene_height(height: int, tile: int) -> None:
    k, width = 5, 1000
    grid = TileGrid(height, width, tile, 16)
    _, _, _, blender = blend(grid, k, lambda t, h, w: np.ones((k, h, w), np.float32), 0.1)
    most_shared_rows = tile - int(np.diff([*grid.row_starts, height - tile]).min(initial=tile))
    # The row carry (K float32 + validity per pixel, overlap rows high, read and rewritten in
    # place), the column carry (tile high), and the tile row's class indexes and validity.
    bound = (k * 4 + 1) * most_shared_rows * width + (k * 4 + 1) * tile * tile + 2 * tile * width
    assert blender.nbytes <= bound
    if height > 10 * tile:  # (a short scene's few tile rows may overlap by much more than asked)
        assert blender.nbytes < k * tile * width * 4 * 0.5, "well under the K x tile x width float band of a tile row"


def test_rows_no_tile_touched_come_out_invalid() -> None:
    grid = TileGrid(200, 120, 64, 16)  # rows 0, 48, 96, 136
    skipped_row = 1  # tiles at y=48 hold no valid pixel and are never predicted

    def skip(tile: Tile) -> bool:
        return tile.row == skipped_row

    valid = np.ones((200, 120), bool)
    valid[48:112] = False  # the rows that only the skipped tiles cover, plus some covered by others
    logits, labels, valid_out, _ = blend(
        grid, 2, lambda t, h, w: np.ones((2, h, w), np.float32), 0.1, valid=valid, skip=skip
    )
    np.testing.assert_array_equal(valid_out, valid)
    # Rows 64..96 lie only in the skipped tiles: no logits were added, nothing is valid there.
    assert not valid_out[64:96].any()


def test_validity_is_the_union_over_tiles() -> None:
    grid = TileGrid(40, 40, 32, 8)  # 0, 8 on both axes: every pixel seen by up to four tiles
    valid = np.random.default_rng(1).random((40, 40)) > 0.3
    _, _, valid_out, _ = blend(grid, 2, lambda t, h, w: np.zeros((2, h, w), np.float32), 0.2, valid=valid)
    np.testing.assert_array_equal(valid_out, valid)


def test_tiles_out_of_grid_order_are_refused() -> None:
    grid = TileGrid(300, 64, 64, 16)
    blender = TileBlender(grid, 2, 0.1)
    tiles = list(grid)
    ones, valid = np.ones((2, 64, 64), np.float32), np.ones((64, 64), bool)
    blender.add(tiles[2], ones, valid)
    with pytest.raises(AssertionError, match="grid order"):
        blender.add(tiles[1], ones, valid)


def test_a_tile_of_the_wrong_size_is_refused() -> None:
    grid = TileGrid(100, 70, 64, 16)  # columns 0 and 6: the tiles are 64 wide
    blender = TileBlender(grid, 2, 0.1)
    with pytest.raises(AssertionError, match=r"needs \(2, 64, 64\) logits"):
        blender.add(next(iter(grid)), np.ones((2, 64, 70), np.float32), np.ones((64, 70), bool))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_argmax_classes_is_argmax(k: int, h: int, w: int, seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    scores = (
        rng.integers(-3, 4, (k, h, w)).astype(np.float32)
        if ties
        else rng.normal(size=(k, h, w)).astype(np.float32)
    )
    labels = argmax_classes(scores)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.argmax(scores, axis=0))  # ties go to the first class, as argmax


def test_argmax_classes_past_256_classes() -> None:
    scores = np.zeros((300, 2, 3), np.float32)
    scores[299, 0, 0] = 1.0
    scores[3, 1, 2] = 1.0
    labels = argmax_classes(scores)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, np.argmax(scores, axis=0))


def test_finished_rows_labels_follow_the_blended_logits() -> None:
    grid = TileGrid(70, 50, 32, 8)
    field = np.random.default_rng(3).normal(size=(4, 70, 50)).astype(np.float32)
    logits, labels, _, _ = blend(grid, 4, lambda t, h, w: field[:, t.y : t.y + h, t.x : t.x + w], 0.1)
    np.testing.assert_array_equal(labels, np.argmax(field, axis=0))


# --- the same blender on torch tensors (the GPU path) ---------------------------------------------------------

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def finished_rows_on(device: str | None, grid: TileGrid, k: int, floor: float, keep: bool, seed: int) -> list:
    """Every FinishedRows of a blender on ``device`` (None: numpy) fed the same seeded tiles, some skipped."""
    rng = np.random.default_rng(seed)
    valid = rng.random((grid.height, grid.width)) > 0.2
    blender = TileBlender(grid, k, floor, keep_logits=keep, device=device)
    out = []
    for tile in grid:
        h, w = min(tile.size, grid.height - tile.y), min(tile.size, grid.width - tile.x)
        values = rng.normal(size=(k, h, w)).astype(np.float32)
        if rng.random() < 0.15:
            continue  # a skipped (all-nodata) tile
        tile_valid = valid[tile.y : tile.y + h, tile.x : tile.x + w]
        if device is not None:
            values, tile_valid = torch.from_numpy(values).to(device), torch.from_numpy(tile_valid.copy()).to(device)
        out += blender.add(tile, values, tile_valid)
    return out + blender.finish()


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(grids(max_side=120), floors, st.booleans(), st.integers(0, 2**31 - 1))
def test_blender_on_torch_tensors_equals_the_numpy_blender(
    device: str, grid: TileGrid, floor: float, keep: bool, seed: int
) -> None:
    expected = finished_rows_on(None, grid, 5, floor, keep, seed)
    got = finished_rows_on(device, grid, 5, floor, keep, seed)
    assert [f.row for f in got] == [f.row for f in expected]
    for a, b in zip(got, expected, strict=True):
        assert isinstance(a.labels, np.ndarray) and a.labels.dtype == b.labels.dtype == np.uint8
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_array_equal(a.labels, b.labels)
        if keep:  # the same float32 products and sums, in the same order
            np.testing.assert_array_equal(a.sums, b.sums)
            np.testing.assert_array_equal(a.logits(), b.logits())
        else:
            assert a.sums is None


@pytest.mark.parametrize("device", DEVICES)
def test_blender_on_torch_tensors_past_256_classes(device: str) -> None:
    grid = TileGrid(40, 30, 32, 8)
    expected = finished_rows_on(None, grid, 300, 0.1, False, 4)
    got = finished_rows_on(device, grid, 300, 0.1, False, 4)
    for a, b in zip(got, expected, strict=True):
        assert a.labels.dtype == np.uint16
        np.testing.assert_array_equal(a.labels, b.labels)
        assert len(np.unique(a.labels[a.valid])) > 100, "the check means something"
