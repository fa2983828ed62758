"""What a prediction writes besides the class raster, and where (``geoseg predict --stats ...``).

Streamed outputs (probabilities, confidence, statistics) are :class:`geoseg.stream.RowSink` s fed
by the engine; derived outputs (polygons, report, STAC Item) are made from the finished class
raster afterwards, still block by block.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ConfigError, OutputError

ProbabilityDtype = Literal["uint8", "float32"]


@dataclass(frozen=True)
class OutputOptions:
    """Extra outputs of one prediction; ``None`` means "not wanted".

    Attributes:
        probabilities: GeoTIFF with one band per class: the softmax probability.
        probabilities_dtype: ``uint8`` (probability x 255) or ``float32``.
        confidence: GeoTIFF with the top-class probability alone.
        stats: Per-class pixel count, area and percentage; ``.json`` or ``.csv``.
        vector: Polygons of the class regions; ``.gpkg`` or ``.geojson``.
        vector_simplify: Simplification tolerance in map units (0: none).
        vector_min_area: Drop regions smaller than this, in square map units (0: keep all).
        report: Folder for a static HTML report (quicklooks, legend, area table).
        stac: STAC Item JSON describing the class raster.
        aoi: Area of interest: a vector file GDAL reads, or GeoJSON text. Only tiles touching
            it are predicted; pixels outside are nodata.
    """

    probabilities: Path | None = None
    probabilities_dtype: ProbabilityDtype = "uint8"
    confidence: Path | None = None
    stats: Path | None = None
    vector: Path | None = None
    vector_simplify: float = 0.0
    vector_min_area: float = 0.0
    report: Path | None = None
    stac: Path | None = None
    aoi: str | None = None

    def __post_init__(self) -> None:
        if self.probabilities_dtype not in ("uint8", "float32"):
            raise ConfigError(f"probabilities dtype must be uint8 or float32, got {self.probabilities_dtype!r}")
        if self.vector_simplify < 0:
            raise ConfigError(f"vector simplification tolerance must be >= 0, got {self.vector_simplify!r}")
        if self.vector_min_area < 0:
            raise ConfigError(f"vector minimum area must be >= 0, got {self.vector_min_area!r}")

    def files(self) -> list[Path]:
        """Every output file or folder asked for (to check them all before any work starts)."""
        return [p for p in (self.probabilities, self.confidence, self.stats, self.vector, self.report, self.stac)
                if p is not None]


def check_streamed_destinations(
    sources: Sequence[str], dst: str | os.PathLike[str], outputs: OutputOptions, overwrite: bool
) -> None:
    """Refuse probability, confidence and statistics files that cannot or must not be written.

    Checked before any work starts, like the class raster itself (:func:`geoseg.io.check_destination`):
    not an input, folder present, not existing without ``overwrite``; no two outputs on one
    file; statistics named ``.json`` or ``.csv``.

    Raises:
        OutputError: The message names the file and the problem.
    """
    from .io import check_destination
    from .stats import stats_format

    for path in (outputs.probabilities, outputs.confidence, outputs.stats):
        if path is None:
            continue
        for src in sources:
            check_destination(src, path, overwrite)
    if outputs.stats is not None:
        stats_format(outputs.stats)
    seen = {os.path.abspath(dst): "the class raster"}
    for path in outputs.files():
        key = os.path.abspath(path)
        if key in seen:
            raise OutputError(f"{path}: given for two outputs ({seen[key]} too); choose another file")
        seen[key] = "another output"
