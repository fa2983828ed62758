"""The STAC Item of a class raster (geoseg.stac, ``geoseg predict --stac``), read back with pystac."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.warp
from affine import Affine

from geoseg.config import PredictConfig
from geoseg.outputs import OutputOptions
from geoseg.pipeline import predict_scene
from geoseg.stac import CLASSIFICATION_SCHEMA, PROJECTION_SCHEMA, RASTER_SCHEMA, build_item

pystac = pytest.importorskip("pystac")
from pystac.extensions.classification import ClassificationExtension  # noqa: E402
from pystac.extensions.projection import ProjectionExtension  # noqa: E402
from pystac.extensions.raster import RasterExtension  # noqa: E402


def predict_with_item(scene: Any, tmp_path: Path, model: Any, name: str = "item.json") -> tuple[Path, Any]:
    dst, stac = tmp_path / "out.tif", tmp_path / "meta" / name
    stac.parent.mkdir(exist_ok=True)
    predict_scene(scene, dst, PredictConfig(), model=model, outputs=OutputOptions(stac=stac))
    return dst, pystac.Item.from_file(str(stac))


def test_item_describes_the_class_raster(make_scene: Any, tiny_loaded_model: Any, tmp_path: Path) -> None:
    scene = make_scene()
    started = datetime.datetime.now(datetime.timezone.utc)
    dst, item = predict_with_item(scene, tmp_path, tiny_loaded_model)
    with rasterio.open(dst) as ds:
        bounds, transform, shape, nodata = ds.bounds, ds.transform, ds.shape, ds.nodata
        west, south, east, north = rasterio.warp.transform_bounds(ds.crs, "EPSG:4326", *bounds)
    assert item.id == "out"
    assert set(item.stac_extensions) >= {PROJECTION_SCHEMA, RASTER_SCHEMA, CLASSIFICATION_SCHEMA}
    assert item.bbox == pytest.approx([west, south, east, north], abs=1e-6)
    assert item.properties["geoseg:datetime_source"] == "prediction"
    assert started - datetime.timedelta(seconds=1) <= item.datetime <= datetime.datetime.now(datetime.timezone.utc)

    proj = ProjectionExtension.ext(item)
    assert proj.code == "EPSG:32618"
    assert proj.shape == list(shape)
    assert proj.transform == pytest.approx(list(transform)[:6])
    assert proj.bbox == pytest.approx(list(bounds))

    asset = item.assets["classes"]
    assert Path(asset.get_absolute_href()) == dst.resolve()
    assert asset.href == "../out.tif"  # relative: the item moves with the raster
    assert asset.roles == ["data"]
    assert asset.media_type == "image/tiff; application=geotiff"
    (band,) = RasterExtension.ext(asset).bands
    assert band.nodata == nodata and band.data_type == "uint8" and band.spatial_resolution == 10.0
    classes = ClassificationExtension.ext(asset).classes
    expected = tiny_loaded_model.metadata.classes
    assert [(c.value, c.name, c.color_hint) for c in classes] == [
        (c.id, c.name, c.color.lstrip("#").upper()) for c in expected
    ]

    (source,) = item.get_links("derived_from")
    assert Path(source.get_absolute_href()) == scene.resolve()
    model = item.properties["geoseg:model"]
    assert model == {"name": tiny_loaded_model.metadata.name, "sha256": tiny_loaded_model.sha256,
                     "file": tiny_loaded_model.path.name}
    assert "geoseg" in item.properties["processing:software"]


def test_footprint_follows_the_projection(make_scene: Any, tiny_loaded_model: Any, tmp_path: Path) -> None:
    # A UTM square is not a lon/lat rectangle: the sampled edges are curved and the bbox holds them.
    scene = make_scene(width=64, height=64, transform=Affine(1000.0, 0, 200000.0, 0, -1000.0, 6000000.0))
    _, item = predict_with_item(scene, tmp_path, tiny_loaded_model)
    ring = np.array(item.geometry["coordinates"][0])
    assert len(ring) == 81 and (ring[0] == ring[-1]).all()
    top_edge_lats = ring[:21, 1]
    assert np.ptp(top_edge_lats) > 0.01  # curved, not two corners
    west, south, east, north = item.bbox
    assert (ring[:, 0] >= west).all() and (ring[:, 0] <= east).all()
    assert (ring[:, 1] >= south).all() and (ring[:, 1] <= north).all()


def test_a_scene_without_a_crs_has_no_geometry(
    make_scene: Any, tiny_loaded_model: Any, tmp_path: Path
) -> None:
    # STAC's geometry is WGS 84: with nothing to place the raster, it is null and there is no bbox.
    scene = make_scene(width=40, height=30, crs=None)
    with pytest.warns(UserWarning, match="no CRS"):
        _, item = predict_with_item(scene, tmp_path, tiny_loaded_model)
    assert item.geometry is None and item.bbox is None
    assert json.loads((tmp_path / "meta" / "item.json").read_text()).keys() >= {"geometry"}


def test_datetime_comes_from_the_scene_tags(make_scene: Any, tiny_loaded_model: Any, tmp_path: Path) -> None:
    scene = make_scene()
    with rasterio.open(scene, "r+") as ds:
        ds.update_tags(TIFFTAG_DATETIME="2021:06:01 17:30:05")
    _, item = predict_with_item(scene, tmp_path, tiny_loaded_model)
    assert item.datetime == datetime.datetime(2021, 6, 1, 17, 30, 5, tzinfo=datetime.timezone.utc)
    assert item.properties["geoseg:datetime_source"] == "scene"


def test_band_files_are_all_linked(make_scene: Any, tiny_loaded_model: Any, tmp_path: Path) -> None:
    bands = [make_scene(f"B{i}.tif", count=1, seed=i) for i in range(4)]
    _, item = predict_with_item(bands, tmp_path, tiny_loaded_model)
    links = item.get_links("derived_from")
    assert [Path(link.get_absolute_href()) for link in links] == [b.resolve() for b in bands]


def test_cog_raster_is_marked_cloud_optimised(tmp_path: Path, tiny_metadata: Any) -> None:
    profile = {"driver": "COG", "width": 300, "height": 200, "count": 1, "dtype": "uint8", "nodata": 255,
               "crs": "EPSG:4326", "transform": Affine(0.01, 0, 10.0, 0, -0.01, 50.0)}
    raster = tmp_path / "cog.tif"
    with rasterio.open(raster, "w", **profile) as dst:
        dst.write(np.ones((1, 200, 300), np.uint8))
    item = build_item(raster, tiny_metadata().classes, item_path=tmp_path / "cog.json")
    assert item["assets"]["classes"]["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
    # Geographic already: the footprint is the bounds.
    assert item["bbox"] == pytest.approx([10.0, 48.0, 13.0, 50.0])
    assert item["properties"]["proj:code"] == "EPSG:4326"
    json.dumps(item)  # plain JSON


def test_stac_destination_errors(runner: Any, make_scene: Any, tiny_model_file: Path, tmp_path: Path) -> None:
    from geoseg.cli import main

    scene = make_scene()
    out = tmp_path / "out.tif"
    base = ["predict", str(scene), str(out), "--model", str(tiny_model_file), "-q"]
    result = runner.invoke(main, [*base, "--stac", str(tmp_path / "no" / "item.json")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'no' / 'item.json'}: folder {tmp_path / 'no'} does not exist"
    result = runner.invoke(main, [*base, "--stac", str(out)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {out}: --stac is also given as the class raster; choose another name"
    result = runner.invoke(main, [*base, "--stac", str(scene)])
    assert result.exit_code == 1 and "destination is the input scene" in result.output
    assert not out.exists()
    result = runner.invoke(main, [*base, "--stac", str(tmp_path / "item.json")])
    assert result.exit_code == 0, result.output
    assert pystac.Item.from_file(str(tmp_path / "item.json")).assets["classes"].href == "out.tif"
