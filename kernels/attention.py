"""Non-causal attention for head_dim 128 on [B, S, H, D] tensors: INT8 Q.K^T + FP8 P.V, or bf16.

Math (one (batch, head), queries i, keys j, sm = 1/sqrt(D), log2e = 1.4427):
    s_ij = sm * q_i . k_j ;  o_i = sum_j softmax_j(s_ij) v_j ;  lse_i = log sum_j exp(s_ij)

Quantized variant (SageAttention-2 recipe, shared/KERNELS.md 2.3-2.4):
  - K smoothing: k'_j = k_j - km with km the per-(batch, head, channel) mean over keys.  Exact for
    the softmax (q_i . km is a per-row constant); the LSE is corrected by + sm * q_i . km.
  - Q, K' -> INT8 with one fp32 scale per (token, head) (amax / 127); sm * log2e is folded into the
    Q scale, so scores come out in log2 units: s2_ij = qs_i * ks_j * (qi8_i . ki8_j)  (int32 dot).
  - Online softmax in fp32 with exp2.  P is shifted by log2(448) so it lands in [0, 448] and is
    cast to e4m3; V -> e4m3 with one scale per (batch, head, channel) (amax over keys / 448), stored
    transposed [B, H, D, Sk_pad] so the P.V dot gets a K-major B operand.  Two-level accumulation:
    every block's P.V is a fresh fp32 dot added to the fp32 accumulator (acc += tl.dot(p, v)).
  - out = acc * vscale / l, bf16.  lse (natural log) = ln2 * (m + log2 l - log2 448 + qs_i * qi8_i . km).
bf16 variant: same loop with bf16 operands, fp32 accumulation, no smoothing, no scales.

Masks stay out of the inner loop: the Sk // BN full key blocks run unmasked; one masked tail block
handles Sk % BN keys (padded keys get score -inf, so they never enter the normalizer -- the
sageattention 1.0.6 bug, shared/KERNELS.md 7.5).

Cost per call: FLOPs = 4 * B * H * Sq * Sk * D (two GEMMs).  Bytes (quantized): Q 1 B/elem, K 1 B/elem
re-read once per BM query rows, V 1 B/elem likewise, out 2 B/elem: compute bound at the self-attention
shape (9360 x 16380 x 40 heads: 3.14 TFLOP per call, 126 TFLOP per step of 40 layers).

Autotune configs (CUDA, long key sequences; KERNELS.md 0 sweep):
    BM=64  BN=128 warps=4 stages=3   (measured best for int8/e4m3, the default)
    BM=64  BN=128 warps=4 stages=4
    BM=128 BN=128 warps=8 stages=3
    BM=64  BN=64  warps=4 stages=4
Short key sequences (cross / audio attention, Sk <= 1024) use BM=64, BN = min(128, next_pow2(Sk))
(at least 32 for the fp8 P.V dot), 4 warps, 3 stages.  LAZY (skip the acc rescale unless a row max
grew by > 2) is implemented but off: 598 vs 627 TFLOP/s measured.

Measured (H100 SXM, triton 3.6, torch 2.11, do_bench median, 9360 x 16380 x 40 heads x 128, DiT-like
keys with channel offsets + outliers), SDPA bf16 default backend side by side: SDPA 564-605 TF/s;
int8/fp8 kernel 627-644 TF/s (1.04-1.11x), cos 0.99927 / rel-L1 0.038 vs fp32 (FP8 P.V is the floor:
KERNELS.md 0 measured the same); bf16 variant 502-516 TF/s, cos 0.999997.

Under TRITON_INTERPRET (CPU) the fp8 casts are pre-rounded to the e4m3 grid in fp32 (the interpreter's
own cast is wrong near powers of two, KERNELS.md 5.4), fp32->bf16 casts are pre-rounded likewise (the
interpreter truncates), and bf16 dot operands are widened to fp32 (the interpreter's bf16 tl.dot
multiplies raw bit patterns).  The last two were found in this work.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOG2_448 = math.log2(448.0)
FP8_MAX = 448.0
HEAD_DIM = 128

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LAZY_RESCALE = False   # quantized kernel: skip the acc rescale unless a row max grew by > 2 (log2 units)

ATTN_CONFIGS = [
    triton.Config({"BM": 64, "BN": 128}, num_warps=4, num_stages=3),
    triton.Config({"BM": 64, "BN": 128}, num_warps=4, num_stages=4),
    triton.Config({"BM": 128, "BN": 128}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 64}, num_warps=4, num_stages=4),
]


# ----------------------------------------------------------------------------------- helpers
@triton.jit
def e4m3_round(x):
    """Round fp32 x (already clamped to +-448) to the nearest e4m3 value (RTNE), in fp32.
    Used only under the interpreter, whose own fp32->fp8 cast mis-rounds (KERNELS.md 5.4)."""
    bits = x.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576        # keep 3 mantissa bits
    normal = r.to(tl.float32, bitcast=True)
    ax = tl.abs(x)
    sub = (ax + 16384.0) - 16384.0                                # fp32 ulp there is 2^-9
    sub = tl.where(x < 0, -sub, sub)
    return tl.where(ax < 0.015625, sub, normal)


@triton.jit
def to_bf16(x, EMU: tl.constexpr):
    """fp32 -> bf16, round to nearest even.  Under the interpreter the cast truncates (found here), so
    round on the bf16 grid in fp32 first (bit trick), after which the cast is exact."""
    if EMU:
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def to_e4m3(x, EMU: tl.constexpr):
    """fp32 -> float8e4nv with saturation to +-448."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMU:
        x = e4m3_round(x)
    return x.to(tl.float8e4nv)


@triton.jit
def round_half_away(x):
    return tl.where(x >= 0, x + 0.5, x - 0.5)


# ----------------------------------------------------------------------------------- attention
@triton.jit
def _attn_block(acc, m_i, l_i, q, qs, k_base, sk_s, ks_base, v_base, sv_s, sv_d, start, Sk,
                offs_n, offs_d, QUANT: tl.constexpr, MASKED: tl.constexpr, EMU: tl.constexpr, LAZY: tl.constexpr):
    offs = start + offs_n
    valid = offs < Sk
    if MASKED:
        k = tl.load(k_base + offs[:, None] * sk_s + offs_d[None, :], mask=valid[:, None], other=0)
    else:
        k = tl.load(k_base + offs[:, None] * sk_s + offs_d[None, :])
    if QUANT:
        if MASKED:
            ks = tl.load(ks_base + offs, mask=valid, other=0.0)
        else:
            ks = tl.load(ks_base + offs)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * ks[None, :]      # int32 -> fp32, key scale
    elif EMU:   # the interpreter's bf16 tl.dot multiplies raw bits: widen first (exact)
        s = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32))
    else:
        s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    # scores in log2 units are s * qs (qs > 0 per row), so max(s * qs) = qs * max(s)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qs)
    if LAZY:
        # rescale acc / l only when some row max grew by more than TAU = 2 (log2 units); otherwise
        # keep the stale max: exact (acc and l share it), P <= 2^(TAU + 6.807) = 448 still fits e4m3
        if tl.max(m_new - m_i, 0) > 2.0:
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        p = tl.math.exp2(s * qs[:, None] - (m_i - 6.807354922057604)[:, None])
        l_i = l_i + tl.sum(p, 1)
        m_new = m_i
    else:
        alpha = tl.math.exp2(m_i - m_new)
        if QUANT:
            p = tl.math.exp2(s * qs[:, None] - (m_new - 8.807354922057604)[:, None])   # P in [0, 448]
        else:
            p = tl.math.exp2(s * qs - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
    if QUANT:
        if MASKED:
            vt = tl.load(v_base + offs_d[:, None] * sv_d + offs[None, :] * sv_s, mask=valid[None, :], other=0.0)
        else:
            vt = tl.load(v_base + offs_d[:, None] * sv_d + offs[None, :] * sv_s)
        acc += tl.dot(to_e4m3(p, EMU), tl.trans(vt))                 # fresh fp32 dot, then add
    else:
        if MASKED:
            v = tl.load(v_base + offs[:, None] * sv_s + offs_d[None, :] * sv_d, mask=valid[:, None], other=0.0)
        else:
            v = tl.load(v_base + offs[:, None] * sv_s + offs_d[None, :] * sv_d)
        if EMU:
            acc = tl.dot(to_bf16(p, EMU).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attn_loop(q, qs, k_base, sk_s, ks_base, v_base, sv_s, sv_d, Sk, offs_n, offs_d,
               QUANT: tl.constexpr, EMU: tl.constexpr, LAZY: tl.constexpr,
               BM: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
    """Sk // BN unmasked key blocks, then one masked tail block.  Returns (acc, m, l)."""
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    n_full = Sk // BN
    for j in range(0, n_full):
        acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, qs, k_base, sk_s, ks_base, v_base, sv_s, sv_d,
                                    j * BN, Sk, offs_n, offs_d, QUANT, False, EMU, LAZY)
    if n_full * BN < Sk:
        acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, qs, k_base, sk_s, ks_base, v_base, sv_s, sv_d,
                                    n_full * BN, Sk, offs_n, offs_d, QUANT, True, EMU, LAZY)
    return acc, m_i, l_i


@triton.jit
def _q_tile(Q, QS, sq_b, sq_s, sq_h, H, Sq, qk_scale, QUANT: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr):
    """This program's (batch, head) and BM query rows: indices, the q tile and its per-row scale."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < Sq
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :], mask=m_mask[:, None], other=0)
    if QUANT:
        qs = tl.load(QS + pid_bh * Sq + offs_m, mask=m_mask, other=1.0)
    else:
        qs = qk_scale
    return pid_bh, b, h, offs_m, offs_n, offs_d, m_mask, q, qs


@triton.jit
def _attn_fwd(Q, K, V, QS, KS, VS, KM, O, LSE,
              sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_h, sv_s, sv_d, so_b, so_s, so_h,
              H, Sq, Sk, qk_scale,
              QUANT: tl.constexpr, HAS_LSE: tl.constexpr, HAS_KM: tl.constexpr, ACCUM: tl.constexpr,
              LAZY: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_bh, b, h, offs_m, offs_n, offs_d, m_mask, q, qs = _q_tile(Q, QS, sq_b, sq_s, sq_h, H, Sq, qk_scale,
                                                                  QUANT, D, BM, BN)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    ks_base = KS + pid_bh * Sk

    acc, m_i, l_i = _attn_loop(q, qs, k_base, sk_s, ks_base, v_base, sv_s, sv_d, Sk, offs_n, offs_d,
                               QUANT, EMU, LAZY, BM, D, BN)
    if QUANT:
        acc = acc * tl.load(VS + pid_bh * D + offs_d)[None, :]
    o = acc / l_i[:, None]
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :]
    if ACCUM:   # out = previous + this, rounded like the bf16 sum of two attention outputs
        prev = tl.load(o_ptrs, mask=m_mask[:, None], other=0.0)
        o = to_bf16(o, EMU).to(tl.float32) + prev.to(tl.float32)
    tl.store(o_ptrs, to_bf16(o, EMU), mask=m_mask[:, None])
    if HAS_LSE:
        lse2 = m_i + tl.math.log2(l_i)
        if QUANT:
            if LAZY:
                lse2 = lse2 - 6.807354922057604
            else:
                lse2 = lse2 - 8.807354922057604
            if HAS_KM:   # undo the K smoothing: + (sm*log2e) q.km, from the dequantized q
                km = tl.load(KM + pid_bh * D + offs_d)
                lse2 += tl.sum(q.to(tl.float32) * km[None, :], 1) * qs
        tl.store(LSE + pid_bh * Sq + offs_m, lse2 * 0.6931471805599453, mask=m_mask)


@triton.jit
def _attn2_fwd(Q, QS, O, K1, V1, KS1, VS1, K2, V2, KS2, VS2,
               sq_b, sq_s, sq_h, so_b, so_s, so_h,
               sk1_b, sk1_s, sk1_h, sv1_b, sv1_h, sv1_s, sv1_d, sk2_b, sk2_s, sk2_h, sv2_b, sv2_h, sv2_s, sv2_d,
               H, Sq, Sk1, Sk2, qk_scale,
               QUANT: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Cross-attention: two separate softmaxes of the same q tile (text keys, image keys), summed in
    the epilogue as bf16(o1) + bf16(o2) -> bf16 like the reference; q is loaded and out stored once."""
    pid_bh, b, h, offs_m, offs_n, offs_d, m_mask, q, qs = _q_tile(Q, QS, sq_b, sq_s, sq_h, H, Sq, qk_scale,
                                                                  QUANT, D, BM, BN)
    acc, m_i, l_i = _attn_loop(q, qs, K1 + b * sk1_b + h * sk1_h, sk1_s, KS1 + pid_bh * Sk1,
                               V1 + b * sv1_b + h * sv1_h, sv1_s, sv1_d, Sk1, offs_n, offs_d,
                               QUANT, EMU, False, BM, D, BN)
    if QUANT:
        acc = acc * tl.load(VS1 + pid_bh * D + offs_d)[None, :]
    o = to_bf16(acc / l_i[:, None], EMU).to(tl.float32)
    acc, m_i, l_i = _attn_loop(q, qs, K2 + b * sk2_b + h * sk2_h, sk2_s, KS2 + pid_bh * Sk2,
                               V2 + b * sv2_b + h * sv2_h, sv2_s, sv2_d, Sk2, offs_n, offs_d,
                               QUANT, EMU, False, BM, D, BN)
    if QUANT:
        acc = acc * tl.load(VS2 + pid_bh * D + offs_d)[None, :]
    o = o + to_bf16(acc / l_i[:, None], EMU).to(tl.float32)
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :], to_bf16(o, EMU), mask=m_mask[:, None])


_attn_tuned = triton.autotune(configs=ATTN_CONFIGS, key=["Sk", "H", "QUANT", "HAS_LSE", "ACCUM", "LAZY"],
                              restore_value=["O"])(_attn_fwd)


# ----------------------------------------------------------------------------------- quantizers
@triton.jit
def _quant_int8_kernel(X, KM, OUT, OS, S, H, sx_b, sx_s, sx_h, so_b, so_s, so_h, factor,
                       HAS_KM: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """x [B, S, H, D] -> int8 [B, S, H, D] + fp32 scale [B, H, S]: per (token, head),
    x' = x - km (optional), scale = max(amax|x'|, 1e-12) / 127, stored scale = scale * factor."""
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    mask = offs_t < S
    x = tl.load(X + b * sx_b + h * sx_h + offs_t[:, None] * sx_s + offs_d[None, :], mask=mask[:, None], other=0.0)
    x = x.to(tl.float32)
    if HAS_KM:
        x = x - tl.load(KM + (b * H + h) * D + offs_d)[None, :]
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-12) / 127.0
    xi = tl.minimum(tl.maximum(round_half_away(x / scale[:, None]), -127.0), 127.0).to(tl.int8)
    tl.store(OUT + b * so_b + h * so_h + offs_t[:, None] * so_s + offs_d[None, :], xi, mask=mask[:, None])
    tl.store(OS + (b * H + h) * S + offs_t, scale * factor, mask=mask)


@triton.jit
def _quant_v_kernel(X1, XS1, X2, VT, VS, AMAX, S1, Sk, SkP, H, sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s,
                    svt_b, svt_h, svt_d,
                    HAS_XS: tl.constexpr, HAS_X2: tl.constexpr, PHASE: tl.constexpr, EMU: tl.constexpr,
                    D: tl.constexpr, BT: tl.constexpr):
    """V rows [0, S1) from X1 (bf16, or e4m3 + per-(token, head) scale XS1 [B, S, H, 1]) and rows
    [S1, Sk) from X2 (bf16); one program per (head, BT keys, batch) (heads of a key block side by side).
    PHASE 0: per-channel amax of the block -> atomic max into AMAX[b, h, :] (fp32, zeroed; max is
    order-independent, so the result is deterministic).
    PHASE 1: vs = max(amax / 448, 1e-12) (IEEE division, as torch on CPU); e4m3(v / vs) stored transposed
    into VT[b, h, :, row] for rows < SkP = pad16(Sk) (padding rows are 0): BT-byte rows, 16-aligned."""
    h, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    t = offs_t[:, None]
    m1 = t < S1
    x = tl.load(X1 + b * sx1_b + h * D + t * sx1_s + offs_d[None, :], mask=m1, other=0.0)
    if HAS_XS:   # fp8 cache rows: x = bf16(q) * bf16(s)  (shared/SPEC.md 4.6)
        xs = tl.load(XS1 + b * sxs1_b + offs_t * H + h, mask=offs_t < S1, other=0.0)
        x = to_bf16(x.to(tl.float32) * to_bf16(xs, EMU).to(tl.float32)[:, None], EMU)
    x = x.to(tl.float32)
    if HAS_X2:
        x2 = tl.load(X2 + b * sx2_b + h * D + (t - S1) * sx2_s + offs_d[None, :], mask=(t >= S1) & (t < Sk),
                     other=0.0)
        x = tl.where(m1, x, x2.to(tl.float32))
    amax_ptr = AMAX + (b * H + h) * D + offs_d
    if PHASE == 0:
        tl.atomic_max(amax_ptr, tl.max(tl.abs(x), 0))
    else:
        vs = tl.maximum(tl.math.div_rn(tl.load(amax_ptr), 448.0), 1e-12)
        if pid_t == 0:
            tl.store(VS + (b * H + h) * D + offs_d, vs)
        y = to_e4m3(x / vs[None, :], EMU)
        tl.store(VT + b * svt_b + h * svt_h + offs_d[:, None] * svt_d + offs_t[None, :], tl.trans(y),
                 mask=offs_t[None, :] < SkP)


@triton.jit
def _requant_k_block_kernel(K8, KS, OUT, OS, Sk, H, NB, sk_b, sk_s, so_b, so_s,
                            EMU: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, PERM: tl.constexpr):
    """One (head, key block of BT keys, batch), heads fastest (the programs running together read whole
    key rows): x = k8 * ks (per key) -> one scale per block s = max(amax|x|, 1e-12) / 127,
    k8' = round_half_away(x / s) (|x / s| <= 127 (1 + 2^-23), so the clamp to +-127 never acts and is left
    out).  Keys past Sk are 0.  Issue-bound (SASS count), so per element:
    - x / s is the IEEE quotient without a division: r = RN(1/s) once, q = RN(x r) is within 1.5 ulp, one
      FMA correction q + (x - s q) r makes it faithful, a second one correctly rounded (Markstein; the
      remainders are exact by FMA; no underflow: |x| >= 1e-12 / 127 or x = 0).  -s is negated once (an
      FMA with -q would cost a negation per element).  Under the interpreter (no single-rounding FMA) the
      FMAs run in float64, where the products are exact.
    - round half away = truncate(q + copysign(0.5, q)) (q + 0.5 is exact below 2^22).
    PERM: every block but the last stores its rows in the Gluon kernel's order (key_row_order16).
    Launch: 4 warps (8 warps, and a persistent pipelined variant, measured slower: bench/NOTES.md).
    Measured (H100, Sk = 16380, 40 heads, 170 MB moved): 0.077 ms = 83 % of a copy of the same bytes
    (previously 0.217 ms, 30 %)."""
    h, blk, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = blk * BT + tl.arange(0, BT)
    mask = t < Sk
    d = tl.arange(0, D)
    k = tl.load(K8 + b * sk_b + t[:, None] * sk_s + h * D + d[None, :], mask=mask[:, None], other=0)
    ks = tl.load(KS + (b * H + h) * Sk + t, mask=mask, other=0.0)
    # int8 -> fp32 without I2F (quarter-rate unit): bits 0x4B000000 | (k + 128) = 2^23 + 128 + k
    kf = ((k ^ -128).to(tl.uint8, bitcast=True).to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True)
    x = (kf - 8388736.0) * ks[:, None]
    sc = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-12), 127.0)
    r = tl.math.div_rn(1.0, sc)
    nsc = -sc
    y = x * r
    for _ in tl.static_range(2):
        if EMU:
            e = (x.to(tl.float64) + nsc.to(tl.float64) * y.to(tl.float64)).to(tl.float32)
            y = (y.to(tl.float64) + e.to(tl.float64) * r.to(tl.float64)).to(tl.float32)
        else:
            y = tl.fma(tl.fma(y, nsc, x), r, y)
    half = ((y.to(tl.uint32, bitcast=True) & 0x80000000) | 0x3F000000).to(tl.float32, bitcast=True)
    if PERM:   # in-block offset o = 16g + 4i + 2j + l goes to row 16g + 8j + 2i + l (blocks before the last)
        o = tl.arange(0, BT)
        po = (o & ~15) | (((o >> 1) & 1) << 3) | (((o >> 2) & 3) << 1) | (o & 1)
        t = tl.where(blk < NB - 1, blk * BT + po, t)
    tl.store(OUT + b * so_b + t[:, None] * so_s + h * D + d[None, :], (y + half).to(tl.int8), mask=mask[:, None])
    tl.store(OS + (b * H + h) * NB + blk, sc)


# ----------------------------------------------------------------------------------- host API
def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, S, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[-1] != HEAD_DIM or k.shape[-1] != HEAD_DIM or v.shape[-1] != HEAD_DIM:
        raise ValueError(f"attention kernels support head_dim {HEAD_DIM} only, got {q.shape[-1]}; "
                         "use ReferenceOps.attention for other sizes")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(need k == v shape and the same batch and heads as q)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1); call .contiguous()")


def _pad16(n: int) -> int:
    return (n + 15) // 16 * 16


def quantize_int8(x: torch.Tensor, km: torch.Tensor | None = None, factor: float = 1.0):
    """x [B, S, H, D] -> (int8 [B, S, H, D], fp32 scale [B, H, S]) per (token, head), after
    subtracting km [B, H, D] (fp32) if given; the stored scale is multiplied by `factor`."""
    b, s, h, d = x.shape
    out = torch.empty((b, s, h, d), dtype=torch.int8, device=x.device)
    sc = torch.empty((b, h, s), dtype=torch.float32, device=x.device)
    bt = 32
    kmc = km.float().contiguous() if km is not None else sc
    _quant_int8_kernel[(triton.cdiv(s, bt), h, b)](x, kmc, out, sc, s, h, x.stride(0), x.stride(1), x.stride(2),
                                                   out.stride(0), out.stride(1), out.stride(2), factor,
                                                   HAS_KM=km is not None, D=d, BT=bt)
    return out, sc


class RowSource:
    """Key or value rows for `quantize_v` / `qk_prep.rope_keys`: x [B, S, H, D] (bf16, or e4m3 with scale
    [B, S, H, 1], a row slice of a contiguous [B, N, H, 1] scale tensor)."""

    def __init__(self, x: torch.Tensor, scale: torch.Tensor | None = None):
        if x.stride(-1) != 1 or (scale is not None and (scale.stride(1) != x.shape[2] or scale.stride(2) != 1)):
            raise ValueError(f"{type(self).__name__}: x must be contiguous in head_dim and scale a row slice of a "
                             "contiguous [B, N, H, 1] tensor")
        self.x, self.scale = x, scale


class VSource(RowSource):
    """Rows of V for `quantize_v`."""


def two_sources(sources, name: str):
    """The row set of one call, concatenated from (at most two) RowSources along the key axis ->
    (x1, xs1, x2, s1, sk): rows [0, s1) come from x1 (with e4m3 scale rows xs1, or None), rows [s1, sk)
    from the bf16 x2 (x2 = x1 when there is a single source; an empty first source is dropped)."""
    if not 1 <= len(sources) <= 2 or (len(sources) == 2 and sources[1].scale is not None):
        raise ValueError(f"{name} takes one or two sources; only the first may be e4m3 with scales")
    x1, xs1 = sources[0].x, sources[0].scale
    b, _, h, d = x1.shape
    for src in sources:
        if src.x.shape[0] != b or src.x.shape[2:] != x1.shape[2:] or src.x.stride(2) != d:
            raise ValueError(f"{name}: sources must be [B, S, H, D] with the same B, H, D, heads contiguous")
    sk = sum(src.x.shape[1] for src in sources)
    s1 = x1.shape[1]
    x2 = sources[1].x if len(sources) == 2 else x1
    if s1 == 0 and len(sources) == 2:                 # no rows in the first source: x2 alone
        x1, xs1, x2, s1 = x2, None, x2, sk
    return x1, xs1, x2, s1, sk


def quantize_v(sources, bt: int | None = None, num_warps: int = 4):
    """Concatenate (at most two) V sources along the key axis and quantize to e4m3 with per-(batch,
    head, channel) scales vs = max(amax over keys / 448, 1e-12): returns (vT e4m3 [B, H, D, pad16(Sk)]
    with zero padding, vscale fp32 [B, H, D]).  Only the first source may be e4m3 (with scales).
    Three launches: zero the amax buffer, amax pass (atomic max), quantize + transposed store.
    Bytes: minimum = read V once (2 B/elem bf16; 1 B + 4 B per (token, head) for e4m3 rows) + write
    1 B/elem; the amax over ALL keys must be known before the first value is quantized, so V is
    read twice.  bt = 64 keys per program (128-key tiles measured 0-4 % slower), 4 warps.
    H100, 16380 keys x 40 x 128 (ratio = a copy of the minimum bytes / ours): bf16 source 0.456 ms
    (previous version: per-source launches, PART buffer + torch amax, unaligned transposed stores)
    -> 0.165 ms (55 %; the traffic actually moved, 5 B/elem, at 84 % of the 1 GiB copy rate); FP8 cache (7020
    e4m3 rows + 9360 bf16) 0.361 -> 0.173 ms (46 %).  vs is the IEEE quotient amax / 448 (torch's
    CUDA division by a scalar multiplies by 1/448 instead: the previous version's vs differed by
    <= 1 ulp, 3.5e-4 of the e4m3 codes by one step)."""
    if isinstance(sources, torch.Tensor):
        sources = [VSource(sources)]
    x1, xs1, x2, s1, sk = two_sources(sources, "quantize_v")
    b, _, h, d = x1.shape
    if bt is None:
        bt = 64
    dev = x1.device
    skp = _pad16(sk)
    amax = torch.zeros((b, h, d), dtype=torch.float32, device=dev)
    vs = torch.empty((b, h, d), dtype=torch.float32, device=dev)
    vt = torch.empty((b, h, d, skp), dtype=torch.float8_e4m3fn, device=dev)
    xs = xs1 if xs1 is not None else amax
    args = (x1, xs, x2, vt, vs, amax, s1, sk, skp, h, x1.stride(0), x1.stride(1), xs1.stride(0) if xs1 is not None
            else 0, x2.stride(0), x2.stride(1), vt.stride(0), vt.stride(1), vt.stride(2))
    flags = dict(HAS_XS=xs1 is not None, HAS_X2=s1 < sk, EMU=INTERPRET, D=d, BT=bt, num_warps=num_warps)
    _quant_v_kernel[(h, triton.cdiv(sk, bt), b)](*args, PHASE=0, **flags)
    _quant_v_kernel[(h, triton.cdiv(skp, bt), b)](*args, PHASE=1, **flags)
    return vt, vs


def key_row_order16(sk: int, block: int = 128) -> torch.Tensor:
    """The key order of per-block keys made for the Gluon kernel's shuffle-free P layout (perm16 in
    requantize_k_blocks): index tensor `src` of length sk such that stored row r holds key src[r].  In every
    key block except the last (block // 16 groups of 16), in-block key 16g + 4i + 2j + l (i < 4, j, l < 2) is
    stored at row 16g + 8j + 2i + l: the rows a thread's accumulator columns {2i, 2i+1, 8+2i, 9+2i} of a
    16-column group read are the keys its FP8 P.V operand register holds as k = 4i..4i+3 (see
    kernels/attention_gluon.py, KPERM); the last block keeps the natural order (it is the masked one)."""
    src = torch.arange(sk)
    nfull = (max(sk - 1, 0) // block) * block          # keys in the blocks before the last
    if nfull and block % 16 == 0:
        o = torch.arange(block)
        po = (o & ~15) | (((o >> 1) & 1) << 3) | (((o >> 2) & 3) << 1) | (o & 1)
        inner = torch.empty(block, dtype=torch.long)
        inner[po] = o
        src[:nfull] = (torch.arange(nfull // block)[:, None] * block + inner[None, :]).reshape(-1)
    return src


def requantize_k_blocks(k8: torch.Tensor, k_scale: torch.Tensor, block: int = 128, out=None, out_scale=None,
                        perm16: bool = False):
    """Per-key int8 keys -> one scale per (batch, head, block of `block` keys): the input of the Gluon
    kernel's fastest config (kernels/attention_gluon.py plain_s2_kblock*, one FFMA less per score).
    k8 int8 [B, Sk, H, D] (heads and head_dim contiguous), k_scale fp32 [B, H, Sk] ->
    (int8 [B, Sk, H, D], fp32 [B, H, cdiv(Sk, block)]); = attention_gluon.requantize_k_per_block (IEEE
    divisions, round half away from zero).  One pass: reads and writes 1 B per element.  out / out_scale:
    optional preallocated outputs (tests poison them).  perm16: store the rows in key_row_order16 (the input
    the Gluon kernel takes with QuantKV(..., k_perm=True); needs block % 16 == 0)."""
    if k8.dtype != torch.int8 or k8.dim() != 4 or k8.stride(-1) != 1 or k8.stride(2) != k8.shape[3]:
        raise ValueError(f"requantize_k_blocks: k8 must be int8 [B, Sk, H, D] with heads contiguous, got "
                         f"{k8.dtype} {tuple(k8.shape)}")
    b, sk, h, d = k8.shape
    if tuple(k_scale.shape) != (b, h, sk) or k_scale.dtype != torch.float32:
        raise ValueError(f"requantize_k_blocks: k_scale must be fp32 [B, H, Sk] = {(b, h, sk)}, "
                         f"got {k_scale.dtype} {tuple(k_scale.shape)}")
    if perm16 and block % 16:
        raise ValueError(f"requantize_k_blocks: perm16 needs a block size divisible by 16, got {block}")
    nb = triton.cdiv(sk, block)
    out = torch.empty_like(k8) if out is None else out
    osc = torch.empty((b, h, nb), dtype=torch.float32, device=k8.device) if out_scale is None else out_scale
    if out.shape != k8.shape or out.stride() != k8.stride() or osc.shape != (b, h, nb) or not osc.is_contiguous():
        raise ValueError("requantize_k_blocks: out must be like k8 and out_scale a contiguous [B, H, nblocks]")
    _requant_k_block_kernel[(h, nb, b)](k8, k_scale.contiguous(), out, osc, sk, h, nb, k8.stride(0), k8.stride(1),
                                        out.stride(0), out.stride(1), EMU=INTERPRET, D=d, BT=block, PERM=perm16,
                                        num_warps=4)
    return out, osc


class QuantKV:
    """Keys and values in the quantized kernel's input format.  k_perm: k8's rows are in key_row_order16
    (per-block keys for the Gluon kernel, requantize_k_blocks(perm16=True)); k_scale, vt, v_scale are not."""

    def __init__(self, k8, k_scale, vt, v_scale, km=None, k_perm: bool = False):
        self.k8, self.k_scale, self.vt, self.v_scale, self.km = k8, k_scale, vt, v_scale, km
        self.k_perm = k_perm

    @property
    def sk(self) -> int:
        return self.k8.shape[1]


def quantize_kv(k: torch.Tensor, v: torch.Tensor, smooth: bool = True) -> QuantKV:
    """bf16 k, v [B, Sk, H, D] -> QuantKV (K smoothed by its per-channel mean, int8 per token;
    V e4m3 per channel, transposed)."""
    km = k.float().mean(dim=1).contiguous() if smooth else None
    k8, ks = quantize_int8(k, km)
    vt, vs = quantize_v(v)
    return QuantKV(k8, ks, vt, vs, km)


def quantize_q(q: torch.Tensor):
    """bf16 q [B, Sq, H, D] -> (int8, scale [B, H, Sq] with sm_scale * log2e folded in)."""
    return quantize_int8(q, None, factor=LOG2E / math.sqrt(q.shape[-1]))


def _launch(q, qs, kq, ks, vv, vs, km, out, lse, sq, sk, h, quant, accum, v_strides, autotune, lazy=False):
    b = q.shape[0]
    has_lse = lse is not None
    args = (q, kq, vv, qs if quant else out, ks if quant else out, vs if quant else out,
            km if km is not None else out, out, lse if has_lse else out,
            q.stride(0), q.stride(1), q.stride(2), kq.stride(0), kq.stride(1), kq.stride(2),
            *v_strides, out.stride(0), out.stride(1), out.stride(2),
            h, sq, sk, LOG2E / math.sqrt(HEAD_DIM))
    flags = dict(QUANT=quant, HAS_LSE=has_lse, HAS_KM=km is not None, ACCUM=accum, LAZY=lazy and quant,
                 EMU=INTERPRET, D=HEAD_DIM)
    if autotune and q.is_cuda and sk > 1024:
        grid = lambda meta: (triton.cdiv(sq, meta["BM"]), b * h)
        _attn_tuned[grid](*args, **flags)
    else:
        bm = 64    # (CPU interpreter: its cost is per program and per block, so large tiles there too)
        bn = min(128 if q.is_cuda else 64, max(32 if quant else 16, triton.next_power_of_2(sk)))  # fp8 dot: K >= 32
        _attn_fwd[(triton.cdiv(sq, bm), b * h)](*args, **flags, BM=bm, BN=bn, num_warps=4, num_stages=3)


def attention_quant_prepared(q8, q_scale, kv: QuantKV, out: torch.Tensor | None = None, return_lse: bool = False,
                             accumulate: bool = False, autotune: bool = True, lse: torch.Tensor | None = None,
                             lazy: bool = LAZY_RESCALE):
    """Quantized attention on prepared inputs: q8 int8 [B, Sq, H, D] + q_scale [B, H, Sq] (log2 units),
    kv from quantize_kv (or the self-attention producers).  out [B, Sq, H, D] bf16 is allocated if None;
    with accumulate=True the result is added to it.  Returns out or (out, lse [B, H, Sq] natural log;
    written into `lse` if given)."""
    b, sq, h, d = q8.shape
    if out is None:
        out = torch.empty((b, sq, h, d), dtype=torch.bfloat16, device=q8.device)
    if return_lse and lse is None:
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q8.device)
    vt = kv.vt
    _launch(q8, q_scale, kv.k8, kv.k_scale, vt, kv.v_scale, kv.km if return_lse else None, out,
            lse if return_lse else None, sq, kv.sk, h,
            True, accumulate, (vt.stride(0), vt.stride(1), 1, vt.stride(2)), autotune, lazy)
    return (out, lse) if return_lse else out


def attention_bf16(q, k, v, out: torch.Tensor | None = None, return_lse: bool = False, accumulate: bool = False,
                   autotune: bool = True, lse: torch.Tensor | None = None):
    """bf16 attention, q [B, Sq, H, D], k, v [B, Sk, H, D] (same API as `attention`)."""
    _check_qkv(q, k, v)
    b, sq, h, d = q.shape
    if out is None:
        out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    _launch(q, None, k, None, v, None, None, out, lse if return_lse else None, sq, k.shape[1], h, False, accumulate,
            (v.stride(0), v.stride(2), v.stride(1), 1), autotune)
    return (out, lse) if return_lse else out


def cross_attention2(q, pair1, pair2, quantized: bool = True, q_prepared=None, out: torch.Tensor | None = None):
    """Sum of two separate softmax attentions of q [B, Sq, H, D] over pair1 and pair2, in one kernel.
    quantized: pairs are QuantKV (from quantize_kv) and q_prepared = quantize_q(q) may be passed;
    bf16: pairs are (k, v) tensors [B, Sk_i, H, D].  Returns bf16 [B, Sq, H, D]."""
    b, sq, h, d = q.shape
    if out is None:
        out = torch.empty((b, sq, h, d), dtype=torch.bfloat16, device=q.device)
    if quantized:
        q8, qs = q_prepared if q_prepared is not None else quantize_q(q)
        sets = [(kv.k8, kv.k_scale, kv.vt, kv.v_scale, kv.sk, (kv.vt.stride(0), kv.vt.stride(1), 1, kv.vt.stride(2)))
                for kv in (pair1, pair2)]
    else:
        for k, v in (pair1, pair2):
            _check_qkv(q, k, v)
        q8, qs = q, out
        sets = [(k, out, v, out, k.shape[1], (v.stride(0), v.stride(2), v.stride(1), 1)) for k, v in (pair1, pair2)]
    args = []
    for kq, ks, vv, vs, _, _ in sets:
        args += [kq, vv, ks, vs]
    strides = []
    for kq, _, _, _, _, vst in sets:
        strides += [kq.stride(0), kq.stride(1), kq.stride(2), *vst]
    sk_min = min(st[4] for st in sets)
    bm = 64
    bn = min(128 if q.is_cuda else 64, max(32 if quantized else 16, triton.next_power_of_2(sk_min)))
    _attn2_fwd[(triton.cdiv(sq, bm), b * h)](
        q8, qs, out, *args, q8.stride(0), q8.stride(1), q8.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *strides, h, sq, sets[0][4], sets[1][4], LOG2E / math.sqrt(HEAD_DIM),
        QUANT=quantized, EMU=INTERPRET, D=HEAD_DIM, BM=bm, BN=bn, num_warps=4, num_stages=3)
    return out


def attention(q, k, v, quantized: bool = True, return_lse: bool = False, autotune: bool = True):
    """softmax(q k^T / sqrt(D)) v for q [B, Sq, H, D], k, v [B, Sk, H, D] (non-causal); bf16 output.
    quantized=True: INT8 Q.K + FP8 P.V (K smoothed); False: bf16 operands.  return_lse adds the
    natural-log LSE [B, H, Sq] fp32."""
    _check_qkv(q, k, v)
    if not quantized:
        return attention_bf16(q, k, v, return_lse=return_lse, autotune=autotune)
    q8, qs = quantize_q(q)
    return attention_quant_prepared(q8, qs, quantize_kv(k, v), return_lse=return_lse, autotune=autotune)
