import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from geoseg.cli import main
from geoseg.errors import InputError
from geoseg.evaluate import evaluate_rasters
from geoseg.labels import ClassMap, Region
from geoseg.modelfile import ClassSpec

CRS = "EPSG:32618"
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0)
CLASSES = ClassMap(
    (ClassSpec(1, "water", "#0000ff"), ClassSpec(2, "forest", "#00aa00"), ClassSpec(3, "urban", "#aa0000")), 0
)
CLASSES_JSON = {
    "ignore_index": 0,
    "classes": [{"id": c.id, "name": c.name, "color": c.color} for c in CLASSES.classes],
}


def write(
    path: Path,
    values: np.ndarray,
    nodata: int | None = None,
    crs: str = CRS,
    transform: Affine = TRANSFORM,
    tags: dict[str, str] | None = None,
    blocksize: int | None = None,
) -> str:
    extra = {"tiled": True, "blockxsize": blocksize, "blockysize": blocksize} if blocksize else {}
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
        **extra,
    ) as dst:
        dst.write(values, 1)
        if tags:
            dst.update_tags(**tags)
    return str(path)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str, np.ndarray, np.ndarray]:
    """A 40x48 reference and prediction with known disagreements, nodata and ignored pixels."""
    rng = np.random.default_rng(0)
    ref = rng.integers(1, 4, (40, 48)).astype(np.uint8)
    pred = ref.copy()
    flip = rng.random((40, 48)) < 0.3
    pred[flip] = rng.integers(1, 4, flip.sum())
    ref[0, :10] = 0  # ignore index
    pred[5, 5:20] = 255  # prediction nodata
    return write(tmp_path / "pred.tif", pred, nodata=255), write(tmp_path / "ref.tif", ref), pred, ref


def brute_confusion(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> np.ndarray:
    cm = np.zeros((3, 3), np.int64)
    for p, r in zip(pred[valid], ref[valid], strict=True):
        cm[r - 1, p - 1] += 1
    return cm


def test_matches_hand_counted_confusion(pair: tuple[str, str, np.ndarray, np.ndarray]) -> None:
    pred_path, ref_path, pred, ref = pair
    valid = (ref != 0) & (pred != 255)
    expected = brute_confusion(pred, ref, valid)
    metrics = evaluate_rasters(
        pred_path, ref_path, CLASSES, block_rows=7
    )  # blocks that do not divide the height
    np.testing.assert_array_equal(metrics.confusion, expected)
    assert metrics.pixels == valid.sum()
    assert metrics.overall_accuracy == pytest.approx(np.mean(pred[valid] == ref[valid]))


def test_tiny_hand_worked_example(tmp_path: Path) -> None:
    ref = np.array([[1, 1, 2], [2, 3, 3]], np.uint8)
    pred = np.array([[1, 2, 2], [2, 3, 1]], np.uint8)
    m = evaluate_rasters(write(tmp_path / "p.tif", pred), write(tmp_path / "r.tif", ref), CLASSES)
    np.testing.assert_array_equal(m.confusion, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    np.testing.assert_allclose(m.iou, [1 / 3, 2 / 3, 1 / 2])
    assert m.kappa == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("region", "rows", "cols"),
    [
        (Region.rows("10:25"), slice(10, 25), slice(0, 48)),
        (Region.window("5,8,20,12"), slice(8, 20), slice(5, 25)),
    ],
)
def test_region_restriction(
    pair: tuple[str, str, np.ndarray, np.ndarray], region: Region, rows: slice, cols: slice
) -> None:
    pred_path, ref_path, pred, ref = pair
    inside = np.zeros(ref.shape, bool)
    inside[rows, cols] = True
    valid = (ref != 0) & (pred != 255) & inside
    metrics = evaluate_rasters(pred_path, ref_path, CLASSES, region)
    np.testing.assert_array_equal(metrics.confusion, brute_confusion(pred, ref, valid))


def test_polygon_region(tmp_path: Path, pair: tuple[str, str, np.ndarray, np.ndarray]) -> None:
    pred_path, ref_path, pred, ref = pair
    x0, y0 = TRANSFORM @ (4, 6)
    x1, y1 = TRANSFORM @ (30, 22)
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(
        json.dumps(
            {
                "type": "Feature",
                "properties": {},
                "crs": {"type": "name", "properties": {"name": CRS}},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
            }
        )
    )
    inside = np.zeros(ref.shape, bool)
    inside[6:22, 4:30] = True
    valid = (ref != 0) & (pred != 255) & inside
    metrics = evaluate_rasters(pred_path, ref_path, CLASSES, Region.aoi(aoi))
    np.testing.assert_array_equal(metrics.confusion, brute_confusion(pred, ref, valid))


def test_classes_from_geoseg_tags(tmp_path: Path) -> None:
    values = np.array([[1, 2], [3, 3]], np.uint8)
    pred = write(
        tmp_path / "p.tif", values, tags={"CLASS_1": "water", "CLASS_2": "forest", "CLASS_3": "urban"}
    )
    metrics = evaluate_rasters(pred, write(tmp_path / "r.tif", values))
    assert metrics.class_names == ("water", "forest", "urban") and metrics.overall_accuracy == 1.0


def test_refuses_different_grids(tmp_path: Path) -> None:
    values = np.ones((10, 12), np.uint8)
    ref = write(tmp_path / "ref.tif", values)
    other_crs = write(tmp_path / "utm17.tif", values, crs="EPSG:32617")
    with pytest.raises(
        InputError, match=r"utm17\.tif: CRS EPSG:32617 differs from the reference's EPSG:32618"
    ):
        evaluate_rasters(other_crs, ref, CLASSES)
    shifted = write(tmp_path / "shifted.tif", values, transform=TRANSFORM @ Affine.translation(2, 0))
    with pytest.raises(InputError, match=r"shifted\.tif: not on the reference's grid.*transform"):
        evaluate_rasters(shifted, ref, CLASSES)
    smaller = write(tmp_path / "small.tif", np.ones((10, 11), np.uint8))
    with pytest.raises(InputError, match="size 11x10 px, expected 12x10"):
        evaluate_rasters(smaller, ref, CLASSES)


def test_refuses_unknown_values_and_empty_overlap(tmp_path: Path) -> None:
    values = np.ones((10, 12), np.uint8)
    ref = write(tmp_path / "ref.tif", values)
    odd = values.copy()
    odd[4, 4] = 9
    with pytest.raises(InputError, match=r"odd\.tif: values 9 are neither classes"):
        evaluate_rasters(write(tmp_path / "odd.tif", odd), ref, CLASSES)
    nothing = write(tmp_path / "nodata.tif", np.full((10, 12), 255, np.uint8), nodata=255)
    with pytest.raises(InputError, match="no pixel is valid in both"):
        evaluate_rasters(nothing, ref, CLASSES)
    with pytest.raises(InputError, match="no class names"):
        evaluate_rasters(ref, ref)


def test_cli_table_and_json(runner, tmp_path: Path, pair: tuple[str, str, np.ndarray, np.ndarray]) -> None:
    pred_path, ref_path, pred, ref = pair
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CLASSES_JSON))
    out = tmp_path / "scores.json"
    result = runner.invoke(
        main,
        ["evaluate", pred_path, ref_path, "--classes", str(classes), "--rows", "0:20", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "mean IoU" in result.output and "forest" in result.output
    data = json.loads(out.read_text())
    valid = (ref[:20] != 0) & (pred[:20] != 255)
    assert data["pixels"] == int(valid.sum())
    assert data["region"] == "rows 0:20"
    assert data["confusion_matrix"]["counts"] == brute_confusion(pred[:20], ref[:20], valid).tolist()


def test_cli_json_destination_rules(runner, tmp_path: Path, pair: tuple[str, str, np.ndarray, np.ndarray]) -> None:
    """--json follows the rules of every output: never an input, never an existing file without
    --overwrite, written under a temporary name; a refused file is left as it was."""
    pred_path, ref_path, _, _ = pair
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CLASSES_JSON))
    base = ["evaluate", pred_path, ref_path, "--classes", str(classes), "-q"]
    for target, what in ((ref_path, "the reference raster (REF)"), (pred_path, "the prediction raster (PRED)"),
                         (str(classes), "the classes file (--classes)")):
        before = Path(target).read_bytes()
        result = runner.invoke(main, [*base, "--json", target, "--overwrite"])
        assert result.exit_code == 1
        assert result.output.strip() == (
            f"Error: {target}: --json is an input of this run ({what}); choose another file"
        )
        assert Path(target).read_bytes() == before
    existing = tmp_path / "scores.json"
    existing.write_text("earlier figures")
    result = runner.invoke(main, [*base, "--json", str(existing)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {existing}: already exists (use --overwrite to replace it)"
    assert existing.read_text() == "earlier figures"
    result = runner.invoke(main, [*base, "--json", str(tmp_path)])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {tmp_path}: is a folder; give a file name"
    result = runner.invoke(main, [*base, "--json", str(existing), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads(existing.read_text())["reference"] == ref_path
    assert [p.name for p in tmp_path.glob(".*")] == []  # no temporary left behind


def test_write_figures_leaves_nothing_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures file appears only complete: a failure before the rename leaves the old file and no temporary."""
    import os

    from geoseg.evaluate import write_figures

    dst = tmp_path / "scores.json"
    dst.write_text("old")

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_figures(dst, '{"new": 1}')
    assert dst.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def test_cli_errors_are_one_line(runner, tmp_path: Path) -> None:
    values = np.ones((10, 12), np.uint8)
    ref = write(tmp_path / "ref.tif", values)
    other = write(
        tmp_path / "other.tif", values, crs="EPSG:4326", transform=Affine(0.001, 0, 10, 0, -0.001, 50)
    )
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CLASSES_JSON))
    for args in (
        ["evaluate", other, ref, "--classes", str(classes)],
        ["evaluate", str(tmp_path / "missing.tif"), ref, "--classes", str(classes)],
        ["evaluate", ref, ref, "--classes", str(classes), "--rows", "5"],
        ["evaluate", ref, ref, "--classes", str(classes), "--rows", "50:60"],
        ["evaluate", ref, ref, "--classes", str(classes), "--rows", "0:5", "--window", "0,0,2,2"],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert "Traceback" not in result.output
    result = runner.invoke(main, ["evaluate", other, ref, "--classes", str(classes)])
    assert "other.tif" in result.output and "CRS" in result.output


def test_rows_past_the_grid_are_clipped_with_a_warning_and_recorded(
    runner, tmp_path: Path, pair: tuple[str, str, np.ndarray, np.ndarray]
) -> None:
    pred_path, ref_path, pred, ref = pair
    height, width = ref.shape
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CLASSES_JSON))
    out = tmp_path / "scores.json"
    result = runner.invoke(main, ["evaluate", pred_path, ref_path, "--classes", str(classes), "--rows",
                                  f"5:{height + 1000}", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["region"] == f"rows 5:{height}"
    valid = (ref[5:] != 0) & (pred[5:] != 255)
    assert data["pixels"] == int(valid.sum())
    with pytest.warns(UserWarning, match=rf"^{ref_path}: the evaluation region \(window 2,3,999,4\) runs past "
                      rf"the {width}x{height} px image; using window 2,3,{width - 2},4$"):
        metrics = evaluate_rasters(pred_path, ref_path, CLASSES, Region.window("2,3,999,4"))
    assert metrics.region == f"window 2,3,{width - 2},4"
    with pytest.raises(InputError, match=rf"^{ref_path}: the evaluation region \(rows {height}:{height + 5}\) "
                       rf"lies outside the {width}x{height} px image$"):
        evaluate_rasters(pred_path, ref_path, CLASSES, Region.rows(f"{height}:{height + 5}"))
