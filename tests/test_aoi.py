"""--aoi: tiles outside the area of interest are never read, pixels outside are nodata in every output."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform, transform_geom
from rasterio.windows import Window

from geoseg.aoi import load_aoi
from geoseg.cli import main
from geoseg.config import PredictConfig
from geoseg.errors import InputError
from geoseg.io import open_scene
from geoseg.outputs import OutputOptions
from geoseg.pipeline import plan_grid, predict_scene

fiona = pytest.importorskip("fiona")  # reads the park boundary (geoseg[vector])

ZION = ("zion-landsat8-nlcd", "image_rgbn.tif")
PARK = ("zion-landsat8-nlcd", "zion_park_boundary.gpkg")
# conftest's make_scene grid: EPSG:32618, 10 m pixels, top-left corner at (500000, 4200000)
X0, Y0, PIXEL_M = 500000.0, 4200000.0, 10.0


def predict(src: Path, dst: Path, model: Any, outputs: OutputOptions, **config: Any) -> Any:
    config = {"device": "cpu", "tile": 64, "overlap": 16} | config
    return predict_scene(src, dst, PredictConfig(**config), model=model, outputs=outputs)


def pixel_box(col0: float, row0: float, col1: float, row1: float) -> shapely.Polygon:
    """A rectangle in make_scene's map coordinates, from pixel edges."""
    return shapely.box(X0 + col0 * PIXEL_M, Y0 - row1 * PIXEL_M, X0 + col1 * PIXEL_M, Y0 - row0 * PIXEL_M)


def write_vector(path: Path, geometries: list[Any], crs: str | None, driver: str = "GPKG") -> Path:
    schema = {"geometry": "Unknown", "properties": {"name": "str"}}
    with fiona.open(path, "w", driver=driver, schema=schema, crs=crs) as dst:
        for i, geom in enumerate(geometries):
            dst.write({"geometry": shapely.geometry.mapping(geom), "properties": {"name": f"area {i}"}})
    return path


def tile_windows(src: Path, model: Any) -> list[Window]:
    scene = open_scene(src, model.metadata)
    grid = plan_grid(scene, model.metadata, PredictConfig(tile=64, overlap=16))
    return [
        Window(t.x, t.y, min(t.size, scene.width - t.x), min(t.size, scene.height - t.y)) for t in grid
    ]


def read_windows(record: list[tuple[str, Any]]) -> list[Window]:
    return [w for method, w in record if method == "read" and w is not None]


# --- the real park boundary on a crop of the Zion scene --------------------------------------------------------


@pytest.fixture
def zion_crop(shared_data: Path, tmp_path: Path) -> Path:
    """Rows 320-640, columns 0-512 of the Zion scene: the park's western edge crosses it."""
    with rasterio.open(shared_data.joinpath(*ZION)) as src:
        window = Window(0, 320, 512, 320)
        crop_transform = src.transform @ Affine.translation(window.col_off, window.row_off)
        profile = src.profile | {"width": 512, "height": 320, "transform": crop_transform}
        path = tmp_path / "zion_crop.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path


def inside_park(shared_data: Path, scene: Path) -> np.ndarray:
    """Whether each pixel centre of ``scene`` lies in the park, tested point by point in the park's own CRS."""
    with fiona.open(shared_data.joinpath(*PARK)) as layer:
        park = shapely.union_all([shapely.geometry.shape(f.geometry) for f in layer])
        park_crs = CRS.from_wkt(layer.crs.to_wkt())
    with rasterio.open(scene) as ds:
        rows, cols = np.mgrid[0 : ds.height, 0 : ds.width]
        xs, ys = rasterio.transform.xy(ds.transform, rows.ravel(), cols.ravel(), offset="center")
        scene_crs, shape = ds.crs, ds.shape
    px, py = transform(scene_crs, park_crs, xs, ys)
    return shapely.contains_xy(park, np.asarray(px), np.asarray(py)).reshape(shape)


def test_real_park_boundary_in_another_crs(
    shared_data: Path, zion_crop: Path, tmp_path: Path, tiny_loaded_model, record_reads, count_forward
) -> None:
    park = shared_data.joinpath(*PARK)
    with fiona.open(park) as layer, rasterio.open(zion_crop) as ds:
        assert CRS.from_wkt(layer.crs.to_wkt()) != ds.crs, "the case this test is for: the CRSs differ"
    expected = inside_park(shared_data, zion_crop)
    assert 0.2 < expected.mean() < 0.8
    forward = count_forward(tiny_loaded_model)
    dst, stats, confidence = tmp_path / "classes.tif", tmp_path / "stats.json", tmp_path / "conf.tif"
    result = predict(zion_crop, dst, tiny_loaded_model, OutputOptions(aoi=str(park), stats=stats, confidence=confidence))

    with rasterio.open(dst) as ds:
        labels = ds.read(1)
    with rasterio.open(confidence) as ds:
        conf = ds.read(1)
    np.testing.assert_array_equal(labels != 255, expected)
    np.testing.assert_array_equal(conf != 0, expected)
    doc = json.loads(stats.read_text())
    assert doc["valid_pixels"] == int(expected.sum()) and doc["aoi"] == str(park)

    windows = tile_windows(zion_crop, tiny_loaded_model)
    touching = [w for w in windows if expected[w.toslices()].any()]
    reads = read_windows(record_reads)
    assert len(touching) < len(windows)
    assert result.tiles_predicted == len(touching) == forward["tiles"]
    assert sorted(map(tuple, map(Window.flatten, reads))) == sorted(map(tuple, map(Window.flatten, touching))), (
        "exactly the tiles holding a park pixel are read"
    )


# --- generated areas ------------------------------------------------------------------------------------------


def test_geojson_text_in_wgs84_with_a_hole(tmp_path: Path, make_scene, tiny_loaded_model, record_reads) -> None:
    src = make_scene(width=200, height=180)
    outer, hole = pixel_box(20, 10, 120, 90), pixel_box(50, 30, 80, 60)
    area = shapely.Polygon(outer.exterior, [hole.exterior])
    lonlat = transform_geom("EPSG:32618", "EPSG:4326", shapely.geometry.mapping(area))
    text = json.dumps({"type": "Feature", "geometry": lonlat, "properties": {}})
    dst, probs = tmp_path / "classes.tif", tmp_path / "probs.tif"
    predict(src, dst, tiny_loaded_model, OutputOptions(aoi=text, probabilities=probs))

    expected = np.zeros((180, 200), bool)
    expected[10:90, 20:120] = True
    expected[30:60, 50:80] = False
    with rasterio.open(dst) as ds:
        np.testing.assert_array_equal(ds.read(1) != 255, expected)
    with rasterio.open(probs) as ds:
        np.testing.assert_array_equal(ds.dataset_mask() > 0, expected)
    for window in read_windows(record_reads):
        assert window.row_off < 90 and window.col_off < 120, f"{window} lies outside the area but was read"


def test_two_separate_parts_skip_the_tiles_between(tmp_path: Path, make_scene, tiny_loaded_model, record_reads) -> None:
    src = make_scene(width=400, height=100)
    parts = [pixel_box(0, 0, 30, 100), pixel_box(370, 0, 400, 100)]
    vector = write_vector(tmp_path / "parts.gpkg", parts, "EPSG:32618")
    result = predict(src, tmp_path / "classes.tif", tiny_loaded_model, OutputOptions(aoi=str(vector)))
    with rasterio.open(tmp_path / "classes.tif") as ds:
        valid = ds.read(1) != 255
    assert valid[:, :30].all() and valid[:, 370:].all() and not valid[:, 30:370].any()
    assert {w.col_off for w in read_windows(record_reads)} == {0, 336}
    assert result.tiles_predicted == 4 < result.tiles_total


def test_an_invalid_bow_tie_is_repaired_and_logged(
    tmp_path: Path, make_scene, tiny_metadata, caplog: pytest.LogCaptureFixture
) -> None:
    src = make_scene(width=100, height=100)
    corners = [(0, 0), (100, 100), (100, 0), (0, 100), (0, 0)]  # pixel (col, row): two triangles meeting at (50, 50)
    bow_tie = shapely.Polygon([(X0 + c * PIXEL_M, Y0 - r * PIXEL_M) for c, r in corners])
    assert not bow_tie.is_valid
    vector = write_vector(tmp_path / "bow.geojson", [bow_tie], "EPSG:32618", driver="GeoJSON")
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        aoi = load_aoi(str(vector), open_scene(src, tiny_metadata()))
    assert "invalid polygon" in caplog.text and "Self-intersection" in caplog.text and "repaired" in caplog.text
    assert aoi.geometry.is_valid and aoi.geometry.area == pytest.approx(2 * 100 * 50 / 2)
    mask = aoi.mask(0, 0, 100, 100)
    rows, cols = np.mgrid[0:100, 0:100] + 0.5
    expected = ((cols > rows) & (cols + rows > 100)) | ((cols < rows) & (cols + rows < 100))  # left and right triangles
    off_the_edges = (cols != rows) & (cols + rows != 100)  # centres on an edge may go either way
    np.testing.assert_array_equal(mask[off_the_edges], expected[off_the_edges])


def test_a_layer_without_a_crs_is_taken_to_be_in_the_scene_crs(tmp_path: Path, make_scene, tiny_metadata) -> None:
    src = make_scene(width=100, height=100)
    vector = write_vector(tmp_path / "nocrs.gpkg", [pixel_box(10, 20, 30, 40)], None)
    aoi = load_aoi(str(vector), open_scene(src, tiny_metadata()))
    assert aoi.geometry.bounds == pytest.approx((10, 20, 30, 40))


# --- bad input: one-line errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_aoi", "fragment"),
    [
        (lambda d: str(write_vector(d / "far.gpkg", [pixel_box(500, 500, 600, 600)], "EPSG:32618")),
         "does not overlap the scene"),
        (lambda d: (d / "broken.gpkg").write_bytes(b"SQLite format 3\0 not really") and str(d / "broken.gpkg"),
         "not a vector file GDAL can read"),
        (lambda d: str(d / "missing.gpkg"), "area of interest file not found"),
        (lambda d: '{"type": "Polygon", "coordinates": [[[0, 0], [1, 0]', "not valid GeoJSON"),
        (lambda d: json.dumps({"type": "Point", "coordinates": [-75, 37.9]}), "needs polygons, found Point"),
        (lambda d: str(write_vector(d / "flat.gpkg", [shapely.Polygon([(X0, Y0), (X0 + 50, Y0), (X0 + 90, Y0), (X0, Y0)])],
                                    "EPSG:32618")),
         "has no area"),
        (lambda d: json.dumps({"type": "Polygon", "coordinates": [[[X0, Y0], [X0 + 90, Y0], [X0 + 90, Y0 - 90],
                                                                   [X0, Y0]]]}),
         'are not longitude/latitude, but its CRS is geographic (a GeoJSON without a "crs" member is WGS 84)'),
    ],
    ids=["misses-the-scene", "unreadable", "missing", "bad-geojson", "points", "zero-area", "metres-without-crs"],
)
def test_bad_areas_are_one_line_errors_and_write_nothing(
    tmp_path: Path, make_scene, tiny_model_file: Path, runner, make_aoi: Any, fragment: str
) -> None:
    src = make_scene(width=100, height=100)
    out = tmp_path / "out"
    out.mkdir()
    aoi = make_aoi(tmp_path)
    result = runner.invoke(main, ["predict", str(src), str(out / "classes.tif"), "--model", str(tiny_model_file),
                                  "--aoi", aoi, "--stats", str(out / "s.json")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    label = "--aoi GeoJSON" if aoi.startswith("{") else aoi
    assert label in errors[0] and "Traceback" not in result.output
    assert list(out.iterdir()) == []


def test_an_aoi_needs_a_scene_crs(tmp_path: Path, make_scene, tiny_metadata) -> None:
    with pytest.warns(UserWarning, match="no CRS"):
        scene = open_scene(make_scene(width=50, height=50, crs=None), tiny_metadata())
    vector = write_vector(tmp_path / "a.gpkg", [pixel_box(0, 0, 10, 10)], "EPSG:32618")
    with pytest.raises(InputError, match="has no CRS, so the area of interest cannot be placed"):
        load_aoi(str(vector), scene)


def test_a_shapefile_in_wgs84_finds_its_prj_beside_it(tmp_path: Path, make_scene, tiny_loaded_model) -> None:
    # predict_scene reads inside GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR; the .prj must still be found.
    src = make_scene(width=120, height=100)
    lonlat = shapely.geometry.shape(transform_geom("EPSG:32618", "EPSG:4326", shapely.geometry.mapping(pixel_box(0, 0, 60, 100))))
    vector = write_vector(tmp_path / "half.shp", [lonlat], "EPSG:4326", driver="ESRI Shapefile")
    assert vector.with_suffix(".prj").exists()
    predict(src, tmp_path / "classes.tif", tiny_loaded_model, OutputOptions(aoi=str(vector)))
    with rasterio.open(tmp_path / "classes.tif") as ds:
        valid = ds.read(1) != 255
    assert valid[:, :60].all() and not valid[:, 60:].any()


def test_a_tile_the_area_only_touches_has_no_pixel_inside() -> None:
    from geoseg.aoi import AreaOfInterest

    aoi = AreaOfInterest(shapely.union_all([shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)]), "two squares")
    assert not aoi.mask(0, 10, 10, 10).any(), "sharing an edge is not being inside"
    assert not aoi.mask(10, 0, 5, 40).any()
    mask = aoi.mask(0, 5, 10, 20)  # columns 5-25: half of each square
    assert mask[:, :5].all() and not mask[:, 5:15].any() and mask[:, 15:].all()
    assert aoi.mask(2, 2, 4, 4).all()
