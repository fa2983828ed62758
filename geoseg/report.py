"""A static HTML report of one prediction (``geoseg predict --report DIR``).

``DIR/index.html`` shows the class map with a legend, the input scene in natural colour and the
area of each class; the two quicklooks are PNG files beside it (``classes.png``, ``scene.png``),
linked by relative paths, so the folder opens from disk, can be copied anywhere and needs no
server and no JavaScript. Quicklooks are decimated reads (at most ``QUICKLOOK_PX`` on a side,
nearest neighbour), never the whole raster; the folder is built under a temporary name and
renamed into place.
"""

from __future__ import annotations

import datetime
import os
import shutil
import warnings
from collections.abc import Sequence
from html import escape
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning

from ._version import __version__
from .errors import OutputError
from .io import TMP_MARKER, Scene
from .modelfile import ClassSpec, ModelMetadata
from .stats import ClassArea, count_raster

QUICKLOOK_PX = 1024
REPORT_FILES = frozenset({"index.html", "classes.png", "scene.png"})  # all a report folder holds
STRETCH_PERCENTILES = (2.0, 98.0)
NATURAL_COLOUR = ("red", "green", "blue")


def quicklook_shape(height: int, width: int, max_px: int = QUICKLOOK_PX) -> tuple[int, int]:
    """(height, width) of a quicklook: the raster's, scaled down so the longer side is at most ``max_px``."""
    scale = min(1.0, max_px / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def class_quicklook(path: str | os.PathLike[str], classes: Sequence[ClassSpec]) -> npt.NDArray[np.uint8]:
    """The class map as RGBA ``(4, h, w)`` uint8 in the class colours; nodata is transparent."""
    with rasterio.open(path) as ds:
        shape = quicklook_shape(ds.height, ds.width)
        values = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
        valid = ds.read_masks(1, out_shape=shape, resampling=Resampling.nearest) > 0
    size = max(int(values.max()) + 1, max(c.id for c in classes) + 1)
    palette = np.zeros((size, 4), np.uint8)  # unknown values stay transparent
    for c in classes:
        palette[c.id] = c.rgba
    rgba = palette[values]  # (h, w, 4)
    rgba[~valid] = 0
    return np.moveaxis(rgba, -1, 0)


def natural_colour_bands(scene: Scene, metadata: ModelMetadata) -> tuple[int, ...]:
    """Raster bands (1-based) showing red, green and blue: the bands fed to the model's red, green and
    blue inputs; without all three, the first model band alone (greyscale)."""
    by_name = {b.name.lower(): index for b, index in zip(metadata.bands, scene.band_indexes)}
    if all(name in by_name for name in NATURAL_COLOUR):
        return tuple(by_name[name] for name in NATURAL_COLOUR)
    return (scene.band_indexes[0],)


def scene_quicklook(
    scene: Scene, metadata: ModelMetadata, valid_from: str | os.PathLike[str]
) -> npt.NDArray[np.uint8]:
    """The input scene as RGBA ``(4, h, w)`` uint8, each band stretched between its 2nd and 98th percentile.

    Args:
        scene: The checked input (its band choice says which raster bands are red, green, blue).
        metadata: The model (its band names).
        valid_from: The class raster; its nodata marks the input's invalid pixels (which
            follow the scene's nodata rules, including a ``--nodata`` override), transparent here.
    """
    bands = natural_colour_bands(scene, metadata)
    with rasterio.open(scene.path) as src:
        shape = quicklook_shape(src.height, src.width)
        pixels = src.read(list(bands), out_shape=shape, resampling=Resampling.nearest).astype(np.float64)
    with rasterio.open(valid_from) as ds:
        valid = ds.read_masks(1, out_shape=shape, resampling=Resampling.nearest) > 0
    valid &= np.all(np.isfinite(pixels), axis=0)
    grey = np.zeros(shape, np.uint8)
    channels = []
    for band in pixels:
        if valid.any():
            low, high = np.percentile(band[valid], STRETCH_PERCENTILES)
        else:
            low, high = 0.0, 1.0
        scaled = (band - low) / max(high - low, 1e-12) * 255
        channels.append(np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8))
    if len(channels) == 1:
        channels = channels * 3
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    rgba = np.stack([*channels, alpha])
    rgba[:3, ~valid] = grey[~valid]
    return rgba


def write_png(path: Path, rgba: npt.NDArray[np.uint8]) -> None:
    """Write ``(4, h, w)`` uint8 as an RGBA PNG (GDAL's PNG driver; no georeferencing, no sidecar)."""
    with warnings.catch_warnings(), rasterio.Env(GDAL_PAM_ENABLED="NO"):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        count, height, width = rgba.shape
        with rasterio.open(path, "w", driver="PNG", width=width, height=height, count=count, dtype="uint8") as dst:
            dst.write(rgba)


def check_report_folder(
    dst: str | os.PathLike[str],
    overwrite: bool,
    keep: Sequence[tuple[str | os.PathLike[str], str]] = (),
) -> Path:
    """Refuse a report folder that cannot be written, or whose replacement would lose anything.

    ``--overwrite`` replaces a folder only when it is an earlier report (it holds nothing but
    :data:`REPORT_FILES`), since the old folder is deleted whole once the new one is in place.

    Args:
        dst: The report folder as given.
        overwrite: Whether an existing report may be replaced.
        keep: ``(path, what)`` of the run's inputs and other outputs; none may lie inside ``dst``.

    Returns:
        ``dst`` as an absolute path (``.`` and ``..`` resolved, so it has a name to rename).

    Raises:
        OutputError: The folder is missing its parent, is a file or a link, is or holds the
            current folder, holds an input or another output, exists without ``overwrite``, or
            holds anything besides an earlier report.
    """
    given = os.fspath(dst)
    folder = Path(os.path.abspath(given))
    if not folder.name:
        raise OutputError(f"{given}: not a folder a report can be written to; give a new folder's name")
    if not folder.parent.is_dir():
        raise OutputError(f"{given}: folder {folder.parent} does not exist")
    if folder.is_symlink():
        raise OutputError(f"{given}: is a symbolic link; give the report a folder of its own")
    if not folder.exists():
        return folder
    if not folder.is_dir():
        raise OutputError(f"{given}: exists and is not a folder; the report is a folder")
    real = folder.resolve()
    if Path.cwd().resolve().is_relative_to(real):
        raise OutputError(f"{given}: is (or holds) the current folder; give the report a folder of its own")
    for path, what in keep:
        if _not_local(os.fspath(path)):
            continue
        if Path(os.path.abspath(path)).resolve().is_relative_to(real):
            raise OutputError(f"{given}: holds {what} {os.fspath(path)}; give the report a folder of its own")
    if not overwrite:
        raise OutputError(f"{given}: already exists (use --overwrite to replace it)")
    others = sorted(entry.name for entry in folder.iterdir()
                    if entry.name not in REPORT_FILES or not entry.is_file() or entry.is_symlink())
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise OutputError(
            f"{given}: holds {shown}, so it is not an earlier geoseg report; "
            "--overwrite replaces only a report folder; choose another folder"
        )
    return folder


def _not_local(path: str) -> bool:
    """A URL, a GDAL virtual path or VRT text: nothing a local folder can hold."""
    return "://" in path or path.startswith(("/vsi", "<"))


def write_report(
    dst: str | os.PathLike[str],
    class_raster: str | os.PathLike[str],
    scene: Scene,
    metadata: ModelMetadata,
    *,
    model_sha256: str = "",
    overwrite: bool = False,
    table: Sequence[ClassArea] | None = None,
) -> Path:
    """Write the report folder ``dst`` (index.html, classes.png, scene.png) for a finished prediction.

    ``table`` is the class-area table when it was counted already (the engine counts it from the
    finished rows); ``None`` counts it from ``class_raster``. The folder is built as a hidden
    sibling and renamed into place; with ``overwrite`` an earlier report is replaced only once the
    new one is complete.

    Raises:
        OutputError: ``dst`` may not be written (see :func:`check_report_folder`).
    """
    given = Path(dst)
    dst = check_report_folder(dst, overwrite, keep=[(class_raster, "the class raster"),
                                                     (scene.path, "the input scene")])
    tmp = dst.with_name(f".{dst.name}{TMP_MARKER}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        classes = metadata.classes
        classes_png = class_quicklook(class_raster, classes)
        write_png(tmp / "classes.png", classes_png)
        write_png(tmp / "scene.png", scene_quicklook(scene, metadata, class_raster))
        with rasterio.open(class_raster) as ds:
            crs = ds.crs.to_string() if ds.crs else "none (pixel space)"
            size = f"{ds.width} x {ds.height} px, pixel {abs(ds.transform.a):g} x {abs(ds.transform.e):g}"
        page = render_html(
            table=table if table is not None else count_raster(class_raster, classes),
            classes=classes,
            scene_name=scene.label,
            output_name=Path(class_raster).name,
            model_name=metadata.name,
            model_sha256=model_sha256,
            crs=crs,
            size=size,
            natural_colour=len(natural_colour_bands(scene, metadata)) == 3,
            image_px=(classes_png.shape[2], classes_png.shape[1]),
        )
        (tmp / "index.html").write_text(page, encoding="utf-8")
        if dst.exists():
            old = dst.with_name(f".{dst.name}{TMP_MARKER}{os.getpid()}-old")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def _number(value: float | None, per: float, digits: int) -> str:
    """``value / per`` with thousands separators; a dash where there is no area (no CRS)."""
    return "&ndash;" if value is None else f"{value / per:,.{digits}f}"


def render_html(
    *,
    table: Sequence[ClassArea],
    classes: Sequence[ClassSpec],
    scene_name: str,
    output_name: str,
    model_name: str,
    model_sha256: str,
    crs: str,
    size: str,
    natural_colour: bool,
    image_px: tuple[int, int],
) -> str:
    """The report page (UTF-8 HTML, inline CSS, relative image links, no script)."""
    colours = {c.id: c.color for c in classes}
    legend = "".join(
        f'<li><span class="swatch" style="background:{escape(c.color)}"></span>{escape(c.name)}</li>'
        for c in classes
    )
    rows = "".join(
        f"<tr><td><span class=\"swatch\" style=\"background:{escape(colours[row.id])}\"></span></td>"
        f"<td>{row.id}</td><td>{escape(row.name)}</td><td>{row.pixels:,}</td>"
        f"<td>{_number(row.hectares, 1, 2)}</td><td>{_number(row.area_m2, 1e6, 4)}</td>"
        f"<td>{row.percent:.2f}</td></tr>"
        for row in table
    )
    total_px = sum(row.pixels for row in table)
    hectares = [row.hectares for row in table]
    total_ha = None if None in hectares else sum(h or 0.0 for h in hectares)
    width, height = image_px
    scene_caption = "natural colour (red, green, blue)" if natural_colour else "first model band (greyscale)"
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>geoseg report: {escape(output_name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
figure {{ display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; }}
figure img {{ max-width: 45vw; height: auto; border: 1px solid #ccc;
  background: repeating-conic-gradient(#eee 0 25%, #fff 0 50%) 0 0 / 16px 16px; }}
.swatch {{ display: inline-block; width: 1em; height: 1em; border: 1px solid #555; margin-right: .4em;
  vertical-align: middle; }}
ul.legend {{ list-style: none; padding: 0; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
td:nth-child(3), th:nth-child(3) {{ text-align: left; }}
dt {{ font-weight: bold; float: left; clear: left; width: 7em; }}
dd {{ margin-left: 8em; }}
</style>
</head>
<body>
<h1>Land cover: {escape(output_name)}</h1>
<dl>
<dt>Scene</dt><dd>{escape(scene_name)}</dd>
<dt>Model</dt><dd>{escape(model_name)} <small>sha256 {escape(model_sha256 or "unknown")}</small></dd>
<dt>Grid</dt><dd>{escape(size)}; CRS {escape(crs)}</dd>
<dt>Made</dt><dd>{created} by geoseg {__version__}</dd>
</dl>
<figure id="class-map">
<img src="classes.png" alt="class map" width="{width}" height="{height}">
<figcaption>Class map
<ul class="legend">{legend}</ul></figcaption>
</figure>
<figure id="scene">
<img src="scene.png" alt="input scene" width="{width}" height="{height}">
<figcaption>Input scene, {scene_caption}, 2&ndash;98 % stretch</figcaption>
</figure>
<h2>Area by class</h2>
<table id="areas">
<thead><tr><th></th><th>id</th><th>class</th><th>pixels</th><th>hectares</th><th>km&sup2;</th><th>%</th></tr></thead>
<tbody>{rows}</tbody>
<tfoot><tr><td></td><td></td><td>all valid pixels</td><td>{total_px:,}</td><td>{_number(total_ha, 1, 2)}</td>
<td>{_number(total_ha, 100, 4)}</td><td>{100.0 if total_px else 0.0:.2f}</td></tr></tfoot>
</table>
</body>
</html>
"""
