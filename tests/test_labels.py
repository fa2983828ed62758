import importlib.util
import json
import sqlite3
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.errors import ConfigError, InputError
from geoseg.labels import IGNORE, ClassMap, Grid, Region, open_labels, parse_region, read_vector
from geoseg.modelfile import ClassSpec

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# fiona is an extra (geoseg[vector], which CI installs); the tests that read vector files skip without it
needs_fiona = pytest.mark.skipif(importlib.util.find_spec("fiona") is None, reason="fiona is not installed (pip install 'geoseg[vector]')")
CRS_UTM = "EPSG:32618"
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0)
GRID = Grid(40, 30, CRS.from_string(CRS_UTM), TRANSFORM)
CLASSES = ClassMap(
    (ClassSpec(1, "Water", "#0000ff"), ClassSpec(2, "Forest", "#00aa00"), ClassSpec(5, "Urban", "#aa0000")), 0
)


def pixel_box(col0: int, row0: int, col1: int, row1: int) -> list[list[float]]:
    """Polygon ring covering pixels [col0, col1) x [row0, row1) of GRID, in map coordinates."""
    x0, y0 = TRANSFORM @ (col0, row0)
    x1, y1 = TRANSFORM @ (col1, row1)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write_geojson(
    path: Path, features: list[tuple[list[list[float]], dict[str, Any]]], crs: str | None = CRS_UTM
) -> Path:
    doc: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}
            for ring, props in features
        ],
    }
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def write_gpkg(
    path: Path, features: list[tuple[list[list[float]], dict[str, Any]]], epsg: int = 32618
) -> Path:
    """A minimal GeoPackage: one polygon feature table, geometries as GP header + WKB."""
    import shapely

    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT, srs_id INTEGER PRIMARY KEY, organization TEXT,
            organization_coordsys_id INTEGER, definition TEXT, description TEXT);
        CREATE TABLE gpkg_contents (table_name TEXT PRIMARY KEY, data_type TEXT, identifier TEXT,
            description TEXT, last_change TEXT, min_x REAL, min_y REAL, max_x REAL, max_y REAL,
            srs_id INTEGER);
        CREATE TABLE gpkg_geometry_columns (table_name TEXT, column_name TEXT, geometry_type_name TEXT,
            srs_id INTEGER, z INTEGER, m INTEGER);
        CREATE TABLE fields (fid INTEGER PRIMARY KEY, geom BLOB, landcover TEXT);
        """
    )
    con.execute(
        "INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, 'EPSG', ?, ?, '')",
        ("utm", epsg, epsg, CRS.from_epsg(epsg).to_wkt()),
    )
    con.execute(
        "INSERT INTO gpkg_contents VALUES ('fields', 'features', 'fields', '', '', 0, 0, 0, 0, ?)", (epsg,)
    )
    con.execute("INSERT INTO gpkg_geometry_columns VALUES ('fields', 'geom', 'POLYGON', ?, 0, 0)", (epsg,))
    for ring, props in features:
        # flags 0b00000011: little-endian header, a 32-byte xy envelope
        polygon = shapely.Polygon(ring)
        header = b"GP" + bytes([0, 0b11]) + struct.pack("<i", epsg) + struct.pack("<4d", *polygon.bounds)
        con.execute(
            "INSERT INTO fields (geom, landcover) VALUES (?, ?)",
            (header + shapely.to_wkb(polygon), props["landcover"]),
        )
    con.commit()
    con.close()
    return path


def write_label_raster(
    path: Path,
    values: np.ndarray,
    nodata: float | None = None,
    transform: Affine = TRANSFORM,
    crs: str = CRS_UTM,
) -> Path:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=values.shape[1],
        height=values.shape[0],
        count=1,
        dtype=values.dtype.name,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(values, 1)
    return path


def test_vector_labels_rasterise_onto_the_right_pixels(tmp_path: Path) -> None:
    path = write_geojson(
        tmp_path / "labels.geojson",
        [
            (pixel_box(2, 3, 10, 8), {"cls": "forest"}),
            (pixel_box(5, 5, 7, 7), {"cls": 5}),
            (pixel_box(20, 0, 40, 2), {"cls": "1"}),
        ],
    )
    labels = open_labels(path, GRID, CLASSES, "cls")
    out = labels.read(GRID.window)
    expected = np.full((30, 40), IGNORE, np.uint8)
    expected[3:8, 2:10] = 1  # Forest, index 1
    expected[5:7, 5:7] = 2  # Urban (id 5) drawn over it: later features win
    expected[0:2, 20:40] = 0  # Water by id given as text
    np.testing.assert_array_equal(out, expected)
    # a window reads the same pixels as the full grid
    np.testing.assert_array_equal(labels.read(Window(4, 2, 10, 7)), expected[2:9, 4:14])


def test_vector_labels_are_reprojected(tmp_path: Path) -> None:
    from rasterio.warp import transform_geom

    ring = pixel_box(10, 10, 20, 20)
    lonlat = transform_geom(CRS_UTM, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    path = write_geojson(tmp_path / "wgs84.geojson", [(lonlat["coordinates"][0], {"cls": "Water"})], crs=None)
    out = open_labels(path, GRID, CLASSES, "cls").read(GRID.window)
    inside = out == 0
    # the reprojected square still covers the same 10x10 pixels (edges may move by a pixel at most)
    assert 81 <= inside.sum() <= 121
    assert inside[11:19, 11:19].all() and not inside[:9].any() and not inside[:, :9].any()


@needs_fiona
def test_geopackage_labels(tmp_path: Path) -> None:
    path = write_gpkg(tmp_path / "fields.gpkg", [(pixel_box(0, 0, 4, 4), {"landcover": "URBAN"})])
    data = read_vector(path)
    assert data.crs == CRS.from_epsg(32618)
    assert data.properties[0]["landcover"] == "URBAN"
    out = open_labels(path, GRID, CLASSES, "landcover").read(Window(0, 0, 6, 6))
    assert (out[:4, :4] == 2).all() and (out[4:, :] == IGNORE).all()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")
@needs_fiona
def test_real_geopackage_reads() -> None:
    data = read_vector(SHARED_DATA / "zion-landsat8-nlcd" / "zion_park_boundary.gpkg")
    assert len(data.geometries) == 1 and data.crs is not None and data.crs.is_projected
    assert data.geometries[0].area > 5e8  # Zion National Park is about 590 km^2


def test_vector_label_errors(tmp_path: Path) -> None:
    path = write_geojson(tmp_path / "l.geojson", [(pixel_box(0, 0, 4, 4), {"kind": "Water"})])
    with pytest.raises(InputError, match=r"l\.geojson.*no feature has the class attribute 'cls'.*kind"):
        open_labels(path, GRID, CLASSES, "cls")
    with pytest.raises(InputError, match="need a class attribute"):
        open_labels(path, GRID, CLASSES, None)
    bad = write_geojson(
        tmp_path / "bad.geojson",
        [(pixel_box(0, 0, 4, 4), {"cls": "Glacier"}), (pixel_box(0, 0, 1, 1), {"cls": 7})],
    )
    with pytest.raises(InputError, match=r"'Glacier', 7 match no class"):
        open_labels(bad, GRID, CLASSES, "cls")
    with pytest.raises(InputError, match="not found"):
        open_labels(tmp_path / "missing.geojson", GRID, CLASSES, "cls")


def test_raster_labels_map_ids_and_ignore(tmp_path: Path) -> None:
    values = np.zeros((30, 40), np.uint8)
    values[:10] = 1
    values[10:20] = 5
    values[20:, :5] = 9  # nodata
    path = write_label_raster(tmp_path / "labels.tif", values, nodata=9)
    out = open_labels(path, GRID, CLASSES).read(GRID.window)
    assert (out[:10] == 0).all() and (out[10:20] == 2).all()
    assert (out[20:] == IGNORE).all()  # 0 is the ignore index, 9 is nodata


def test_raster_label_errors(tmp_path: Path) -> None:
    values = np.ones((30, 40), np.uint8)
    values[3, 4] = 7
    with pytest.raises(InputError, match=r"values 7 are not in the classes file"):
        open_labels(write_label_raster(tmp_path / "a.tif", values), GRID, CLASSES)
    shifted = write_label_raster(
        tmp_path / "b.tif", np.ones((30, 40), np.uint8), transform=TRANSFORM @ Affine.translation(1, 0)
    )
    with pytest.raises(InputError, match=r"b\.tif: label raster is not on the image's grid: transform"):
        open_labels(shifted, GRID, CLASSES)
    other_crs = write_label_raster(tmp_path / "c.tif", np.ones((30, 40), np.uint8), crs="EPSG:32617")
    with pytest.raises(InputError, match="CRS EPSG:32617, expected EPSG:32618"):
        open_labels(other_crs, GRID, CLASSES)
    small = write_label_raster(tmp_path / "d.tif", np.ones((20, 40), np.uint8))
    with pytest.raises(InputError, match="size 40x20 px, expected 40x30"):
        open_labels(small, GRID, CLASSES)


def test_class_map() -> None:
    assert CLASSES.index_of_attribute("urban") == 2
    assert CLASSES.index_of_attribute(" WATER ") == 0
    assert CLASSES.index_of_attribute(5) == 2 and CLASSES.index_of_attribute(5.0) == 2
    assert CLASSES.index_of_attribute(3) is None and CLASSES.index_of_attribute(None) is None
    assert CLASSES.unknown_values(np.array([0, 1, 2, 5, 7, 9]), nodata=9) == [7]
    np.testing.assert_array_equal(CLASSES.to_indexes(np.array([1, 2, 5, 0, 3])), [0, 1, 2, IGNORE, IGNORE])


def test_regions(tmp_path: Path) -> None:
    rows = Region.rows("5:12").on(GRID)
    assert (rows.bbox.row_off, rows.bbox.height, rows.bbox.width) == (5, 7, 40)
    mask = rows.mask(Window(0, 0, 40, 30))
    assert mask[5:12].all() and not mask[:5].any() and not mask[12:].any()
    assert rows.intersects(Window(0, 10, 8, 8)) and not rows.intersects(Window(0, 12, 8, 8))
    with pytest.warns(UserWarning, match=r"runs past the 40x30 px image; using window 30,25,10,5"):
        win = Region.window("30,25,20,20").on(GRID)  # clipped to the grid, and recorded so
    assert (win.bbox.col_off, win.bbox.row_off, win.bbox.width, win.bbox.height) == (30, 25, 10, 5)
    assert win.region.describe() == "window 30,25,10,5"
    aoi = write_geojson(tmp_path / "aoi.geojson", [(pixel_box(3, 4, 9, 6), {})])
    poly = Region.aoi(aoi).on(GRID)
    mask = poly.mask(GRID.window)
    assert mask.sum() == 12 and mask[4:6, 3:9].all()
    assert (
        not poly.is_rectangular
        and poly.intersects(Window(8, 5, 4, 4))
        and not poly.intersects(Window(20, 20, 4, 4))
    )
    with pytest.raises(InputError, match="outside"):
        Region.rows("100:200").on(GRID)


@pytest.mark.parametrize("text", ["5", "12:5", "a:b", "-1:3"])
def test_bad_rows(text: str) -> None:
    with pytest.raises(ConfigError, match="rows must be A:B"):
        Region.rows(text)


def test_parse_region() -> None:
    assert parse_region().kind == "all"
    assert parse_region(window="0,0,4,4").kind == "window"
    with pytest.raises(ConfigError, match="at most one"):
        parse_region(rows="0:4", window="0,0,4,4")
    with pytest.raises(ConfigError, match="window must be"):
        parse_region(window="0,0,0,4")


PROJECTED_NO_CRS = {  # UTM metres in a GeoJSON without "crs": read as WGS 84, as RFC 7946 says
    "type": "FeatureCollection",
    "features": [{"type": "Feature", "properties": {"lc": 2}, "geometry": {"type": "Polygon", "coordinates": [
        [[500000, 4199500], [500500, 4199500], [500500, 4200000], [500000, 4200000], [500000, 4199500]]]}}],
}


@needs_fiona
@pytest.mark.parametrize("content", [PROJECTED_NO_CRS, []], ids=["projected-without-crs", "top-level-list"])
@pytest.mark.parametrize("command", ["train --labels", "train --val-aoi", "evaluate --aoi", "predict --aoi"])
def test_bad_geojson_is_a_one_line_error_everywhere(
    command: str, content: Any, runner: Any, make_scene: Any, tiny_model_file: Path, tmp_path: Path
) -> None:
    """Each place reading polygons names the file and the problem instead of a PROJ traceback."""
    from geoseg.cli import main

    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps(content))
    scene = make_scene()
    with rasterio.open(scene) as src:
        profile = src.profile | {"count": 1, "dtype": "uint8"}
    labels = tmp_path / "labels.tif"
    with rasterio.open(labels, "w", **profile) as dst:
        dst.write(np.full((profile["height"], profile["width"]), 2, np.uint8), 1)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classes": [{"id": c.id, "name": c.name, "color": c.color}
                                               for c in CLASSES.classes]}))
    train = ["train", "--image", str(scene), "--classes", str(classes), "--steps", "1", "--window-px", "32",
             "--out", str(tmp_path / "m.safetensors"), "-q"]
    args = {
        "train --labels": [*train, "--labels", str(bad), "--label-attribute", "lc"],
        "train --val-aoi": [*train, "--labels", str(labels), "--val-aoi", str(bad)],
        "evaluate --aoi": ["evaluate", str(labels), str(labels), "--classes", str(classes), "--aoi", str(bad)],
        "predict --aoi": ["predict", str(scene), str(tmp_path / "lc.tif"), "--model", str(tiny_model_file),
                          "--aoi", str(bad), "-q"],
    }[command]
    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: "), result.output
    if content:
        assert "are not longitude/latitude" in lines[0] and 'without a "crs"' in lines[0]
    elif command != "predict --aoi":  # predict reads areas of interest through GDAL, which says it cannot
        assert "the top level is a list" in lines[0]


def test_reprojection_failures_are_input_errors() -> None:
    """PROJ's own errors (rasterio's CPLE_* family, not RasterioErrors) become one-line InputErrors."""
    shapely = pytest.importorskip("shapely")
    from geoseg.labels import VectorData, geometries_on_grid

    # UTM coordinates far outside the projection's domain, placed on a lon/lat grid.
    far = VectorData((shapely.box(1e8, 1e8, 1.1e8, 1.1e8),), ({},), CRS.from_string(CRS_UTM), "far.gpkg")
    lonlat = Grid(40, 30, CRS.from_epsg(4326), Affine(0.001, 0, -75, 0, -0.001, 40))
    with pytest.raises(InputError, match=r"^far.gpkg: cannot reproject to the image CRS \(.*domain"):
        geometries_on_grid(far, lonlat)


def test_polygons_that_miss_the_image_are_blamed_on_the_label_file(tmp_path: Path) -> None:
    far = write_geojson(tmp_path / "far.geojson", [(pixel_box(1000, 1000, 1010, 1010), {"cls": 1})])
    with pytest.raises(InputError, match=r"^.*far\.geojson: the polygons \(.*\) do not overlap the 40x30 px image$"):
        open_labels(far, GRID, CLASSES, "cls")
    near = write_geojson(tmp_path / "near.geojson", [(pixel_box(35, 25, 45, 35), {"cls": 1})])  # partly inside
    assert (open_labels(near, GRID, CLASSES, "cls").read(GRID.window) != IGNORE).sum() == 5 * 5
