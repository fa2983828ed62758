"""The ``geoseg`` command line: parse options, call the library, turn errors into one-line messages.

Only click is imported at module level, so ``geoseg --help`` never loads torch or rasterio;
each command imports what it needs inside its body.
"""

from __future__ import annotations

import gc
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

from ._malloc import missing_tcmalloc_warning, reuse_freed_memory, tcmalloc_environment
from ._version import __version__
from .errors import ConfigError, GeosegError
from .outputs import ProbabilityDtype

log = logging.getLogger("geoseg")


def _configure_logging(verbosity: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.INFO if verbosity == 0 else logging.DEBUG)
    # Other libraries stay at WARNING unless -v: rasterio logs every GDAL error it raises at INFO,
    # which would turn a one-line error into several.
    root_level = level if verbosity else max(level, logging.WARNING)
    logging.basicConfig(level=root_level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("geoseg").setLevel(level)
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, _UserLogFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_UserLogFilter(show_gdal_retries=verbosity > 0))


class _UserLogFilter(logging.Filter):
    """Log lines as the user may see them: URLs without credentials, GDAL's retries only with -v.

    GDAL names the URL it fetches, query string and ``user:password@`` included, in its messages
    (which rasterio logs); and it reports each retry of an HTTP request as a warning, several per
    failed read, which geoseg's own "trying again" warnings sum up.
    """

    def __init__(self, show_gdal_retries: bool):
        super().__init__()
        self.show_gdal_retries = show_gdal_retries

    def filter(self, record: logging.LogRecord) -> bool:
        from ._remote import redact

        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.name.startswith("rasterio") and "Retrying again in" in message and record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.show_gdal_retries
        return True


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    # One line per warning, as a user reads it; no source lines.
    from ._remote import redact

    click.echo(f"Warning: {redact(str(message))}", err=True)


@contextmanager
def _importing_the_library() -> Iterator[None]:
    """Import torch and the engine without the cyclic collector, then freeze what they created.

    Importing torch creates ~170,000 long-lived objects, and the collector made three full passes
    over them while they were created; frozen, no later pass traverses them again. In ``geoseg
    predict`` the import took 0.96-1.13 s this way against 1.06-1.27 s (four runs each,
    docs/performance.md). Where torch is already loaded (a caller's process, the tests), nothing
    is imported and nothing is frozen.
    """
    if "torch" in sys.modules:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


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
        except KeyboardInterrupt as err:
            # What is on disk by then is for the interrupted library code to say (exception notes);
            # every output is renamed into place only when complete, so nothing partial remains.
            notes = getattr(err, "__notes__", None)
            said = "; ".join(notes) if notes else "no unfinished output was left behind"
            click.echo(f"Interrupted; {said}.", err=True)
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
    # NOTE: set before torch loads OpenMP. Idle libgomp threads spin GOMP_SPINCOUNT times (300,000
    # by default) before they sleep, taking the cores the reader and writer threads need, and a
    # whole machine when other jobs run: two predicts side by side took 116 s with the default,
    # 28 s with 3,000, 23 s fully passive, which however costs a lone run 15 % (docs/performance.md).
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
    # Freed activations are reused for the next batch instead of unmapped and faulted back in:
    # predict on an 8192 px scene 51 s -> 43 s on 2 cores (geoseg/_malloc.py).
    reuse_freed_memory()


def run() -> None:
    """The ``geoseg`` program: :func:`main`, re-run first under tcmalloc where that applies.

    Tests call :func:`main` (click's group) directly and never re-run the process.
    """
    try:
        environment = tcmalloc_environment(dict(os.environ), sys.argv[1:])
    except ValueError as err:
        click.echo(f"Error: {err}", err=True)
        raise SystemExit(2) from None
    missing = missing_tcmalloc_warning(dict(os.environ), sys.argv[1:])
    if missing is not None:
        click.echo(f"Warning: {missing}", err=True)
    if environment is not None:
        # Same PID, same arguments (interpreter flags included), a malloc of its own from the start.
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
        except OSError as err:  # exec not allowed here: run on the malloc we have
            reason = err.strerror or err
            click.echo(f"Warning: could not re-run with tcmalloc ({reason}); using the system malloc",
                       err=True)
    try:
        main()
    finally:
        # NOTE: at exit CPython's collector traverses every object once more (the ~170,000 that torch
        # and rasterio create among them) and finds nothing worth freeing before the process ends.
        # Frozen objects are skipped: `geoseg predict` ends about 0.4 s sooner (docs/performance.md).
        gc.freeze()


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPRESSIONS = ("deflate", "zstd", "lzw", "none")
RESAMPLINGS = ("nearest", "bilinear", "cubic")  # geoseg.sources.Resampling (not imported: it loads rasterio)


def _predict_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The settings of one prediction, shared by ``predict`` and ``batch`` (for every scene of a batch)."""
    options = [
        click.option("--model", "model", type=click.Path(dir_okay=False),
                     help="Model file (default: the bundled model)."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="YAML preset of predict settings."),
        click.option("--tile", type=click.IntRange(min=32), help="Tile edge in pixels [model's suggestion]."),
        click.option("--overlap", type=click.IntRange(min=0),
                     help="Pixels shared by neighbouring tiles [model's suggestion]."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Tiles per forward pass [4]."),
        click.option("--bands", callback=_band_list,
                     help="1-based raster bands feeding the model, in its order, e.g. 4,3,2,8."),
        click.option("--nodata", type=float, help="Input value to treat as nodata (overrides the file's)."),
        click.option("--output-nodata", type=click.IntRange(0, 65535),
                     help="Output value where the input is nodata; must not be a class id [255]."),
        click.option("--device", help="auto, cpu, cuda or cuda:N [auto]."),
        click.option("--precision", type=click.Choice(PRECISIONS), help="Compute precision [auto]."),
        click.option("--compress", type=click.Choice(COMPRESSIONS), help="Output compression [deflate]."),
        click.option("--threads", type=click.IntRange(min=1),
                     help="CPU threads for the network [all cores]."),
        click.option("--parallel-batches", type=click.IntRange(min=1),
                     help="CPU: batches run at once, each on threads / N torch threads "
                          "[threads / 4, at least 2 and at most 8]."),
        click.option("--reader-threads", type=click.IntRange(min=1),
                     help="Threads reading tiles, each with its own dataset handle [1 on CPU, up to 8 with a GPU]."),
        click.option("--compile", "compile", is_flag=True, default=None,
                     help="torch.compile the network (the first batch compiles, ~1 min for B0 on a CPU) "
                     "[off]."),
        click.option("--trace/--no-trace", "trace", default=None,
                     help="CPU, fp32 or bf16: run the network as a traced TorchScript graph, free of the GIL "
                     "[with 2+ batches at once on a scene of 256+ tiles]."),
        click.option("--cog", "cog", is_flag=True, default=None,
                     help="Write Cloud-Optimized GeoTIFFs with overviews (mode resampling for classes) [off]."),
        click.option("--crf/--no-crf", "crf", default=None,
                     help="Refine the class map with a dense CRF (settings: a crf: section in --config) [off]."),
        click.option("--crf-workers", type=click.IntRange(min=1),
                     help="Worker processes for the CRF; implies --crf [all cores]."),
        click.option("--resample", type=click.Choice(RESAMPLINGS),
                     help="Resample band files coarser than the finest one onto its grid [refuse them]."),
        click.option("--assets", help="STAC Item assets: red=B04,green=B03,... or keys in model band order "
                     "[by eo:bands common name]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _predict_config(config_file: str | None, flags: dict[str, Any]) -> Any:
    """A PredictConfig from the preset file and the predict flags actually given."""
    from .config import build_config, load_config_file, parse_band_list

    file_settings = load_config_file(config_file) if config_file else {}
    if isinstance(flags.get("bands"), str):  # parsed by _band_list when it came from the command line
        flags["bands"] = parse_band_list(flags["bands"])
    try:
        return build_config(file_settings, **flags)
    except ConfigError as err:
        if config_file and not _valid_alone(file_settings):
            raise ConfigError(f"{config_file}: {err}") from err  # the file's own value is wrong
        raise


def _band_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """``--bands 4,3,2,8`` parsed; a malformed list is a usage error (exit 2), like click's own checks."""
    from .config import parse_band_list

    try:
        return None if value is None else parse_band_list(value)
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None


def _opset_torch_writes(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """``--opset`` no higher than the installed torch exports (past it torch dumps its graph, then fails)."""
    from .onnx_export import highest_opset

    highest = highest_opset()
    if highest is not None and value > highest:
        import torch

        raise click.BadParameter(f"{value}: torch {torch.__version__} exports opsets up to {highest}")
    return value


def _valid_alone(settings: dict[str, Any]) -> bool:
    """Whether config-file settings make a valid PredictConfig without any flag."""
    from .config import build_config

    try:
        build_config(settings)
    except ConfigError:
        return False
    return True


_OUTPUT_FIELDS = ("probabilities", "probabilities_dtype", "confidence", "stats", "aoi",
                  "vector", "vector_simplify", "vector_min_area", "report", "stac")


def _output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Extra outputs besides the class raster (geoseg.outputs.OutputOptions), for ``predict`` and ``batch``."""
    options = [
        click.option("--probabilities", type=click.Path(dir_okay=False),
                     help="Also write FILE: one band per class, its probability (see --probabilities-dtype)."),
        click.option("--probabilities-dtype", type=click.Choice(get_args(ProbabilityDtype)), default="uint8",
                     show_default=True,
                     help="uint8: probability x 255 (masked where invalid); float32: nodata NaN."),
        click.option("--confidence", type=click.Path(dir_okay=False),
                     help="Also write FILE: the top-class probability alone (uint8 nodata 0, or float32)."),
        click.option("--stats", type=click.Path(dir_okay=False),
                     help="Also write per-class pixel counts, areas (m2, ha) and percentages: FILE.json or FILE.csv."),
        click.option("--aoi", help="Area of interest: a vector file GDAL reads, or GeoJSON text. Only tiles "
                     "touching it are predicted; pixels outside it are nodata."),
        click.option("--vector", "vector", type=click.Path(dir_okay=False),
                     help="Also write one polygon per class region: FILE.gpkg (GeoPackage) or FILE.geojson."),
        click.option("--simplify", "vector_simplify", type=click.FloatRange(min=0), default=0.0,
                     help="Polygon simplification tolerance in map units, shared edges kept [0: exact pixel edges]."),
        click.option("--min-area", "vector_min_area", type=click.FloatRange(min=0), default=0.0,
                     help="Drop polygons smaller than this, in square map units [0: keep all]."),
        click.option("--report", "report", type=click.Path(),
                     help="Also write a static HTML report to this folder (quicklooks, legend, area table)."),
        click.option("--stac", "stac", type=click.Path(dir_okay=False),
                     help="Also write a STAC Item (JSON) describing DST."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _pop_outputs(flags: dict[str, Any]) -> dict[str, Any]:
    """Take the extra-output options out of ``flags`` (the rest are PredictConfig settings)."""
    chosen = {name: flags.pop(name) for name in _OUTPUT_FIELDS}
    if (chosen["vector_simplify"] or chosen["vector_min_area"]) and chosen["vector"] is None:
        raise click.UsageError("--simplify and --min-area apply to --vector; give --vector FILE too")
    return chosen


def _output_paths(chosen: dict[str, Any], name: Callable[[str], str] = str) -> Any:
    """OutputOptions from the chosen options; ``name`` turns each given file name into a path."""
    from pathlib import Path

    from .outputs import OutputOptions

    paths = {k: Path(name(v)) for k, v in chosen.items()
             if k in ("probabilities", "confidence", "stats", "vector", "report", "stac") and v}
    return OutputOptions(
        **paths,
        probabilities_dtype=chosen["probabilities_dtype"],
        vector_simplify=chosen["vector_simplify"],
        vector_min_area=chosen["vector_min_area"],
        aoi=chosen["aoi"],
    )


@main.command()
@click.argument("paths", nargs=-1, metavar="SRC DST")
@_predict_options
@_output_options
@click.option("--band-files", multiple=True, help="Files stacked band after band in model band order, "
              "repeatable or comma-separated; give DST alone.")
@click.option("--overwrite", is_flag=True, help="Replace DST (and the other outputs) if they exist.")
@_verbosity_options
def predict(paths: tuple[str, ...], config_file: str | None, overwrite: bool, verbose: int, quiet: bool,
            band_files: tuple[str, ...], resample: str | None, assets: str | None, **flags: Any) -> None:
    """Predict a land-cover GeoTIFF from a multispectral scene.

    SRC is a GDAL path or a URI: a local file, https:// or s3:// (read in windows, never
    downloaded whole), /vsizip/..., a VRT; several single-band files joined by commas
    (or --band-files), stacked in model band order; or a STAC Item (.json file or URL).
    DST gets the CRS, transform and size of the grid read, class ids with a colour table
    and class names, and nodata (255) wherever SRC is nodata. It appears only when complete.

    \b
    Examples:
      geoseg predict scene.tif landcover.tif
      geoseg predict scene.tif out.tif --bands 4,3,2,8 --tile 512 --overlap 64
      geoseg predict scene.tif out.tif --model my.safetensors --config configs/fast.yaml
      geoseg predict scene.tif out.tif --model my.onnx
      geoseg predict https://example.com/scene_cog.tif out.tif
      geoseg predict B04.tif,B03.tif,B02.tif,B08.tif out.tif
      geoseg predict --band-files B04.tif,B03.tif,B02.tif,B05.tif --resample bilinear out.tif
      geoseg predict item.json out.tif --assets red=B04,green=B03,blue=B02,nir=B08
      geoseg predict scene.tif out.tif --crf --config configs/predict-crf.yaml
      geoseg predict scene.tif out.tif --cog --probabilities probs.tif --stats areas.csv
      geoseg predict scene.tif out.tif --aoi park.gpkg --confidence confidence.tif
      geoseg predict scene.tif out.tif --vector out.gpkg --simplify 15 --min-area 3600
      geoseg predict scene.tif out.tif --report report/ --stac out.json
    """
    _configure_logging(verbose, quiet)
    if band_files:
        if len(paths) != 1:
            raise click.UsageError("with --band-files, give DST alone (the band files replace SRC)")
        src: str | list[str] = [p for item in band_files for p in item.split(",") if p.strip()]
    elif len(paths) != 2:
        raise click.UsageError(f"expected SRC and DST, got {len(paths)} path(s)")
    else:
        src = paths[0]
    dst = paths[-1]
    chosen_outputs = _pop_outputs(flags)
    with _user_errors(quiet):
        from .sources import parse_assets

        config = _predict_config(config_file, flags)
        outputs = _output_paths(chosen_outputs)

        with _importing_the_library():
            from .pipeline import predict_scene

        progress = not quiet and sys.stderr.isatty()
        result = predict_scene(
            src,
            dst,
            config,
            overwrite=overwrite,
            progress=progress,
            resample=resample,  # type: ignore[arg-type]
            assets=parse_assets(assets) if assets else None,
            outputs=outputs,
        )
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


ON_ERROR = ("continue", "stop")  # geoseg.batch.OnError (not imported: it would load the library)


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the outputs and the manifest (created if missing).")
@click.option("--template", default="{stem}_landcover.tif", show_default=True,
              help="Output file name per scene; fields {stem}, {name}, {parent}.")
@click.option("--scheduler", metavar="ADDRESS",
              help="Run on this dask scheduler (tcp://host:8786 or a scheduler file) [a local cluster].")
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes of the local cluster [one per GPU, else one per core (1.5 GiB each at most)].")
@click.option("--force", is_flag=True, help="Redo every scene, even those done before.")
@click.option("--on-error", type=click.Choice(ON_ERROR), default="continue", show_default=True,
              help="After a scene fails: go on with the others, or stop.")
@_predict_options
@_output_options
@_verbosity_options
def batch(inputs: tuple[str, ...], out_dir: str, template: str, scheduler: str | None, workers: int | None,
          force: bool, on_error: str, config_file: str | None, resample: str | None, assets: str | None,
          verbose: int, quiet: bool, **flags: Any) -> None:
    """Predict many scenes in parallel with dask; re-running skips the scenes already done.

    INPUT is a scene (any SRC predict takes), a glob ('archive/*.tif', quoted) or @list.txt with
    one path or GDAL URI per line. Every predict option applies to every scene. Outputs go to
    OUT-DIR, named by --template; OUT-DIR/geoseg-manifest.sqlite records per scene the input's
    size and time, the model and settings hashes, the status, the output's checksum, timings and
    errors. A scene done before with the same input, model and settings is skipped; changed and
    failed scenes are redone. A failing scene fails alone; the exit status is 0 only when every
    scene is done. One batch at a time per OUT-DIR.

    \b
    Examples:
      geoseg batch 'archive/*.tif' --out-dir maps/
      geoseg batch @scenes.txt --out-dir maps/ --workers 4 --tile 512
      geoseg batch @scenes.txt --out-dir /shared/maps --scheduler tcp://head-node:8786
      geoseg batch 'archive/*.tif' --out-dir maps/ --cog --stats '{stem}_areas.json'

    Extra outputs (--stats, --probabilities, --vector, ...) take templates like --template's,
    inside OUT-DIR; asking for different outputs redoes the scenes done without them.
    """
    _configure_logging(verbose, quiet)
    chosen_outputs = _pop_outputs(flags)
    with _user_errors(quiet):
        from contextlib import nullcontext

        from ._lazy import lazy_import
        from .batch import connect, run_batch
        from .sources import parse_assets

        lazy_import("distributed", extra="dask")  # configures its loggers on import; quieten them after
        for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
            logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)

        config = _predict_config(config_file, flags)
        if scheduler and workers:
            log.warning("--workers is for the local cluster; with --scheduler the cluster's workers run "
                        "the scenes")
        client = connect(scheduler) if scheduler else None
        with client if client is not None else nullcontext():
            summary = run_batch(
                inputs, out_dir, config, client=client, workers=workers, template=template, force=force,
                on_error=on_error,  # type: ignore[arg-type]
                resample=resample, assets=parse_assets(assets) if assets else None,
                outputs=_output_paths(chosen_outputs),
            )
        click.echo(summary.format_table())
        if not summary.ok:
            raise click.ClickException(
                f"{summary.failed + summary.not_run} of {summary.total} scenes not done; "
                f"see {summary.manifest}"
            )


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info(model: str, as_json: bool) -> None:
    """Show what a model file is for: architecture, bands, scaling, classes, tiles."""
    with _user_errors():
        from .modelfile import count_weights, describe_network, file_sha256, read_metadata

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
            f"network:       {describe_network(meta)}"
            + ("" if model.lower().endswith(".onnx") else f"; {count_weights(model) / 1e6:.2f} M weights"),
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


def _arch_override(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML, as in a config file's ``arch_overrides``.

    So ``gelu``, ``64`` and ``[8,16,24,32]`` work; ``8,16,24,32`` is a list too.

    Raises:
        ConfigError: No ``=``, no key, or VALUE is not valid YAML.
    """
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--arch-override {item!r}: expected KEY=VALUE")
    try:
        value = yaml.safe_load(text)
        if isinstance(value, str) and "," in value:
            value = [yaml.safe_load(part) for part in value.split(",")]
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(
            f"--arch-override {item!r}: VALUE must be a number, text or list ({problem})"
        ) from None
    return key.strip(), value


@main.command("init-model")
@click.argument("out")
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
        from .errors import OutputError
        from .modelfile import Normalization, check_not_an_input, load_classes, new_metadata, save_model

        out_path = Path(out)
        check_not_an_input(out, {"classes file": classes_file}, option="OUT")
        if out_path.is_dir():
            raise OutputError(f"{out}: is a folder; give a file name")
        if out_path.exists() and not overwrite:
            raise OutputError(f"{out}: already exists (use --overwrite to replace it)")
        if not out_path.parent.is_dir():
            raise OutputError(f"{out}: folder {out_path.parent} does not exist")
        names = [b.strip() for b in bands.split(",") if b.strip()]
        sources = parse_band_list(source_bands) if source_bands else None
        classes, ignore_index = load_classes(classes_file)
        overrides = dict(_arch_override(item) for item in arch_override)
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


@main.command("import-weights")
@click.argument("src")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--bands", default="red,green,blue", show_default=True,
              help="Input band names, in model order (with a 3-band checkpoint: red,green,blue first).")
@click.option("--source-bands", help="Raster band feeding each input by default [1,2,...].")
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False),
              help="Classes JSON file [the checkpoint's id2label, keeping its decode head].")
@click.option("--parts", type=click.Choice(("auto", "encoder", "whole")), default="auto", show_default=True,
              help="encoder: new decode head; whole: the checkpoint's; auto: whole when the classes match.")
@click.option("--scale", type=float, help="Input scaling x * scale [1e-4].")
@click.option("--mean", help="Per-band means in raw units, comma-separated (with --std, instead of --scale).")
@click.option("--std", help="Per-band standard deviations in raw units, comma-separated.")
@click.option("--tile-size", type=int, default=512, show_default=True, help="Suggested tile edge in pixels.")
@click.option("--overlap", type=int, default=64, show_default=True, help="Suggested tile overlap in pixels.")
@click.option("--resolution", type=float, help="Pixel size the model is meant for, in metres.")
@click.option("--name", help="Model name [variant and folder name].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a new decode head's weights.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_verbosity_options
def import_weights(src: str, out: str, bands: str, source_bands: str | None, classes_file: str | None,
                   parts: str, scale: float | None, mean: str | None, std: str | None, tile_size: int,
                   overlap: int, resolution: float | None, name: str | None, seed: int, overwrite: bool,
                   verbose: int, quiet: bool) -> None:
    """Convert a Hugging Face transformers SegFormer checkpoint into a geoseg model file.

    SRC is a local folder holding config.json and model.safetensors (or pytorch_model.bin,
    read without running code), as save_pretrained writes for nvidia/mit-b0 ... b5 and
    segformer-b*-finetuned-*; or one of those files. Nothing is downloaded: fetch hub models
    elsewhere first. With --classes for the user's classes the encoder is imported and the
    decode head is new (untrained); without, or when the classes match the checkpoint's, the
    whole model is kept. A 3-band checkpoint feeding more bands gets the added bands'
    first-layer filters from the mean of its RGB filters, all scaled by 3/bands so activations
    keep their size. The source and what was imported go into the metadata's provenance.

    \b
    Examples:
      geoseg import-weights ./mit-b2 b2.safetensors --bands red,green,blue,nir --classes classes.json
      geoseg import-weights ./segformer-b0-finetuned-ade-512-512 ade.safetensors \\
        --mean 123.675,116.28,103.53 --std 58.395,57.12,57.375
    """
    _configure_logging(verbose, quiet)
    with _user_errors(quiet):
        from pathlib import Path

        from .config import parse_band_list
        from .errors import ConfigError, OutputError
        from .hf_import import import_weights as import_hf
        from .modelfile import Normalization, load_classes, save_model

        out_path = Path(out)
        if out_path.exists() and not overwrite:
            raise OutputError(f"{out}: already exists (use --overwrite to replace it)")
        if not out_path.parent.is_dir():
            raise OutputError(f"{out}: folder {out_path.parent} does not exist")
        names = [b.strip() for b in bands.split(",") if b.strip()]
        if (mean is None) != (std is None):
            raise click.BadParameter("give --mean and --std together", param_hint="--mean/--std")
        if mean is not None and scale is not None:
            raise click.BadParameter("give --scale or --mean/--std, not both", param_hint="--scale")
        if mean is not None and std is not None:
            try:
                means = tuple(float(v) for v in mean.split(","))
                stds = tuple(float(v) for v in std.split(","))
            except ValueError as err:
                raise click.BadParameter(f"expected comma-separated numbers ({err})",
                                         param_hint="--mean/--std") from None
            if len(means) != len(names) or len(stds) != len(names):
                raise ConfigError(f"--mean and --std need one value per band ({len(names)})")
            normalization = Normalization("meanstd", mean=means, std=stds)
        else:
            factor = 1e-4 if scale is None else scale
            normalization = Normalization("scale", scale=(factor,) * len(names), offset=(0.0,) * len(names))
        classes, ignore_index = load_classes(classes_file) if classes_file else (None, None)
        result = import_hf(
            src,
            names,
            classes,
            parts=parts,  # type: ignore[arg-type]
            ignore_index=ignore_index,
            normalization=normalization,
            source_bands=parse_band_list(source_bands) if source_bands else None,
            tile_size=tile_size,
            overlap=overlap,
            resolution_m=resolution,
            name=name,
            seed=seed,
        )
        save_model(out_path, result.state_dict, result.metadata)
        meta = result.metadata
        what = "whole model" if result.parts == "whole" else "encoder (new, untrained decode head)"
        if not quiet:  # -q: only errors
            click.echo(
                f"wrote {out}: {what} of {meta.variant}, {len(meta.bands)} bands, {len(meta.classes)} classes"
                + (f"; {result.band_expansion}" if result.band_expansion else "")
            )


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True,
              callback=_opset_torch_writes, help="ONNX opset.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_verbosity_options
def export(model: str, out: str, opset: int, overwrite: bool, verbose: int, quiet: bool) -> None:
    """Export a model file to ONNX (OUT.onnx), with its metadata in the ONNX metadata_props.

    Batch, height and width stay dynamic. geoseg predict --model OUT.onnx runs it through
    onnxruntime in the same engine (fp32). Needs: pip install 'geoseg[onnx]'.

    \b
    Example:
      geoseg export model.safetensors model.onnx
    """
    _configure_logging(verbose, quiet)
    with _user_errors(quiet):
        from .onnx_export import export_onnx

        export_onnx(model, out, opset=opset, overwrite=overwrite)
        if not quiet:
            click.echo(f"wrote {out} (ONNX opset {opset})")


TRAIN_PRECISIONS = ("fp32", "bf16", "auto")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of training settings.")
@click.option("--image", "images", multiple=True, help="Training image (repeatable; pairs with --labels in order).")
@click.option("--labels", "labels", multiple=True, help="Class raster on the image's grid, or vector polygons (repeatable).")
@click.option("--label-attribute", help="Attribute of vector labels holding the class id or name.")
@click.option("--classes", type=click.Path(dir_okay=False), help="Classes JSON file (ids, names, colours, ignore_index).")
@click.option("--out", help="Model file to write (the best epoch).")
@click.option("--arch", help="SegFormer variant for a new model [segformer-b0].")
@click.option("--init-model", type=click.Path(dir_okay=False), help="Start from this geoseg model file.")
@click.option("--pretrained", type=click.Path(dir_okay=False), help="Start from weights in this safetensors file.")
@click.option("--bands", help="1-based raster bands feeding the model, in its order, e.g. 4,3,2,8.")
@click.option("--train-rows", help="Training rows A:B (B exclusive) [whole image].")
@click.option("--train-window", help="Training window col_off,row_off,width,height.")
@click.option("--train-aoi", type=click.Path(dir_okay=False), help="Training polygons (GeoJSON, GeoPackage).")
@click.option("--val-rows", help="Validation rows A:B (B exclusive).")
@click.option("--val-window", help="Validation window col_off,row_off,width,height.")
@click.option("--val-aoi", type=click.Path(dir_okay=False), help="Validation polygons (GeoJSON, GeoPackage).")
@click.option("--window-px", type=int, help="Training window edge in pixels [256].")
@click.option("--batch-size", type=int, help="Windows per step [8].")
@click.option("--steps", type=int, help="Optimiser steps in total [2000].")
@click.option("--epoch-steps", type=int, help="Steps between validations [200].")
@click.option("--lr", type=float, help="Peak learning rate [6e-4].")
@click.option("--seed", type=int, help="Seed: the same seed gives the same model [0].")
@click.option("--precision", type=click.Choice(TRAIN_PRECISIONS), help="Compute precision [fp32].")
@click.option("--device", help="auto, cpu, cuda or cuda:N [auto].")
@click.option("--threads", type=int, help="CPU threads for the network [all cores].")
@click.option("--resume", is_flag=True, help="Continue the interrupted run whose checkpoint is beside --out.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@_verbosity_options
def train(config_file: str | None, resume: bool, overwrite: bool, verbose: int, quiet: bool, **flags: Any) -> None:
    """Train a land-cover model on images with class rasters or labelled polygons.

    Each epoch predicts the validation region and reports per-class IoU and mIoU; the best
    epoch is written to --out as a geoseg model file, with normalisation statistics from the
    training pixels. Without a validation region (a final fit on all labels, once the settings
    were chosen), the model after the last step is written. A checkpoint beside it lets
    --resume continue an interrupted run.

    \b
    Examples:
      geoseg train --config configs/zion-default.yaml --out zion.safetensors
      geoseg train --image scene.tif --labels fields.gpkg --label-attribute crop \\
        --classes classes.json --val-rows 800:1000 --out crops.safetensors
    """
    _configure_logging(verbose, quiet)
    with _user_errors(quiet):
        from .config import parse_band_list
        from .train import build_train_config, load_train_config_file, train_model

        file_settings = load_train_config_file(config_file) if config_file else {}
        if flags.get("bands") is not None:
            flags["bands"] = parse_band_list(flags["bands"])
        config = build_train_config(file_settings, **flags)
        progress = not quiet and sys.stderr.isatty()
        result = train_model(config, resume=resume, overwrite=overwrite, progress=progress)
        if quiet:  # "only errors": the model file is the result
            return
        if not result.history:
            click.echo(f"no epoch finished; nothing written (checkpoint: {result.checkpoint})")
            return
        if result.best_metrics is None:
            click.echo(
                f"wrote {result.out}: the model after step {result.best_step} (no validation region); "
                f"{result.seconds / 60:.1f} min"
            )
            return
        click.echo(result.best_metrics.format_table())
        click.echo(
            f"\nwrote {result.out}: best validation mIoU {result.best_miou:.4f} at epoch {result.best_epoch} "
            f"(step {result.best_step} of {result.steps_done}); {result.seconds / 60:.1f} min"
        )


@main.command()
@click.argument("pred")
@click.argument("ref")
@click.option("--classes", type=click.Path(dir_okay=False), help="Classes JSON file [class names stored in PRED].")
@click.option("--rows", help="Only rows A:B (B exclusive, 0-based).")
@click.option("--window", help="Only the window col_off,row_off,width,height (pixels).")
@click.option("--aoi", type=click.Path(dir_okay=False), help="Only pixels inside these polygons (GeoJSON, GeoPackage).")
@click.option("--json", "json_file", help="Also write the figures to this JSON file.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
@_verbosity_options
def evaluate(pred: str, ref: str, classes: str | None, rows: str | None, window: str | None, aoi: str | None,
             json_file: str | None, overwrite: bool, verbose: int, quiet: bool) -> None:
    """Score a class raster PRED against a reference class raster REF on the same grid.

    Prints per-class IoU, precision, recall and F1, mean IoU, overall accuracy, Cohen's kappa
    and the confusion matrix, over the pixels valid in both rasters (not nodata, not the
    classes file's ignore index) and inside the region, if one is given.

    \b
    Examples:
      geoseg evaluate landcover.tif reference.tif --classes classes.json
      geoseg evaluate pred.tif ref.tif --rows 1032:1428 --json scores.json
    """
    _configure_logging(verbose, quiet)
    with _user_errors(quiet):
        from .evaluate import check_figures_destination, evaluate_rasters, write_figures
        from .labels import ClassMap, parse_region
        from .modelfile import load_classes

        if json_file:
            inputs = {"the prediction raster (PRED)": pred, "the reference raster (REF)": ref,
                      "the classes file (--classes)": classes, "the area of interest (--aoi)": aoi}
            check_figures_destination(json_file, inputs, overwrite)
        region = parse_region(rows, window, aoi)
        class_map = ClassMap(*load_classes(classes)) if classes else None
        metrics = evaluate_rasters(pred, ref, class_map, region)
        click.echo(metrics.format_table())
        if json_file:
            figures = metrics.to_json(prediction=pred, reference=ref, region=metrics.region)
            write_figures(json_file, figures + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
