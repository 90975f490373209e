"""Hopper (sm90) INT8-QK / FP8-PV attention written in Gluon (triton.experimental.gluon, triton 3.6).

Same math, inputs and outputs as `kernels.attention.attention_quant_prepared` (SageAttention-2 recipe,
shared/KERNELS.md 2.3-2.4), one (batch, head) and 64 query rows per consumer warpgroup, non-causal, D = 128:
    s2_ij = qs_i * ks_j * (q8_i . k8_j)            int8 x int8 -> int32 wgmma, scores in log2 units
    m_i   = running max_j s2_ij ; P_ij = exp2(s2_ij - m_i + log2 448) in [0, 448] -> e4m3 (cvt.rn.satfinite)
    acc_i = acc_i * exp2(m_old - m_new) + (P8 @ V8)_i   fresh fp32 wgmma partial per key block (two-level)
    out_i = acc_i * v_scale / l_i (bf16) ; lse_i = ln2 * (m_i + log2 l_i - log2 448 + qs_i * q8_i . km)
Padded keys: the last key block (the only masked one) sets t = -inf past Sk, so they never enter l.

Cost: FLOPs = 4 * B * H * Sq * Sk * D (3.14 TFLOP at 9360 x 16380 x 40 heads x 128).  Bytes: Q, K, V 1 B per
element, K and V re-read once per 64 (plain) or 128 (ws) query rows, mostly from L2; out 2 B per element.
Per score element the ALU work is what limits, not bytes: per SM per clock an H100 does 8192 dense 8-bit tensor
FLOP, 16 MUFU ex2, 16 I2F, 128 fp32 FMA, so the exp2s alone take as long as both GEMMs at peak
(6.1e9 ex2 -> ~1.6 ms; 3.14 TFLOP -> ~1.6 ms).

Softmax tricks (SASS per 64x128 block per thread: 194 FFMA, 70 FADD, 68 FMNMX, 66 MUFU, 66 IADD, 34 FMUL,
32 F2FP, 24 SHFL, 16 PRMT: ~690 instructions, no I2F):
  - int32 -> fp32 without I2F: |s| <= 127*127*128 < 2^22, so the float with bits s + 0x4B400000 is exactly
    1.5*2^23 + s; then t = bits * ks_j + c_j with c_j = -1.5*2^23 * ks_j (FOLD, one FFMA, 32 more registers)
    or t = (bits - 1.5*2^23) * ks_j (FOLD=False: FADD + FMUL).
  - exp2 argument as one FFMA: t * qs_i + (log2 448 - m_i); no clamp (the e4m3 cast saturates).
  - the wgmma accumulator inputs of QK are recycled dead tiles (use_acc=False), so no zero tile stays live.
  - exp2 flavour (config key EXP, default 0 = gl.exp2 = MUFU.EX2 fp32):
      EXP=1  ex2.approx.f16x2 by inline asm (two fp32 arguments -> one f16x2 register -> ex2 -> f16 P, cast to
             e4m3 by cvt.rn.satfinite.e4m3x2.f16x2; row sum in fp32).  ptxas for sm_90 splits it into TWO
             MUFU.EX2.F16 (64 per block, not 32), and on the H100 one MUFU.EX2.F16 costs what one MUFU.EX2 costs
             (measured: 31.0 vs 31.5 G exp2/s per SM, `--exp2-micro`), so nothing is halved; 844 instructions
             per block (f16 packs and f16->f32 converts).  The f16 argument near the row max (x ~ 8.8) is
             rounded to 2^-7 and ex2.f16 has 2^-9.9 relative error: LSE up to 2.2e-3 off (Sk = 1).
      EXP=2/3  FA4-style: 1 (2) of every 4 exp2s on the FMA pipe (_POLY_EXP2: clamp, floor by round-down add
             of 1.5*2^23, degree-3 polynomial on the fraction, exponent added as j << 23 with one integer add):
             7 SASS instructions (FMNMX, 3 FADD, 3 FFMA, LEA) replace one MUFU: per block 50 (34) MUFU and
             829 (941) instructions instead of 66 and 716.  Max relative error 7.5e-5 (vs 2^-4 for e4m3).
             An isolated polynomial exp2 costs about what a MUFU exp2 costs (30.4 G/s per SM, issue-bound).

Schedules (CONFIGS; BN = 128 keys per block; K [BN, 128] and V^T [128, BN] tiles by TMA, ready/empty mbarriers):
  plain / plain_s2  one warpgroup per CTA (BM = 64) that issues its own TMA loads STAGES (3 / 2) blocks ahead;
                    per block: QK wgmma -> wait -> softmax -> PV wgmma (register A = P) -> wait -> acc update.
                    249 registers, so 2 CTAs (2 warpgroups) per SM; the two CTAs overlap on their own.
  ws                gl.warp_specialize: 1 producer warp (24 regs) issuing TMA into a 2-stage ring shared by
                    2 consumer warpgroups (240 regs each, BM = 128 per CTA, maxnreg 168 over 12 warps).
  ws_pp             ws + FA3 ping-pong: the consumers take turns (two mbarriers) issuing [PV(j), QK(j+1)]
                    back to back, so one consumer's softmax runs while the other's GEMMs run; P is produced
                    and consumed inside one step (a loop-carried fp8 tile is kept unpacked by the compiler:
                    4x the registers and ~200 byte permutes per block, measured 474 TF/s before this fix).
  ws_pp_nofold      ws_pp with FOLD=False.
Tried and dropped (measured below, code removed): FA3 intra-warpgroup overlap (softmax(j+1) while PV(j)
runs) - spills at 240/255 registers (acc + partial + S + P + key scales > 240) and carries P across steps;
3 CTAs per SM (maxnreg 168) - spills.

Layouts the kernel reads (views, no copies): q8 as [B*Sq, H*D] (block [64, 128] at column h*128), k8 as
[B*Sk, H*D] (block [BN, 128]), vt as [B*H*D, Sk] with row stride pad16(Sk) (block [128, BN]; TMA zero-fills
columns >= Sk, so vt's padding is never read).  Q rows past Sq of a batch read the next batch's rows (finite,
never stored); K rows past Sk likewise (masked to -inf).

Measured (H100 80GB HBM3, torch 2.11, triton 3.6, do_bench median, 9360 x 16380 x 40 x 128, DiT-like keys,
`source bench/devenv.sh; python -m liveact.bench.attention_gluon_bench`); each row is one run, side by side:
    run  SDPA bf16  Triton int8/fp8  Gluon configs (TF/s)
    1    558        618              plain 640, ws 597, ws+intra-WG overlap 505, plain+overlap 540  (old softmax)
    2    574        644              plain 633, plain_s2 661, ws 603, ws 3 stages 609, 3 CTAs/SM 406 / 642
    3    603        613              plain_s2 654, ws_pp with loop-carried P 474 / 479 (nofold)
    4    573        634              plain_s2 657 (4.778 ms), ws_pp_nofold 654, plain 643, ws_pp 631, ws 612
    5    579        628              plain_s2 657, plain_s2_poly25 631, plain_s2_poly50 597, plain_s2_h2 619
                                     (f16 row sum), ws_pp 638, ws_pp_poly25 642
    6    569        628              plain_s2 647, plain_s2_h2 618 (fp32 row sum, kept), plain_s2_poly25 629,
                                     ws_pp_poly25 640
    7    572        629              plain_s2 651 (4.822 ms), ws_pp_poly25 642, ws_pp 632, plain_s2_poly25 629,
                                     plain_s2_h2 620, plain_s2_poly50 597
  Run 4 is this file's code before the exp2 variants (PTX of the kept configs checked identical after the dead
  code was removed); runs 5-7 are this file's code (the EXP = 0 configs' PTX is unchanged by the variants);
  run 7 also passed all 38 GPU tests of tests/test_attention_gluon.py.
  Best: plain_s2, 1.03-1.07x the Triton kernel and 1.09-1.15x SDPA -- far from the 930 TF/s target; every
  schedule lands at 610-660 TF/s, close to the sum (not the max) of the tensor, MUFU and FMA-pipe times.
  Accuracy (all configs): cos 0.999998 vs the Triton kernel (FOLD; nofold is bit-identical), cos 0.99928 vs
  fp32 on 2 heads (Triton: 0.99928), LSE within 7e-6 of Triton's.
  exp2 variants (runs 5-7), accuracy at the real shape: cos vs fp32 0.999282 (poly25/50, h2 0.999281) vs
  0.999281 for plain_s2; cos vs the Triton kernel 0.999998 (poly), 0.99997 (h2); small-shape LSE within 2.6e-5
  (poly25), 7.2e-5 (poly50), 2.2e-3 (h2) of Triton's.
  Prediction (from the SASS, before the runs) vs result: h2 cannot halve anything on sm_90 (two MUFU.EX2.F16
  per f16x2) and adds instructions -> predicted slower, measured 0.94x plain_s2.  The poly mix only pays if the
  MUFU pipe is the limit; the loop is ~716 issue slots per warp and block against 528 MUFU cycles, so predicted
  a small loss for plain_s2 (the two CTAs of an SM run their softmaxes side by side and are issue-bound) and at
  most a few % for ws_pp (one warp per SMSP in softmax at a time): measured plain_s2_poly25 0.96-0.97x, poly50
  0.91x, ws_pp_poly25 1.006-1.016x ws_pp (runs 5, 7) but still below plain_s2.  Inferred from these (no
  profiler run): each added softmax instruction costs ~0.6 cycles per warp and block, and removing MUFU work
  saves nothing, so the kernel is limited by issue slots and by the serial QK -> softmax -> PV
  chain of each warp, not by MUFU throughput.  DEFAULT_CONFIG stays plain_s2.
Per-key-BLOCK K scales (KBLOCK; configs plain_s2_kblock, plain_s2_kblock_3cta; plain_s2 switches to it when
kv.k_scale is [B, H, cdiv(Sk, 128)] instead of [B, H, Sk]; the other configs refuse per-block scales):
    s2_ij = (qs_i * kb_J) * (q8_i . k8_j)   one scale kb_J per (batch, head, 128-key block J = BN block)
  so per row and block a_i = qs_i * kb, a0_i = -1.5*2^23 * a_i and the exp2 argument is ONE FFMA per score:
    x_ij = sb_ij * a_i + (a0_i + log2 448 - m_new),  m_new = max(m_i, max_j(sb_ij) * a_i + a0_i)
  (no per-key ks / c vectors: no 32 LDGs, no t = sb * ks + c FFMA, no separate t * qs step).  The masked last
  block keeps the per-key formula with the scalar kb (t = sb * kb + c, -inf mask, x = t * qs + ...): the one-FFMA
  form there produced one NaN output row (row 63 of the CTA, deterministic) at Sk = 1 on the H100 -- measured, not
  root-caused.  Producer: requantize_k_per_block (dequantize quantize_kv's per-key int8 keys, requantize with
  scale = block amax / 127; two roundings) or quantize_k_per_block (from bf16 keys minus km, one rounding).
  SASS (ptxas sm_90a, main loop, per 64x128 block per thread): 598 instructions (134 FFMA, 70 FADD, 68 FMNMX,
  66 MUFU, 67 IADD, 5 FMUL, 1 LDG) vs 716 for plain_s2 (194 FFMA, 34 FMUL, 32 LDG); 199 registers in the loop
  (254 with 40 B of spills in the masked tail block only, none in the loop) vs 249, so maxnreg 168 fits with no
  spill in the loop (plain_s2_kblock_3cta: 3 CTAs = 3 warpgroups per SM; 4-24 B spilled outside the loop).
  Measured (H100 80GB HBM3, same shape; run A = `--kblock` bench, run B = `--kblock-probe`, final code in B):
    run  SDPA  Triton  plain_s2           plain_s2_kblock            plain_s2_kblock_3cta
    A    558   618     656 (4.786 ms)     748 (4.199 ms, 1.14x)      824 (3.811 ms, 1.26x; 1.33x Triton)
    B    -     -       651 (4.822 ms)     786 (3.997 ms, 1.21x)      816 (3.847 ms, 1.25x)
  (run A's plain_s2_kblock used the one-FFMA masked tail described above; B has the final tail, 762 TF/s with
  the old one in the same run.)  Accuracy at the real shape: cos vs fp32 on 2 heads 0.999238 (keys requantized
  from quantize_kv's int8) / 0.999260 (quantized per block from bf16) vs 0.999281 per key (rel-L1 0.0390 / 0.0384
  vs 0.0378); cos 0.999997 vs the Triton kernel on the same per-block keys (scales repeated per key), 0.99959 vs
  plain_s2 on the per-key keys; LSE within 8e-5 of Triton's on small shapes.  DEFAULT_CONFIG stays plain_s2
  (the production keys are per key; per-block keys need a producer change).
FA3 intra-warpgroup overlap on KBLOCK (tried 2026-11-25, code removed; bench/NOTES.md session 3): per block,
softmax(j) while PV(j-1) runs, then QK(j+1) and PV(j) issued back to back (acc accumulated inside the tensor
core, use_acc=True), loop unrolled by two.  Compiles without spills at 240 registers (2 CTAs per SM) and passed
the 17 kblock GPU tests (cos 0.99999 vs Triton, cos vs fp32 0.999236 = the same as without overlap), but ran at
771 TF/s against 830 for plain_s2_kblock_3cta in the same run: three independent warpgroups per SM hide the
QK -> softmax -> PV chain better than two overlapped ones.  At maxnreg 168 (3 CTAs) it spills and ptxas
serializes the wgmmas.  ptxas pitfalls met on the way (C7514/C7515, "wgmma serialized"): (a) the loop-carried
S tile copied at the back edge into registers an in-flight wgmma still reads -- unroll by two; (b) a QK wgmma
left in flight across the softmax of the previous tile (issue QK(j+1) before softmax(j)) -- issue it after;
(c) register copies at the merge after an odd-count tail step -- drain (wait 0) before the branch.
Two contexts in one launch (kv2, TWO; cross-attention over text + image, session 4): each CTA runs the key loop
(_keys_pass) over the first context, stores its bf16 output, runs it again over the second context on the same Q
tile (the K/V ring keeps counting its slots and phases across the contexts) and adds into the output it just
stored: bit-identical to two launches with accumulate (GPU tests).  ptxas: the same 598-609 instructions per
block in both loops, 580 B spilled outside the loops.  Measured (H100): no GPU-time gain under CUDA graphs
(attention kernels 175.86 vs 175.90 ms per step; the Q reload and the output round trip of the second launch
were L2 hits) and one launch instead of two per layer; eager timings are host-bound (0.53 vs 0.60 ms, then
0.48 vs 0.42 in another run).
Next step (not tried): a per-block K producer in qk_prep.
Keys in key_row_order16 (KPERM, session 5; QuantKV(k_perm=True), made by requantize_k_blocks(perm16=True)): in every
key block but the last, in-block key 16g + 4i + 2j + l is stored at row 16g + 8j + 2i + l.  S column c then holds
the key this thread's P.V operand register wants at that place, so the e4m3 P goes from the accumulator layout
to the wgmma A layout without the 16 SHFL + 16 SEL + 16 PRMT per block of the generic conversion (the masked
last block keeps the natural order and the generic conversion).  With KPERM the row sums are also kept per lane
(l_i [BM, 4]: each of a row's 4 lanes adds its own 32 P values; the lanes are added after the key loop), saving the
per-block SHFL + FADD reduction.  SASS per 64x128 block per thread 586 -> 550 (conversion) -> 542 (lane sums)
instructions (plain_s2_kblock_3cta).  Same result up to the fp32 order of the row sum l (the thread's 64 P values
are added in column order, which now holds the keys in another order: ulp-level LSE differences, out within one bf16
ulp; GPU tests).  Measured (H100, real shape; bench/results/h100-2026-11-25-s5/): attention_gluon_bench, before the
lane sums, two runs: plain_s2_kblock_3cta natural keys 810 / 824 TF/s, permuted 843 / 868 TF/s (+4-5 %); SDPA
569 / 589, Triton 629 / 639 in the same runs.  `liveact bench kernels --only attention` with the lane sums: natural
796, permuted (the default) 834 TF/s = 1.42x SDPA (587) in the same run.
Unrolling the key loop by two (ring slots static): 576 instructions per block and spills in the loop -- dropped.
Also tried (session 5, dropped): K and V tiles of a stage on ONE mbarrier (one expect of both byte counts, one wait
per block instead of two): 536 instead of 550 instructions per block, but the membar analysis still puts a CTA
barrier between the two TMA issues (4 bar.sync per block either way); 860 vs 868 TF/s in the same run.
Row sums on the tensor cores (LMMA, config plain_s2_kblock_3cta_lmma, the engine's default since session 5): per
block one m64n8k32 wgmma P8 @ ones next to P.V (same A registers; B = an [8, 128] e4m3 ones tile TMA-loaded once
per CTA), l kept as the [64, 8] accumulator (l = l * alpha + P8 @ ones; the 8 equal columns reduced after the
loop): the 64 FADD + the quad reduction per block go away (SASS 542 -> 491 instructions per block with KPERM).
l is then the sum of the e4m3-rounded P that P.V multiplies (FA3 / SageAttention sum the fp32 P): out is
normalized by the weights it used; LSE differs from the fp32-sum kernels by up to ~1e-2 (small shapes), cos vs
fp32 unchanged (0.999238 on 2 heads at the real shape).  Measured (H100, same runs): attention_gluon_bench 857 vs
835 TF/s (+2.6 %); `liveact bench kernels --only attention` 810 vs 772 TF/s (+4.9 %; 1.49x SDPA at 542 TF/s on that
machine, natural key order + fp32 sums 766).
Found on the way: the same ones tile written with st.shared (+ fence.proxy.async) gave wrong sums on the H100 (with
A = ones too: 64 instead of 128; N = 16 and a 64-byte swizzle gave the very same numbers); the TMA-loaded tile at
the same address (it shares its bytes with never-used mbarriers either way: Gluon reuses dead allocations) gives
the right sums.  Cause not found (the generic-proxy store is followed by fence.proxy.async and a CTA barrier).
"""
from __future__ import annotations

import math

import torch

from .attention import QuantKV, key_row_order16

try:  # gluon ships with triton >= 3.5; keep import errors out of available()
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _GLUON_OK = True
except Exception:  # pragma: no cover - depends on the installed triton
    _GLUON_OK = False

HEAD_DIM = 128
LOG2_448 = math.log2(448.0)

# Kernel configs (all BN = 128 keys per block, BM_WG = 64 query rows per consumer warpgroup, 4-warp default
# partition); TF/s measured on H100 at 9360 x 16380 x 40 x 128 (table in the module docstring).
#   plain         one warpgroup, self-issued TMA 3 stages ahead, 2 CTAs/SM (249 regs)
#   plain_s2      same, 2 stages (74 KB smem)                                            <- default, fastest
#   ws            1 TMA producer warp + 2 consumer warpgroups (BM = 128), free-running
#   ws_pp         same + ping-pong: the consumers take turns issuing PV(j) + QK(j+1)
#   ws_pp_nofold  same, int->float as FADD + FMUL (no per-key c_j registers)
#   plain_s2_kblock  plain_s2 with one K scale per (batch, head, 128-key block) instead of per key
#   plain_s2_kblock_3cta  same at maxnreg 168: 3 CTAs per SM
#   plain_s2_h2 / plain_s2_poly25 / plain_s2_poly50 / ws_pp_poly25: exp2 via ex2.approx.f16x2 / 1 or 2 of every
#                 4 exp2s as an FMA-pipe polynomial (all measured slower or equal; docstring)
CONFIGS = {
    "plain": dict(WS=False, NUM_CONSUMERS=1, PINGPONG=False, FOLD=True, STAGES=3, maxnreg=None),
    "plain_s2": dict(WS=False, NUM_CONSUMERS=1, PINGPONG=False, FOLD=True, STAGES=2, maxnreg=None),
    "ws": dict(WS=True, NUM_CONSUMERS=2, PINGPONG=False, FOLD=True, STAGES=2, maxnreg=168),
    "ws_pp": dict(WS=True, NUM_CONSUMERS=2, PINGPONG=True, FOLD=True, STAGES=2, maxnreg=168),
    "ws_pp_nofold": dict(WS=True, NUM_CONSUMERS=2, PINGPONG=True, FOLD=False, STAGES=2, maxnreg=168),
    # exp2 variants (EXP, see _exp2): 1 = ex2.approx.f16x2, 2 / 3 = 1 / 2 of every 4 exp2s as an FMA-pipe polynomial
    "plain_s2_h2": dict(WS=False, NUM_CONSUMERS=1, PINGPONG=False, FOLD=True, STAGES=2, maxnreg=None, EXP=1),
    "plain_s2_poly25": dict(WS=False, NUM_CONSUMERS=1, PINGPONG=False, FOLD=True, STAGES=2, maxnreg=None, EXP=2),
    "plain_s2_poly50": dict(WS=False, NUM_CONSUMERS=1, PINGPONG=False, FOLD=True, STAGES=2, maxnreg=None, EXP=3),
    "ws_pp_poly25": dict(WS=True, NUM_CONSUMERS=2, PINGPONG=True, FOLD=True, STAGES=2, maxnreg=168, EXP=2),
    # per-key-block K scales (KBLOCK): needs kv.k_scale [B, H, cdiv(Sk, 128)] (requantize_k_per_block)
    "plain_s2_kblock": dict(WS=False, NUM_CONSUMERS=1, PINGPONG=False, FOLD=True, STAGES=2, maxnreg=None,
                            KBLOCK=True),
    # same with maxnreg 168 (no spills: KBLOCK needs 199 registers, not 249): 3 CTAs (3 warpgroups) per SM
    "plain_s2_kblock_3cta": dict(WS=False, NUM_CONSUMERS=1, PINGPONG=False, FOLD=True, STAGES=2, maxnreg=168,
                                 KBLOCK=True),
    # same with the row sums l on the tensor cores (LMMA: P8 @ ones, an m64n8k32 wgmma per block)
    "plain_s2_kblock_3cta_lmma": dict(WS=False, NUM_CONSUMERS=1, PINGPONG=False, FOLD=True, STAGES=2, maxnreg=168,
                                      KBLOCK=True, LMMA=True),
}
BLOCK_N = 128
NUM_WARPS = 4
DEFAULT_CONFIG = "plain_s2"


# 2^x for x <= ~8.81 on the FMA pipe (FA4-style): x clamped to -126, j = floor(x) by adding 1.5*2^23 with
# round-down (the low bits of f then hold j), r = x - j in [0, 1), p(r) = degree-3 fit of 2^r (max rel. error
# 7.5e-5, p(r) in [0.99992, 2)), 2^j applied by adding j << 23 to p's exponent bits (one integer add; 126 + j
# >= 0, so no wrap into the sign).  Coefficients c0..c3 (fp32 hex): 0x3F7FFB12 0x3F32224D 0x3E677DD6 0x3D9FCA75.
_POLY_EXP2 = ("{{ .reg .b32 x, f, j, r, p, e; max.f32 x, {a}, 0fC2FC0000; add.rm.f32 f, x, 0f4B400000;"
              " sub.f32 j, f, 0f4B400000; sub.f32 r, x, j; fma.rn.f32 p, r, 0f3D9FCA75, 0f3E677DD6;"
              " fma.rn.f32 p, p, r, 0f3F32224D; fma.rn.f32 p, p, r, 0f3F7FFB12; shl.b32 e, f, 23;"
              " add.s32 {o}, p, e; }}")


def _mix_asm(n_poly: int, pack: int = 4) -> str:
    """Inline PTX for `pack` exp2s: the first pack - n_poly on MUFU (ex2.approx.ftz.f32), the rest polynomial."""
    out = []
    for i in range(pack):
        o, a = f"${i}", f"${pack + i}"
        out.append(f"ex2.approx.ftz.f32 {o}, {a};" if i < pack - n_poly else _POLY_EXP2.format(o=o, a=a))
    return "\n".join(out)


# two exp2s per ex2.approx.f16x2 (two fp32 arguments rounded into one f16x2 register; result: two f16)
_ASM_H2 = "cvt.rn.f16x2.f32 $0, $2, $1;\nex2.approx.f16x2 $0, $0;"
_ASM_POLY25 = _mix_asm(1)
_ASM_POLY50 = _mix_asm(2)


def available() -> bool:
    """True only on a CUDA device of compute capability 9.0 with gluon importable."""
    try:
        return bool(_GLUON_OK and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0))
    except Exception:
        return False


if _GLUON_OK:
    # ------------------------------------------------------------------------------- device code
    _H2: gl.constexpr = gl.constexpr(_ASM_H2)
    _P25: gl.constexpr = gl.constexpr(_ASM_POLY25)
    _P50: gl.constexpr = gl.constexpr(_ASM_POLY50)
    _E4M3X4: gl.constexpr = gl.constexpr("{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
                                         "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }")

    @gluon.jit
    def _exp2_mix(x, EXP: gl.constexpr):
        """fp32 2^x with EXP = 2 (1 of 4 elements polynomial) or 3 (2 of 4)."""
        if EXP == 2:
            return gl.inline_asm_elementwise(_P25, "=r,=r,=r,=r,r,r,r,r", [x], dtype=gl.float32, is_pure=True, pack=4)
        else:
            return gl.inline_asm_elementwise(_P50, "=r,=r,=r,=r,r,r,r,r", [x], dtype=gl.float32, is_pure=True, pack=4)

    @gluon.jit
    def _load_ks(KS, bh, Sk, n0, BN: gl.constexpr, S_L: gl.constexpr, MASKED: gl.constexpr,
                 KBLOCK: gl.constexpr):
        """Key-scale terms of block n0: per key, ks_j (0 past Sk) and c_j = -1.5*2^23 * ks_j; with KBLOCK the
        block's one scale kb (a scalar, KS is [B, H, cdiv(Sk, BN)]) and -1.5*2^23 * kb."""
        if KBLOCK:
            ks = gl.load(KS + bh * gl.cdiv(Sk, BN) + n0 // BN)
        else:
            cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, S_L))
            if MASKED:
                ks = gl.load(KS + bh * Sk + cols, mask=cols < Sk, other=0.0)
            else:
                ks = gl.load(KS + bh * Sk + cols)
        return ks, ks * (-12582912.0)

    @gluon.jit
    def _softmax(s, qs, ks, c, Sk, n0, m_i, l_i, BN: gl.constexpr, S_L: gl.constexpr, P_L: gl.constexpr,
                 MASKED: gl.constexpr, FOLD: gl.constexpr, EXP: gl.constexpr, KBLOCK: gl.constexpr,
                 VPERM: gl.constexpr = False, LQ: gl.constexpr = False, LMMA: gl.constexpr = False):
        """int32 scores of key block n0 -> (e4m3 P in the wgmma A-operand layout, alpha, m_new, l_new)."""
        sb = (s + 0x4B400000).to(gl.float32, bitcast=True)       # = 1.5*2^23 + s exactly (|s| < 2^22)
        if KBLOCK and not MASKED:
            # ks, c: the block's scalar kb and -1.5*2^23 * kb.  Per row a = qs * kb, a0 = -1.5*2^23 * a:
            # s2 = sb * a + a0 and the exp2 argument is ONE FFMA per score, sb * a + (a0 + log2 448 - m_new)
            # (the cancellation happens inside the FFMA; rounding a0 + ... costs ~1 unit of s, i.e. ~a)
            a = qs * ks
            a0 = qs * c
            m_new = gl.maximum(m_i, gl.max(sb, axis=1) * a + a0)
            alpha = gl.exp2(m_i - m_new)
            x = sb * a[:, None] + (a0 + (8.807354922057604 - m_new))[:, None]   # p = 2^x in [0, 448]
        elif KBLOCK:
            # masked last block (once per row block): the per-key formula with the block's scalar kb.  (The
            # one-FFMA formula here, masking sb before the max and x after it, gave a NaN output row -- row 63
            # of the CTA, every run -- at Sk = 1 on the H100; measured, not root-caused.)
            t = sb * ks + c
            cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, S_L))
            t = gl.where((cols < Sk)[None, :], t, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(t, axis=1) * qs)
            alpha = gl.exp2(m_i - m_new)
            x = t * qs[:, None] + (8.807354922057604 - m_new)[:, None]
        else:
            if FOLD:
                t = sb * ks[None, :] + c[None, :]                  # = s * ks_j  (one FFMA; c costs 32 regs)
            else:
                t = (sb - 12582912.0) * ks[None, :]                # FADD (exact) + FMUL
            if MASKED:
                cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, S_L))
                t = gl.where((cols < Sk)[None, :], t, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(t, axis=1) * qs)        # qs > 0
            alpha = gl.exp2(m_i - m_new)
            x = t * qs[:, None] + (8.807354922057604 - m_new)[:, None]        # p = 2^x in [0, 448]
        if EXP == 0:
            p = gl.exp2(x)
        elif EXP == 1:
            # f16 p, summed in fp32 (a per-block f16 row sum measured 2.2e-3 LSE error vs Triton's, 7e-6 in fp32)
            p = gl.inline_asm_elementwise(_H2, "=r,r,r", [x], dtype=gl.float16, is_pure=True, pack=2)
        else:
            p = _exp2_mix(x, EXP)
        if LMMA:
            l_new = l_i
        elif LQ:   # l_i [BM, 4]: this lane's partial row sums (the 4 lanes of a row are added after the loop)
            BMq: gl.constexpr = p.shape[0]
            ps = gl.sum(gl.sum(gl.reshape(p.to(gl.float32), [BMq, BN // 8, 4, 2]), 3), 1)
            l_new = l_i * gl.convert_layout(alpha, gl.SliceLayout(1, ps.type.layout))[:, None] + ps
        else:
            l_new = l_i * alpha + gl.sum(p.to(gl.float32), axis=1)
        # the fp32 / f16 -> e4m3 cast is cvt.rn.satfinite (no clamp needed)
        if VPERM:
            # keys in key_row_order16 (KPERM): this thread's accumulator columns {2i, 2i+1, 8+2i, 9+2i} of each
            # 16-column group hold keys 4i..4i+3, i.e. exactly its A-operand bytes k = 4i..4i+3 of P.V.  The
            # reshape/permute names that order, the conversion to P_L is then register-only (no SHFL/SEL/PRMT),
            # and four fp32 go to one e4m3x4 register with two cvt (_E4M3X4) instead of cvt + byte permute
            BM: gl.constexpr = p.shape[0]
            pp = gl.reshape(p, [BM, BN // 16, 2, 4, 2])
            pp = gl.permute(pp, (0, 1, 3, 2, 4))
            pp = gl.reshape(pp, [BM, BN])
            p8 = gl.inline_asm_elementwise(_E4M3X4, "=r,r,r,r,r", [gl.convert_layout(pp, P_L)],
                                           dtype=gl.float8e4nv, is_pure=True, pack=4)
        else:
            p8 = gl.convert_layout(p.to(gl.float8e4nv), P_L)
        return p8, alpha, m_new, l_new

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, j, b, h, bh, Sk,
                 BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, jb=0):
        """TMA loads of key block j of this context into ring slot (jb + j) % STAGES (jb: blocks of the
        contexts before it in this CTA, which keep counting the ring's phases)."""
        st = (jb + j) % STAGES
        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b * Sk + j * BN, h * D], k_ready.index(st), k_bufs.index(st))
        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [bh * D, j * BN], v_ready.index(st), v_bufs.index(st))

    @gluon.jit
    def _producer(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, b, h, bh, Sk,
                  BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
        n_blk = gl.cdiv(Sk, BN)
        for j in range(n_blk):
            st = j % STAGES
            ph = (j // STAGES) & 1
            mbarrier.wait(k_empty.index(st), ph ^ 1)
            mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b * Sk + j * BN, h * D], k_ready.index(st), k_bufs.index(st))
            mbarrier.wait(v_empty.index(st), ph ^ 1)
            mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [bh * D, j * BN], v_ready.index(st), v_bufs.index(st))

    @gluon.jit
    def _step(j, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, k_desc, v_desc, s, part, acc,
              m_i, l_i, qs, KS, b, h, bh, Sk, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
              S_L: gl.constexpr, P_L: gl.constexpr, MASKED: gl.constexpr, SELF_LOAD: gl.constexpr,
              FOLD: gl.constexpr, EXP: gl.constexpr, KBLOCK: gl.constexpr, jb=0, KPERM: gl.constexpr = False,
              ones=None, LMMA: gl.constexpr = False):
        """Key block j without intra-warpgroup overlap: S = QK^T, softmax, PV, acc update (ring slot and phase
        from jb + j, see _load_kv)."""
        st = (jb + j) % STAGES
        ph = ((jb + j) // STAGES) & 1
        ks, c = _load_ks(KS, bh, Sk, j * BN, BN, S_L, MASKED, KBLOCK)
        mbarrier.wait(k_ready.index(st), ph)
        s = warpgroup_mma(q_smem, k_bufs.index(st).permute((1, 0)), s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        if not SELF_LOAD:
            mbarrier.arrive(k_empty.index(st), count=1)
        p8, alpha, m_i, l_i = _softmax(s, qs, ks, c, Sk, j * BN, m_i, l_i, BN, S_L, P_L, MASKED, FOLD, EXP, KBLOCK,
                                       KPERM and not MASKED, KPERM, LMMA)
        mbarrier.wait(v_ready.index(st), ph)
        part = warpgroup_mma(p8, v_bufs.index(st).permute((1, 0)), part, use_acc=False, is_async=True)
        if LMMA:
            L_L: gl.constexpr = l_i.type.layout
            lp = warpgroup_mma(gl.convert_layout(p8, gl.DotOperandLayout(operand_index=0, parent=L_L, k_width=4)),
                               ones.permute((1, 0)), gl.zeros(l_i.shape, gl.float32, L_L), use_acc=False,
                               is_async=True)
            part, lp = warpgroup_mma_wait(0, deps=(part, lp))
            l_i = l_i * gl.convert_layout(alpha, gl.SliceLayout(1, L_L))[:, None] + lp
        else:
            part = warpgroup_mma_wait(0, deps=(part, ))
        if SELF_LOAD:
            if j + STAGES < gl.cdiv(Sk, BN):
                _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, j + STAGES, b, h, bh, Sk, BN, D, STAGES,
                         jb)
        else:
            mbarrier.arrive(v_empty.index(st), count=1)
        acc = acc * alpha[:, None] + part
        return s, part, acc, m_i, l_i

    @gluon.jit
    def _step_pp(j, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_me, turn_other, s, acc,
                 m_i, l_i, qs, KS, bh, Sk, WG: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                 STAGES: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr, P_L: gl.constexpr,
                 MASKED: gl.constexpr, FOLD: gl.constexpr, LAST: gl.constexpr, EXP: gl.constexpr,
                 KBLOCK: gl.constexpr):
        """Ping-pong step j (S(j) and its key terms are ready): softmax(j), then on this consumer's turn
        issue PV(j) and QK(j+1) back to back and hand the tensor cores to the other consumer; acc update.
        P is produced and consumed in the same step (a loop-carried fp8 tile is kept unpacked, 4x the
        registers and ~200 byte-permutes per block: measured in SASS)."""
        st = j % STAGES
        ph = (j // STAGES) & 1
        st1 = (j + 1) % STAGES
        ph1 = ((j + 1) // STAGES) & 1
        ks, c = _load_ks(KS, bh, Sk, j * BN, BN, S_L, MASKED, KBLOCK)
        p8, alpha, m_i, l_i = _softmax(s, qs, ks, c, Sk, j * BN, m_i, l_i, BN, S_L, P_L, MASKED, FOLD, EXP, KBLOCK)
        mbarrier.wait(turn_me, ((j + 1) & 1) ^ (1 - WG))
        mbarrier.wait(v_ready.index(st), ph)
        part = warpgroup_mma(p8, v_bufs.index(st).permute((1, 0)), gl.zeros([acc.shape[0], D], gl.float32, O_L),
                             use_acc=False, is_async=True)
        if not LAST:
            mbarrier.wait(k_ready.index(st1), ph1)
            s = warpgroup_mma(q_smem, k_bufs.index(st1).permute((1, 0)), s, use_acc=False, is_async=True)
        mbarrier.arrive(turn_other, count=1)
        if not LAST:
            s, part = warpgroup_mma_wait(0, deps=(s, part))
            mbarrier.arrive(k_empty.index(st1), count=1)
        else:
            part = warpgroup_mma_wait(0, deps=(part, ))
        mbarrier.arrive(v_empty.index(st), count=1)
        acc = acc * alpha[:, None] + part
        return s, acc, m_i, l_i

    @gluon.jit
    def _keys_pass(q_smem, qb, k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, qs, KS,
                   b, h, bh, Sk, jb, BM_WG: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                   STAGES: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr, P_L: gl.constexpr,
                   SELF_LOAD: gl.constexpr, FOLD: gl.constexpr, EXP: gl.constexpr, KBLOCK: gl.constexpr,
                   KPERM: gl.constexpr = False, ones=None, LMMA: gl.constexpr = False):
        """The key loop over one context (schedules without ping-pong) -> (acc, m_i, l_i).  jb = key blocks
        this CTA went through before (earlier contexts): the K/V ring keeps counting its slots and phases."""
        n_blk = gl.cdiv(Sk, BN)
        if SELF_LOAD:
            for j in gl.static_range(STAGES):
                if j < n_blk:
                    _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, j, b, h, bh, Sk, BN, D, STAGES, jb)
        m_i = gl.full([BM_WG], float("-inf"), gl.float32, gl.SliceLayout(1, S_L))
        if LMMA:
            L_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 32])
            l_i = gl.zeros([BM_WG, 8], gl.float32, L_L)
        elif KPERM:   # lane-partial row sums (see _softmax LQ)
            l_i = gl.sum(gl.sum(gl.reshape(gl.zeros([BM_WG, BN], gl.float32, S_L), [BM_WG, BN // 8, 4, 2]), 3), 1)
        else:
            l_i = gl.zeros([BM_WG], gl.float32, gl.SliceLayout(1, S_L))
        acc = gl.zeros([BM_WG, D], gl.float32, O_L)
        # dead values recycled as the (ignored, use_acc=False) wgmma accumulator inputs
        s = gl.zeros([BM_WG, BN], gl.int32, S_L)
        part = gl.zeros([BM_WG, D], gl.float32, O_L)
        mbarrier.wait(qb, 0)      # Q is in shared memory (passes at once after the first context)
        for j in range(n_blk - 1):
            s, part, acc, m_i, l_i = _step(j, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                                           k_desc, v_desc, s, part, acc, m_i, l_i, qs, KS, b, h, bh, Sk,
                                           BN, D, STAGES, S_L, P_L, False, SELF_LOAD, FOLD, EXP, KBLOCK, jb,
                                           KPERM, ones, LMMA)
        s, part, acc, m_i, l_i = _step(n_blk - 1, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                                       k_desc, v_desc, s, part, acc, m_i, l_i, qs, KS, b, h, bh, Sk,
                                       BN, D, STAGES, S_L, P_L, True, SELF_LOAD, FOLD, EXP, KBLOCK, jb,
                                       KPERM, ones, LMMA)
        if LMMA:
            l_i = gl.convert_layout(gl.max(l_i, axis=1), gl.SliceLayout(1, S_L))
        elif KPERM:
            l_i = gl.convert_layout(gl.sum(l_i, 1), gl.SliceLayout(1, S_L))
        return acc, m_i, l_i

    @gluon.jit
    def _store_out(acc, l_i, VS, O, b, h, bh, H, Sq, row0, BM_WG: gl.constexpr, D: gl.constexpr,
                   O_L: gl.constexpr, ACCUM: gl.constexpr):
        """out = acc * vs / l (bf16); ACCUM: out = bf16(bf16(this) + out), the bf16 sum of two attentions."""
        dcol = gl.arange(0, D, layout=gl.SliceLayout(0, O_L))
        orow = row0 + gl.arange(0, BM_WG, layout=gl.SliceLayout(1, O_L))
        vs = gl.load(VS + bh * D + dcol)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, O_L))
        o = acc * vs[None, :] / l_o[:, None]
        optr = O + ((b * Sq + orow.to(gl.int64)) * H + h)[:, None] * D + dcol[None, :]
        if ACCUM:   # (with TWO the rows were stored by this same thread just before: an L2 hit)
            prev = gl.load(optr, mask=(orow < Sq)[:, None], other=0.0)
            o = o.to(gl.bfloat16).to(gl.float32) + prev.to(gl.float32)
        gl.store(optr, o.to(gl.bfloat16), mask=(orow < Sq)[:, None])

    @gluon.jit
    def _consumer(WG: gl.constexpr, q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar,
                  k_ready, v_ready, k_empty, v_empty, QS, KS, VS, KM, O, LSE, b, h, bh, H, Sq, Sk, pid_m,
                  HAS_LSE: gl.constexpr, BM_WG: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                  STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, SELF_LOAD: gl.constexpr,
                  FOLD: gl.constexpr, PINGPONG: gl.constexpr, turn, EXP: gl.constexpr, KBLOCK: gl.constexpr,
                  ACCUM: gl.constexpr, k2_desc, v2_desc, KS2, VS2, Sk2, TWO: gl.constexpr,
                  KPERM: gl.constexpr = False, ones=None, LMMA: gl.constexpr = False):
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN, 32])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, D, 32])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=4)
        ROW_L: gl.constexpr = gl.SliceLayout(1, S_L)

        n_blk = gl.cdiv(Sk, BN)
        row0 = pid_m * (BM_WG * NUM_CONSUMERS) + WG * BM_WG
        q_smem = q_bufs.index(WG)
        qb = q_bar.index(WG)
        mbarrier.expect(qb, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b * Sq + row0, h * D], qb, q_smem)
        rows = row0 + gl.arange(0, BM_WG, layout=ROW_L)
        qs = gl.load(QS + bh * Sq + rows, mask=rows < Sq, other=1.0)

        if PINGPONG:
            m_i = gl.full([BM_WG], float("-inf"), gl.float32, ROW_L)
            l_i = gl.zeros([BM_WG], gl.float32, ROW_L)
            acc = gl.zeros([BM_WG, D], gl.float32, O_L)
            s = gl.zeros([BM_WG, BN], gl.int32, S_L)
            mbarrier.wait(qb, 0)
            # each consumer takes turns 0..n_blk-1 on the tensor cores, alternating with the other one
            # (turn barriers: WG 0 starts, its first wait passes on the fresh barrier's parity)
            turn_me = turn.index(WG)
            turn_other = turn.index(1 - WG)
            mbarrier.wait(turn_me, 1 - WG)
            mbarrier.wait(k_ready.index(0), 0)
            s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
            mbarrier.arrive(turn_other, count=1)
            s = warpgroup_mma_wait(0, deps=(s, ))
            mbarrier.arrive(k_empty.index(0), count=1)
            for j in range(n_blk - 1):
                s, acc, m_i, l_i = _step_pp(
                    j, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_me, turn_other, s, acc,
                    m_i, l_i, qs, KS, bh, Sk, WG, BN, D, STAGES, S_L, O_L, P_L, False, FOLD, False, EXP, KBLOCK)
            s, acc, m_i, l_i = _step_pp(
                n_blk - 1, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_me, turn_other, s, acc,
                m_i, l_i, qs, KS, bh, Sk, WG, BN, D, STAGES, S_L, O_L, P_L, True, FOLD, True, EXP, KBLOCK)
        else:
            acc, m_i, l_i = _keys_pass(q_smem, qb, k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                                       v_empty, qs, KS, b, h, bh, Sk, 0, BM_WG, BN, D, STAGES, S_L, O_L, P_L,
                                       SELF_LOAD, FOLD, EXP, KBLOCK, KPERM, ones, LMMA)
        _store_out(acc, l_i, VS, O, b, h, bh, H, Sq, row0, BM_WG, D, O_L, ACCUM)
        if TWO:   # a second context (cross-attention: text, then image) on the same Q tile, added into out
            acc, m_i, l_i = _keys_pass(q_smem, qb, k2_desc, v2_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                                       v_empty, qs, KS2, b, h, bh, Sk2, n_blk, BM_WG, BN, D, STAGES, S_L, O_L, P_L,
                                       SELF_LOAD, FOLD, EXP, KBLOCK, KPERM, ones, LMMA)
            _store_out(acc, l_i, VS2, O, b, h, bh, H, Sq, row0, BM_WG, D, O_L, True)
        if HAS_LSE:
            BL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            q = q_smem.load(BL).to(gl.float32)
            km = gl.load(KM + bh * D + gl.arange(0, D, layout=gl.SliceLayout(0, BL)))
            qkm = gl.convert_layout(gl.sum(q * km[None, :], axis=1), ROW_L)
            lse2 = m_i + gl.log2(l_i) - 8.807354922057604 + qkm * qs
            gl.store(LSE + bh * Sq + rows, lse2 * 0.6931471805599453, mask=rows < Sq)

    @gluon.jit
    def _attn_fwd_gluon(q_desc, k_desc, v_desc, QS, KS, VS, KM, O, LSE, H, Sq, Sk, k2_desc, v2_desc, KS2, VS2, Sk2,
                        HAS_LSE: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                        NUM_CONSUMERS: gl.constexpr, WS: gl.constexpr, FOLD: gl.constexpr, PINGPONG: gl.constexpr,
                        EXP: gl.constexpr = 0, KBLOCK: gl.constexpr = False, ACCUM: gl.constexpr = False,
                        TWO: gl.constexpr = False, KPERM: gl.constexpr = False, ones_desc=None,
                        LMMA: gl.constexpr = False):
        BM_WG: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_CONSUMERS):
            mbarrier.init(q_bar.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)
            mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)

        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        NO_SELF_LOAD: gl.constexpr = False
        NO_TWO: gl.constexpr = False
        # (argument tuples written inline: a tuple assigned to a variable loses its constexpr entries)
        if WS:   # every WS config has two consumer warpgroups (CONFIGS)
            gl.static_assert(NUM_CONSUMERS == 2, "warp specialization runs two consumer warpgroups")
            gl.static_assert(not TWO, "two contexts run on the self-loading schedules only")
            gl.warp_specialize([
                (_consumer, (WG0, q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty,
                             v_empty, QS, KS, VS, KM, O, LSE, b, h, bh, H, Sq, Sk, pid_m,
                             HAS_LSE, BM_WG, BN, D, STAGES, NUM_CONSUMERS, NO_SELF_LOAD, FOLD, PINGPONG, turn,
                             EXP, KBLOCK, ACCUM, k2_desc, v2_desc, KS2, VS2, Sk2, NO_TWO)),
                (_consumer, (WG1, q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty,
                             v_empty, QS, KS, VS, KM, O, LSE, b, h, bh, H, Sq, Sk, pid_m,
                             HAS_LSE, BM_WG, BN, D, STAGES, NUM_CONSUMERS, NO_SELF_LOAD, FOLD, PINGPONG, turn,
                             EXP, KBLOCK, ACCUM, k2_desc, v2_desc, KS2, VS2, Sk2, NO_TWO)),
                (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, b, h, bh, Sk,
                             BN, D, STAGES)),
            ], [4, 1], [240, 24])
        else:
            gl.static_assert(not (TWO and HAS_LSE), "two contexts return no LSE")
            ones = None
            if LMMA:   # [8, BN] e4m3 ones (B operand of the row-sum wgmma P8 @ ones), loaded by TMA
                ones = gl.allocate_shared_memory(ones_desc.dtype, ones_desc.block_type.shape, ones_desc.layout)
                ob = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
                mbarrier.init(ob, count=1)
                mbarrier.expect(ob, ones_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(ones_desc, [0, 0], ob, ones)
                mbarrier.wait(ob, 0)
            _consumer(0, q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                      QS, KS, VS, KM, O, LSE, b, h, bh, H, Sq, Sk, pid_m,
                      HAS_LSE, BM_WG, BN, D, STAGES, 1, True, FOLD, False, turn, EXP, KBLOCK, ACCUM,
                      k2_desc, v2_desc, KS2, VS2, Sk2, TWO, KPERM, ones, LMMA)


# ----------------------------------------------------------------------------------- host API
def _layouts(bn: int):
    return (gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], gl.int8),
            gl.NVMMASharedLayout.get_default_for([bn, HEAD_DIM], gl.int8),
            gl.NVMMASharedLayout.get_default_for([HEAD_DIM, bn], gl.float8e4nv))


_ONES = {}


def _ones_desc(device):
    """TMA descriptor of a [8, BLOCK_N] e4m3 ones tile (the LMMA row-sum operand), one per device, made on the first
    eager call (a tensor made inside a CUDA-graph capture would live in the graph's pool, filled only on replay)."""
    key = str(device)
    if key not in _ONES:
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("attention_gluon: run one eager call of an LMMA config before capturing a CUDA graph "
                             "(it makes the constant ones tile of the row sums)")
        t = torch.ones(8, BLOCK_N, device=device).to(torch.float8_e4m3fn)
        lay = gl.NVMMASharedLayout.get_default_for([8, BLOCK_N], gl.float8e4nv)
        _ONES[key] = (t, TensorDescriptor(t, [8, BLOCK_N], [BLOCK_N, 1], [8, BLOCK_N], lay))
    return _ONES[key][1]


def make_descriptors(q8, k8, vt, sk: int, bn: int):
    """TMA descriptors over 2-D views of the prepared inputs (no copies)."""
    b, sq, h, d = q8.shape
    ql, kl, vl = _layouts(bn)
    q2 = q8.view(b * sq, h * d)
    k2 = k8.view(b * sk, h * d)
    v2 = vt.view(b * h * d, vt.shape[-1])
    q_desc = TensorDescriptor(q2, [b * sq, h * d], [h * d, 1], [64, d], ql)
    k_desc = TensorDescriptor(k2, [b * sk, h * d], [h * d, 1], [bn, d], kl)
    v_desc = TensorDescriptor(v2, [b * h * d, sk], [vt.shape[-1], 1], [d, bn], vl)
    return q_desc, k_desc, v_desc


def _check(q8, q_scale, kv):
    if not _GLUON_OK:
        raise ValueError("attention_gluon needs triton.experimental.gluon (triton >= 3.5); "
                         "use kernels.attention.attention_quant_prepared instead")
    if not (q8.is_cuda and torch.cuda.is_available() and torch.cuda.get_device_capability(q8.device) == (9, 0)):
        raise ValueError("attention_gluon runs on CUDA sm90 (H100/H200) only; "
                         "use kernels.attention.attention_quant_prepared elsewhere")
    if q8.dim() != 4 or q8.shape[-1] != HEAD_DIM or kv.k8.shape[-1] != HEAD_DIM:
        raise ValueError(f"attention_gluon supports [B, S, H, {HEAD_DIM}] only, got q8 {tuple(q8.shape)}, "
                         f"k8 {tuple(kv.k8.shape)}")
    b, sq, h, d = q8.shape
    sk = kv.k8.shape[1]
    if q8.dtype != torch.int8 or kv.k8.dtype != torch.int8 or kv.vt.dtype != torch.float8_e4m3fn:
        raise ValueError("attention_gluon expects q8/k8 int8 and vt float8_e4m3fn (use quantize_q / quantize_kv)")
    if kv.k8.shape[0] != b or kv.k8.shape[2] != h or tuple(kv.vt.shape[:3]) != (b, h, d) or kv.vt.shape[3] < sk:
        raise ValueError(f"shape mismatch: q8 {tuple(q8.shape)}, k8 {tuple(kv.k8.shape)}, vt {tuple(kv.vt.shape)}")
    for name, t in (("q8", q8), ("q_scale", q_scale), ("k8", kv.k8), ("k_scale", kv.k_scale), ("vt", kv.vt),
                    ("v_scale", kv.v_scale)):
        if not t.is_contiguous():
            raise ValueError(f"attention_gluon: {name} must be contiguous; call .contiguous()")
    if kv.vt.shape[3] % 16 or sk < 1:
        raise ValueError("attention_gluon: vt's last dim must be a multiple of 16 (quantize_v pads it) and Sk >= 1")
    nblk = (sk + BLOCK_N - 1) // BLOCK_N
    ks = kv.k_scale
    if ks.dtype != torch.float32 or ks.dim() != 3 or tuple(ks.shape[:2]) != (b, h) or ks.shape[2] not in (sk, nblk):
        raise ValueError(f"attention_gluon: k_scale must be fp32 [B, H, Sk] (per key) or [B, H, cdiv(Sk, "
                         f"{BLOCK_N})] (per {BLOCK_N}-key block, requantize_k_per_block); got "
                         f"{tuple(ks.shape)} {ks.dtype} for B={b}, H={h}, Sk={sk}")


def _kblock(kv, config: str) -> bool:
    """Whether kv.k_scale holds one scale per BLOCK_N-key block (by shape; at Sk = 1 both forms are one scale).
    A KBLOCK config (plain_s2_kblock*) insists on per-block scales; plain_s2 (the default) switches to its
    per-block variant (= plain_s2_kblock) when given them; the other configs' per-block variants compile but
    are not GPU-tested, so they refuse per-block scales."""
    sk = kv.k8.shape[1]
    n = kv.k_scale.shape[-1]
    per_block = n == (sk + BLOCK_N - 1) // BLOCK_N and (n != sk or CONFIGS[config].get("KBLOCK", False))
    if CONFIGS[config].get("KBLOCK", False) and not per_block:
        raise ValueError(f"attention_gluon config {config!r} needs per-block K scales [B, H, cdiv(Sk, {BLOCK_N})], "
                         f"got {tuple(kv.k_scale.shape)}: convert with requantize_k_per_block(kv.k8, kv.k_scale) "
                         f"or use config 'plain_s2'")
    if per_block and not CONFIGS[config].get("KBLOCK", False) and config != "plain_s2":
        raise ValueError(f"attention_gluon config {config!r} takes per-key K scales [B, H, Sk] only; with per-block "
                         f"scales use config 'plain_s2_kblock' or 'plain_s2_kblock_3cta'")
    return per_block


def attention_gluon(q8, q_scale, kv, out: torch.Tensor | None = None, return_lse: bool = False,
                    lse: torch.Tensor | None = None, config: str = DEFAULT_CONFIG, accumulate: bool = False,
                    kv2=None):
    """Quantized attention on prepared inputs (same contract as attention_quant_prepared):
    q8 int8 [B, Sq, H, 128], q_scale fp32 [B, H, Sq] (log2 units), kv a QuantKV whose k_scale is either
    [B, H, Sk] (per key, as quantize_kv makes it) or [B, H, cdiv(Sk, 128)] (one scale per 128-key block,
    requantize_k_per_block; detected by shape: plain_s2 then runs as plain_s2_kblock; configs
    plain_s2_kblock / plain_s2_kblock_3cta need them).  Returns out bf16
    [B, Sq, H, 128] or (out, lse fp32 [B, H, Sq] natural log).  accumulate=True adds the result to out
    (given): out = bf16(bf16(this) + out), the sum of two attentions (cross-attention over text + image).
    kv2: a second key/value set (same scale form as kv) attended by the same Q tiles in the same launch and added
    like accumulate: out = bf16(bf16(attn(kv2)) + bf16(attn(kv))), bit-identical to two launches (no LSE; the
    self-loading configs only)."""
    if config not in CONFIGS:
        raise ValueError(f"attention_gluon: unknown config {config!r}; choose one of {sorted(CONFIGS)}")
    if accumulate and (out is None or out.dtype != torch.bfloat16 or tuple(out.shape) != tuple(q8.shape)
                       or not out.is_contiguous()):
        raise ValueError("attention_gluon: accumulate=True needs out, a contiguous bf16 tensor shaped like q8")
    _check(q8, q_scale, kv)
    cfg = CONFIGS[config]
    kblock = _kblock(kv, config)
    kperm = kv.k_perm
    if kperm and (not kblock or cfg["WS"]):
        raise ValueError(f"attention_gluon: keys in key_row_order16 (k_perm=True) need per-block K scales and a "
                         f"self-loading config (plain*), got config {config!r} with k_scale "
                         f"{tuple(kv.k_scale.shape)}")
    if kv2 is not None:
        _check(q8, q_scale, kv2)
        if (return_lse or cfg["WS"] or _kblock(kv2, config) != kblock
                or kv2.k_perm != kperm):
            raise ValueError("attention_gluon: kv2 (a second context in the same launch) needs return_lse=False, a "
                             "self-loading config (plain*) and the same K-scale form (per key / per block) and key "
                             "order (k_perm) as kv")
    b, sq, h, d = q8.shape
    sk = kv.k8.shape[1]
    if out is None:
        out = torch.empty((b, sq, h, d), dtype=torch.bfloat16, device=q8.device)
    if return_lse and lse is None:
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q8.device)
    if return_lse and kv.km is None:
        km = torch.zeros((b, h, d), dtype=torch.float32, device=q8.device)
    else:
        km = kv.km
    bn = BLOCK_N
    q_desc, k_desc, v_desc = make_descriptors(q8, kv.k8, kv.vt, sk, bn)
    kv2_args = (k_desc, v_desc, kv.k_scale, kv.v_scale, sk)
    if kv2 is not None:
        sk2 = kv2.k8.shape[1]
        kv2_args = make_descriptors(q8, kv2.k8, kv2.vt, sk2, bn)[1:] + (kv2.k_scale, kv2.v_scale, sk2)
    bm = 64 * cfg["NUM_CONSUMERS"]
    grid = (triton.cdiv(sq, bm), b * h)
    extra = {} if cfg["maxnreg"] is None else {"maxnreg": cfg["maxnreg"]}
    _attn_fwd_gluon[grid](q_desc, k_desc, v_desc, q_scale, kv.k_scale, kv.v_scale,
                          km if return_lse else kv.v_scale, out, lse if return_lse else q_scale, h, sq, sk, *kv2_args,
                          HAS_LSE=return_lse, BN=bn, STAGES=cfg["STAGES"], NUM_CONSUMERS=cfg["NUM_CONSUMERS"],
                          WS=cfg["WS"], FOLD=cfg["FOLD"], PINGPONG=cfg["PINGPONG"], EXP=cfg.get("EXP", 0),
                          KBLOCK=kblock, ACCUM=accumulate, TWO=kv2 is not None, KPERM=kperm,
                          ones_desc=_ones_desc(q8.device) if cfg.get("LMMA") else None, LMMA=cfg.get("LMMA", False),
                          num_warps=NUM_WARPS,
                          **extra)
    return (out, lse) if return_lse else out


def requantize_k_per_block(k8: torch.Tensor, k_scale: torch.Tensor, block: int = BLOCK_N):
    """Per-key int8 keys -> per-key-block int8 keys (torch; any device).
    k8 int8 [B, Sk, H, D] with k_scale fp32 [B, H, Sk] (quantize_kv's K, already smoothed) ->
    (k8_block int8 [B, Sk, H, D], k_scale_block fp32 [B, H, cdiv(Sk, block)]): dequantize x = k8 * ks, then per
    (batch, head, block of `block` keys) scale = max(amax|x|, 1e-12) / 127 and k8_block = clamp(round half away
    from zero(x / scale), +-127).  |k8_block * scale - x| <= scale / 2 per element.  The attention kernels need
    block = BLOCK_N (128)."""
    if k8.dtype != torch.int8 or k8.dim() != 4:
        raise ValueError(f"requantize_k_per_block: k8 must be int8 [B, Sk, H, D], got {k8.dtype} {tuple(k8.shape)}")
    b, sk, h, d = k8.shape
    if tuple(k_scale.shape) != (b, h, sk):
        raise ValueError(f"requantize_k_per_block: k_scale must be the per-key scale [B, H, Sk] = {(b, h, sk)}, "
                         f"got {tuple(k_scale.shape)}")
    if block < 1:
        raise ValueError("requantize_k_per_block: block must be >= 1")
    x = k8.float() * k_scale.float().transpose(1, 2)[..., None]          # [B, Sk, H, D]
    return _quantize_k_blocks(x, block)


def requantize_kv_per_block(kv, block: int = BLOCK_N):
    """A QuantKV with per-key int8 keys (quantize_kv) -> the same QuantKV with its keys requantized to one scale
    per `block` keys (requantize_k_per_block; values, V and km unchanged)."""
    return QuantKV(*requantize_k_per_block(kv.k8, kv.k_scale, block), kv.vt, kv.v_scale, kv.km)


def _quantize_k_blocks(x: torch.Tensor, block: int):
    """fp32 keys [B, Sk, H, D] -> (int8 [B, Sk, H, D], scale fp32 [B, H, cdiv(Sk, block)]), one scale per block."""
    b, sk, h, d = x.shape
    nblk = (sk + block - 1) // block
    pad = nblk * block - sk
    xp = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
    amax = xp.abs().view(b, nblk, block, h, d).amax(dim=(2, 4))          # [B, nblk, H]
    scale = amax.clamp_min(1e-12) / 127.0
    sc_tok = scale.repeat_interleave(block, dim=1)[:, :sk]               # [B, Sk, H]
    y = x / sc_tok[..., None]
    y = torch.sign(y) * torch.floor(y.abs() + 0.5)                        # round half away from zero
    q = y.clamp(-127.0, 127.0).to(torch.int8)
    return q.contiguous(), scale.transpose(1, 2).contiguous()


def quantize_k_per_block(k: torch.Tensor, km: torch.Tensor | None = None, block: int = BLOCK_N):
    """bf16 keys [B, Sk, H, D] (minus km [B, H, D] if given, quantize_kv's smoothing) -> per-block int8 keys and
    scales [B, H, cdiv(Sk, block)] in one rounding (what a per-block producer would emit; torch reference)."""
    x = k.float()
    if km is not None:
        x = x - km.float()[:, None]
    return _quantize_k_blocks(x, block)


def permute_key_rows(k8: torch.Tensor, block: int = BLOCK_N) -> torch.Tensor:
    """Keys [B, Sk, ...] in natural order -> the same rows in key_row_order16 (what requantize_k_blocks(perm16=True)
    writes; pass the result as QuantKV(..., k_perm=True)).  A copy."""
    return k8[:, key_row_order16(k8.shape[1], block).to(k8.device)].contiguous()


def per_key_scales(k_scale_block: torch.Tensor, sk: int, block: int = BLOCK_N) -> torch.Tensor:
    """Per-block scales [B, H, nblk] -> the same scales repeated per key [B, H, Sk] (for per-key kernels)."""
    return k_scale_block.repeat_interleave(block, dim=-1)[..., :sk].contiguous()
