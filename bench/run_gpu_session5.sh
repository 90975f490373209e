#!/usr/bin/env bash
# Device calls of session 5 (2026-11-25).  Usage (device tool):
#   bash bench/run_gpu_session5.sh final1 # end state: GPU tests, attention + producer table
#   bash bench/run_gpu_session5.sh final2 # FPS default (+ profile) / fast-accum / fast-accum + VAE, accuracy
#   bash bench/run_gpu_session5.sh final3 # after LMMA (row sums on the tensor cores): tests, table, FPS, accuracy
#   bash bench/run_gpu_session5.sh final4 # final code: Gluon attention GPU tests, FPS default / fast / fast + VAE / VAE
#   bash bench/run_gpu_session5.sh abfps  # FPS A/B, interleaved: row sums on the tensor cores vs fp32 row sums
#   bash bench/run_gpu_session5.sh final5 # final code: FPS fast-accum / fast + VAE / precise + VAE
#   bash bench/run_gpu_session5.sh table  # (carry .whl) the attention + producer table with sageattention 1.0.6
#   bash bench/run_gpu_session5.sh attn   # Gluon attention: keys in key_row_order16 (shuffle-free P)
#                                         #   (KPERM): GPU tests, then A/B against
#                                         # plain_s2_kblock_3cta with natural / permuted keys, SDPA, Triton
source bench/gpu_session_lib.sh "$1"
if [ "$1" = attn ]; then
  L "gpu tests: Gluon attention, attention kernels, attention ops"
  timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gluon.py tests/test_attention.py \
    tests/test_attention_ops.py tests/test_convkv.py --tb=line 2>&1 | tail -8 | tee -a "$LOG"
  L "A/B: plain_s2_kblock_3cta, natural / permuted keys (real shape)"
  timeout 260 python3 -m liveact.bench.attention_gluon_bench --timeout 110 --budget 250 \
    --configs plain_s2_kblock_3cta+perm,plain_s2_kblock_3cta > "$OUT/attn_ab5.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; cp "$OUT/attention_gluon_bench.log" "$OUT/attn_ab5.log" 2>/dev/null
  sed -n '/^device:/,$p' "$OUT/attn_ab5.txt" | tee -a "$LOG"
fi
if [ "$1" = final1 ]; then
  # bash bench/run_gpu_session5.sh final1  # the session's end state: GPU tests, the attention + producers table
  L "gpu tests: attention, attention ops, ConvKV, runtime"
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gluon.py tests/test_attention.py \
    tests/test_attention_ops.py tests/test_convkv.py tests/test_gpu_runtime.py --tb=line 2>&1 | tail -6 | tee -a "$LOG"
  L "liveact bench kernels --only attention (+ producers)"
  timeout 240 $C bench kernels --only attention --json "$OUT/attention_bench5.json" > "$OUT/attention_bench5.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "self_attn|cross_attn|producer|qk_prep|rope_keys|quantize_v|convkv|requant" \
    "$OUT/attention_bench5.txt" | cut -c1-160 | tee -a "$LOG"
fi
if [ "$1" = final2 ]; then
  # bash bench/run_gpu_session5.sh final2  # FPS default (+ profile) / fast-accum / fast-accum + VAE, accuracy
  L "fps: default (+ profile) / fast-accum / fast-accum + VAE"
  $B --chunks 7 --warmup 3 --json "$OUT/fps_s5.json" --profile "$OUT/profile_s5.txt" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 7 --warmup 3 --fast-accum --json "$OUT/fps_s5_fast.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 6 --warmup 3 --fast-accum --vae --json "$OUT/fps_s5_fast_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  head -14 "$OUT/profile_s5.txt" | cut -c1-100 | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path (default)"
  $A --json "$OUT/accuracy_s5.json" 2>&1 | tail -3 | tee -a "$LOG"
fi
if [ "$1" = final3 ]; then
  # bash bench/run_gpu_session5.sh final3  # after the row sums moved onto the tensor cores (LMMA, the new default):
  #                                        # GPU tests, attention table, FPS default (+ profile), accuracy
  L "gpu tests: attention, attention ops, runtime"
  timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gluon.py tests/test_attention.py \
    tests/test_attention_ops.py tests/test_gpu_runtime.py --tb=line 2>&1 | tail -6 | tee -a "$LOG"
  L "liveact bench kernels --only attention"
  timeout 200 $C bench kernels --only attention --json "$OUT/attention_bench5_lmma.json" > "$OUT/attention_bench5_lmma.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "self_attn|cross_attn" "$OUT/attention_bench5_lmma.txt" | cut -c1-160 | tee -a "$LOG"
  L "fps: default (+ profile), accuracy"
  $B --chunks 7 --warmup 3 --json "$OUT/fps_s5_lmma.json" --profile "$OUT/profile_s5_lmma.txt" 2>&1 | grep -E "$S" | tee -a "$LOG"
  head -6 "$OUT/profile_s5_lmma.txt" | cut -c1-100 | tee -a "$LOG"
  $A --json "$OUT/accuracy_s5_lmma.json" 2>&1 | tail -3 | tee -a "$LOG"
fi
if [ "$1" = final4 ]; then
  # bash bench/run_gpu_session5.sh final4  # the final code: Gluon attention GPU tests, FPS default / fast / fast + VAE
  L "gpu tests: Gluon attention"
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gluon.py --tb=line 2>&1 | tail -4 \
    | tee -a "$LOG"
  L "fps: default / fast-accum / fast-accum + VAE"
  $B --chunks 7 --warmup 3 --json "$OUT/fps_s5_final.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 7 --warmup 3 --fast-accum --json "$OUT/fps_s5_final_fast.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 6 --warmup 3 --fast-accum --vae --json "$OUT/fps_s5_final_fast_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 6 --warmup 3 --vae --json "$OUT/fps_s5_final_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
fi
if [ "$1" = abfps ]; then
  # bash bench/run_gpu_session5.sh abfps   # FPS A/B in one call, interleaved: default (row sums on the tensor cores)
  #                                        # vs LIVEACT_GLUON_KBLOCK_CONFIG=plain_s2_kblock_3cta (fp32 row sums)
  for r in 1 2; do
    L "fps default (plain_s2_kblock_3cta_lmma), round $r"
    $B --chunks 7 --warmup 3 --json "$OUT/fps_ab_lmma_$r.json" 2>&1 | grep -E "steady_fps|ms_per_step|sm_clock" | tee -a "$LOG"
    L "fps plain_s2_kblock_3cta, round $r"
    LIVEACT_GLUON_KBLOCK_CONFIG=plain_s2_kblock_3cta $B --chunks 7 --warmup 3 --json "$OUT/fps_ab_fp32l_$r.json" 2>&1 \
      | grep -E "steady_fps|ms_per_step|sm_clock" | tee -a "$LOG"
  done
fi
if [ "$1" = final5 ]; then
  # bash bench/run_gpu_session5.sh final5  # the final code on a fresh machine: FPS fast-accum / fast + VAE / VAE
  $B --chunks 7 --warmup 3 --fast-accum --json "$OUT/fps_s5_end_fast.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 6 --warmup 3 --fast-accum --vae --json "$OUT/fps_s5_end_fast_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 6 --warmup 3 --vae --json "$OUT/fps_s5_end_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
fi
if [ "$1" = table ]; then
  # bash bench/run_gpu_session5.sh table   (carry .whl)   the side-by-side attention table with sageattention
  if ls .whl/sageattention-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sage .whl/sageattention-*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/sage
  fi
  L "liveact bench kernels --only attention (sageattention carried)"
  timeout 240 $C bench kernels --only attention --json "$OUT/attention_bench5_table.json" > "$OUT/attention_bench5_table.txt" 2>&1
  echo "rc $?" | tee -a "$LOG"; grep -E "self_attn|cross_attn|qk_prep|rope_keys|quantize_v|convkv|requant" \
    "$OUT/attention_bench5_table.txt" | cut -c1-160 | tee -a "$LOG"
fi
