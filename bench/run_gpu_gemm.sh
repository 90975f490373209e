#!/usr/bin/env bash
# Device call: FP8 GEMM + producer (issue 4): GPU tests, the comparison table with the fixed config table,
# the explicit-config sweep, then the risky warp-specialized epilogue variants in their own process.
# Usage (device tool): bash bench/run_gpu_gemm.sh
source bench/devenv.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L() { echo "== $*" | tee -a "$OUT/gemm_log.txt"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader | tee -a "$OUT/gemm_log.txt"
L "gpu tests: norm_quant, fp8_gemm, fp8_linear_ops"
timeout 150 python3 -m pytest -q -m gpu tests/test_norm_quant.py tests/test_fp8_gemm.py tests/test_fp8_linear_ops.py \
  -p no:cacheprovider 2>&1 | tail -4 | tee -a "$OUT/gemm_log.txt"
L "bench kernels --only gemm (fixed config table)"
timeout 200 python3 -m liveact.bench.kernels_gemm --json "$OUT/gemm_bench.json" > "$OUT/gemm_bench.log" 2>&1
tail -40 "$OUT/gemm_bench.log" | tee -a "$OUT/gemm_log.txt"
L "sweep: gemm configs + producer"
timeout 200 python3 -m liveact.bench.kernels_gemm --sweep gemm,producer > "$OUT/gemm_sweep.log" 2>&1
L "sweep: warp-specialized epilogues (may abort the compiler)"
timeout 60 python3 -m liveact.bench.kernels_gemm --sweep risky > "$OUT/gemm_sweep_risky.log" 2>&1; echo "rc $?" >> "$OUT/gemm_sweep_risky.log"
cat "$OUT/gemm_sweep.log" "$OUT/gemm_sweep_risky.log" | grep -v "^kernel " | cut -c1-140
