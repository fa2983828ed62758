#!/usr/bin/env bash
# The checks and figures that need a CUDA GPU, in one go (run from the repository root on a
# machine with one, with geoseg and its dependencies importable and ../shared/data present):
#   1. the test suite with CUDA present (the CUDA-only tests run; `auto` picks the GPU);
#   2. bench_predict on CUDA: model only against `geoseg predict` (and warm, in process), fp32
#      at the CPU figures' batch size, then bf16 at a batch size that suits a GPU, with the
#      default readers and with one;
#   3. how often bf16 and fp16 change the class map on the GPU (bench_precision);
#   4. a profile of the calling thread during one GPU predict (where its time goes).
#   5. with CPU_PARALLEL (e.g. "1 2 4"): bench_predict on that machine's CPU, fp32 batch 4, with each
#      number of parallel batches (how the CPU path scales past this project's 2 cores); with
#      CPU_SPIN also once more at that GOMP_SPINCOUNT (both the model alone and the command).
#   6. with "threads" in STEPS (not run by default): bench/bench_threads.py on that machine's CPU,
#      8192² mosaic: where each thread's time goes at each of THREAD_SETTINGS (default "default"),
#      with the network alone beside each; then with the nearly free network at TINY_SETTINGS;
#      with TCMALLOC (a path to libtcmalloc_minimal.so.4) the default setting once more under it.
# QUICK=1 leaves out the one-reader run and the profile (for a short lease); STEPS picks steps by
# name (default "tests fp32 bf16 one-reader precision profile cpu").
# bench/bench_read.py gives the reader's ceiling with 1..N threads (CPU only).
# Logs go to $OUT (default bench/out/gpu).
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-tests fp32 bf16 one-reader precision profile cpu}
[ -n "${QUICK:-}" ] && STEPS=${STEPS//one-reader/} && STEPS=${STEPS//profile/}
section() { echo; echo "=== $* ($(date +%T))"; }
step() { [[ " $STEPS " == *" $1 "* ]]; }

section machine
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, rasterio; print('torch', torch.__version__, torch.cuda.get_device_name(), '| rasterio', rasterio.__version__, 'GDAL', rasterio.__gdal_version__)"
nproc
lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\)|Core\(s\)|Socket\(s\)|Flags" | cut -c1-160
python3 -c "import torch; print('torch threads', torch.get_num_threads())"

if step tests; then
section tests with CUDA present
timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 180 -o addopts="-ra -m 'not slow'" \
    ${GPU_TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -25
fi

if step fp32; then
section "bench_predict cuda fp32 batch 4"
timeout 200 python3 bench/bench_predict.py --device cuda --precision fp32 --batch-size 4 --repeat 2 --seconds 5 \
    --rss 2048,8192 --warm 2>&1 | tee "$OUT/predict_fp32_b4.log"
fi

if step bf16; then
section "bench_predict cuda bf16 batch ${GPU_BATCH:-32}"
timeout 200 python3 bench/bench_predict.py --device cuda --precision bf16 --batch-size "${GPU_BATCH:-32}" --repeat 2 \
    --seconds 5 --rss '' --warm 2>&1 | tee "$OUT/predict_bf16.log"
fi

if step one-reader; then
section "bench_predict cuda bf16 batch ${GPU_BATCH:-32}, one reader"
timeout 200 python3 bench/bench_predict.py --device cuda --precision bf16 --batch-size "${GPU_BATCH:-32}" --repeat 1 \
    --seconds 3 --rss '' --warm --reader-threads 1 2>&1 | tee "$OUT/predict_bf16_1reader.log"

fi

if step precision; then
section "bench_precision cuda"
timeout 120 python3 bench/bench_precision.py --device cuda --precisions fp32,bf16,fp16 2>&1 | tee "$OUT/precision.log"
fi

if step profile; then
section "profile of one GPU predict (calling thread)"
timeout 120 python3 -m cProfile -o "$OUT/predict.prof" -m geoseg predict bench/out/zion_8192.tif "$OUT/p.tif" \
    --device cuda --precision bf16 --batch-size "${GPU_BATCH:-32}" --overwrite -q
rm -f "$OUT/p.tif"
python3 -c "import pstats; pstats.Stats('$OUT/predict.prof').sort_stats('tottime').print_stats(15)" | tail -24
fi

if step cpu && [ -n "${CPU_PARALLEL:-}" ]; then
for p in $CPU_PARALLEL; do
section "bench_predict cpu fp32 batch 4, $p parallel batches"
timeout 200 python3 bench/bench_predict.py --device cpu --precision fp32 --batch-size 4 --repeat 1 --seconds 4 \
    --rss '' --parallel-batches "$p" 2>&1 | tee "$OUT/cpu_p$p.log"
done
if [ -n "${CPU_SPIN:-}" ]; then
p=${CPU_PARALLEL%% *}
section "bench_predict cpu fp32 batch 4, $p parallel batches, GOMP_SPINCOUNT=$CPU_SPIN"
GOMP_SPINCOUNT=$CPU_SPIN timeout 200 python3 bench/bench_predict.py --device cpu --precision fp32 --batch-size 4 \
    --repeat 1 --seconds 4 --rss '' --parallel-batches "$p" 2>&1 | tee "$OUT/cpu_p${p}_spin.log"
fi
fi

if step threads; then
section "bench_threads cpu, 8192² mosaic: ${THREAD_SETTINGS:-default}"
timeout 300 python3 bench/bench_threads.py --scene-px 8192 --settings "${THREAD_SETTINGS:-default}" \
    --model-only 4 2>&1 | tee "$OUT/threads.log"
section "bench_threads cpu --tiny: ${TINY_SETTINGS:-default}"
timeout 120 python3 bench/bench_threads.py --scene-px 8192 --tiny --settings "${TINY_SETTINGS:-default}" \
    2>&1 | tee "$OUT/threads_tiny.log"
if [ -n "${TCMALLOC:-}" ]; then
section "bench_threads cpu under $TCMALLOC"
LD_PRELOAD=$TCMALLOC timeout 120 python3 bench/bench_threads.py --scene-px 8192 --settings default \
    2>&1 | tee "$OUT/threads_tcmalloc.log"
fi
fi
