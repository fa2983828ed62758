"""The ``geoseg`` command line: parse options, call the library, turn errors into one-line messages.

Only click is imported at module level, so ``geoseg --help`` never loads torch or rasterio;
each command imports what it needs inside its body.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, get_args

import click

from ._version import __version__
from .errors import GeosegError

log = logging.getLogger("geoseg")


def _configure_logging(verbosity: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.INFO if verbosity == 0 else logging.DEBUG)
    # Other libraries stay at WARNING unless -v: rasterio logs every GDAL error it raises at INFO,
    # which would turn a one-line error into several.
    root_level = level if verbosity else max(level, logging.WARNING)
    logging.basicConfig(level=root_level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("geoseg").setLevel(level)


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    # One line per warning, as a user reads it; no source lines.
    click.echo(f"Warning: {message}", err=True)


@contextmanager
def _user_errors(quiet: bool = False) -> Iterator[None]:
    """Map geoseg's errors to one-line messages and exit 1; keep tracebacks for real bugs.

    SIGTERM is turned into SystemExit so cleanup (removing temporary outputs) still runs when a
    job scheduler stops the process.
    """

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")
        warnings.showwarning = _show_warning
        try:
            yield
        except GeosegError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:  # disk full, permission denied: the environment, not a bug
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(f"{where}{err.strerror or err}") from None
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            raise SystemExit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)


def _verbosity_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bar.")(f)
    f = click.option("-v", "--verbose", count=True, help="Debug detail.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
def main() -> None:
    """Land-cover maps from multispectral GeoTIFFs with a SegFormer, streamed tile by tile."""
    # NOTE: set before torch loads OpenMP. Idle OpenMP threads that spin steal the cores the
    # reader and writer threads need: on 2 shared cores a run took 2.7x as long (README, Performance).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPRESSIONS = ("deflate", "zstd", "lzw", "none")


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--model", "model", type=click.Path(dir_okay=False), help="Model file (default: the bundled model).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML preset of predict settings.")
@click.option("--tile", type=int, help="Tile edge in pixels [model's suggestion].")
@click.option("--overlap", type=int, help="Pixels shared by neighbouring tiles [model's suggestion].")
@click.option("--batch-size", type=int, help="Tiles per forward pass [4].")
@click.option("--bands", help="1-based raster bands feeding the model, in its order, e.g. 4,3,2,8.")
@click.option("--nodata", type=float, help="Input value to treat as nodata (overrides the file's).")
@click.option("--device", help="auto, cpu, cuda or cuda:N [auto].")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Compute precision [auto].")
@click.option("--compress", type=click.Choice(COMPRESSIONS), help="Output compression [deflate].")
@click.option("--threads", type=int, help="CPU threads for the network [all cores].")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@_verbosity_options
def predict(src: str, dst: str, config_file: str | None, overwrite: bool, verbose: int, quiet: bool, **flags: Any) -> None:
    """Predict a land-cover GeoTIFF from a multispectral scene.

    DST gets the same CRS, transform and size as SRC, class ids with a colour table and
    class names, and nodata (255) wherever SRC is nodata. It appears only when complete.

    \b
    Examples:
      geoseg predict scene.tif landcover.tif
      geoseg predict scene.tif out.tif --bands 4,3,2,8 --tile 512 --overlap 64
      geoseg predict scene.tif out.tif --model my.safetensors --config configs/fast.yaml
    """
    _configure_logging(verbose, quiet)
    with _user_errors(quiet):
        from .config import build_config, load_config_file, parse_band_list

        file_settings = load_config_file(config_file) if config_file else {}
        if flags.get("bands") is not None:
            flags["bands"] = parse_band_list(flags["bands"])
        config = build_config(file_settings, **flags)

        from .pipeline import predict_scene

        progress = not quiet and sys.stderr.isatty()
        result = predict_scene(src, dst, config, overwrite=overwrite, progress=progress)
        log.info(
            "wrote %s: %d of %d tiles predicted in %.1f s (%.2f MP/s, %s, %s)",
            result.dst,
            result.tiles_predicted,
            result.tiles_total,
            result.seconds,
            result.megapixels_per_second,
            result.device,
            result.precision,
        )


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info(model: str, as_json: bool) -> None:
    """Show what a model file is for: architecture, bands, scaling, classes, tiles."""
    with _user_errors():
        from .modelfile import file_sha256, read_metadata

        meta = read_metadata(model)
        if as_json:
            click.echo(json.dumps(json.loads(meta.to_json()) | {"sha256": file_sha256(model)}, indent=2))
            return
        norm = meta.normalization
        if norm.method == "meanstd":
            scaling = "(x - mean) / std, mean " + _floats(norm.mean) + ", std " + _floats(norm.std)
        else:
            scaling = "x * scale + offset, scale " + _floats(norm.scale) + ", offset " + _floats(norm.offset)
        lines = [
            f"name:          {meta.name}",
            f"architecture:  {meta.architecture} ({meta.variant})",
            f"sha256:        {file_sha256(model)}",
            f"bands:         " + ", ".join(f"{b.name} (band {b.source_band})" for b in meta.bands),
            f"scaling:       {scaling}",
            f"tile, overlap: {meta.tile_size}, {meta.overlap} px",
            f"resolution:    {meta.resolution_m} m" if meta.resolution_m else "resolution:    unknown",
        ]
        if meta.intended_input:
            lines.append(f"input:         {meta.intended_input}")
        if meta.description:
            lines.append(f"description:   {meta.description}")
        lines.append(f"classes ({len(meta.classes)}):")
        lines += [f"  {c.id:>5}  {c.color}  {c.name}" for c in meta.classes]
        for key, value in sorted(meta.provenance.items()):
            lines.append(f"provenance.{key}: {value}")
        click.echo("\n".join(lines))


def _floats(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


@main.command("init-model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--arch", default="segformer-b0", show_default=True, help="segformer-b0 ... segformer-b5.")
@click.option("--bands", default="red,green,blue,nir", show_default=True, help="Input band names, in model order.")
@click.option("--source-bands", help="Raster band feeding each input by default [1,2,...].")
@click.option("--classes", "classes_file", required=True, type=click.Path(dir_okay=False), help="Classes JSON file.")
@click.option("--scale", type=float, default=1e-4, show_default=True, help="Input scaling: x * scale.")
@click.option("--tile-size", type=int, default=512, show_default=True, help="Suggested tile edge in pixels.")
@click.option("--overlap", type=int, default=64, show_default=True, help="Suggested tile overlap in pixels.")
@click.option("--resolution", type=float, help="Pixel size the model is meant for, in metres.")
@click.option("--name", help="Model name [the architecture].")
@click.option("--arch-override", multiple=True, metavar="KEY=VALUE", help="Change one architecture field (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random initial weights.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def init_model(out: str, arch: str, bands: str, source_bands: str | None, classes_file: str, scale: float, tile_size: int,
               overlap: int, resolution: float | None, name: str | None, arch_override: tuple[str, ...], seed: int,
               overwrite: bool) -> None:
    """Write a fresh, untrained model file (a start for training, or a test fixture).

    \b
    Example:
      geoseg init-model --arch segformer-b0 --bands red,green,blue,nir --classes classes.json model.safetensors
    """
    with _user_errors():
        from pathlib import Path

        from .config import parse_band_list
        from .errors import ConfigError, OutputError
        from .modelfile import Normalization, load_classes, new_metadata, save_model

        out_path = Path(out)
        if out_path.exists() and not overwrite:
            raise OutputError(f"{out}: already exists (use --overwrite to replace it)")
        if not out_path.parent.is_dir():
            raise OutputError(f"{out}: folder {out_path.parent} does not exist")
        names = [b.strip() for b in bands.split(",") if b.strip()]
        sources = parse_band_list(source_bands) if source_bands else None
        classes, ignore_index = load_classes(classes_file)
        overrides: dict[str, Any] = {}
        for item in arch_override:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--arch-override {item!r}: expected KEY=VALUE")
            overrides[key.strip()] = json.loads(f"[{value}]") if "," in value else json.loads(value)
        metadata = new_metadata(
            arch,
            names,
            classes,
            source_bands=sources,
            normalization=Normalization("scale", scale=(scale,) * len(names), offset=(0.0,) * len(names)),
            tile_size=tile_size,
            overlap=overlap,
            resolution_m=resolution,
            ignore_index=ignore_index,
            arch_overrides=overrides,
            provenance={"created_by": f"geoseg {__version__} init-model", "trained": False, "seed": seed},
            **({"name": name} if name else {}),
        )
        import torch

        from .modelfile import build_network

        torch.manual_seed(seed)
        network = build_network(metadata)
        save_model(out_path, network.state_dict(), metadata)
        click.echo(f"wrote {out}: untrained {metadata.variant}, {len(names)} bands, {len(classes)} classes")


if __name__ == "__main__":  # pragma: no cover
    main()
