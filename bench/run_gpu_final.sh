#!/usr/bin/env bash
# Device call A: integration GPU tests, end-to-end FPS of the fast path, accuracy vs the reference path,
# ring path at N=1.  Usage (device tool): bash bench/run_gpu_final.sh
source bench/devenv.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L() { echo "== $*" | tee -a "$OUT/log.txt"; }
C="python3 -m liveact.tools.cli"
B="$C bench fps --preset liveact-18b --size 416*720 --no-progress"
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv,noheader | tee -a "$OUT/log.txt"
L "gpu integration tests"
python3 -m pytest -q -m gpu tests/test_gpu_runtime.py -p no:cacheprovider 2>&1 | tail -4 | tee -a "$OUT/log.txt"
L "triton ops (FP8 GEMM + INT8/FP8 attention), FP8 KV cache, CUDA graphs"
$B --ops triton --fp8-kv-cache --chunks 8 --warmup 3 --json "$OUT/fps_triton_fp8kv.json" 2>&1 | tail -22 | tee -a "$OUT/log.txt"
L "triton ops, bf16 KV cache, CUDA graphs"
$B --ops triton --chunks 8 --warmup 3 --json "$OUT/fps_triton_bf16kv.json" 2>&1 | tail -22 | tee -a "$OUT/log.txt"
L "accuracy after 3 chunks: triton vs reference ops, FP8 KV cache"
python3 -m liveact.bench.accuracy --preset liveact-18b --size 416*720 --chunks 3 --ops triton --fp8-kv-cache \
  --json "$OUT/accuracy.json" 2>&1 | tail -4 | tee -a "$OUT/log.txt"
L "ring path at N=1 vs plain, triton ops, eager"
$B --ops triton --fp8-kv-cache --chunks 5 --warmup 2 --no-cuda-graph --json "$OUT/fps_plain_eager.json" 2>&1 | grep -E "steady_fps|ms_per_step_steady" | tee -a "$OUT/log.txt"
$B --ops triton --fp8-kv-cache --chunks 5 --warmup 2 --no-cuda-graph --ring --json "$OUT/fps_ring1_eager.json" 2>&1 | grep -E "steady_fps|ms_per_step_steady|ops" | tee -a "$OUT/log.txt"
