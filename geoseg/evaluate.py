"""evaluate_rasters(): accuracy of a class raster against a reference raster, streamed block by block.

Both rasters must share one grid (size, CRS, transform); they are read in bands of rows, so a
scene of any size takes little memory. A pixel counts when it is valid in both: not nodata in
either file, not the classes file's ignore index, and inside the region when one is given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio

from .errors import InputError
from .labels import IGNORE, ClassMap, Grid, Region, open_raster, row_blocks
from .metrics import Metrics, confusion_matrix
from .modelfile import ClassSpec

log = logging.getLogger(__name__)

BLOCK_ROWS = 256
_DEFAULT_COLORS = "#808080"


def evaluate_rasters(
    pred: str | os.PathLike[str],
    ref: str | os.PathLike[str],
    classes: ClassMap | None = None,
    region: Region | None = None,
    block_rows: int = BLOCK_ROWS,
) -> Metrics:
    """Compare a predicted class raster with a reference class raster.

    Args:
        pred: Predicted class raster (e.g. from ``geoseg predict``).
        ref: Reference class raster on the same grid.
        classes: Classes and ignore index; ``None`` takes the class names geoseg wrote into
            ``pred`` (``CLASS_<id>`` tags), else those in ``ref``.
        region: Count only pixels inside it; ``None`` counts the whole grid.
        block_rows: Rows read at a time.

    Returns:
        The confusion matrix and the figures derived from it.

    Raises:
        InputError: A file is missing or unreadable, the grids or CRSs differ, a raster holds
            values that are not classes, the region lies outside the grid, or no pixel is valid
            in both rasters.
    """
    pred, ref = os.fspath(pred), os.fspath(ref)
    with open_raster(pred, "prediction raster") as p_src, open_raster(ref, "reference raster") as r_src:
        for path, src in ((pred, p_src), (ref, r_src)):
            if np.dtype(src.dtypes[0]).kind not in "ui":
                raise InputError(f"{path}: a class raster must hold integers, found {src.dtypes[0]}")
        _check_same_grid(pred, p_src, ref, r_src)
        if classes is None:
            classes = _classes_from_tags(pred, p_src) or _classes_from_tags(ref, r_src)
            if classes is None:
                raise InputError(f"{pred}: no class names in either raster; pass a classes file (--classes)")
        grid = Grid.of(r_src)
        bound = (region or Region()).on(grid, f"{ref}: the evaluation region")
        k = classes.num_classes
        confusion = np.zeros((k, k), np.int64)
        for window in row_blocks(bound.bbox, block_rows):
            p_vals = p_src.read(1, window=window)
            r_vals = r_src.read(1, window=window)
            for path, vals, nodata in ((pred, p_vals, p_src.nodata), (ref, r_vals, r_src.nodata)):
                unknown = classes.unknown_values(vals, nodata)
                if unknown:
                    ids = ", ".join(map(str, classes.ids))
                    raise InputError(
                        f"{path}: values {', '.join(map(str, unknown[:10]))} are neither classes ({ids}) "
                        "nor nodata "
                        f"(first seen in rows {window.row_off}..{window.row_off + window.height})"
                    )
            p_idx = classes.to_indexes(p_vals, None if p_src.nodata is None else p_vals != p_src.nodata)
            r_idx = classes.to_indexes(r_vals, None if r_src.nodata is None else r_vals != r_src.nodata)
            valid = (p_idx != IGNORE) & (r_idx != IGNORE)
            if not bound.is_rectangular:
                valid &= bound.mask(window)
            confusion += confusion_matrix(r_idx, p_idx, k, valid)
    if confusion.sum() == 0:
        raise InputError(f"{pred}: no pixel is valid in both rasters within the {bound.region.describe()}")
    log.info("evaluated %d pixels of %s against %s (%s)", confusion.sum(), pred, ref, bound.region.describe())
    return Metrics(confusion, classes.ids, classes.names, region=bound.region.describe())


def check_figures_destination(
    dst: str | os.PathLike[str], inputs: Mapping[str, str | os.PathLike[str] | None], overwrite: bool
) -> Path:
    """Refuse a figures file (``evaluate --json``) that cannot or must not be written, before any work.

    Args:
        dst: The JSON file to write.
        inputs: What each input is (``"the prediction raster (PRED)"``) -> its path, or None.
        overwrite: Whether an existing file may be replaced.

    Raises:
        OutputError: ``dst`` is one of the inputs (even with ``overwrite``), a folder, in a
            missing folder, or exists without ``overwrite``.
    """
    from .io import check_writable
    from .modelfile import check_not_an_input

    dst = Path(dst)
    check_not_an_input(dst, inputs, option="--json")
    check_writable(dst, overwrite)
    return dst


def write_figures(dst: str | os.PathLike[str], text: str) -> Path:
    """Write the figures JSON under a temporary name beside ``dst``, then rename it into place."""
    from .io import temporary_path

    dst = Path(dst)
    tmp = temporary_path(dst)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _check_same_grid(
    pred: str, p_src: rasterio.io.DatasetReader, ref: str, r_src: rasterio.io.DatasetReader
) -> None:
    p_grid, r_grid = Grid.of(p_src), Grid.of(r_src)
    if (p_grid.crs is None) != (r_grid.crs is None) or (p_grid.crs is not None and p_grid.crs != r_grid.crs):
        raise InputError(
            f"{pred}: CRS {_crs(p_grid)} differs from the reference's {_crs(r_grid)} ({ref}); "
            "reproject one raster onto the other's grid first"
        )
    why = r_grid.difference(p_grid)
    if why:
        raise InputError(
            f"{pred}: not on the reference's grid ({ref}): {why}; resample one onto the other's grid first"
        )


def _crs(grid: Grid) -> str:
    if grid.crs is None:
        return "none"
    epsg = grid.crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else grid.crs.to_string()[:60]


def _classes_from_tags(path: str, src: rasterio.io.DatasetReader) -> ClassMap | None:
    """Classes from geoseg's ``CLASS_<id>=name`` tags and the colour table, if present."""
    tags = src.tags()
    ids = sorted(int(key[6:]) for key in tags if key.startswith("CLASS_") and key[6:].isdigit())
    if not ids:
        return None
    try:
        colormap = src.colormap(1)
    except ValueError:
        colormap = {}
    specs = []
    for cid in ids:
        rgba = colormap.get(cid)
        color = "#{:02x}{:02x}{:02x}".format(*rgba[:3]) if rgba else _DEFAULT_COLORS
        specs.append(ClassSpec(cid, tags[f"CLASS_{cid}"], color))
    log.info("%s: classes from its tags: %s", path, ", ".join(f"{c.id}={c.name}" for c in specs))
    return ClassMap(tuple(specs), None)
