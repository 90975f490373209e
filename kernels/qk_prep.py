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
    PHASE 0: km = mean of the rotated keys over every KM_STRIDE-th key row (8: 2048 of 16380 keys),
             per-program partial sums -> torch sum; the K smoothing vector
    PHASE 1: k - km -> int8 per (token, head) + scale [B, H, Sk]      (QUANT)
             or the rotated bf16 keys [B, Sk, H, D]                       (bf16 attention, no phase 0)
  K smoothing is exact for ANY km subtracted from every key of a head (softmax is invariant to the
  per-query constant q.km; the attention kernel adds q.km back to the LSE with the km returned here),
  so a sample is enough: it only has to remove the channel offsets.  Measured at the real shape:
  attention cos vs fp32 0.998521 (km from 1/8) vs 0.998518 (km over all keys), max|lse err| 0.0633
  vs 0.0636; int8 key error rel 1.408e-2 either way.
  The cache keeps un-rotated keys (slot positions change at memory compression, SPEC 4.4), so the
  rotation is applied to the whole key set once per call.  Minimum bytes (bf16 cache, one source):
  read 2 B/elem + cos/sin 1 KB per key, write 1 B/elem + 4 B scale per (key, head) = 271 MB at
  16380 x 40 x 128; phase 0 adds 1/8 of the key reads.
  Tiles: [TB rows, HG heads, 128] (RoPE pairs in float64), grid (cdiv(Sk, TB), cdiv(H, HG*GL), B);
  phase 0 uses TB0 = TB..16 sampled rows per program (8 at the real shape: 256 x 5 programs, 8 warps).

Launch configs: qk_prep one token per program, 4 warps (8 for H*D >= 4096); rope_keys TB=4, HG=8,
GL=1, 4 warps (rope_keys_config; swept on H100: (TB, HG, GL, warps) = (2,8,1,4) (4,8,1,4) (2,8,5,4)
(1,8,5,4) (2,8,1,2) within 3 % of each other; in an earlier sweep (8,8,1,4) gave phase 1 in 0.149 vs
0.137 ms, and whole rows (1,64,1,8) or 8-warp [8..16, 8, 128] tiles were 10-40 % slower).
Measured (H100, 9360-token chunk / 16380 keys, 40 x 128; device copy 3.0 TB/s in the same run; ratio =
a copy of the same bytes / ours): qk_prep 0.228 ms = 2.36 TB/s (81 %).  rope_keys, bf16 cache:
previous two-full-pass version 0.317 ms (31 % of copy on the minimum bytes), this one 0.234 ms
(42 %); FP8 cache (7020 e4m3 rows + 9360 fresh): 0.443 -> 0.243 ms (19 -> 35 %).  Phase 1 alone
(km from one key) 0.129-0.138 ms (70-76 %), the rotated bf16 output alone 0.128-0.149 ms; so
phase 0 + its partial sum cost ~0.1 ms for 21 MB of reads -- not understood (the kernel compiles
to 4 vector loads per thread, no spills); next step: time the three launches separately (profiler).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

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
def _rotated_keys(X1, XS1, X2, COS, SIN, b, t2, h2, S1, Sk, H, sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s,
                  HAS_XS: tl.constexpr, HAS_X2: tl.constexpr, EMU: tl.constexpr,
                  TB: tl.constexpr, HG: tl.constexpr, D: tl.constexpr):
    """Key rows t2 [TB, 1] x heads h2 [1, HG] rotated at their row position: bf16-rounded fp32
    [TB, HG, D], 0 for rows >= Sk or heads >= H.  Rows < S1 from X1 (dequantized if HAS_XS), else X2."""
    t = t2[:, :, None]
    hh = h2[:, :, None]
    col = hh * D + tl.arange(0, D)[None, None, :]
    m3 = (t < Sk) & (hh < H)
    if HAS_X2:
        m1 = (t < S1) & (hh < H)
    else:
        m1 = m3
    x = tl.load(X1 + b * sx1_b + t * sx1_s + col, mask=m1, other=0.0)
    if HAS_XS:   # e4m3 cache rows: bf16(q) * bf16(s) (kv_read of shared/SPEC.md 4.6)
        xs = tl.load(XS1 + b * sxs1_b + t2 * H + h2, mask=(t2 < S1) & (h2 < H), other=0.0)
        x = to_bf16(x.to(tl.float32) * to_bf16(xs, EMU).to(tl.float32)[:, :, None], EMU)
    x = x.to(tl.float32)
    if HAS_X2:
        x2 = tl.load(X2 + b * sx2_b + (t - S1) * sx2_s + col, mask=m3 & (t >= S1), other=0.0)
        x = tl.where(t < S1, x, x2.to(tl.float32))
    pp = tl.arange(0, D // 2)[None, None, :]
    c = tl.load(COS + t * (D // 2) + pp, mask=t < Sk, other=0.0)
    s = tl.load(SIN + t * (D // 2) + pp, mask=t < Sk, other=0.0)
    return _rope3(x, c, s, TB, HG, D, EMU)


@triton.jit
def _rope_keys_kernel(X1, XS1, X2, COS, SIN, KM, OUT, OS, PART, S1, Sk, H, row_stride, inv_cnt,
                      sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s, so_b, so_s,
                      HAS_XS: tl.constexpr, HAS_X2: tl.constexpr, PHASE: tl.constexpr, QUANT: tl.constexpr,
                      EMU: tl.constexpr, TB: tl.constexpr, HG: tl.constexpr, GL: tl.constexpr,
                      D: tl.constexpr):
    """[TB, HG, D] tiles: TB key rows x HG heads; program (p, g, b) covers heads [g*GL*HG, (g+1)*GL*HG)
    in GL steps.  Rows [0, S1) come from X1 (bf16, or e4m3 with scale rows XS1), rows [S1, Sk) from X2.
    PHASE 0 (K smoothing vector): sums the rotated keys of rows m * row_stride for m in
    [p*TB, (p+1)*TB), times inv_cnt -> PART[p, b, heads] (km = PART.sum(0)).
    PHASE 1: rows [p*TB, (p+1)*TB) -> k - km -> int8 + scale [B, H, Sk] (QUANT) or the rotated bf16 keys."""
    pid, g, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tt = tl.arange(0, TB)[:, None]                                        # [TB, 1]
    hg = tl.arange(0, HG)[None, :]                                        # [1, HG]
    dd = tl.arange(0, D)[None, None, :]                                   # [1, 1, D]
    if PHASE == 0:
        t2 = (pid * TB + tt) * row_stride                                 # [TB, 1] sampled key rows
        for gi in tl.static_range(GL):
            h2 = (g * GL + gi) * HG + hg
            y = _rotated_keys(X1, XS1, X2, COS, SIN, b, t2, h2, S1, Sk, H, sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s,
                              HAS_XS, HAS_X2, EMU, TB, HG, D)
            hc = (g * GL + gi) * HG + tl.arange(0, HG)[:, None]           # [HG, 1]
            tl.store(PART + (pid * tl.num_programs(2) + b) * (H * D) + hc * D + tl.arange(0, D)[None, :],
                     tl.sum(y, 0) * inv_cnt, mask=hc < H)
    else:
        t2 = pid * TB + tt                                                # [TB, 1] key rows
        t = t2[:, :, None]
        for gi in tl.static_range(GL):
            h2 = (g * GL + gi) * HG + hg                                  # [1, HG] heads
            hh = h2[:, :, None]
            col = hh * D + dd
            m3 = (t < Sk) & (hh < H)
            y = _rotated_keys(X1, XS1, X2, COS, SIN, b, t2, h2, S1, Sk, H, sx1_b, sx1_s, sxs1_b, sx2_b, sx2_s,
                              HAS_XS, HAS_X2, EMU, TB, HG, D)
            if QUANT:
                y = y - tl.load(KM + b * H * D + col, mask=hh < H, other=0.0)
                sc = tl.maximum(tl.max(tl.abs(y), 2), 1e-12) / 127.0
                yi = tl.minimum(tl.maximum(round_half_away(y / sc[:, :, None]), -127.0), 127.0).to(tl.int8)
                tl.store(OUT + b * so_b + t * so_s + col, yi, mask=m3)
                tl.store(OS + (b * H + h2) * Sk + t2, sc, mask=(t2 < Sk) & (h2 < H))
            else:
                tl.store(OUT + b * so_b + t * so_s + col, y.to(tl.bfloat16), mask=m3)


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


KM_STRIDE = 8   # K smoothing vector from every 8th block of keys (any km is exact, KERNELS.md 2.3)


def rope_keys_config(is_cuda: bool, h: int):
    """(TB, HG, GL, num_warps): tile [TB rows, HG heads, 128], GL head groups per program.  The CPU
    interpreter's cost is per program: all heads, 16 rows there."""
    if not is_cuda:
        return 16, triton.next_power_of_2(h), 1, 4
    return 4, 8, 1, 4


def km_sample_rows(sk: int, km_stride: int) -> torch.Tensor:
    """Indices of the keys whose mean is km: every km_stride-th key row."""
    return torch.arange(0, sk, km_stride)


def rope_keys(sources, cos, sin, quantize: bool = True, km_stride: int = KM_STRIDE, config=None):
    """Concatenate (at most two) key sources along the key axis, rotate key r at table row r (bf16
    rounding as the reference), and either smooth + quantize (returns int8 [B, Sk, H, D], scale
    [B, H, Sk], km [B, H, D]) or return the rotated bf16 keys (tensor [B, Sk, H, D], None, None).
    km = mean of the rotated keys over every km_stride-th key row (km_sample_rows; km_stride=1: all keys); K smoothing is exact for any km, and the attention kernel's LSE uses this km.
    Only the first source may be e4m3 (with scales)."""
    x1, xs1, x2, s1, sk = two_sources(sources, "rope_keys")
    b, _, h, d = x1.shape
    if sk > cos.shape[0]:
        raise ValueError(f"RoPE table has {cos.shape[0]} positions, the key set has {sk}")
    tb, hg, gl, nw = config if config is not None else rope_keys_config(x1.is_cuda, h)
    ngp = triton.cdiv(h, hg * gl)
    dev = x1.device
    if quantize:
        out = torch.empty((b, sk, h, d), dtype=torch.int8, device=dev)
        osc = torch.empty((b, h, sk), dtype=torch.float32, device=dev)
    else:
        out = torch.empty((b, sk, h, d), dtype=torch.bfloat16, device=dev)
        osc = out
    args = dict(sx1_b=x1.stride(0), sx1_s=x1.stride(1), sxs1_b=xs1.stride(0) if xs1 is not None else 0,
                sx2_b=x2.stride(0), sx2_s=x2.stride(1), so_b=out.stride(0), so_s=out.stride(1))
    flags = dict(HAS_XS=xs1 is not None, HAS_X2=s1 < sk, QUANT=quantize, EMU=INTERPRET, TB=tb, HG=hg, GL=gl,
                 D=d, num_warps=nw)
    xs1 = xs1 if xs1 is not None else out
    km = out
    if quantize:
        # phase 0: one [TB0, HG, D] tile of sampled rows per program, partial sums -> part, km = part.sum(0)
        n_samp = triton.cdiv(sk, km_stride)                          # sampled rows 0, s, 2s, ...
        tb0 = min(16, max(tb, triton.next_power_of_2(triton.cdiv(n_samp, 256)))) if x1.is_cuda else 16
        n_prog = triton.cdiv(n_samp, tb0)
        part = torch.empty((n_prog, b, h, d), dtype=torch.float32, device=dev)
        _rope_keys_kernel[(n_prog, ngp, b)](x1, xs1, x2, cos, sin, out, out, osc, part, s1, sk, h, km_stride,
                                            1.0 / n_samp, **args, PHASE=0,
                                            **{**flags, "TB": tb0, "num_warps": 8 if tb0 * hg >= 64 else nw})
        km = part.sum(0)
    _rope_keys_kernel[(triton.cdiv(sk, tb), ngp, b)](x1, xs1, x2, cos, sin, km, out, osc, out, s1, sk, h, 1, 1.0,
                                                     **args, PHASE=1, **flags)
    return (out, osc, km) if quantize else (out, None, None)
