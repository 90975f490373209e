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

`rope_keys` (one program per (BT keys, batch), looping over heads so cos/sin rows load once): the key
set of one self-attention call, from up
to two sources (cache rows, possibly e4m3 + scale, dequantized as bf16(q)*bf16(s); and the current
chunk's fresh bf16 kn), rotated at position = key row (slot index * Fl + in-frame position),
rounded to bf16 like the reference, then
    PHASE 0: per-block partial channel sums (-> km = mean over keys, the K smoothing vector)
    PHASE 1: k - km -> int8 per (token, head) + scale [B, H, Sk]      (QUANT)
             or the rotated bf16 keys [B, Sk, H, D]                       (bf16 attention)
  The cache keeps un-rotated keys (slot positions change at memory compression, SPEC 4.4), so the
  rotation is applied to the whole key set once per call: reads 2 B/elem twice (two phases), writes
  1 B/elem (int8) + scales.

Launch configs: qk_prep one token per program, 4 warps (8 for H*D >= 4096); rope_keys BT = 32, 4 warps.
Measured (H100, 9360-token chunk / 16380 keys, 40 x 128; device copy 3.0 TB/s in the same run):
qk_prep 0.227 ms = 2.37 TB/s (79 % of copy); rope_keys 0.317 ms = 1.44 TB/s (48 %: two passes,
counted bytes include both reads).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import INTERPRET, LOG2E, round_half_away, to_bf16, to_e4m3


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
def _rope_keys_kernel(X, XS, COS, SIN, KM, OUT, OS, PART, S, H, Sk, row0, n_blk0,
                      sx_b, sx_s, sx_h, sxs_b, so_b, so_s, so_h,
                      HAS_XS: tl.constexpr, PHASE: tl.constexpr, QUANT: tl.constexpr, EMU: tl.constexpr,
                      D: tl.constexpr, BT: tl.constexpr):
    """One program per (BT keys, batch); loops over the heads so the cos/sin rows load once."""
    pid_t, b = tl.program_id(0), tl.program_id(1)
    nb = tl.num_programs(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, D // 2)
    mask = offs_t < S
    tmask = mask[:, None]
    rows = row0 + offs_t
    c = tl.load(COS + rows[:, None] * (D // 2) + offs_p[None, :], mask=tmask, other=0.0)
    s = tl.load(SIN + rows[:, None] * (D // 2) + offs_p[None, :], mask=tmask, other=0.0)
    for h in range(H):
        x = tl.load(X + b * sx_b + h * sx_h + offs_t[:, None] * sx_s + offs_d[None, :], mask=tmask, other=0.0)
        if HAS_XS:   # e4m3 cache rows: bf16(q) * bf16(s) (kv_read of shared/SPEC.md 4.6)
            xs = tl.load(XS + b * sxs_b + offs_t * H + h, mask=mask, other=0.0)
            x = to_bf16(x.to(tl.float32) * to_bf16(xs, EMU).to(tl.float32)[:, None], EMU)
        y = _rope(x.to(tl.float32), c, s, BT, D, EMU)       # padded rows are 0
        if PHASE == 0:
            tl.store(PART + ((n_blk0 + pid_t) * nb + b) * (H * D) + h * D + offs_d, tl.sum(y, 0))
        elif QUANT:
            y = y - tl.load(KM + (b * H + h) * D + offs_d)[None, :]
            sc = tl.maximum(tl.max(tl.abs(y), 1), 1e-12) / 127.0
            yi = tl.minimum(tl.maximum(round_half_away(y / sc[:, None]), -127.0), 127.0).to(tl.int8)
            tl.store(OUT + b * so_b + h * so_h + rows[:, None] * so_s + offs_d[None, :], yi, mask=tmask)
            tl.store(OS + (b * H + h) * Sk + rows, sc, mask=mask)
        else:
            tl.store(OUT + b * so_b + h * so_h + rows[:, None] * so_s + offs_d[None, :],
                     y.to(tl.bfloat16), mask=tmask)


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


class KSource:
    """Key rows for `rope_keys`: x [B, S, H, D] bf16, or e4m3 with scale rows [B, S, H, 1]."""

    def __init__(self, x: torch.Tensor, scale: torch.Tensor | None = None):
        if x.stride(-1) != 1 or (scale is not None and (scale.stride(1) != x.shape[2] or scale.stride(2) != 1)):
            raise ValueError("KSource: x must be contiguous in head_dim and scale a row slice of a contiguous "
                             "[B, N, H, 1] tensor")
        self.x, self.scale = x, scale


def rope_keys(sources, cos, sin, quantize: bool = True, bt: int = 32):
    """Concatenate key sources along the key axis, rotate key r at table row r (bf16 rounding as the
    reference), and either smooth + quantize (returns int8 [B, Sk, H, D], scale [B, H, Sk], km [B, H, D])
    or return the rotated bf16 keys (tensor [B, Sk, H, D], None, None)."""
    x0 = sources[0].x
    b, _, h, d = x0.shape
    sk = sum(s.x.shape[1] for s in sources)
    if sk > cos.shape[0]:
        raise ValueError(f"RoPE table has {cos.shape[0]} positions, the key set has {sk}")
    dev = x0.device
    nblks = [triton.cdiv(s.x.shape[1], bt) for s in sources]
    if quantize:
        out = torch.empty((b, sk, h, d), dtype=torch.int8, device=dev)
        osc = torch.empty((b, h, sk), dtype=torch.float32, device=dev)
        part = torch.empty((sum(nblks), b, h, d), dtype=torch.float32, device=dev)
        phases = (0, 1)
    else:
        out = torch.empty((b, sk, h, d), dtype=torch.bfloat16, device=dev)
        osc = part = out
        phases = (1,)
    km = out
    for phase in phases:
        if phase == 1 and quantize:
            km = (part.sum(0) / sk).contiguous()
        row0 = blk0 = 0
        for src, nb in zip(sources, nblks):
            x, s = src.x, src.x.shape[1]
            if s:
                xs = src.scale if src.scale is not None else out
                _rope_keys_kernel[(nb, b)](x, xs, cos, sin, km, out, osc, part, s, h, sk, row0, blk0,
                                              x.stride(0), x.stride(1), x.stride(2),
                                              xs.stride(0) if src.scale is not None else 0,
                                              out.stride(0), out.stride(1), out.stride(2),
                                              HAS_XS=src.scale is not None, PHASE=phase, QUANT=quantize, EMU=INTERPRET,
                                              D=d, BT=bt)
            row0 += s
            blk0 += nb
    return (out, osc, km) if quantize else (out, None, None)
