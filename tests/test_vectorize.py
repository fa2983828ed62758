"""Polygons of class regions (geoseg.vectorize, ``geoseg predict --vector``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.features
from affine import Affine

from geoseg.errors import OutputError
from geoseg.modelfile import ClassSpec
from geoseg.stats import count_raster

shapely = pytest.importorskip("shapely")
fiona = pytest.importorskip("fiona")
from shapely.geometry import shape  # noqa: E402

import geoseg.vectorize  # noqa: E402
from geoseg.vectorize import iter_regions, vectorize_raster  # noqa: E402

CLASSES = (ClassSpec(1, "water", "#0000ff"), ClassSpec(2, "forest", "#00aa00"), ClassSpec(3, "urban", "#aa0000"))
NODATA = 255
UTM = "EPSG:32612"
TRANSFORM = Affine(30.0, 0.0, 300000.0, 0.0, -30.0, 4100000.0)


def blocky_classes(height: int = 100, width: int = 90, seed: int = 0, cell: int = 7) -> np.ndarray:
    """Seeded class map of 1..3: cells of ``cell`` px (regions cross block borders), 5 % single-pixel
    noise, and a nodata rectangle."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(1, 4, (height // cell + 1, width // cell + 1))
    data = np.kron(cells, np.ones((cell, cell), int))[:height, :width].astype("uint8")
    noise = rng.random((height, width)) < 0.05
    data[noise] = rng.integers(1, 4, int(noise.sum()))
    data[40:47, 10:50] = NODATA
    return data


def write_classes(path: Path, data: np.ndarray, crs: Any = UTM, transform: Affine = TRANSFORM) -> Path:
    profile = {"driver": "GTiff", "width": data.shape[1], "height": data.shape[0], "count": 1, "dtype": "uint8",
               "crs": crs, "transform": transform, "nodata": NODATA}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def reference_regions(data: np.ndarray) -> list[tuple[int, Any]]:
    """Regions of the whole raster at once, in pixel coordinates: what block-wise polygons must equal."""
    shapes = rasterio.features.shapes(data, mask=data != NODATA, connectivity=4, transform=Affine.identity())
    return [(int(value), shape(geometry)) for geometry, value in shapes]


def assert_same_regions(found: list[tuple[int, Any]], expected: list[tuple[int, Any]]) -> None:
    assert len(found) == len(expected)
    tree = shapely.STRtree([polygon for _, polygon in expected])
    for value, polygon in found:
        # Pixel regions only share boundaries, so the one region a polygon lies within is its twin.
        (match,) = tree.query(polygon, predicate="within")
        assert expected[match][0] == value
        assert expected[match][1].equals(polygon)


def seam_segments(polygon: Any, data: np.ndarray, block_px: int) -> list[tuple[str, int, int]]:
    """Unit edges of a polygon's boundary (pixel coordinates) that lie on an internal block line
    between two pixels of the same class: seams a block-wise polygonisation must not leave."""
    height, width = data.shape
    seams = []
    for ring in [polygon.exterior, *polygon.interiors]:
        xy = np.asarray(ring.coords)
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
            if x0 == x1 and x0 % block_px == 0 and 0 < x0 < width:
                for y in range(int(min(y0, y1)), int(max(y0, y1))):
                    if data[y, int(x0) - 1] == data[y, int(x0)]:
                        seams.append(("x", int(x0), y))
            if y0 == y1 and y0 % block_px == 0 and 0 < y0 < height:
                for x in range(int(min(x0, x1)), int(max(x0, x1))):
                    if data[int(y0) - 1, x] == data[int(y0), x]:
                        seams.append(("y", int(y0), x))
    return seams


@pytest.mark.parametrize("block_px", [8, 16, 33, 1024])
def test_block_wise_regions_equal_the_whole_raster_regions(tmp_path: Path, block_px: int) -> None:
    data = blocky_classes()
    path = write_classes(tmp_path / "classes.tif", data)
    found = list(iter_regions(path, block_px=block_px))
    assert_same_regions(found, reference_regions(data))
    assert not [s for _, polygon in found for s in seam_segments(polygon, data, block_px)]


def test_a_region_spanning_four_blocks_is_one_polygon_without_seams(tmp_path: Path) -> None:
    data = np.full((64, 64), 2, np.uint8)
    data[10:50, 12:52] = 1  # crosses the block lines x = 32 and y = 32
    data[30:34, 30:34] = 3  # a hole right on the block corner
    path = write_classes(tmp_path / "classes.tif", data)
    regions = list(iter_regions(path, block_px=32))
    water = [polygon for value, polygon in regions if value == 1]
    assert len(water) == 1
    assert water[0].area == 40 * 40 - 16
    assert len(water[0].interiors) == 1
    assert not seam_segments(water[0], data, 32)
    assert sorted(value for value, _ in regions) == [1, 2, 3]


def test_regions_meeting_at_a_block_corner_point_stay_apart(tmp_path: Path) -> None:
    data = np.full((32, 32), 2, np.uint8)
    data[8:16, 8:16] = 1
    data[16:24, 16:24] = 1  # touches the first square only at the corner (16, 16): 4-connected, two regions
    path = write_classes(tmp_path / "classes.tif", data)
    water = [polygon for value, polygon in iter_regions(path, block_px=16) if value == 1]
    assert sorted(p.area for p in water) == [64, 64]


def read_features(path: Path) -> tuple[Any, list[dict[str, Any]]]:
    with fiona.open(path) as src:
        return src.crs, [{"geometry": shape(f.geometry), **dict(f.properties)} for f in src]


def class_areas(features: list[dict[str, Any]], key: str = "area") -> dict[int, float]:
    areas: dict[int, float] = {}
    for f in features:
        areas[f["class_id"]] = areas.get(f["class_id"], 0.0) + f[key]
    return areas


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_polygon_file_matches_the_raster(tmp_path: Path, suffix: str) -> None:
    data = blocky_classes(seed=1)
    raster = write_classes(tmp_path / "classes.tif", data)
    dst = tmp_path / f"regions{suffix}"
    result = vectorize_raster(raster, dst, CLASSES, block_px=16)
    crs, features = read_features(dst)
    assert crs.to_epsg() == 32612
    assert result.polygons == len(features) == len(reference_regions(data))
    assert {(f["class_id"], f["class_name"]) for f in features} == {(c.id, c.name) for c in CLASSES}
    for f in features:
        assert f["area"] == pytest.approx(f["geometry"].area)
        assert "area_m2" not in f  # metres already
    # Map coordinates: every polygon inside the raster's bounds, on the pixel grid.
    with rasterio.open(raster) as ds:
        bounds = ds.bounds
    assert shapely.union_all([f["geometry"] for f in features]).within(shapely.box(*bounds))
    table = {row.id: row.area_m2 for row in count_raster(raster, CLASSES)}
    assert class_areas(features) == pytest.approx(table, rel=1e-12)
    assert list(tmp_path.glob(".*")) == []  # no temporary file left


def test_geographic_raster_gets_square_metres(tmp_path: Path) -> None:
    data = blocky_classes(seed=2)
    transform = Affine(0.001, 0.0, -112.0, 0.0, -0.001, 37.5)
    raster = write_classes(tmp_path / "classes.tif", data, crs="EPSG:4326", transform=transform)
    dst = tmp_path / "regions.gpkg"
    vectorize_raster(raster, dst, CLASSES, block_px=32)
    _, features = read_features(dst)
    table = {row.id: row.area_m2 for row in count_raster(raster, CLASSES)}
    # Polygons: ellipsoidal equal-area projection; the table: the authalic sphere (within 0.5 %).
    assert class_areas(features, "area_m2") == pytest.approx(table, rel=5e-3)
    degrees = {row.id: row.pixels * 1e-6 for row in count_raster(raster, CLASSES)}
    assert class_areas(features) == pytest.approx(degrees, rel=1e-9)


@pytest.mark.parametrize("group", [None, 7])
def test_simplified_polygons_keep_the_coverage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: int | None) -> None:
    # group=7: simplified a few regions at a time; edges between groups stay exact, so still no gap or overlap.
    if group is not None:
        monkeypatch.setattr(geoseg.vectorize, "SIMPLIFY_GROUP", group)
    data = blocky_classes(seed=3, cell=12)
    raster = write_classes(tmp_path / "classes.tif", data)
    exact, simple = tmp_path / "exact.gpkg", tmp_path / "simple.gpkg"
    vectorize_raster(raster, exact, CLASSES, block_px=32)
    vectorize_raster(raster, simple, CLASSES, block_px=32, simplify=45.0)
    _, exact_features = read_features(exact)
    _, simple_features = read_features(simple)
    vertices = [sum(shapely.get_num_coordinates(f["geometry"]) for f in fs) for fs in (exact_features, simple_features)]
    assert vertices[1] < 0.8 * vertices[0]
    polygons = [f["geometry"] for f in simple_features]
    assert all(p.is_valid and not p.is_empty for p in polygons)
    # Shared edges simplified once: no overlaps (areas add up to the union's) and the same outline.
    union = shapely.union_all(polygons)
    assert sum(p.area for p in polygons) == pytest.approx(union.area, rel=1e-9)
    exact_union = shapely.union_all([f["geometry"] for f in exact_features])
    assert union.symmetric_difference(exact_union).area < 1e-9 * exact_union.area  # the outer edge stays exact
    table = {row.id: row.area_m2 for row in count_raster(raster, CLASSES)}
    assert class_areas(simple_features) == pytest.approx(table, rel=0.03)


def test_min_area_drops_small_regions(tmp_path: Path) -> None:
    data = blocky_classes(seed=4)
    raster = write_classes(tmp_path / "classes.tif", data)
    dst = tmp_path / "regions.gpkg"
    pixel_m2 = 30.0 * 30.0
    result = vectorize_raster(raster, dst, CLASSES, block_px=16, min_area=5 * pixel_m2)
    _, features = read_features(dst)
    reference = reference_regions(data)
    small = [(v, p) for v, p in reference if p.area < 5]
    assert small and result.dropped == len(small)
    assert len(features) == len(reference) - len(small)
    assert min(f["area"] for f in features) >= 5 * pixel_m2
    expected = {row.id: row.area_m2 for row in count_raster(raster, CLASSES)}
    for value, polygon in small:
        expected[value] -= polygon.area * pixel_m2
    assert class_areas(features) == pytest.approx(expected, rel=1e-12)


def test_unknown_extension_is_refused(tmp_path: Path) -> None:
    raster = write_classes(tmp_path / "classes.tif", blocky_classes())
    with pytest.raises(OutputError, match=r"regions\.shp: polygon output must end in \.gpkg or \.geojson"):
        vectorize_raster(raster, tmp_path / "regions.shp", CLASSES)


def test_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.vectorize

    raster = write_classes(tmp_path / "classes.tif", blocky_classes())
    real = geoseg.vectorize.iter_regions

    def failing(*args: Any, **kwargs: Any) -> Any:
        for i, region in enumerate(real(*args, **kwargs)):
            if i == 50:
                raise KeyboardInterrupt
            yield region

    monkeypatch.setattr(geoseg.vectorize, "iter_regions", failing)
    with pytest.raises(KeyboardInterrupt):
        vectorize_raster(raster, tmp_path / "regions.gpkg", CLASSES, block_px=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.tif"]


def test_predict_writes_polygons_matching_its_class_raster(
    make_scene: Any, tiny_loaded_model: Any, tmp_path: Path
) -> None:
    from geoseg.config import PredictConfig
    from geoseg.outputs import OutputOptions
    from geoseg.pipeline import predict_scene

    invalid = np.zeros((80, 96), bool)
    invalid[:10, :30] = True
    scene = make_scene(nodata=0, invalid=invalid)
    dst, vector = tmp_path / "out.tif", tmp_path / "out.gpkg"
    predict_scene(scene, dst, PredictConfig(), model=tiny_loaded_model, outputs=OutputOptions(vector=vector))
    _, features = read_features(vector)
    table = {row.id: row.area_m2 for row in count_raster(dst, tiny_loaded_model.metadata.classes) if row.pixels}
    assert class_areas(features) == pytest.approx(table, rel=1e-12)
    nodata_box = shapely.box(500000.0, 4200000.0 - 100, 500000.0 + 300, 4200000.0)
    assert all(f["geometry"].intersection(nodata_box).area == 0 for f in features)


def test_cli_vector_errors_are_one_line(runner: Any, make_scene: Any, tiny_model_file: Path, tmp_path: Path) -> None:
    from geoseg.cli import main

    scene = make_scene()
    out = tmp_path / "out.tif"
    base = ["predict", str(scene), str(out), "--model", str(tiny_model_file), "-q"]
    result = runner.invoke(main, [*base, "--vector", str(tmp_path / "regions.shp")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 'regions.shp'}: polygon output must end in "
                                                  ".gpkg or .geojson (got '.shp')"]
    existing = tmp_path / "regions.gpkg"
    existing.write_text("")
    result = runner.invoke(main, [*base, "--vector", str(existing)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {existing}: already exists (use --overwrite to replace it)"
    result = runner.invoke(main, [*base, "--vector", str(tmp_path / "missing" / "r.gpkg")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = runner.invoke(main, [*base, "--min-area", "10"])
    assert result.exit_code == 2 and "--vector" in result.output
    result = runner.invoke(main, [*base, "--vector", str(existing), "--simplify", "-1"])
    assert result.exit_code == 2
    assert not out.exists()  # every refusal came before any work


def test_cli_writes_polygons(runner: Any, make_scene: Any, tiny_model_file: Path, tmp_path: Path) -> None:
    from geoseg.cli import main

    scene = make_scene()
    out, vector = tmp_path / "out.tif", tmp_path / "out.geojson"
    args = ["predict", str(scene), str(out), "--model", str(tiny_model_file), "-q", "--vector", str(vector),
            "--simplify", "10", "--min-area", "200"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    crs, features = read_features(vector)
    assert crs.to_epsg() == 32618
    # The minimum area applies to the exact regions (simplifying moves their edges afterwards).
    exact = tmp_path / "exact.gpkg"
    vectorize_raster(out, exact, CLASSES, min_area=200)
    _, exact_features = read_features(exact)
    assert len(features) == len(exact_features) > 0
    assert min(f["area"] for f in exact_features) >= 200
