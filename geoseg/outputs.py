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
        if not self.vector_simplify >= 0:  # also NaN, which would act as 0 unnoticed
            raise ConfigError(f"vector simplification tolerance must be >= 0, got {self.vector_simplify!r}")
        if not self.vector_min_area >= 0:
            raise ConfigError(f"vector minimum area must be >= 0, got {self.vector_min_area!r}")

    def interrupted_note(self, dst: Path, since: float) -> str:
        """What exists after an interrupt while the derived outputs were being made.

        That is DST and the streamed outputs, and those of the derived ones (polygons, report, STAC
        Item) finished at ``since`` or later (each appears only complete).
        """
        written = [dst, *(p for p in (self.probabilities, self.confidence, self.stats) if p is not None)]
        missing = []
        for path in (self.vector, self.report, self.stac):
            if path is None:
                continue
            try:
                done = path.stat().st_mtime >= since
            except OSError:
                done = False
            (written if done else missing).append(path)
        said = f"{', '.join(map(str, written))} {'was' if len(written) == 1 else 'were'} written"
        if missing:
            said += f"; {', '.join(map(str, missing))} {'was' if len(missing) == 1 else 'were'} not"
        return said

    def files(self) -> list[Path]:
        """Every output file or folder asked for (to check them all before any work starts)."""
        return list(self.named_files().values())

    def named_files(self) -> dict[str, Path]:
        """The outputs asked for, by the option that names each (``--stats``: its path)."""
        chosen = {"--probabilities": self.probabilities, "--confidence": self.confidence,
                  "--stats": self.stats, "--vector": self.vector, "--report": self.report, "--stac": self.stac}
        return {option: path for option, path in chosen.items() if path is not None}


def check_output_destinations(outputs: OutputOptions, dst: Path, sources: Sequence[str], overwrite: bool) -> None:
    """Refuse extra outputs that cannot or must not be written, before any work starts.

    Raises:
        OutputError: An output is the class raster, an input or another output; its folder is
            missing; it exists without ``overwrite``; a polygon or statistics file's extension
            is unknown; the report folder holds an input, another output or anything but an
            earlier report.
    """
    from .io import check_destination
    from .stats import stats_format

    seen = {os.path.abspath(dst): "the class raster"}
    for option, path in outputs.named_files().items():
        if os.path.abspath(path) in seen:
            other = seen[os.path.abspath(path)]
            raise OutputError(f"{path}: {option} is also given as {other}; choose another name")
        seen[os.path.abspath(path)] = option
        if path == outputs.report:
            from .report import check_report_folder

            others = [(p, f"the {name} output") for name, p in outputs.named_files().items() if p != path]
            check_report_folder(path, overwrite, keep=[(dst, "the class raster"),
                                                       *((src, "the input") for src in sources), *others])
            continue
        for src in sources:
            check_destination(src, path, overwrite)
    if outputs.stats is not None:
        stats_format(outputs.stats)
    if outputs.vector is not None:
        from .vectorize import vector_driver

        vector_driver(outputs.vector)
