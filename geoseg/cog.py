"""Cloud-Optimized GeoTIFF: rewrite a finished tiled GeoTIFF with overviews through GDAL's COG driver.

The prediction is first written as an ordinary tiled GeoTIFF (streamed, block by block); the COG
driver then builds the overviews into a temporary file and copies the full resolution and the
overviews in COG order, also block by block, so memory stays within GDAL's block cache whatever
the scene's size. Colour table, nodata, internal mask, band descriptions and tags are copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import rasterio
import rasterio.shutil
from rasterio.errors import RasterioError

from .errors import OutputError

COG_BLOCK_PX = 256
OverviewResampling = Literal["mode", "average", "nearest"]


@dataclass(frozen=True)
class CogOptions:
    """How a raster is laid out as a COG.

    Attributes:
        resampling: Overview resampling: ``mode`` for classes (a class is never averaged into
            another), ``average`` for continuous values such as probabilities.
        compress: ``deflate``, ``zstd``, ``lzw`` or ``none``.
    """

    resampling: OverviewResampling
    compress: str = "deflate"

    def intermediate_profile(self) -> dict[str, Any]:
        """Creation options for the tiled GeoTIFF written before the conversion.

        The same codec at its fastest level: the file is read once and deleted, so spending
        CPU on a better ratio would be wasted.
        """
        if self.compress == "none":
            return {}
        fastest = {"deflate": {"ZLEVEL": 1}, "zstd": {"ZSTD_LEVEL": 1}}.get(self.compress, {})
        return {"compress": self.compress, **fastest}


def convert_to_cog(src: Path, dst: Path, options: CogOptions, *, label: str | os.PathLike[str] | None = None) -> None:
    """Write ``src`` (a finished GeoTIFF) as a Cloud-Optimized GeoTIFF at ``dst``.

    Overviews halve the size until the smallest fits one 256 px block (GDAL's ``OVERVIEWS=AUTO``).
    ``dst`` should be a temporary name; the caller renames it.

    Args:
        src: The finished tiled GeoTIFF.
        dst: Where the COG goes (a temporary name).
        options: Overview resampling and compression.
        label: The output as messages name it (the user's file, not the temporary one).

    Raises:
        OutputError: GDAL could not write ``dst`` (disk full, permissions).
    """
    with rasterio.open(src) as ds:
        dtype = ds.dtypes[0]
    creation: dict[str, Any] = {
        "COMPRESS": options.compress.upper(),
        "BLOCKSIZE": COG_BLOCK_PX,
        "OVERVIEW_RESAMPLING": options.resampling.upper(),
        "BIGTIFF": "IF_SAFER",
        # NOTE: the network is done by now, so every core can compress; GDAL keeps the output identical.
        "NUM_THREADS": "ALL_CPUS",
    }
    if dtype.startswith("float") and options.compress != "none":
        creation["PREDICTOR"] = "YES"  # the floating-point predictor: smaller probability rasters
    try:
        rasterio.shutil.copy(os.fspath(src), os.fspath(dst), driver="COG", **creation)
    except RasterioError as err:
        remove_cog_leftovers(dst)
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OutputError(f"{label or dst}: cannot write the Cloud-Optimized GeoTIFF ({text})") from err


def remove_cog_leftovers(dst: Path) -> None:
    """Remove ``dst`` and the temporary overview files GDAL's COG driver keeps beside it while working."""
    for path in (dst, Path(f"{dst}.aux.xml"), Path(f"{dst}.ovr.tmp"), Path(f"{dst}.msk.ovr.tmp")):
        path.unlink(missing_ok=True)
