#!/usr/bin/env bash
# Device calls of session 4 (2026-11-25).  Usage (device tool):
#   bash bench/run_gpu_session4.sh check   # GPU tests of session 3's last refactor; Nsight Compute counters of the
#                                          # attention kernel, our O-proj GEMM (plain / gated residual), _scaled_mm
source bench/gpu_session_lib.sh "$1"
NCU="ncu --clock-control none --launch-skip 2 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis
     --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy"
ncu_run() {   # name, kernel regex, probe args...
  local name=$1 re=$2; shift 2
  timeout 240 $NCU -k "regex:$re" python3 -m liveact.bench.ncu_probe "$@" > "$OUT/ncu_$name.txt" 2>&1
  echo "-- ncu $name (rc $?)" | tee -a "$LOG"
  grep -E "Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Executed Ipc Active|No Eligible|Registers Per|Achieved Occupancy|L2 Hit Rate|Mem Busy|Max Bandwidth|One or More Eligible|Stall" \
    "$OUT/ncu_$name.txt" | head -30 | tee -a "$LOG"
}
if [ "$1" = check ]; then
  L "gpu tests: Gluon attention, attention ops (per-block dispatch refactor), runtime"
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gluon.py tests/test_attention_ops.py \
    tests/test_gpu_runtime.py 2>&1 | tail -4 | tee -a "$LOG"
  L "ncu"
  ncu --version | tail -1 | tee -a "$LOG"
  ncu_run attn _attn_fwd_gluon attn
  ncu_run gemm_plain _fp8_gemm_kernel gemm none
  ncu_run gemm_gated _fp8_gemm_kernel gemm gated_residual
  ncu_run scaled_mm "gemm|xmma|cutlass" scaled_mm
fi
if [ "$1" = gemm ]; then
  # bash bench/run_gpu_session4.sh gemm   # GEMM epilogue in column halves (no spills) + tanh.approx GELU: GPU tests,
  #                                       # config sweep (128x128 5-6 stages, 1 warpgroup x 2 CTAs per SM);
  #                                       # attention warp-stall reasons (ncu)
  L "gpu tests: fp8_gemm, fp8_linear_ops"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_gemm.py tests/test_fp8_linear_ops.py 2>&1 \
    | tail -3 | tee -a "$LOG"
  L "gemm sweep"
  timeout 300 python3 -m liveact.bench.kernels_gemm --sweep gemm --json "$OUT/gemm_sweep4.json" > "$OUT/gemm_sweep4.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "sweep-gemm" "$OUT/gemm_sweep4.txt" | cut -c1-130 | tee -a "$LOG"
  L "gemm sweep, warp specialization with epilogues"
  timeout 120 python3 -m liveact.bench.kernels_gemm --sweep risky > "$OUT/gemm_sweep4_risky.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "sweep-gemm" "$OUT/gemm_sweep4_risky.txt" | cut -c1-130 | tee -a "$LOG"
  L "ncu: attention warp stall reasons"
  timeout 200 ncu --clock-control none --launch-skip 2 --launch-count 1 -k regex:_attn_fwd_gluon \
    --metrics "regex:^smsp__average_warps_issue_stalled_[a-z_]+_per_issue_active\.ratio$,regex:^sm__pipe_[a-z_]+_cycles_active\.avg\.pct_of_peak_sustained_active$,regex:^sm__inst_executed_pipe_[a-z_]+\.avg\.pct_of_peak_sustained_active$" \
    python3 -m liveact.bench.ncu_probe attn > "$OUT/ncu_attn_stalls.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"
  grep -E "stalled|pipe" "$OUT/ncu_attn_stalls.txt" | sort -k3 -n -r | head -40 | tee -a "$LOG"
fi
if [ "$1" = measure ]; then
  # bash bench/run_gpu_session4.sh measure   (carry out/ab): GEMM epilogue A/B (session-3 kernel vs now, one
  # process), the issue-4 GEMM table, FPS default (+ profile) / fast-accum, fast-accum accuracy after 3 chunks
  L "A/B: session-3 fp8_gemm vs the current one (epilogues)"
  cp out/ab/old_fp8_gemm.py kernels/_old_fp8_gemm.py
  timeout 150 python3 out/ab/ab_gemm.py 2>&1 | tail -7 | tee -a "$LOG"; rm -f kernels/_old_fp8_gemm.py
  L "liveact bench kernels --only gemm"
  timeout 200 $C bench kernels --only gemm --json "$OUT/gemm_bench4.json" > "$OUT/gemm_bench4.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "^gemm|^producer" "$OUT/gemm_bench4.txt" | cut -c1-140 | tee -a "$LOG"
  L "fps: default (+ profile) / fast-accum"
  $B --chunks 7 --warmup 3 --json "$OUT/fps_s4.json" --profile "$OUT/profile_s4.txt" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 7 --warmup 3 --fast-accum --json "$OUT/fps_s4_fast.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  head -14 "$OUT/profile_s4.txt" | cut -c1-100 | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path, fast accumulation"
  $A --fast-accum --json "$OUT/accuracy_s4_fast.json" 2>&1 | tail -3 | tee -a "$LOG"
fi
if [ "$1" = cross ]; then
  # bash bench/run_gpu_session4.sh cross   # both cross-attention contexts in one Gluon launch (kv2): GPU tests,
  #                                         # the attention table (self, producers, cross rows), FPS default + profile
  L "gpu tests: Gluon attention, attention ops, fp8_gemm (rounding chain), runtime"
  timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gluon.py tests/test_attention_ops.py \
    tests/test_fp8_gemm.py tests/test_gpu_runtime.py 2>&1 | tail -4 | tee -a "$LOG"
  L "liveact bench kernels --only attention"
  timeout 200 $C bench kernels --only attention --json "$OUT/attention_bench4.json" > "$OUT/attention_bench4.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "self_attn|cross_attn|qk_prep|rope_keys|quantize_v|convkv|ConvKV|requant|copy" \
    "$OUT/attention_bench4.txt" | cut -c1-150 | tee -a "$LOG"
  L "fps: default (+ profile)"
  $B --chunks 7 --warmup 3 --json "$OUT/fps_s4_cross.json" --profile "$OUT/profile_s4_cross.txt" 2>&1 | grep -E "$S" \
    | tee -a "$LOG"
  head -8 "$OUT/profile_s4_cross.txt" | cut -c1-100 | tee -a "$LOG"
fi
