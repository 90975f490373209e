#!/usr/bin/env bash
# Device calls of the second 2026-11-24 session.  Usage (device tool):
#   bash bench/run_gpu_session2.sh kernels   # GPU tests of the changed kernels + the kernel tables (gemm, attention)
#   bash bench/run_gpu_session2.sh e2e       # end-to-end FPS (+ profile), variants, accuracy vs the reference path
#   bash bench/run_gpu_session2.sh e2e2      # the same after the fused RMSNorm, + VAE decode
#   bash bench/run_gpu_session2.sh final     # defaults at the end of the session (auto attention kernel, SDPA cross)
#   (the per-block K scale runs it prepared were made by bench/run_gpu_session3.sh kblock1 / kblock2)
source bench/gpu_session_lib.sh "$1"
if [ "$1" = kernels ]; then
  # sageattention 1.0.6 (the baseline the attention table names) is not in the image: carry its wheel
  if ls .whl/sageattention-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sage .whl/sageattention-*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/sage
  fi
  L "gpu tests of the changed kernels (tests/test_attention_gluon.py: run by bench/attention_gluon_bench.py's author)"
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_norm_quant.py tests/test_fp8_gemm.py \
    tests/test_attention.py tests/test_qk_prep.py tests/test_convkv.py tests/test_attention_ops.py \
    tests/test_fp8_linear_ops.py tests/test_gpu_runtime.py 2>&1 | tail -6 | tee -a "$LOG"
  L "bench kernels --only attention"
  timeout 140 $C bench kernels --only attention --json "$OUT/attention_bench.json" > "$OUT/attention_bench.log" 2>&1
  tail -30 "$OUT/attention_bench.log" | tee -a "$LOG"
  L "bench kernels --only gemm"
  timeout 170 $C bench kernels --only gemm --json "$OUT/gemm_bench.json" > "$OUT/gemm_bench.log" 2>&1
  grep -v "^kernel" "$OUT/gemm_bench.log" | cut -c1-150 | tee -a "$LOG"
  L "producer sweep (rows, warps, split)"
  timeout 50 python3 -m liveact.bench.kernels_gemm --sweep producer 2>&1 | grep -v "^kernel" | cut -c1-110 | tee -a "$LOG"
fi
if [ "$1" = final ]; then
  L "gpu tests: attention ops (cross-attention = reference SDPA, Gluon self-attention)"
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_ops.py 2>&1 | tail -3 | tee -a "$LOG"
  L "final: --ops triton (auto = Gluon self-attention, SDPA cross-attention, fused RMSNorm), precise / fast-accum"
  $B --chunks 8 --warmup 3 --json "$OUT/fps_final.json" --profile "$OUT/profile_final.txt" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 8 --warmup 3 --fast-accum --json "$OUT/fps_final_fast.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 7 --warmup 3 --fast-accum --vae --json "$OUT/fps_final_fast_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path: default / fast-accum"
  $A --json "$OUT/accuracy_final.json" 2>&1 | tail -4 | tee -a "$LOG"
  $A --fast-accum --json "$OUT/accuracy_final_fast.json" 2>&1 | tail -4 | tee -a "$LOG"
fi
if [ "$1" = e2e2 ]; then
  L "triton ops + fused RMSNorm: default / gluon + fast-accum, FP8 KV cache, CUDA graphs"
  $B --chunks 8 --warmup 3 --json "$OUT/fps_triton_rms.json" --profile "$OUT/profile_triton_rms.txt" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 8 --warmup 3 --attention-kernel gluon --fast-accum --json "$OUT/fps_gluon_fast_rms.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  L "same + streaming VAE decode (416x720, then 480x832 / 512x512)"
  $B --chunks 7 --warmup 3 --attention-kernel gluon --fast-accum --vae --json "$OUT/fps_gluon_fast_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path, gluon + fast-accum, with the fused RMSNorm"
  $A --attention-kernel gluon --fast-accum --json "$OUT/accuracy_gluon_fast_rms.json" 2>&1 | tail -4 | tee -a "$LOG"
fi
if [ "$1" = e2e ]; then
  L "triton ops (precise FP8 GEMMs, Triton attention), FP8 KV cache, CUDA graphs, + profile of one chunk"
  $B --chunks 8 --warmup 3 --json "$OUT/fps_triton.json" --profile "$OUT/profile_triton.txt" 2>&1 | grep -E "$S|ms/step|calls" | tee -a "$LOG"
  L "same, Gluon self-attention"
  $B --chunks 7 --warmup 3 --attention-kernel gluon --json "$OUT/fps_gluon.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  L "same, Gluon self-attention + fast-accumulation GEMMs"
  $B --chunks 7 --warmup 3 --attention-kernel gluon --fast-accum --json "$OUT/fps_gluon_fast.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path: default triton ops / gluon + fast-accum"
  $A --json "$OUT/accuracy.json" 2>&1 | tail -4 | tee -a "$LOG"
  $A --attention-kernel gluon --fast-accum --json "$OUT/accuracy_gluon_fast.json" 2>&1 | tail -4 | tee -a "$LOG"
fi
