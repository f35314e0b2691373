#!/usr/bin/env bash
# One device call's worth of GPU checks, in priority order, each under its own time limit
# so that a slow step cannot take the rest with it (the device tool gives 10 min per call
# and 15 min of device time per session; a machine goes back after 30 s idle, so chain
# work in one call).
#   run: bash benchmarks/gpu_session.sh [tests|epoch|all|batch|mm]   (default: all)
# Writes logs and JSON under $OUT (the device tool's folder) or bench_results/gpu/.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-bench_results/gpu}
mkdir -p "$out"
what=${1:-all}
py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
$py -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"

# The compilation caches (Inductor's FX graphs, AOTAutograd, Triton kernels) live in one
# folder. A call that carries .compile_cache/ (the parts an earlier call wrote to $OUT,
# copied there; see benchmarks/README.md) restores them, and every call saves the folder
# back to $OUT as compile_cache.part.* (at most 5 parts of 12 MiB: the device tool returns
# 8 files, 64 MiB in all). A warm cache cut the first compiled step of a CPU test from
# 849 s to 31 s; a cache from another torch, Triton or GPU only misses.
cache=/tmp/diffnas_compile_cache
export TORCHINDUCTOR_CACHE_DIR=$cache/inductor TRITON_CACHE_DIR=$cache/triton
mkdir -p "$cache"
if compgen -G ".compile_cache/compile_cache.part.*" >/dev/null; then
  cat .compile_cache/compile_cache.part.* | tar -xzf - -C "$cache" \
    && echo "compile cache restored: $(du -sh "$cache" | cut -f1)"
fi
save_cache() {
  rm -f "$out"/compile_cache.part.*
  tar -czf /tmp/compile_cache.tgz -C "$cache" . || return
  split -b 12M /tmp/compile_cache.tgz "$out/compile_cache.part."
  local n; n=$(compgen -G "$out/compile_cache.part.*" | wc -l)
  if [ "$n" -gt 5 ]; then
    rm -f "$out"/compile_cache.part.*
    echo "compile cache not saved: $(du -h /tmp/compile_cache.tgz | cut -f1) compressed, over 5 parts"
  else
    echo "compile cache saved: $n part(s), $(du -h /tmp/compile_cache.tgz | cut -f1) compressed"
  fi
}

tests_pid=
if [ "$what" = tests ] || [ "$what" = all ]; then
  # the correctness guard, the savers, the avg-pool workaround and the CUDA graph step on
  # CUDA; with "all" they run beside the epoch's cold compile (CPU-bound, minutes) and are
  # over (or killed) before its timed part begins
  ( echo "tests start $(date +%T)"
    timeout 170 $py -m pytest -q -p no:cacheprovider -rf --tb=short \
      tests/test_fast_supernet.py tests/test_ops.py tests/test_cuda_graph.py -k "cuda or graph" \
      2>&1 | tail -40
    echo "tests end $(date +%T)" ) > "$out/tests.log" 2>&1 &
  tests_pid=$!
fi
if [ "$what" = epoch ] || [ "$what" = all ]; then
  # the issue-5 figure through the library's configured_step: Inductor per edge, bf16,
  # cudnn.benchmark, whole-step CUDA graph, batch 1250, one measured epoch
  echo "epoch start $(date +%T)"
  timeout 470 $py benchmarks/search_epoch.py --amp bf16 --batches 1250 --steps 5 --warmup 2 \
    --cudnn-benchmark 1 --compile default --scope edge --graph 1 --full-epoch 1250 \
    --out "$out/epoch_graph_b1250.json" 2>&1 | tee "$out/epoch.log" | tail -12
  echo "epoch end $(date +%T)"
fi
if [ -n "$tests_pid" ]; then wait "$tests_pid"; cat "$out/tests.log"; fi
# Candidates for the last percent, one per device call (each compiles cold for ~6 min):
#   batch: the same step at batch 1563 (16 steps, the last of 1555; ~57 GB est.), since a
#          GPU-bound step may still gain a little throughput from a bigger batch;
#   mm:    Inductor's conv_1x1_as_mm at batch 1250 (its cold compile and first step took
#          over 400 s on an H200 on 2026-12-04, so no full epoch: give the call timeout_s 600).
if [ "$what" = batch ]; then
  timeout 560 $py benchmarks/search_epoch.py --amp bf16 --batches 1563 --steps 5 --warmup 2 \
    --cudnn-benchmark 1 --compile default --scope edge --graph 1 --full-epoch 1563 \
    --out "$out/epoch_graph_b1563.json" 2>&1 | grep -v "warm-up step [1-9]" | tail -8
fi
if [ "$what" = mm ] || [ "$what" = variants ]; then
  timeout 560 $py benchmarks/search_epoch.py --amp bf16 --batches 1250 --steps 5 --warmup 2 \
    --cudnn-benchmark 1 --compile default --scope edge --graph 1 \
    --inductor conv_1x1_as_mm=True --out "$out/epoch_graph_b1250_1x1mm.json" 2>&1 \
    | grep -v "warm-up step [1-9]" | tail -8
fi
save_cache
