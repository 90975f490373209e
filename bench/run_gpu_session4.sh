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
if [ "$1" = gluon_gemm ]; then
  # bash bench/run_gpu_session4.sh gluon_gemm   # kernels/fp8_gemm_gluon.py: GPU tests, bit-equality with the Triton
  #                                             # kernel at the real shapes, the issue-4 table with the Gluon rows
  L "gpu tests: Gluon FP8 GEMM"
  timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_gemm.py -k gluon 2>&1 | tail -5 | tee -a "$LOG"
  L "Gluon vs Triton GEMM: equal bits? (precise, real shapes)"
  timeout 100 python3 - <<'PY' 2>&1 | tail -6 | tee -a "$LOG"
import torch
from liveact.kernels import fp8_gemm_gluon as GG
from liveact.kernels.fp8_gemm import fp8_gemm, quantize_weight
from liveact.kernels.norm_quant import quantize_rows
from liveact.bench.kernels_gemm import _problem
for m, k, n, epi in [(9360, 5120, 5120, "gated_residual"), (9360, 13824, 5120, "none"), (9360, 5120, 13824, "gelu")]:
    x, w, bias, gate, res = _problem(m, k, n, "cuda")
    qa = quantize_rows(x); wq, ws = quantize_weight(w)
    kw = dict(bias=bias, epilogue=epi, residual=res, gate=gate)
    g = GG.fp8_gemm_gluon(qa.data, qa.scale.reshape(m).float(), wq, ws, **kw)
    t = fp8_gemm(qa, None, wq, ws, **kw)
    d = (g.float() - t.float()).abs()
    print(f"{m}x{k}->{n} {epi}: equal={torch.equal(g, t)} differing={(d > 0).float().mean().item():.2e} max={d.max().item():.3e}")
PY
  L "liveact bench kernels --only gemm (with the Gluon rows)"
  timeout 240 $C bench kernels --only gemm --json "$OUT/gemm_bench4_gluon.json" > "$OUT/gemm_bench4_gluon.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "^gemm" "$OUT/gemm_bench4_gluon.txt" | grep -v audio | cut -c1-150 | tee -a "$LOG"
fi
if [ "$1" = gemm_e2e ]; then
  # bash bench/run_gpu_session4.sh gemm_e2e   # precise GEMMs through the Gluon kernel by default: GPU tests, the
  #                                           # issue-4 table, FPS default (+ profile), accuracy after 3 chunks
  L "gpu tests: fp8_gemm (Gluon dispatch, bit-equality with the Triton kernel), fp8_linear_ops, triton_ops"
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_gemm.py tests/test_fp8_linear_ops.py \
    tests/test_triton_ops.py 2>&1 | tail -4 | tee -a "$LOG"
  L "liveact bench kernels --only gemm"
  timeout 200 $C bench kernels --only gemm --json "$OUT/gemm_bench4_final.json" > "$OUT/gemm_bench4_final.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "^gemm" "$OUT/gemm_bench4_final.txt" | grep -v audio | cut -c1-150 | tee -a "$LOG"
  L "fps: default (+ profile)"
  $B --chunks 7 --warmup 3 --json "$OUT/fps_s4_gluon_gemm.json" --profile "$OUT/profile_s4_gluon_gemm.txt" 2>&1 \
    | grep -E "$S" | tee -a "$LOG"
  head -8 "$OUT/profile_s4_gluon_gemm.txt" | cut -c1-100 | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path (default)"
  $A --json "$OUT/accuracy_s4_gluon_gemm.json" 2>&1 | tail -3 | tee -a "$LOG"
fi
if [ "$1" = final1 ]; then
  # bash bench/run_gpu_session4.sh final1   # the session's end state: GPU tests, producers table
  # bash bench/run_gpu_session4.sh final2   # FPS default (+ profile) / fast / fast + VAE / default + VAE, accuracy
  L "gpu tests: Gluon GEMM, fast accumulation + residual (details)"
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_gemm.py -k "gluon_gemm and True" --tb=line \
    2>&1 | tail -12 | tee -a "$LOG"
  timeout 60 python3 - <<'PY' 2>&1 | tail -6 | tee -a "$LOG"
import torch
from liveact.kernels import fp8_gemm_gluon as GG
from liveact.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, quantize_weight, LARGE_M_CONFIGS
from liveact.kernels.norm_quant import quantize_rows
from liveact.bench.kernels_gemm import _problem
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
for m, k, n in [(9360, 5120, 5120), (1000, 512, 200)]:
    x, w, bias, gate, res = _problem(m, k, n, "cuda")
    qa = quantize_rows(x); wq, ws = quantize_weight(w)
    kw = dict(bias=bias, epilogue="residual", residual=res, skip_rows=m // 3, rows_per_batch=m)
    ref = fp8_gemm_ref(qa, None, wq, ws, **kw)
    t = fp8_gemm(qa, None, wq, ws, fast_accum=True, config=dict(LARGE_M_CONFIGS[(True, "residual")][0]), **kw)
    g = GG.fp8_gemm_gluon(qa.data, qa.scale.reshape(m).float(), wq, ws, fast_accum=True, **kw)
    s = m // 3
    print(m, k, n, f"triton-fast vs ref {rel(t, ref):.2e} skip-rows-kept {torch.equal(t[:s], res[:s])} | gluon-fast vs ref "
          f"{rel(g, ref):.2e} kept {torch.equal(g[:s], res[:s])} | gluon vs triton {rel(g, t):.2e} nan {g.isnan().any().item()}")
PY
  L "gpu tests: qk_prep (new rope_keys), attention ops, triton ops (fast path vs reference over chunks), runtime"
  timeout 220 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_qk_prep.py tests/test_attention_ops.py \
    tests/test_triton_ops.py tests/test_gpu_runtime.py 2>&1 | tail -4 | tee -a "$LOG"
  L "producers vs copy (attention side)"
  timeout 100 python3 -m liveact.bench.kernels_attention --producers > "$OUT/producers_s4.txt" 2>&1
  grep -E "copy|qk_prep|rope_keys|quantize_v|convkv|requant" "$OUT/producers_s4.txt" | cut -c1-140 | tee -a "$LOG"
fi
if [ "$1" = final2 ]; then
  L "gpu tests: Gluon GEMM with fast accumulation (Triton table fixed: the residual family's s4 config needed 262 KB)"
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_gemm.py -k "gluon_gemm and True" --tb=line \
    2>&1 | tail -3 | tee -a "$LOG"
  L "fps: default (+ profile) / fast-accum / fast-accum + VAE / default + VAE"
  $B --chunks 7 --warmup 3 --json "$OUT/fps_s4_final.json" --profile "$OUT/profile_s4_final.txt" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 7 --warmup 3 --fast-accum --json "$OUT/fps_s4_final_fast.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 6 --warmup 3 --fast-accum --vae --json "$OUT/fps_s4_final_fast_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 6 --warmup 3 --vae --json "$OUT/fps_s4_final_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  head -14 "$OUT/profile_s4_final.txt" | cut -c1-100 | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path (default)"
  $A --json "$OUT/accuracy_s4_final.json" 2>&1 | tail -3 | tee -a "$LOG"
fi
if [ "$1" = tables ]; then
  # bash bench/run_gpu_session4.sh tables   # the closing tables: GEMM (small M now graph-timed) and attention
  L "liveact bench kernels --only gemm"
  timeout 200 $C bench kernels --only gemm --json "$OUT/gemm_bench4_tables.json" > "$OUT/gemm_bench4_tables.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "^gemm" "$OUT/gemm_bench4_tables.txt" | cut -c1-150 | tee -a "$LOG"
  L "liveact bench kernels --only attention"
  timeout 220 $C bench kernels --only attention --json "$OUT/attention_bench4_tables.json" \
    > "$OUT/attention_bench4_tables.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "self_attn|cross_attn" "$OUT/attention_bench4_tables.txt" | cut -c1-150 | tee -a "$LOG"
fi
