#!/usr/bin/env bash
# Device calls of the 2026-11-25 session.  Usage (device tool):
#   bash bench/run_gpu_session3.sh kblock1   # GPU tests of the kblock path; FPS gluon-kblock vs gluon (precise), kblock fast
#   bash bench/run_gpu_session3.sh kblock2   # kblock fast + VAE; accuracy after 3 chunks (precise, fast)
#   bash bench/run_gpu_session3.sh final     # GPU tests of the last changes, FPS default (+ profile) / fast /
#                                            # fast + VAE, accuracy (what the last device budget allowed)
source bench/gpu_session_lib.sh "$1"
if [ "$1" = kblock1 ]; then
  L "gpu tests: requantize_k_blocks, attention ops (gluon / gluon-kblock), gluon kblock configs"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py tests/test_attention_ops.py \
    tests/test_attention_gluon.py -k "requantize or gluon or cross or kblock" 2>&1 | tail -4 | tee -a "$LOG"
  L "precise GEMMs: --attention-kernel gluon-kblock (+ profile), then gluon"
  $B --chunks 7 --warmup 3 --attention-kernel gluon-kblock --json "$OUT/fps_kblock.json" \
    --profile "$OUT/profile_kblock.txt" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 7 --warmup 3 --attention-kernel gluon --json "$OUT/fps_gluon.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  L "fast accumulation: gluon-kblock"
  $B --chunks 7 --warmup 3 --attention-kernel gluon-kblock --fast-accum --json "$OUT/fps_kblock_fast.json" 2>&1 \
    | grep -E "$S" | tee -a "$LOG"
fi
if [ "$1" = kblock2 ]; then
  L "gluon-kblock + fast accumulation + streaming VAE decode"
  $B --chunks 7 --warmup 3 --attention-kernel gluon-kblock --fast-accum --vae --json "$OUT/fps_kblock_fast_vae.json" 2>&1 \
    | grep -E "$S" | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path: gluon-kblock precise / fast-accum"
  $A --attention-kernel gluon-kblock --json "$OUT/accuracy_kblock.json" 2>&1 | tail -3 | tee -a "$LOG"
  $A --attention-kernel gluon-kblock --fast-accum --json "$OUT/accuracy_kblock_fast.json" 2>&1 | tail -3 | tee -a "$LOG"
fi
if [ "$1" = final ]; then
  L "gpu tests: norm_quant (producer rewrite), attention ops (Gluon cross-attention, prepared context), runtime"
  timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_norm_quant.py tests/test_attention_ops.py \
    tests/test_gpu_runtime.py 2>&1 | tail -4 | tee -a "$LOG"
  L "defaults: precise (+ profile) / fast-accum / fast-accum + VAE"
  $B --chunks 7 --warmup 3 --json "$OUT/fps_final.json" --profile "$OUT/profile_final.txt" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 7 --warmup 3 --fast-accum --json "$OUT/fps_final_fast.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  $B --chunks 6 --warmup 3 --fast-accum --vae --json "$OUT/fps_final_fast_vae.json" 2>&1 | grep -E "$S" | tee -a "$LOG"
  L "accuracy after 3 chunks vs the reference path (default)"
  $A --json "$OUT/accuracy_final.json" 2>&1 | tail -3 | tee -a "$LOG"
  head -14 "$OUT/profile_final.txt" | cut -c1-100 | tee -a "$LOG"
fi
