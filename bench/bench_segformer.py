"""geoseg's SegFormer against transformers' with the same weights, batch and tile size, in one run.

Prints tiles per second (network forward only, no reading, blending or writing) for each variant
and its ratio to transformers at the same precision; asserts nothing. From the repository root:

    python bench/bench_segformer.py                        # B0, 4 bands, 8 classes, batch 4, tile 512
    python bench/bench_segformer.py --arch b2 --repeats 3
    python bench/bench_segformer.py --compile              # also torch.compile (needs a C++ compiler)
    python bench/bench_segformer.py --onnx                 # also the ONNX export in onnxruntime
    python bench/bench_segformer.py --precisions fp32      # skip bf16 (8-25x slower without native bf16)

transformers' model gets random weights and is written with ``save_pretrained``; geoseg's reads that
folder with ``geoseg.hf_import`` (the ``geoseg import-weights`` path), so both run the same weights.
Variants are timed round-robin (one batch each per round), so a noisy machine slows all alike; the
figure is the median over rounds, after one untimed warm-up batch each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from geoseg.hf_import import import_weights
from geoseg.inference import cpu_has_native_bf16
from geoseg.segformer import SegformerConfig, SegformerForSemanticSegmentation, segformer_config

BAND_NAMES = ("red", "green", "blue", "nir", "swir1", "swir2", "b7", "b8", "b9", "b10", "b11", "b12")


def build_pair(
    config: SegformerConfig, folder: Path, onnx_path: Path | None = None
) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]:
    """transformers' model with random weights, geoseg's with the same weights via import, and
    (with ``onnx_path``) geoseg's exported to ONNX and run by onnxruntime."""
    import transformers

    hf_config = transformers.SegformerConfig(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    )
    torch.manual_seed(0)
    reference = transformers.SegformerForSemanticSegmentation(hf_config).eval()
    reference.save_pretrained(folder)
    imported = import_weights(folder, BAND_NAMES[: config.num_channels])
    ours = SegformerForSemanticSegmentation(SegformerConfig.from_dict(dict(imported.metadata.arch_config)))
    ours.load_state_dict(imported.state_dict, strict=True)
    runtime = None
    if onnx_path is not None:
        from geoseg.modelfile import save_model
        from geoseg.onnx_export import export_onnx, load_onnx_model

        model_file = onnx_path.with_suffix(".safetensors")
        save_model(model_file, imported.state_dict, imported.metadata)
        runtime = load_onnx_model(export_onnx(model_file, onnx_path)).module
    return reference, ours.eval(), runtime


def time_round_robin(
    variants: dict[str, Callable[[], torch.Tensor]], repeats: int
) -> dict[str, list[float]]:
    """Seconds per batch of each variant, one batch each per round, after one warm-up batch each."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for run in variants.values():
            run()
        for _ in range(repeats):
            for name, run in variants.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="b0", help="b0 ... b5 [b0]")
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported) [5]")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(geoseg)")
    parser.add_argument("--onnx", action="store_true", help="also time the ONNX export in onnxruntime (fp32)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads [torch's default]")
    args = parser.parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    config = segformer_config(args.arch, num_channels=args.bands, num_labels=args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx" if args.onnx else None
        reference, ours, runtime = build_pair(config, Path(tmp) / "hf", onnx_path)
    ours_cl = SegformerForSemanticSegmentation(config).eval()
    ours_cl.load_state_dict(ours.state_dict())
    ours_cl.to(memory_format=torch.channels_last)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__} "
        f"(attention: {reference.config._attn_implementation}), threads {torch.get_num_threads()}"
    )
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 (AVX512-BF16/AMX): "
        f"{cpu_has_native_bf16()}, oneDNN bf16 path: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}"
    )
    print(
        f"segformer-{args.arch}, {args.bands} bands, {args.classes} classes, batch {args.batch}, "
        f"tile {args.tile}, median of {args.repeats} rounds"
    )
    x = torch.randn(args.batch, args.bands, args.tile, args.tile, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = reference(pixel_values=x).logits
        got = ours(x)
    print(f"fp32 logits, geoseg vs transformers: max |difference| {(got - expected).abs().max().item():.2e}")

    precisions = [p for p in args.precisions.split(",") if p]
    rates: dict[tuple[str, str], float] = {}
    compiled = None
    if args.compile:
        compiled = torch.compile(ours_cl)
        started = time.perf_counter()
        with torch.inference_mode():
            compiled(x_cl)
        print(f"torch.compile: first batch (compilation) took {time.perf_counter() - started:.0f} s")

    for precision in precisions:
        autocast = precision != "fp32"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32

        def under_autocast(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                    return fn()

            return run

        variants = {
            "transformers": under_autocast(lambda: reference(pixel_values=x).logits),
            "geoseg": under_autocast(lambda: ours(x)),
            "geoseg channels_last": under_autocast(lambda: ours_cl(x_cl)),
        }
        if compiled is not None:
            variants["geoseg channels_last + compile"] = under_autocast(lambda: compiled(x_cl))
        if runtime is not None and precision == "fp32":
            variants["geoseg ONNX in onnxruntime"] = lambda: runtime(x)
        repeats = args.repeats if precision == "fp32" else max(2, args.repeats // 2)
        seconds = time_round_robin(variants, repeats)
        base = args.batch / statistics.median(seconds["transformers"])
        print(f"\n{precision}{' autocast' if autocast else ''} ({repeats} rounds):")
        for name, times in seconds.items():
            rate = rates[precision, name] = args.batch / statistics.median(times)
            spread = f"{args.batch / max(times):.2f}-{args.batch / min(times):.2f}"
            print(f"  {name:32s} {rate:7.2f} tiles/s  (range {spread})  {rate / base:5.2f}x transformers")
        if precision != "fp32":
            with torch.inference_mode():
                with torch.autocast("cpu", dtype=dtype):
                    reduced = ours(x).float()
            agree = (reduced.argmax(1) == got.argmax(1)).float().mean().item()
            print(f"  {precision} vs fp32 class agreement on this random batch: {100 * agree:.2f} %")
    if "fp32" in precisions and len(precisions) > 1:
        print("\nagainst transformers in fp32:")
        for (precision, name), rate in rates.items():
            if precision != "fp32":
                print(f"  {name} {precision}: {rate / rates['fp32', 'transformers']:.2f}x")

if __name__ == "__main__":
    main()
