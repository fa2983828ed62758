"""Probability and confidence rasters: the softmax behind each class decision, streamed like the classes.

Both are written row block by row block from the engine's finished rows (as
:class:`geoseg.stream.RowSink` s), on the class raster's grid: same CRS, transform and size.

Encodings (``dtype``):

- ``uint8``: round(probability x 255). Every byte 0-255 is a legal probability, so a probability
  raster has no nodata value: invalid pixels are 0 in every band and masked out by an internal
  mask (GDAL's per-dataset mask band, which GDAL, rasterio and QGIS honour). The band scale is
  1/255, so tools that apply scales read probabilities back. A pixel's bands sum to 255 within
  rounding (at most K/2 off for K classes). The confidence raster's top-class probability is at
  least 1/K, never 0, so it uses nodata 0.
- ``float32``: the probability, nodata NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .cog import CogOptions
from .io import Scene, TiledRasterWriter, scene_profile
from .modelfile import ClassSpec
from .outputs import ProbabilityDtype
from .stream import RowBlock

UINT8_SCALE = 255
CONFIDENCE_UINT8_NODATA = 0


def encode_probabilities(probabilities: npt.NDArray[np.float32], dtype: ProbabilityDtype) -> npt.NDArray[Any]:
    """Probabilities in ``[0, 1]``, ``(K, ...)`` or ``(...)``, as stored: uint8 ``round(p * 255)`` or float32.

    Returns a new array. The uint8 encoding goes one class at a time, so its float scratch is
    one band, not K.
    """
    if dtype == "float32":
        return probabilities.astype(np.float32, copy=True)
    stacked = probabilities.reshape(-1, *probabilities.shape[-2:]) if probabilities.ndim > 2 else probabilities[None]
    encoded = np.empty(stacked.shape, np.uint8)
    scratch = np.empty(stacked.shape[1:], np.float32)
    for k, band in enumerate(stacked):
        np.multiply(band, np.float32(UINT8_SCALE), out=scratch)
        np.rint(scratch, out=scratch)
        encoded[k] = scratch
    return encoded.reshape(probabilities.shape)


def _probability_profile(scene: Scene, count: int, dtype: ProbabilityDtype, compress: str) -> dict[str, Any]:
    profile = scene_profile(scene) | {"count": count, "dtype": dtype}
    if compress != "none":
        profile["compress"] = compress
        if dtype == "float32":
            profile["predictor"] = 3  # floating-point predictor: probabilities compress far better
    return profile


class ProbabilityWriter(TiledRasterWriter):
    """Writes one band per model class (model class order), each band described by its class name.

    See the module docstring for the encodings. Band tags ``CLASS_ID`` and ``CLASS_NAME`` name
    each band's class; dataset tags carry the class raster's provenance tags.
    """

    needs_probabilities = True

    def __init__(
        self,
        dst: Path,
        scene: Scene,
        classes: Sequence[ClassSpec],
        dtype: ProbabilityDtype,
        compress: str,
        tags: Mapping[str, str],
        *,
        cog: bool = False,
        overwrite: bool = False,
    ):
        self.encoding = dtype
        self.classes = tuple(classes)
        profile = _probability_profile(scene, len(self.classes), dtype, compress)
        if dtype == "float32":
            profile["nodata"] = float("nan")
        cog_options = CogOptions("average", compress) if cog else None
        super().__init__(dst, profile, masked=dtype == "uint8", cog=cog_options, overwrite=overwrite)
        for band, spec in enumerate(self.classes, start=1):
            self._dst.set_band_description(band, spec.name)
            self._dst.update_tags(band, CLASS_ID=str(spec.id), CLASS_NAME=spec.name)
        if dtype == "uint8":
            self._dst.scales = (1 / UINT8_SCALE,) * len(self.classes)
        self._dst.update_tags(**tags, GEOSEG_PRODUCT="class probabilities")

    def write(self, block: RowBlock) -> None:
        """Write one finished row block (needs ``block.probabilities``)."""
        assert block.probabilities is not None, "the engine computes probabilities for sinks that need them"
        values = encode_probabilities(block.probabilities, self.encoding)
        values[:, ~block.valid] = np.nan if self.encoding == "float32" else 0
        self.write_rows(block.row, values, block.valid)


class ConfidenceWriter(TiledRasterWriter):
    """Writes one band: the probability of the class each pixel was given.

    That is the top class's probability, except where a CRF (:mod:`geoseg.crf`) changed the class:
    there it is the network's probability of the class the map shows. uint8 nodata is 0 (a
    top-class probability is at least 1/K, so valid pixels are at least 1); float32 nodata is NaN.
    """

    needs_probabilities = True

    def __init__(
        self,
        dst: Path,
        scene: Scene,
        classes: Sequence[ClassSpec],
        dtype: ProbabilityDtype,
        compress: str,
        tags: Mapping[str, str],
        *,
        cog: bool = False,
        overwrite: bool = False,
    ):
        self.encoding = dtype
        ids = np.array([c.id for c in classes])
        self._index_of = np.zeros(int(ids.max()) + 1, np.intp)  # class id -> row of the probabilities
        self._index_of[ids] = np.arange(len(ids))
        profile = _probability_profile(scene, 1, dtype, compress)
        profile["nodata"] = float("nan") if dtype == "float32" else CONFIDENCE_UINT8_NODATA
        cog_options = CogOptions("average", compress) if cog else None
        super().__init__(dst, profile, cog=cog_options, overwrite=overwrite)
        self._dst.set_band_description(1, "confidence (top-class probability)")
        if dtype == "uint8":
            self._dst.scales = (1 / UINT8_SCALE,)
        self._dst.update_tags(**tags, GEOSEG_PRODUCT="top-class probability")

    def write(self, block: RowBlock) -> None:
        """Write one finished row block (needs ``block.probabilities``)."""
        assert block.probabilities is not None, "the engine computes probabilities for sinks that need them"
        given = np.where(block.valid, block.classes, 0).clip(0, self._index_of.size - 1)
        chosen = np.take_along_axis(block.probabilities, self._index_of[given][None], axis=0)[0]
        values = encode_probabilities(chosen, self.encoding)
        if self.encoding == "uint8":
            np.maximum(values, 1, out=values)  # with thousands of classes 1/K could round to 0, the nodata value
            values[~block.valid] = CONFIDENCE_UINT8_NODATA
        else:
            values[~block.valid] = np.nan
        self.write_rows(block.row, values)
