"""Q/K producers for self-attention: RMSNorm(H*D) + 3-D RoPE + KV-cache write + quantization.

`qk_prep` (one program per token on GPU -- the whole H*D = 5120 row as a [1, H_pad, 128] tile; 16
tokens per program in the CPU interpreter), in one pass:
    q  -> y = bf16(q * rsqrt(mean(q^2) + eps)) (fp32) ; y = bf16(y * w_q)            RMSNorm over H*D
          -> RoPE at table rows q_pos0 + t: (y0 + i y1) * (cos + i sin) in float64 -> fp32 -> bf16
          -> int8 per (token, head) with scale amax/127 * sm_scale*log2e   (or the rotated bf16 q)
    k  -> same RMSNorm with w_k -> kn (un-rotated) -> cache rows: bf16, or e4m3 + per-(token, head) scale
          s = max(amax/448, 1e-12), e4m3(bf16(kn) / bf16(s))  (shared/SPEC.md 4.6); kn is also written
          as bf16 (it IS the cache row in the bf16 cache; a scratch for the FP8 cache, because the
          published model attends to the un-requantized current chunk)
    v  -> cache rows (copy, or e4m3 + scale as for k)
  RoPE rounding: the multiply runs in float64 like the reference (cos/sin tables float64 from
  Rope3D.cos_sin()), then fp32 -> bf16: bit-identical to rope_apply_reference up to fp64 FMA
  contraction (differences below 1 bf16 ulp, in rare ties).  The RMSNorm is fp32 with a different
  summation order than torch: rare 1-ulp (bf16) differences.
  Bytes per token (bf16 cache): read q, k, v 3*2*H*D, write q8 H*D + kn 2*H*D + v 2*H*D (+ table 1 KB).

`rope_keys`: the key set of one self-attention call, from up to two sources (cache rows, possibly
e4m3 + scale, dequantized as bf16(q)*bf16(s); then the current chunk's fresh bf16 kn), rotated at
position = key row (slot index * Fl + in-frame position), rounded to bf16 like the reference, then
    PHASE 0 (launch 1): km = mean of the rotated keys over every KM_STRIDE-th key row (8: 2048 of
             16380 keys): each program sums TB0-row steps of its rows_per_prog sampled rows in fp32,
             adds sum/n * 2^32 as int64 (fixed point, order-independent => km deterministic) into a
             reused zeroed workspace with atomics; the last program of each head group (counter)
             writes km = acc * 2^-32 and zeroes the workspace again.  No torch reduction launch.
    PHASE 1 (launch 2): k - km -> int8 per (token, head) + scale [B, H, Sk]      (QUANT)
             or the rotated bf16 keys [B, Sk, H, D]                       (bf16 attention, no phase 0)
  Numerics of phase 1 are the previous kernel's bit for bit (checked on the H100 against it at the
  real shape, bf16 and FP8 cache: 0 of 84M int8 values or scales differ; bf16 keys identical):
  fp64 multiply (same expression, same FMA contraction) -> fp32 -> bf16 (RNE);
  sc = max(amax, 1e-12)/127; q = trunc(y*rcp(sc) +- 0.5) = round-half-away (y / sc is div.full.f32 =
  y * rcp(sc) for sc in [2^-126, 2^126]; the product is rounded on its own (mul.rn), as before;
  |q| <= 127 + ulps, so the old clamp to +-127 never acted and is gone).
  K smoothing is exact for ANY km subtracted from every key of a head (softmax is invariant to the
  per-query constant q.km; the attention kernel adds q.km back to the LSE with the km returned here),
  so a sample is enough: it only has to remove the channel offsets.  Measured at the real shape:
  attention cos vs fp32 0.998521 (km from 1/8) vs 0.998518 (km over all keys), max|lse err| 0.0633
  vs 0.0636; int8 key error rel 1.408e-2 either way.  The fixed-point km differs from an fp32 mean
  by < 3e-7 (|km| must stay < 2^31).
  The cache keeps un-rotated keys (slot positions change at memory compression, SPEC 4.4), so the
  rotation is applied to the whole key set once per call.  Minimum bytes (bf16 cache, one source):
  read 2 B/elem + cos/sin 1 KB per key, write 1 B/elem + 4 B scale per (key, head) = 271 MB at
  16380 x 40 x 128 (FP8 cache, 7020 e4m3 rows: 236 MB); phase 0 adds 1/8 of the key reads (21 MB).
  Layout: every key row is read as D/2 32-bit words (bf16 pairs; e4m3 pairs as 16-bit words) so
  the RoPE pairs (2p, 2p+1) are the low/high halves of one word: no split/join, hence no shared-
  memory round trip (the previous kernel spent ~30 SASS instructions per element, 8 barriers per
  tile); bf16 rounding as one packed cvt.rn.bf16x2.f32 per pair, int8 pairs packed with one prmt,
  rcp(sc) as one MUFU.RCP, int8 rounding RND=1 from the mantissa of rz(|q| + 0.5 + 1.5*2^23)
  (no F2I; RND=0 keeps F2I).  Phase 1 (bf16 source, sm90 SASS, no spills): 25 instructions per
  element for the default tile, 22 for (8, 1, 8, 4); the previous kernel 31 (8 smem round trips).
  Tiles [TB rows, HG heads, D/2 words]; program = (row block, GL head groups), head group fastest
  (the 5 programs sharing cos/sin rows run together); with GL > 1 the next group's keys and km are
  loaded before the current group's stores.  Phase 0 tiles [TB0, HG0, D/2], next step prefetched.

Launch configs: qk_prep one token per program, 4 warps (8 for H*D >= 4096).  rope_keys phase 1
(TB, HG, GL, warps) = (4, 8, 1, 4) (rope_keys_config), phase 0 (TB0, rows per program, warps, HG0)
= (4, 32, 4, 8) (km_config: 64 x 5 programs of 8 steps at the real shape), RND = 1.
Measured (H100 SXM, device tool; 16380 keys x 40 x 128; CUDA-graph replay timed with do_bench
median; copy = a device copy of the same bytes in the same run: 0.0978 ms bf16 / 0.0867 ms FP8):
  phase 1 alone, (TB, HG, GL, warps) x RND:   bf16 cache         FP8 cache (7020 e4m3 + 9360 bf16)
    (4, 8, 1, 4) RND 1 [default]             0.1060 ms (92 %)   0.1094 ms (79 %)
    (4, 8, 1, 4) RND 0                       0.1089             0.1109
    (8, 1, 4, 4) RND 0 / 1                   0.1078 / 0.1093    0.1122 / 0.1157
    (8, 1, 5, 4) RND 1                       0.1089             0.1166
    (2, 8, 1, 4) RND 1 (the old tile)        0.1242             0.1264
    old kernel's phase 1 (km of one key)     0.1358 (72 %)      0.1419 (61 %)
  phase 0 alone (graph, incl. ~5 us replay): (4,32,4,8) 0.026 / 0.028 ms; (4,16,4,8) 0.031 / 0.034;
    (4,64,4,8) 0.030 / 0.038; (8,32,8,8) 0.043 / 0.051; with km_stride 16: 0.020 / 0.024.
  whole call (graph):  old 0.2303 ms (42 %) / 0.2428 (36 %);  (2,8,1,4) 0.1442 / 0.1495;
    (8,1,5,4) 0.1277 (77 %) / 0.1400 (62 %); (8,1,8,4) 0.1361 / 0.1396 -- phase 0 adds 19 us (bf16)
    / 23 us (FP8) to phase 1 in one graph, so the default is ~0.125 ms (78 %) / ~0.133 ms (65 %)
    (sum of the measured parts); the default measured afterwards (`python -m liveact.bench.kernels_attention
    --producers`, session 4 final): 0.127 ms (77 %) / 0.147 ms (58 %), and 0.150 ms (58 %) for FP8 in the probe's
    graph -- the 80 % target is met by phase 1 alone (92 % / 79 %), not by the whole call.  End to end rope_keys
    went from 10.2 to 5.9 ms per step (profile).
  Where the old phase-0 time went (profiler, old kernel, per call): its two launches 222.6 us +
  the torch sum 6.9 us, against 136 us for its phase 1 alone => its phase-0 kernel ~87 us for 21 MB.
  Its SASS (offline sm90 compile) shows why it was slow per byte: the [8, 8, 128] tile goes through
  shared memory for the RoPE split and again for the row sum (32 KB smem, 12 barriers per program,
  8 warps) -- a latency-bound chain, not bandwidth (inferred from SASS, not profiled per line).
  The new phase 0 adds 19-23 us to a graph of the call; from the km_cfg sweep about 5 us of it
  scale with the atomics and ~0.8 us per step, the rest looks fixed (launch boundary, fences, the
  last program's reduction) -- an estimate from the sweep, not a profile.
  Eager calls are host-bound: ~210 us of Python + launch per call for old and new alike (graphs
  hide it).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .attention import INTERPRET, LOG2E, RowSource, round_half_away, to_bf16, to_e4m3, two_sources


@triton.jit
def _rms_rows(x, w, n, eps, EMU: tl.constexpr):
    """x [TB, HP, D] fp32 (zero padding), w [1, HP, D] bf16 -> bf16(bf16(x / rms_token) * w) as fp32."""
    ms = tl.sum(tl.sum(x * x, 2), 1) / n
    y = to_bf16(x * (1.0 / tl.sqrt_rn(ms + eps))[:, None, None], EMU).to(tl.float32)
    return to_bf16(y * w.to(tl.float32), EMU).to(tl.float32)


@triton.jit
def _rot(x0, x1, c, s, EMU: tl.constexpr):
    """One complex multiply per pair in float64, rounded fp64 -> fp32 -> bf16 (as the reference)."""
    x0 = x0.to(tl.float64)
    x1 = x1.to(tl.float64)
    y0 = to_bf16((x0 * c - x1 * s).to(tl.float32), EMU)
    y1 = to_bf16((x0 * s + x1 * c).to(tl.float32), EMU)
    return y0, y1


@triton.jit
def _rope(x, c, s, R: tl.constexpr, D: tl.constexpr, EMU: tl.constexpr):
    """x [R, D] fp32 with interleaved pairs, c, s [R, D/2] float64 -> bf16-rounded fp32 [R, D]."""
    x0, x1 = tl.split(tl.reshape(x, (R, D // 2, 2)))
    y0, y1 = _rot(x0, x1, c, s, EMU)
    return tl.reshape(tl.join(y0, y1), (R, D)).to(tl.float32)


@triton.jit
def _rope3(x, c, s, TB: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, EMU: tl.constexpr):
    """x [TB, HP, D], c, s [TB, 1, D/2] float64 -> bf16-rounded fp32 [TB, HP, D]."""
    x0, x1 = tl.split(tl.reshape(x, (TB, HP, D // 2, 2)))
    y0, y1 = _rot(x0, x1, c, s, EMU)
    return tl.reshape(tl.join(y0, y1), (TB, HP, D)).to(tl.float32)


@triton.jit
def _fp8_cache_store(x, P, PS, offs, ps_offs, hmask, mask3, EMU: tl.constexpr):
    """SPEC 4.6 quantization of x [TB, HP, D] (bf16 values as fp32): per (token, head)
    s = max(amax/448, 1e-12), e4m3(bf16(x) / bf16(s)); stores e4m3 at P + offs and s at PS + ps_offs."""
    s = tl.maximum(tl.max(tl.abs(x), 2) / 448.0, 1e-12)
    qv = to_bf16(x / to_bf16(s, EMU).to(tl.float32)[:, :, None], EMU).to(tl.float32)
    tl.store(P + offs, to_e4m3(qv, EMU), mask=mask3)
    tl.store(PS + ps_offs, s, mask=hmask)


@triton.jit
def _qk_prep_kernel(Q, K, V, WQ, WK, COS, SIN, QO, QOS, KN, KC, KCS, VC, VCS,
                    L, H, q_pos0, eps, factor,
                    sq_b, sq_s, sk_b, sk_s, sv_b, sv_s, sqo_b, sqo_s, skn_b, skn_s, skc_b, skc_s, svc_b, svc_s,
                    scs_b,
                    QUANT: tl.constexpr, FP8_CACHE: tl.constexpr, EMU: tl.constexpr,
                    TB: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
    """One program per TB tokens of one batch row; tile [TB, HP, D] = TB whole H*D rows."""
    b = tl.program_id(1)
    t2 = tl.program_id(0) * TB + tl.arange(0, TB)[:, None]               # [TB, 1]
    h2 = tl.arange(0, HP)[None, :]                                        # [1, HP]
    hmask = (t2 < L) & (h2 < H)                                           # [TB, HP]
    t = t2[:, :, None]                                                    # [TB, 1, 1]
    hh = h2[:, :, None]                                                   # [1, HP, 1]
    dd = tl.arange(0, D)[None, None, :]                                   # [1, 1, D]
    tmask = t < L
    mask3 = tmask & (hh < H)
    row = hh * D + dd
    n = H * D
    # ---- q: RMSNorm -> RoPE -> int8 (or bf16)
    x = tl.load(Q + b * sq_b + t * sq_s + row, mask=mask3, other=0.0).to(tl.float32)
    y = _rms_rows(x, tl.load(WQ + row, mask=hh < H, other=0.0), n, eps, EMU)
    pp = tl.arange(0, D // 2)[None, None, :]
    c = tl.load(COS + (q_pos0 + t) * (D // 2) + pp, mask=tmask, other=0.0)
    s = tl.load(SIN + (q_pos0 + t) * (D // 2) + pp, mask=tmask, other=0.0)
    y = _rope3(y, c, s, TB, HP, D, EMU)
    if QUANT:
        sc = tl.maximum(tl.max(tl.abs(y), 2), 1e-12) / 127.0
        yi = tl.minimum(tl.maximum(round_half_away(y / sc[:, :, None]), -127.0), 127.0).to(tl.int8)
        tl.store(QO + b * sqo_b + t * sqo_s + row, yi, mask=mask3)
        tl.store(QOS + (b * H + h2) * L + t2, sc * factor, mask=hmask)
    else:
        tl.store(QO + b * sqo_b + t * sqo_s + row, y.to(tl.bfloat16), mask=mask3)   # y is on the bf16 grid
    # ---- k: RMSNorm (un-rotated) -> kn (bf16) and the cache row
    x = tl.load(K + b * sk_b + t * sk_s + row, mask=mask3, other=0.0).to(tl.float32)
    y = _rms_rows(x, tl.load(WK + row, mask=hh < H, other=0.0), n, eps, EMU)
    tl.store(KN + b * skn_b + t * skn_s + row, y.to(tl.bfloat16), mask=mask3)
    ps_offs = b * scs_b + t2 * H + h2
    if FP8_CACHE:
        _fp8_cache_store(y, KC, KCS, b * skc_b + t * skc_s + row, ps_offs, hmask, mask3, EMU)
    # ---- v: the cache row
    x = tl.load(V + b * sv_b + t * sv_s + row, mask=mask3, other=0.0)
    if FP8_CACHE:
        _fp8_cache_store(x.to(tl.float32), VC, VCS, b * svc_b + t * svc_s + row, ps_offs, hmask, mask3, EMU)
    else:
        tl.store(VC + b * svc_b + t * svc_s + row, x, mask=mask3)


@triton.jit
def _bf16_pairs(w):
    """int32 words holding two bf16 (element 2p in the low half) -> (x[2p], x[2p+1]) as fp32."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_word(y0, y1, EMU: tl.constexpr):
    """fp32 (y0, y1) -> int32 word of (bf16(y0), bf16(y1)) (RNE): one cvt.rn.bf16x2.f32 per pair on the
    GPU (Triton emits one scalar conversion per element, on the slow conversion pipe)."""
    if EMU:
        lo = to_bf16(y0, EMU).to(tl.float32).to(tl.uint32, bitcast=True) >> 16
        hi = to_bf16(y1, EMU).to(tl.float32).to(tl.uint32, bitcast=True) & 0xFFFF0000
        return (hi | lo).to(tl.int32, bitcast=True)
    else:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", [y1, y0], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _src1_pairs(X1, XS1, b, t, t2, h2, col, m, m2, H, sx1_b, sx1_s, sxs1_b, HAS_XS: tl.constexpr,
                EMU: tl.constexpr):
    """Pairs of the first source at rows t: bf16 words, or e4m3 byte pairs dequantized as bf16(q)*bf16(s)
    (kv_read of shared/SPEC.md 4.6)."""
    w = tl.load(X1 + b * sx1_b + t * sx1_s + col, mask=m, other=0)
    if HAS_XS:   # w: int16 = two e4m3 codes
        x0 = w.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        x1 = (w >> 8).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        xs = tl.load(XS1 + b * sxs1_b + t2 * H + h2, mask=m2, other=0.0)
        sb = to_bf16(xs, EMU).to(tl.float32)[:, :, None]
        x0, x1 = _bf16_pairs(_bf16_word(x0 * sb, x1 * sb, EMU))
    else:
        x0, x1 = _bf16_pairs(w)
    return x0, x1


@triton.jit
def _key_pairs(X1, XS1, X2, b, t2, h2, r_lo, r_hi, S1, Sk, H, sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s,
               HAS_XS: tl.constexpr, HAS_X2: tl.constexpr, EMU: tl.constexpr, P: tl.constexpr):
    """Key rows t2 [TB, 1] x heads h2 [1, HG] as pairs (x[2p], x[2p+1]) [TB, HG, P] (bf16 values as
    fp32), 0 for rows >= Sk or heads >= H.  Rows < S1 come from X1, the others from X2; r_lo <= rows
    <= r_hi picks the source once per tile."""
    t = t2[:, :, None]
    hh = h2[:, :, None]
    col = hh * P + tl.arange(0, P)[None, None, :]
    hm = hh < H
    if HAS_X2:
        if r_hi < S1:
            x0, x1 = _src1_pairs(X1, XS1, b, t, t2, h2, col, (t < S1) & hm, (t2 < S1) & (h2 < H), H,
                                 sx1_b, sx1_s, sxs1_b, HAS_XS, EMU)
        elif r_lo >= S1:
            x0, x1 = _bf16_pairs(tl.load(X2 + b * sx2_b + (t - S1) * sx2_s + col, mask=(t < Sk) & hm, other=0))
        else:   # the one tile that straddles the two sources
            a0, a1 = _src1_pairs(X1, XS1, b, t, t2, h2, col, (t < S1) & hm, (t2 < S1) & (h2 < H), H,
                                 sx1_b, sx1_s, sxs1_b, HAS_XS, EMU)
            b0, b1 = _bf16_pairs(tl.load(X2 + b * sx2_b + (t - S1) * sx2_s + col,
                                         mask=(t >= S1) & (t < Sk) & hm, other=0))
            x0 = tl.where(t < S1, a0, b0)
            x1 = tl.where(t < S1, a1, b1)
    else:
        x0, x1 = _src1_pairs(X1, XS1, b, t, t2, h2, col, (t < Sk) & hm, (t2 < Sk) & (h2 < H), H,
                             sx1_b, sx1_s, sxs1_b, HAS_XS, EMU)
    return x0, x1


@triton.jit
def _rope_pairs(x0, x1, c, s, EMU: tl.constexpr):
    """_rot's float64 complex multiply with c, s [TB, 1, P], rounded fp64 -> fp32 -> bf16 (as fp32)."""
    x0 = x0.to(tl.float64)
    x1 = x1.to(tl.float64)
    return _bf16_pairs(_bf16_word((x0 * c - x1 * s).to(tl.float32), (x0 * s + x1 * c).to(tl.float32), EMU))


@triton.jit
def _int8_byte(q, RND: tl.constexpr, EMU: tl.constexpr):
    """round-half-away(q) for |q| <= 127.5 as an int32 whose low byte is the int8 code.  RND=0:
    trunc(q +- 0.5) through F2I.  RND=1 (GPU): n = floor(fl(|q| + 0.5)) read from the mantissa of
    rz(fl(|q| + 0.5) + 1.5*2^23) (no conversion instruction; the sum is normal, so the .ftz of
    __nv_fadd_rz is harmless), negated with the sign of q; the same integer as RND=0
    (fl(q - 0.5) = -fl(|q| + 0.5))."""
    if EMU:
        return round_half_away(q).to(tl.int32)
    elif RND == 1:
        r = libdevice.add_rz(tl.abs(q) + 0.5, 12582912.0).to(tl.int32, bitcast=True)
        sg = q.to(tl.int32, bitcast=True) >> 31
        return (r ^ sg) - sg
    else:        # q + copysign(0.5, q) = round_half_away's sum, then F2I (truncation)
        half = ((q.to(tl.uint32, bitcast=True) & 0x80000000) | 0x3F000000).to(tl.float32, bitcast=True)
        return (q + half).to(tl.int32)


@triton.jit
def _byte_pair(q0, q1, EMU: tl.constexpr):
    """Low bytes of int32 q0, q1 -> int16 (q0 in the low byte): one prmt on the GPU."""
    if EMU:
        return ((q1 << 8) | (q0 & 255)).to(tl.int16)
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x40;", "=r,r,r", [q0, q1], dtype=tl.int32,
                                         is_pure=True, pack=1).to(tl.int16)


@triton.jit
def _mul(y, inv, EMU: tl.constexpr):
    """y * inv rounded on its own (mul.rn: never contracted into an FMA with the +-0.5 that follows,
    as div.full.f32 y / sc is not)."""
    if EMU:
        return y * inv
    else:
        return libdevice.mul_rn(y, inv)


@triton.jit
def _rcp(x, EMU: tl.constexpr):
    """1 / x as div.full.f32 computes it for x in [2^-126, 2^126] (MUFU.RCP), so y * _rcp(x) == y / x
    bit for bit on the GPU; one instruction instead of div.full's range checks."""
    if EMU:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _rope_keys_kernel(X1, XS1, X2, COS, SIN, KM, ACC, CNT, OUT, OS, S1, Sk, H, row_stride, rows_per_prog,
                      n_prog0, inv_cnt, sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s, so_b, so_s,
                      HAS_XS: tl.constexpr, HAS_X2: tl.constexpr, PHASE: tl.constexpr, QUANT: tl.constexpr,
                      RND: tl.constexpr, EMU: tl.constexpr, TB: tl.constexpr, HG: tl.constexpr, GL: tl.constexpr,
                      NGP: tl.constexpr, P: tl.constexpr):
    """Tiles [TB rows, HG heads, P = D/2 pairs]: every key row is read as P 32-bit words (bf16 pairs;
    16-bit e4m3 pairs), so the RoPE pairs need no split/join (no shared-memory round trip).
    Program (pid, b): head group g = pid % ngp (GL groups of HG heads), row block pid // ngp.
    PHASE 0 (K smoothing vector, quantized call only): rows m * row_stride, m in the program's
    rows_per_prog sampled rows (TB per step); sum * inv_cnt -> fixed point (2^-32) -> int64 atomic add
    into ACC[b, heads, D] (integer: order-independent, so km is deterministic); the last of the n_prog0
    programs of (g, b) (counter CNT) writes KM = ACC * 2^-32 and resets ACC and CNT to 0.
    PHASE 1: rows [blk*TB, (blk+1)*TB) -> y - km -> int8 pairs + scale [B, H, Sk] (QUANT), or the
    rotated bf16 pairs (KM, ACC, CNT unused)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    g = pid % NGP
    blk = pid // NGP
    tt = tl.arange(0, TB)[:, None]                                        # [TB, 1]
    hg = tl.arange(0, HG)[None, :]                                        # [1, HG]
    pp = tl.arange(0, P)[None, None, :]                                   # [1, 1, P]
    if PHASE == 0:
        acc0 = tl.zeros((TB, HG, P), tl.float32)
        acc1 = tl.zeros((TB, HG, P), tl.float32)
        h2 = g * HG + hg
        m_lo = blk * rows_per_prog
        m_hi = m_lo + rows_per_prog
        t2 = (m_lo + tt) * row_stride                                     # [TB, 1] sampled key rows
        x0, x1 = _key_pairs(X1, XS1, X2, b, t2, h2, m_lo * row_stride, (m_lo + TB - 1) * row_stride,
                            S1, Sk, H, sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s, HAS_XS, HAS_X2, EMU, P)
        c = tl.load(COS + t2[:, :, None] * P + pp, mask=t2[:, :, None] < Sk, other=0.0)
        s = tl.load(SIN + t2[:, :, None] * P + pp, mask=t2[:, :, None] < Sk, other=0.0)
        for m0 in range(m_lo, m_hi, TB):
            # prefetch the next step (rows past this program's share -> Sk: masked)
            mn = m0 + TB
            t2 = tl.where(mn + tt < m_hi, (mn + tt) * row_stride, Sk)
            n0, n1 = _key_pairs(X1, XS1, X2, b, t2, h2, mn * row_stride, (mn + TB - 1) * row_stride,
                                S1, Sk, H, sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s, HAS_XS, HAS_X2, EMU, P)
            nc = tl.load(COS + t2[:, :, None] * P + pp, mask=t2[:, :, None] < Sk, other=0.0)
            ns = tl.load(SIN + t2[:, :, None] * P + pp, mask=t2[:, :, None] < Sk, other=0.0)
            y0, y1 = _rope_pairs(x0, x1, c, s, EMU)
            acc0 += y0
            acc1 += y1
            x0, x1, c, s = n0, n1, nc, ns
        # flat [HG * P] (the interpreter's atomics mis-handle a leading dimension of 1)
        h1 = g * HG + tl.arange(0, HG)[:, None]                           # [HG, 1]
        p1 = tl.arange(0, P)[None, :]                                     # [1, P]
        hc = tl.reshape(h1 + 0 * p1, (HG * P,))
        off = (b * H + hc) * (2 * P) + 2 * tl.reshape(p1 + 0 * h1, (HG * P,))   # element 2p of ACC / KM
        hm = hc < H
        fix = inv_cnt * 4294967296.0                                      # mean, fixed point 2^-32
        tl.atomic_add(ACC + off, tl.reshape(tl.sum(acc0, 0) * fix, (HG * P,)).to(tl.int64), mask=hm, sem="relaxed")
        tl.atomic_add(ACC + off + 1, tl.reshape(tl.sum(acc1, 0) * fix, (HG * P,)).to(tl.int64), mask=hm,
                      sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(CNT + b * NGP + g, 1, sem="acq_rel") == n_prog0 - 1:   # last program of (g, b)
            for j in tl.static_range(2):
                tot = tl.atomic_xchg(ACC + off + j, 0, mask=hm, sem="relaxed")
                tl.store(KM + off + j, tot.to(tl.float32) * (1.0 / 4294967296.0), mask=hm)
            tl.atomic_xchg(CNT + b * NGP + g, 0, sem="relaxed")
    else:
        t2 = blk * TB + tt                                                # [TB, 1] key rows
        t = t2[:, :, None]
        c = tl.load(COS + t * P + pp, mask=t < Sk, other=0.0)
        s = tl.load(SIN + t * P + pp, mask=t < Sk, other=0.0)
        x0, x1 = _key_pairs(X1, XS1, X2, b, t2, g * GL * HG + hg, blk * TB, blk * TB + TB - 1, S1, Sk, H,
                            sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s, HAS_XS, HAS_X2, EMU, P)
        if QUANT:       # KM read as int64 words = (km[2p], km[2p+1]) fp32 pairs
            hh = (g * GL * HG + hg)[:, :, None]
            kw = tl.load(KM + (b * H + hh) * P + pp, mask=hh < H, other=0)
        for gi in tl.static_range(GL):
            h2 = (g * GL + gi) * HG + hg                                  # [1, HG] heads
            hh = h2[:, :, None]
            col = hh * P + pp
            m3 = (t < Sk) & (hh < H)
            if gi + 1 < GL:   # issue the next head group's loads before this group's stores
                n0, n1 = _key_pairs(X1, XS1, X2, b, t2, h2 + HG, blk * TB, blk * TB + TB - 1, S1, Sk, H,
                                    sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s, HAS_XS, HAS_X2, EMU, P)
                if QUANT:
                    nkw = tl.load(KM + (b * H + hh + HG) * P + pp, mask=hh + HG < H, other=0)
            y0, y1 = _rope_pairs(x0, x1, c, s, EMU)
            if QUANT:
                y0 = y0 - kw.to(tl.int32).to(tl.float32, bitcast=True)
                y1 = y1 - (kw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                sc = tl.maximum(tl.max(tl.maximum(tl.abs(y0), tl.abs(y1)), 2), 1e-12) / 127.0
                # y / sc == y * rcp(sc) on the GPU (div.full.f32 for sc in [2^-126, 2^126]; here
                # sc >= 1e-12/127); |y / sc| <= 127 (+ ulps), so the int8 clamp is not needed
                inv = _rcp(sc, EMU)[:, :, None]
                w = _byte_pair(_int8_byte(_mul(y0, inv, EMU), RND, EMU), _int8_byte(_mul(y1, inv, EMU), RND, EMU),
                               EMU)
                tl.store(OUT + b * so_b + t * so_s + col, w, mask=m3)
                # [TB, HG, 1] in the tile's layout: no layout conversion, one store per (row, head)
                tl.store(OS + ((b * H + h2) * Sk + t2)[:, :, None], sc[:, :, None], mask=(t < Sk) & (hh < H))
            else:       # bf16 pairs packed in int32 words (y is on the bf16 grid: exact)
                tl.store(OUT + b * so_b + t * so_s + col, _bf16_word(y0, y1, EMU), mask=m3)
            if gi + 1 < GL:
                x0, x1 = n0, n1
                if QUANT:
                    kw = nkw


# ----------------------------------------------------------------------------------- host API
def _check_rows(name, t, h, d):
    if t.dim() != 4 or t.shape[2] != h or t.shape[3] != d or t.stride(3) != 1 or t.stride(2) != d:
        raise ValueError(f"{name}: expected [B, L, {h}, {d}] with heads and head_dim contiguous, got shape "
                         f"{tuple(t.shape)} strides {tuple(t.stride())}; call .contiguous()")


def qk_prep(q, k, v, w_q, w_k, eps: float, cos: torch.Tensor, sin: torch.Tensor, q_pos0: int,
            kn_out: torch.Tensor, v_out: torch.Tensor, k_cache_fp8=None, v_cache_fp8=None, quantize_q: bool = True):
    """Fused RMSNorm + RoPE + cache write for one chunk.

    q, k, v [B, L, H, D] (bf16 projections); w_q, w_k [H*D]; cos, sin float64 [positions, D/2]
    (Rope3D.cos_sin()); queries at table rows q_pos0 + t.
    kn_out [B, L, H, D] bf16 receives the normalised, un-rotated k (the bf16 cache rows, or a scratch).
    bf16 cache: v_out receives v (cache rows); FP8 cache: k_cache_fp8 / v_cache_fp8 = (e4m3 rows
    [B, L, H, D], scale rows [B, L, H, 1]) receive the SPEC 4.6 quantized kn and v (v_out unused).
    Returns (q8 int8 [B, L, H, D], q_scale [B, H, L] with sm_scale*log2e folded in) when quantize_q,
    else (rotated bf16 q [B, L, H, D], None).
    """
    b, l, h, d = q.shape
    for name, t in (("q", q), ("k", k), ("v", v), ("kn_out", kn_out)):
        _check_rows(name, t, h, d)
    if cos.dtype != torch.float64 or sin.dtype != torch.float64 or cos.shape[1] != d // 2:
        raise ValueError("cos/sin must be the float64 [positions, D/2] tables of Rope3D.cos_sin()")
    if q_pos0 + l > cos.shape[0]:
        raise ValueError(f"RoPE table has {cos.shape[0]} positions, chunk needs rows up to {q_pos0 + l}")
    fp8 = k_cache_fp8 is not None
    dev = q.device
    if quantize_q:
        qo = torch.empty((b, l, h, d), dtype=torch.int8, device=dev)
        qos = torch.empty((b, h, l), dtype=torch.float32, device=dev)
    else:
        qo, qos = torch.empty((b, l, h, d), dtype=q.dtype, device=dev), None
    if fp8:
        (kc, kcs), (vc, vcs) = k_cache_fp8, v_cache_fp8
        _check_rows("k_cache_fp8", kc, h, d)
        _check_rows("v_cache_fp8", vc, h, d)
        if kcs.stride(1) != h or vcs.stride(1) != h or kcs.stride(0) != vcs.stride(0):
            raise ValueError("fp8 cache scales must be row slices of contiguous [B, N, H, 1] tensors")
    else:
        _check_rows("v_out", v_out, h, d)
        kc, kcs, vc, vcs = kn_out, kn_out, v_out, v_out
    hp = triton.next_power_of_2(h)
    tb = 1 if q.is_cuda else 16    # the interpreter's cost is per program: batch tokens there
    _qk_prep_kernel[(triton.cdiv(l, tb), b)](
        q, k, v, w_q, w_k, cos, sin, qo, qos if qos is not None else qo, kn_out, kc, kcs, vc, vcs,
        l, h, q_pos0, eps, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), qo.stride(0), qo.stride(1),
        kn_out.stride(0), kn_out.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        kcs.stride(0) if fp8 else 0,
        QUANT=quantize_q, FP8_CACHE=fp8, EMU=INTERPRET, TB=tb, HP=hp, D=d, num_warps=8 if h * d >= 4096 else 4)
    return qo, qos


class KSource(RowSource):
    """Key rows for `rope_keys` (kernels.attention.RowSource)."""


KM_STRIDE = 8   # K smoothing vector from every 8th key row (any km is exact, KERNELS.md 2.3)
KM_ROWS = 32    # phase 0: sampled rows per program (km_config)
RND = 1         # int8 rounding without a conversion instruction on the GPU (_int8_byte)


def rope_keys_config(is_cuda: bool, h: int):
    """(TB, HG, GL, num_warps) of phase 1: tile [TB rows, HG heads, 64 pairs], GL head groups per
    program.  The CPU interpreter's cost is per program: all heads, 16 rows there."""
    if not is_cuda:
        return 16, triton.next_power_of_2(h), 1, 4
    return 4, 8, 1, 4


def km_config(is_cuda: bool, h: int):
    """(TB0 sampled rows per step, rows per program, num_warps, HG0 heads) of phase 0."""
    if not is_cuda:
        return 16, 16, 4, triton.next_power_of_2(h)
    return 4, KM_ROWS, 4, 8


def km_sample_rows(sk: int, km_stride: int) -> torch.Tensor:
    """Indices of the keys whose mean is km: every km_stride-th key row."""
    return torch.arange(0, sk, km_stride)


_WORKSPACE = {}


def _km_workspace(device, n_acc: int, n_cnt: int):
    """Zeroed int64 accumulator + int32 counters of phase 0, one pair per device, reused: the last
    program of every head group resets its part to 0 (calls on one device run in stream order)."""
    ws = _WORKSPACE.get(device)
    if ws is None or ws[0].numel() < n_acc or ws[1].numel() < n_cnt:
        ws = (torch.zeros(max(n_acc, 1 << 15), dtype=torch.int64, device=device),
              torch.zeros(max(n_cnt, 256), dtype=torch.int32, device=device))
        _WORKSPACE[device] = ws
    return ws


def _words(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] rows (bf16 or e4m3) as [B, S, H, D/2] words holding element pairs."""
    return x.view(torch.int32 if x.element_size() == 2 else torch.int16)


def _prepare(sources, cos, sin, quantize, config, rnd):
    """Validated launch arguments shared by both phases."""
    x1, xs1, x2, s1, sk = two_sources(sources, "rope_keys")
    b, _, h, d = x1.shape
    if sk > cos.shape[0]:
        raise ValueError(f"RoPE table has {cos.shape[0]} positions, the key set has {sk}")
    if cos.dtype != torch.float64 or sin.dtype != torch.float64 or cos.shape[1] != d // 2:
        raise ValueError("cos/sin must be the float64 [positions, D/2] tables of Rope3D.cos_sin()")
    if d % 2 or (xs1 is None and x1.dtype != torch.bfloat16) or x2.dtype != torch.bfloat16:
        raise ValueError("rope_keys: keys must be bf16 (or e4m3 with scales for the first source), D even")
    dev = x1.device
    if quantize:
        out = torch.empty((b, sk, h, d), dtype=torch.int8, device=dev)
        osc = torch.empty((b, h, sk), dtype=torch.float32, device=dev)
    else:
        out = torch.empty((b, sk, h, d), dtype=torch.bfloat16, device=dev)
        osc = out
    w1, w2, wo = _words(x1), _words(x2), _words(out)
    args = dict(sx1_b=w1.stride(0), sx1_s=w1.stride(1), sxs1_b=xs1.stride(0) if xs1 is not None else 0,
                sx2_b=w2.stride(0), sx2_s=w2.stride(1), so_b=wo.stride(0), so_s=wo.stride(1))
    flags = dict(HAS_XS=xs1 is not None, HAS_X2=s1 < sk, QUANT=quantize, RND=RND if rnd is None else rnd,
                 EMU=INTERPRET, P=d // 2)
    return dict(w1=w1, xs1=xs1 if xs1 is not None else osc, w2=w2, cos=cos, sin=sin, out=out, osc=osc, wo=wo,
                s1=s1, sk=sk, b=b, h=h, d=d, args=args, flags=flags,
                config=config if config is not None else rope_keys_config(x1.is_cuda, h), cuda=x1.is_cuda)


def _km_phase(p, km_stride: int, km_cfg=None):
    """PHASE 0 launch -> km fp32 [B, H, D]."""
    b, h, d, dev = p["b"], p["h"], p["d"], p["out"].device
    km = torch.empty((b, h, d), dtype=torch.float32, device=dev)
    n_samp = triton.cdiv(p["sk"], km_stride)                         # sampled rows 0, s, 2s, ...
    tb0, rpp, nw0, hg0 = km_cfg if km_cfg is not None else km_config(p["cuda"], h)
    rpp = min(rpp, triton.cdiv(n_samp, tb0) * tb0)                    # a multiple of tb0
    ngp0 = triton.cdiv(h, hg0)
    n_prog0 = triton.cdiv(n_samp, rpp)
    acc, cnt = _km_workspace(dev, b * h * d, b * ngp0)
    _rope_keys_kernel[(n_prog0 * ngp0, b)](p["w1"], p["xs1"], p["w2"], p["cos"], p["sin"], km, acc, cnt, p["wo"],
                                           p["osc"], p["s1"], p["sk"], h, km_stride, rpp, n_prog0, 1.0 / n_samp,
                                           **p["args"], PHASE=0, **p["flags"], TB=tb0, HG=hg0, GL=1, NGP=ngp0,
                                           num_warps=nw0)
    return km


def _rot_phase(p, km):
    """PHASE 1 launch: int8 keys + scales (km given) or the rotated bf16 keys (km None)."""
    tb, hg, gl, nw = p["config"]
    ngp = triton.cdiv(p["h"], hg * gl)
    kmw = km.view(torch.int64) if km is not None else p["osc"]        # (km[2p], km[2p+1]) pairs
    _rope_keys_kernel[(triton.cdiv(p["sk"], tb) * ngp, p["b"])](
        p["w1"], p["xs1"], p["w2"], p["cos"], p["sin"], kmw, p["osc"], p["osc"], p["wo"], p["osc"], p["s1"], p["sk"],
        p["h"], 1, tb, 1, 1.0, **p["args"], PHASE=1, **p["flags"], TB=tb, HG=hg, GL=gl, NGP=ngp, num_warps=nw)


def rope_keys(sources, cos, sin, quantize: bool = True, km_stride: int = KM_STRIDE, config=None, km_cfg=None,
              rnd: int | None = None):
    """Concatenate (at most two) key sources along the key axis, rotate key r at table row r (bf16
    rounding as the reference), and either smooth + quantize (returns int8 [B, Sk, H, D], scale
    [B, H, Sk], km [B, H, D]) or return the rotated bf16 keys (tensor [B, Sk, H, D], None, None).
    km = mean of the rotated keys over every km_stride-th key row (km_sample_rows; km_stride=1: all
    keys), accumulated in fixed point 2^-32 (deterministic; |km| must stay below 2^31); K smoothing is
    exact for any km, and the attention kernel's LSE uses this km.  Only the first source may be e4m3
    (with scales).  config: phase 1 (TB, HG, GL, warps) (rope_keys_config); km_cfg: phase 0 (TB0,
    rows per program, warps, HG0) (km_config); rnd: int8 rounding variant (_int8_byte, default RND)."""
    p = _prepare(sources, cos, sin, quantize, config, rnd)
    km = _km_phase(p, km_stride, km_cfg) if quantize else None
    _rot_phase(p, km)
    return (p["out"], p["osc"], km) if quantize else (p["out"], None, None)
