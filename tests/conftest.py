"""Shared fixtures: seeded GeoTIFF scenes, tiny model files, a CLI runner, the shared real data.

Everything is offline and CPU-only. Models are tiny SegFormers (hidden sizes 8-16, one block per
stage) with random weights, written as real geoseg model files; scenes are seeded GeoTIFFs with
an explicit CRS and Affine, written by :func:`make_scene`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from rasterio.enums import ColorInterp

#: SegformerConfig overrides for a model small enough to run hundreds of tiles in a second.
TINY_ARCH: dict[str, Any] = {
    "hidden_sizes": [8, 8, 16, 16],
    "depths": [1, 1, 1, 1],
    "num_attention_heads": [1, 1, 2, 2],
    "decoder_hidden_size": 16,
}
BAND_NAMES = ("red", "green", "blue", "nir")
DEFAULT_CRS = "EPSG:32618"
DEFAULT_TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Run torch on one intra-op thread.

    The pipeline runs a reader and a writer thread beside the network; on a small shared CI
    machine, torch's default of one OpenMP thread per core makes them fight for the cores and
    slows tiny models down by an order of magnitude. Results do not depend on the thread count.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def runner() -> CliRunner:
    """A click test runner (use absolute ``tmp_path`` paths, not ``isolated_filesystem``)."""
    return CliRunner()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder (``<repo>/../shared/data``); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def _default_classes() -> tuple[Any, ...]:
    """Three classes with ids 1, 2 and 3."""
    from geoseg.modelfile import ClassSpec

    return (
        ClassSpec(1, "water", "#0000ff"),
        ClassSpec(2, "forest", "#00aa00"),
        ClassSpec(3, "urban", "#aa0000"),
    )


def _tiny_metadata(
    band_names: Sequence[str] = BAND_NAMES,
    classes: Sequence[Any] | None = None,
    *,
    tile_size: int = 64,
    overlap: int = 16,
    **fields: Any,
) -> Any:
    """Metadata of a tiny SegFormer; ``fields`` go to :func:`geoseg.modelfile.new_metadata`."""
    from geoseg.modelfile import new_metadata

    fields.setdefault("arch_overrides", TINY_ARCH)
    return new_metadata(
        "segformer-b0",
        list(band_names),
        list(classes or _default_classes()),
        tile_size=tile_size,
        overlap=overlap,
        **fields,
    )


def _write_model_file(path: Path, metadata: Any, seed: int = 0) -> Path:
    """Build the network the metadata describes with seeded random weights and save it."""
    import torch

    from geoseg.modelfile import build_network, save_model

    torch.manual_seed(seed)
    save_model(path, build_network(metadata).state_dict(), metadata)
    return path


@pytest.fixture(scope="session")
def tiny_metadata() -> Callable[..., Any]:
    """Factory: ``tiny_metadata(band_names=BAND_NAMES, classes=None, *, tile_size=64, overlap=16, **fields)``.

    Metadata of a tiny SegFormer; ``fields`` go to :func:`geoseg.modelfile.new_metadata`
    (``normalization``, ``source_bands``, ``name``, ``arch_overrides``...). Default classes:
    ids 1, 2, 3 (water, forest, urban).
    """
    return _tiny_metadata


@pytest.fixture
def make_model_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_model_file(name="model.safetensors", seed=0, **tiny_metadata_kwargs)``."""

    def make(name: str = "model.safetensors", seed: int = 0, **kwargs: Any) -> Path:
        return _write_model_file(tmp_path / name, _tiny_metadata(**kwargs), seed=seed)

    return make


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-band (red, green, blue, nir), 3-class model file; tile 64, overlap 16, scale 1e-4."""
    return _write_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", _tiny_metadata())


@pytest.fixture
def tiny_loaded_model(tiny_model_file: Path) -> Any:
    """:data:`tiny_model_file`, loaded (a fresh module per test, so tests may wrap or patch it)."""
    from geoseg.modelfile import load_model

    return load_model(tiny_model_file)


def _random_pixels(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded pixel values in a plausible range for ``dtype`` (never 0, so 0 can be nodata)."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return rng.uniform(0.01, 1.0, shape).astype(dtype)
    if kind == "c":
        return (rng.uniform(1, 100, shape) + 1j * rng.uniform(1, 100, shape)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, 1), min(info.max, 10000), shape, endpoint=True).astype(dtype)


@pytest.fixture
def make_scene(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a seeded GeoTIFF and returning its path.

    ``make_scene(name="scene.tif", *, width=96, height=80, count=4, dtype="uint16",
    crs=DEFAULT_CRS, transform=DEFAULT_TRANSFORM, nodata=None, data=None, seed=0,
    invalid=None, mask=None, alpha=None, descriptions=None, tiled=False, blocksize=None,
    compress=None, folder=tmp_path)``

    - ``data``: explicit ``(count, height, width)`` pixels (else seeded random values, never 0);
    - ``invalid``: ``(height, width)`` bool, pixels set to ``nodata`` in every band;
    - ``mask``: ``(height, width)`` bool validity written as an internal per-dataset mask;
    - ``alpha``: ``(height, width)`` bool validity written as an extra, last alpha band (needs
      ``count >= 3``: the first three bands are labelled red, green, blue);
    - ``descriptions``: band descriptions (``None`` entries are left unset);
    - ``crs=None`` writes no CRS, ``transform=None`` no geotransform.
    """

    def make(
        name: str = "scene.tif",
        *,
        width: int = 96,
        height: int = 80,
        count: int = 4,
        dtype: str = "uint16",
        crs: Any = DEFAULT_CRS,
        transform: Affine | None = DEFAULT_TRANSFORM,
        nodata: float | None = None,
        data: np.ndarray | None = None,
        seed: int = 0,
        invalid: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        alpha: np.ndarray | None = None,
        descriptions: Sequence[str | None] | None = None,
        tiled: bool = False,
        blocksize: int | None = None,
        compress: str | None = None,
        folder: Path | None = None,
    ) -> Path:
        path = Path(folder or tmp_path) / name
        if data is None:
            data = _random_pixels(np.random.default_rng(seed), dtype, (count, height, width))
        else:
            data = np.asarray(data, dtype=dtype)
            count, height, width = data.shape
        if invalid is not None:
            if nodata is None:
                raise ValueError("invalid= needs a nodata value")
            data = data.copy()
            data[:, invalid] = nodata
        profile: dict[str, Any] = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": count + (alpha is not None),
            "dtype": dtype,
            "crs": crs,
            "nodata": nodata,
        }
        if transform is not None:  # None: no geotransform at all (GCPs, RPCs or a world file may follow)
            profile["transform"] = transform
        if alpha is None:
            profile["photometric"] = "MINISBLACK"  # else GTiff labels a 4th byte band alpha, as for RGBA
        if tiled:
            profile |= {"tiled": True, "blockxsize": blocksize or 64, "blockysize": blocksize or 64}
        if compress:
            profile["compress"] = compress
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
            dst.write(data, indexes=list(range(1, count + 1)))
            if alpha is not None:
                dst.write(np.where(alpha, np.iinfo("uint8").max, 0).astype(dtype), count + 1)
                # GTiff keeps an alpha band only after photometric bands (RGB), not after gray.
                rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
                dst.colorinterp = rgb[:count] + [ColorInterp.undefined] * (count - 3) + [ColorInterp.alpha]
            if mask is not None:
                dst.write_mask(np.where(mask, 255, 0).astype("uint8"))
            for i, text in enumerate(descriptions or (), start=1):
                if text is not None:
                    dst.set_band_description(i, text)
        return path

    return make


class Pointwise:
    """Builds :class:`geoseg.modelfile.LoadedModel` objects around a seeded 1x1 convolution.

    A 1x1 convolution returns full-resolution logits that depend on each pixel alone, so a
    tiled prediction must equal the whole image's (the engine's bilinear upsampling of a map
    that already has the tile's size is the identity). ``calls`` counts forward passes and
    ``tiles_seen`` the tiles passed to the network.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.tiles_seen = 0

    def __call__(self, metadata: Any, seed: int = 0, path: str = "pointwise.safetensors") -> Any:
        import torch

        from geoseg.modelfile import LoadedModel

        counter = self

        class PointwiseNet(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(seed)
                self.conv = torch.nn.Conv2d(len(metadata.bands), len(metadata.classes), 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                counter.calls += 1
                counter.tiles_seen += x.shape[0]
                return self.conv(x)

        return LoadedModel(module=PointwiseNet().eval(), metadata=metadata, sha256="test", path=Path(path))


@pytest.fixture
def pointwise_model() -> Pointwise:
    """Factory of 1x1-convolution models (see :class:`Pointwise`); ``calls``/``tiles_seen`` count use."""
    return Pointwise()


@pytest.fixture
def four_torch_threads() -> Iterator[int]:
    """torch with 4 intra-op threads for the test (CI machines may have fewer cores), then as before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield 4
    torch.set_num_threads(before)


@pytest.fixture
def count_forward() -> Callable[[Any], dict[str, int]]:
    """Wrap a LoadedModel's module so its forward passes are counted.

    ``counts = count_forward(loaded)`` returns a dict whose ``calls`` and ``tiles`` grow as the
    network runs.
    """

    def wrap(loaded: Any) -> dict[str, int]:
        counts = {"calls": 0, "tiles": 0}

        def hook(module: Any, args: tuple[Any, ...]) -> None:
            counts["calls"] += 1
            counts["tiles"] += args[0].shape[0]

        loaded.module.register_forward_pre_hook(hook)
        return counts

    return wrap


class RecordingDataset:
    """Wraps a rasterio dataset and records every read's window."""

    def __init__(self, dataset: Any, log: list[tuple[str, Any]]):
        self._dataset = dataset
        self._log = log

    def read(self, *args: Any, **kwargs: Any) -> Any:
        self._log.append(("read", kwargs.get("window")))
        return self._dataset.read(*args, **kwargs)

    def read_masks(self, *args: Any, **kwargs: Any) -> Any:
        self._log.append(("read_masks", kwargs.get("window")))
        return self._dataset.read_masks(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)

    def __enter__(self) -> RecordingDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self._dataset.close()


@pytest.fixture
def record_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Record ``(method, window)`` for every pixel or mask read geoseg.io makes, in any thread."""
    import geoseg.io

    log: list[tuple[str, Any]] = []
    real_open = geoseg.io._open
    monkeypatch.setattr(geoseg.io, "_open", lambda path: RecordingDataset(real_open(path), log))
    return log
