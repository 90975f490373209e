"""ConvKV memory update (shared/SPEC.md 4.2 step 3, 4.4, 4.5; KERNELS.md 4).

Compressor C on a span of 5 slots: a depthwise Conv1d (kernel 5 = stride 5, no bias) along the
flattened token axis, channel c = h*128 + e:
    out[t, c] = sum_{j<5} w[c, j] * x[5t + j, c]      (w = memory_proj_k.weight [C, 1, 5]; mean memory: w = 1/5)
Update, for K and for V (both with memory_proj_k's weight, a published quirk):
    slot 2 <- C(slots 2..6);  slot 3 <- C(slots 7..11);  slots 4, 5 <- slots 12, 13.
In-place hazard: every written slot (2..5) lies inside C(slots 2..6)'s input.  With T1 = ceil(Fl / 5),
outputs t < T1 of C(slots 2..6) read slot 2 (rows 5t..5t+4; the last one also reads slot 3 when
5 does not divide Fl), outputs t >= T1 read only slots 3..6.  Three launches of `_kvmem_kernel`, K and
V together (grid axis 2 = (batch, K or V)), no program reading what another of its launch writes:
    launch 0: outputs [0, T1) of C(slots 2..6) -> scratch [2, B, T1, H, D]        (reads slot 2)
    launch 1: outputs [T1, Fl) -> slot 2 rows [T1, Fl) (read slots 3..6);  scratch -> slot 2 rows [0, T1)
    launch 2: C(slots 7..11) -> slot 3;  slots 12, 13 -> 4, 5 (raw copy, values and fp8 scales)
Values are bit-identical to the previous 2-launch version (full-slot scratch) and to the session-3
3-launch kernel (torch.equal on values and fp8 scales, H100, Fl = 1170 and 1024, bf16 and FP8, the default
config and the all-(16, 4) one) and to ReferenceOps.kv_memory_update (bit-exact on CPU; GPU: the
conv's fp32 sum may round differently at bf16 ties).
Tiles: one program per (head, BT output tokens or copied rows, (batch, tensor)), tile [BT, 128]; the
5 source rows of each output token are 5 strided [BT, 128] loads, all issued (with the fp8 scales and the 5
weight columns) before any arithmetic: each weight column is redistributed through shared memory with a
barrier, and a load placed after a barrier waits for it (SASS of the previous version: at most 2 of the 5
taps in flight per program).  fp32 accumulation, bf16 rounding of the result like the bf16 conv.  Cache
formats: bf16, or e4m3 + per-(token, head) fp32 scale (SPEC 4.6): inputs dequantized as bf16(q) * bf16(s),
outputs re-quantized (s = max(amax/448, 1e-12), e4m3(bf16(x) / bf16(s))) -- the values the reference's
kv_read / kv_write produce.  The fp32 -> bf16 -> fp32 roundings use cvt.rn.bf16x2.f32 (two values per ALU
op, `_round_bf16`): a lone fp32 -> bf16 cast compiles to F2F on the quarter-rate conversion unit, one per
FP8 input element, which bounded the FP8 path (SASS count: 236 F2F per thread per program).  Optional fast
dequantization (`_dequant_fast`, per launch in _LAUNCH): the e4m3 code's bits moved into a bf16 are
q * 2^-120 exactly, one mul.rn.bf16x2 by bf16(s) * 2^120 rounds the exact product once -- the same bf16
as the fp32 path, 2 elements per op (bit-identical; a tile with a scale >= 255, where bf16(s) * 2^120
would overflow, takes the fp32 path; e4m3 NaN codes, which kv_write never writes, are not preserved).
Bytes per tensor: the minimum is read 10 Fl + write 4 Fl rows of H*D*e (+ H*4 scale bytes for fp8;
e = 2 bf16, 1 fp8); the scratch round trip adds T1 rows each way (14.4 Fl rows moved; the previous
version moved 18 Fl).  At 416x720 (Fl = 1170, 40 x 128, K + V) the minimum is 335 MB (bf16) /
173 MB (fp8).
Launch config (_LAUNCH, per launch (BT, warps, fast dequant); no autotune): bf16 (16, 4) for all three;
FP8 (8, 4, fp32 dequant), (16, 4, fast), (16, 4, fp32 dequant) -- the fastest per launch in a sweep of
BT 8-64, 4/8 warps, both dequant paths (H100, graph-timed alone; bench/results/h100-2026-11-25-s5/convkv_probe.log).
Measured (H100, Fl = 1170, 40 x 128, K and V, eager do_bench median; ratio = a device copy of the same
bytes in the same run / ours; bench/NOTES.md):
  4 Triton kernels + 4 torch copies (bf16; + 8 for FP8): bf16 0.173 ms (66 %), FP8 0.240 ms (27 %);
  2 launches, full-slot scratch: bf16 0.149 ms (77-78 %), FP8 0.104 ms (63 %);
  3 launches (session 3): bf16 0.139-0.140 ms (82-83 %; CUDA graph 0.138), FP8 0.096-0.097 ms (68 %; graph
  0.095); Fl = 1024: bf16 0.125 ms (82 %), FP8 0.089 ms (62 %).  Per launch (bf16 / FP8, graph-timed alone):
  0.018 / 0.014, 0.050 / 0.035, 0.084 / 0.059 ms: launch 0 is a small grid at ~half the copy rate;
  launch 2 runs bf16 at the copy rate (2.85 TB/s) but FP8 at 2.1 TB/s.
  This version (H100, 2026-11-25, old = session-3 kernel in the same run; copy 0.1159 / 0.0655 ms):
  bf16 0.1410 ms (82 %; graph 0.1383, old 0.1387), FP8 0.0919 ms (71 %; graph 0.0917, old 0.0950);
  Fl = 1024 graph: bf16 0.1228 (old 0.1221), FP8 0.0825 (old 0.0880; copy 0.0557: 68 %).  Per launch
  FP8 (graph, alone): 0.0132, 0.0334, 0.0563 ms (old 0.0135, 0.0347, 0.0585).  FP8 stays below 80 %:
  launch 2 reaches ~2.2 TB/s; the fast dequantization (~8 % fewer instructions, SASS) wins only in launch 1.
  Eager, the three launches cost ~80-100 us of host time per call, about the FP8 GPU time: do_bench can
  then read host-bound (run 2 saw 0.16-0.18 ms readings whose graph times were 0.082-0.123 ms).
  Tried and slower (reverted): fp32 transposed weights written by launch 0 (no shared-memory
  redistribution per j), compressing and copying programs interleaved, 2-4x larger copy tiles: bf16
  0.143, FP8 0.103 ms; 3-D tiles of 2-8 heads: FP8 2x slower (scales replicated per element).
`convkv_compress` (one compression into a non-overlapping output, TritonAttentionOps.convkv_compress)
uses the same tile code in `_convkv_kernel`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .attention import INTERPRET, to_bf16, to_e4m3

# kv_memory_update launch config by cache format, {fp8: per launch (BT tokens or rows per program, warps,
# fp8 inputs dequantized by bit moves + mul.rn.bf16x2 (_dequant_fast))}
_LAUNCH = {False: ((16, 4, False),) * 3, True: ((8, 4, False), (16, 4, True), (16, 4, False))}


@triton.jit
def _round_bf16(x, EMU: tl.constexpr):
    """fp32 -> the nearest bf16 (ties to even), returned as fp32.  GPU: two values per cvt.rn.bf16x2.f32 (an
    ALU op); a lone fp32 -> bf16 cvt is an F2F on the quarter-rate conversion unit, one per input element of
    the FP8 path, which bounded it (SASS count)."""
    if EMU:
        return to_bf16(x, EMU).to(tl.float32)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
        "=r,=r,r,r", [x], dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _dequant_fast(q, sp, EMU: tl.constexpr):
    """bf16(q * s) as fp32, 4 e4m3 codes (as uint8) per asm instance, sp = bf16(s) * 2^120 duplicated in both bf16
    halves of an int32 (per row; the 4 packed values are consecutive channels of one row).  The code's bits
    (sign, exponent, mantissa) moved into a bf16 are q * 2^-120 (exact, e4m3 subnormals too), so one
    mul.rn.bf16x2 by bf16(s) * 2^120 rounds the exact product q * bf16(s) once to bf16 -- the value
    bf16(fp32(q) * bf16(s)) of the fp32 path -- two values per ALU op; valid while bf16(s) < 2^8 (caller's guard)."""
    if EMU:   # the same bit mapping; the fp32 product q * bf16(s) is exact, rounded once to bf16
        qi = q.to(tl.int32)
        t = ((((qi & 0x80) << 8) | ((qi & 0x7F) << 4)) << 16).to(tl.float32, bitcast=True)
        return _round_bf16(t * (sp & -65536).to(tl.float32, bitcast=True), EMU)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 a, b; prmt.b32 a, $4, 0, 0x9180; prmt.b32 b, $4, 0, 0xB3A2; shl.b32 a, a, 4; shl.b32 b, b, 4; "
        "and.b32 a, a, 0x87F087F0; and.b32 b, b, 0x87F087F0; mul.rn.bf16x2 a, a, $5; mul.rn.bf16x2 b, b, $7; "
        "shl.b32 $0, a, 16; and.b32 $1, a, 0xffff0000; shl.b32 $2, b, 16; and.b32 $3, b, 0xffff0000; }",
        "=r,=r,=r,=r,r,r,r,r,r", [q, sp], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _scale_pair(xs, EMU: tl.constexpr):
    """Per row: bf16(s) * 2^120 as a bf16 duplicated in both halves of an int32 (exact: bf16(s) < 2^8)."""
    sp = (to_bf16(xs, EMU).to(tl.float32) * 1.329227995784916e36).to(tl.int32, bitcast=True)   # 2^120
    return (sp & -65536) | ((sp >> 16) & 0xFFFF)


@triton.jit
def _tap(acc, x, xs, w, FP8: tl.constexpr, MEAN: tl.constexpr, FAST: tl.constexpr, EMU: tl.constexpr):
    """acc + w * x (w = weight column j, x = tap j, dequantized for fp8: bf16(bf16(q) * bf16(s)))."""
    if FP8:
        if FAST:
            x = _dequant_fast(x.to(tl.uint8, bitcast=True), _scale_pair(xs, EMU)[:, None], EMU)
        else:
            x = _round_bf16(x.to(tl.float32) * to_bf16(xs, EMU).to(tl.float32)[:, None], EMU)
    x = x.to(tl.float32)
    if MEAN:
        acc += x
    else:
        acc += w.to(tl.float32)[None, :] * x
    return acc


@triton.jit
def _taps(x0, x1, x2, x3, x4, s0, s1, s2, s3, s4, w0, w1, w2, w3, w4, BT: tl.constexpr, D: tl.constexpr,
          FP8: tl.constexpr, MEAN: tl.constexpr, FAST: tl.constexpr, EMU: tl.constexpr):
    acc = tl.zeros([BT, D], tl.float32)
    acc = _tap(acc, x0, s0, w0, FP8, MEAN, FAST, EMU)
    acc = _tap(acc, x1, s1, w1, FP8, MEAN, FAST, EMU)
    acc = _tap(acc, x2, s2, w2, FP8, MEAN, FAST, EMU)
    acc = _tap(acc, x3, s3, w3, FP8, MEAN, FAST, EMU)
    acc = _tap(acc, x4, s4, w4, FP8, MEAN, FAST, EMU)
    return acc


@triton.jit
def _compress(X, XS, W, Y, YS, b, h, t0, n_out, src0, dst0, H, sx_b, sx_s, sxs_b, sy_b, sy_s, sys_b,
              FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
              FASTDQ: tl.constexpr = False):
    """Y rows dst0 + t <- C(X rows src0 + 5t + j, j < 5) for t in t0 + [0, BT), t < n_out (one head h).
    All 5 taps (values, fp8 scales, weight columns) are loaded before any arithmetic: the weight columns
    are redistributed through shared memory with a barrier each, and loads placed after a barrier wait
    for it (SASS: the old order had at most 2 taps in flight)."""
    offs_t = t0 + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    mask = offs_t < n_out
    c = h * D + offs_d
    rows = src0 + 5 * offs_t
    xp = X + b * sx_b + rows[:, None] * sx_s + c[None, :]
    x0 = tl.load(xp, mask=mask[:, None], other=0.0)
    x1 = tl.load(xp + sx_s, mask=mask[:, None], other=0.0)
    x2 = tl.load(xp + 2 * sx_s, mask=mask[:, None], other=0.0)
    x3 = tl.load(xp + 3 * sx_s, mask=mask[:, None], other=0.0)
    x4 = tl.load(xp + 4 * sx_s, mask=mask[:, None], other=0.0)
    if MEAN:
        w0, w1, w2, w3, w4 = offs_d, offs_d, offs_d, offs_d, offs_d       # unused
    else:
        w0 = tl.load(W + c * 5)
        w1 = tl.load(W + c * 5 + 1)
        w2 = tl.load(W + c * 5 + 2)
        w3 = tl.load(W + c * 5 + 3)
        w4 = tl.load(W + c * 5 + 4)
    if FP8:
        sp = XS + b * sxs_b + rows * H + h
        s0 = tl.load(sp, mask=mask, other=0.0)
        s1 = tl.load(sp + H, mask=mask, other=0.0)
        s2 = tl.load(sp + 2 * H, mask=mask, other=0.0)
        s3 = tl.load(sp + 3 * H, mask=mask, other=0.0)
        s4 = tl.load(sp + 4 * H, mask=mask, other=0.0)
        fast = False
        if FASTDQ:   # the tile's scales all < 255: bf16(s) * 2^120 finite (real caches' scales are far below)
            big = tl.maximum(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)), s4)
            fast = tl.max(big, 0) < 255.0
        if fast:
            acc = _taps(x0, x1, x2, x3, x4, s0, s1, s2, s3, s4, w0, w1, w2, w3, w4, BT, D, FP8, MEAN, True, EMU)
        else:
            acc = _taps(x0, x1, x2, x3, x4, s0, s1, s2, s3, s4, w0, w1, w2, w3, w4, BT, D, FP8, MEAN, False, EMU)
    else:
        acc = _taps(x0, x1, x2, x3, x4, x0, x0, x0, x0, x0, w0, w1, w2, w3, w4, BT, D, FP8, MEAN, False, EMU)
    if MEAN:
        acc = acc / 5.0
    rows_out = dst0 + offs_t
    y_ptrs = Y + b * sy_b + rows_out[:, None] * sy_s + c[None, :]
    if FP8:   # kv_write: SPEC 4.6 quantization per (token, head)
        y = _round_bf16(acc, EMU)
        s = tl.maximum(tl.max(tl.abs(y), 1) / 448.0, 1e-12)
        qv = _round_bf16(y / to_bf16(s, EMU).to(tl.float32)[:, None], EMU)
        tl.store(y_ptrs, to_e4m3(qv, EMU), mask=mask[:, None])
        tl.store(YS + b * sys_b + rows_out * H + h, s, mask=mask)
    else:
        tl.store(y_ptrs, to_bf16(acc, EMU), mask=mask[:, None])


@triton.jit
def _copy_rows(X, XS, Y, YS, b, h, r0, n, src0, dst0, H, sx_b, sx_s, sxs_b, sy_b, sy_s, sys_b,
               FP8: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Y rows dst0 + r <- X rows src0 + r (head h; values and, for fp8, scales) for r in r0 + [0, BT), r < n."""
    r = r0 + tl.arange(0, BT)
    mask = r < n
    c = h * D + tl.arange(0, D)
    x = tl.load(X + b * sx_b + (src0 + r)[:, None] * sx_s + c[None, :], mask=mask[:, None])
    tl.store(Y + b * sy_b + (dst0 + r)[:, None] * sy_s + c[None, :], x, mask=mask[:, None])
    if FP8:
        xs = tl.load(XS + b * sxs_b + (src0 + r) * H + h, mask=mask)
        tl.store(YS + b * sys_b + (dst0 + r) * H + h, xs, mask=mask)


@triton.jit
def _convkv_kernel(X, XS, W, Y, YS, n_out, H, src0, dst0,
                   sx_b, sx_s, sxs_b, sy_b, sy_s, sys_b,
                   FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    h, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _compress(X, XS, W, Y, YS, b, h, pid_t * BT, n_out, src0, dst0, H, sx_b, sx_s, sxs_b, sy_b, sy_s, sys_b,
              FP8, MEAN, EMU, D, BT)


@triton.jit
def _kvmem_phase(X, XS, W, SC, SCS, pid, b, h, Fl, T1, H, nb_a, sx_b, sx_s, sxs_b, sc_b, sc_s, scs_b,
                 PHASE: tl.constexpr, FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr,
                 BT: tl.constexpr, FASTDQ: tl.constexpr):
    """One program of launch PHASE for one tensor (K or V); T1 = ceil(Fl / 5); see the module docstring."""
    if PHASE == 0:                     # outputs [0, T1) of C(slots 2..6) -> scratch
        _compress(X, XS, W, SC, SCS, b, h, pid * BT, T1, 2 * Fl, 0, H, sx_b, sx_s, sxs_b, sc_b, sc_s, scs_b,
                  FP8, MEAN, EMU, D, BT, FASTDQ)
    elif PHASE == 1:
        if pid < nb_a:                 # outputs [T1, Fl) of C(slots 2..6) -> slot 2 rows [T1, Fl)
            _compress(X, XS, W, X, XS, b, h, T1 + pid * BT, Fl, 2 * Fl, 2 * Fl, H, sx_b, sx_s, sxs_b,
                      sx_b, sx_s, sxs_b, FP8, MEAN, EMU, D, BT, FASTDQ)
        else:                          # scratch -> slot 2 rows [0, T1)
            _copy_rows(SC, SCS, X, XS, b, h, (pid - nb_a) * BT, T1, 0, 2 * Fl, H, sc_b, sc_s, scs_b,
                       sx_b, sx_s, sxs_b, FP8, D, BT)
    else:
        if pid < nb_a:                 # slot 3 <- C(slots 7..11)
            _compress(X, XS, W, X, XS, b, h, pid * BT, Fl, 7 * Fl, 3 * Fl, H, sx_b, sx_s, sxs_b,
                      sx_b, sx_s, sxs_b, FP8, MEAN, EMU, D, BT, FASTDQ)
        else:                          # slots 4, 5 <- slots 12, 13
            _copy_rows(X, XS, X, XS, b, h, (pid - nb_a) * BT, 2 * Fl, 12 * Fl, 4 * Fl, H, sx_b, sx_s, sxs_b,
                       sx_b, sx_s, sxs_b, FP8, D, BT)


@triton.jit
def _kvmem_kernel(K, KS, V, VS, W, SC, SCS, Fl, T1, H, nb_a, sx_b, sx_s, sxs_b, sc_t, sc_b, sc_s, scs_t, scs_b,
                  PHASE: tl.constexpr, FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr,
                  BT: tl.constexpr, FASTDQ: tl.constexpr = False):
    """Launch PHASE (0, 1, 2) of the update.  Grid (H, programs of the phase, 2B): the heads of one row
    block run side by side (they share the rows' DRAM pages and fp8 scale sectors); programs [0, nb_a)
    compress, the rest copy.  Grid axis 2 = (batch, K or V)."""
    h, pid, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = z // 2
    if z % 2 == 0:
        _kvmem_phase(K, KS, W, SC, SCS, pid, b, h, Fl, T1, H, nb_a, sx_b, sx_s, sxs_b, sc_b, sc_s, scs_b,
                     PHASE, FP8, MEAN, EMU, D, BT, FASTDQ)
    else:
        _kvmem_phase(V, VS, W, SC + sc_t, SCS + scs_t, pid, b, h, Fl, T1, H, nb_a, sx_b, sx_s, sxs_b,
                     sc_b, sc_s, scs_b, PHASE, FP8, MEAN, EMU, D, BT, FASTDQ)


def _check_rows(name, t):
    if t.dim() != 4 or t.stride(-1) != 1 or t.stride(2) != t.shape[3]:
        raise ValueError(f"{name} must be [B, N, H, D] with heads and head_dim contiguous, got shape "
                         f"{tuple(t.shape)} strides {tuple(t.stride())}")


def _check_weight(weight, h, d):
    if weight is None:
        return None
    if weight.numel() != h * d * 5:
        raise ValueError(f"ConvKV weight must be [{h * d}, 1, 5], got {tuple(weight.shape)}")
    return weight.contiguous()


def convkv_compress(x, x_scale, weight, out, out_scale, src_row0: int, dst_row0: int, n_out: int, bt: int = 32):
    """out rows [dst_row0, dst_row0 + n_out) <- C(x rows [src_row0, src_row0 + 5 n_out)).

    x, out: [B, N, H, D] bf16, or e4m3 with x_scale / out_scale [B, N, H, 1] fp32 (FP8 cache);
    weight [H*D, 1, 5] (memory_proj_k.weight) or None for the mean-memory variant.
    The source and destination ranges must not overlap (use a scratch output otherwise)."""
    b, n, h, d = x.shape
    _check_rows("convkv_compress: x", x)
    _check_rows("convkv_compress: out", out)
    same = x.data_ptr() == out.data_ptr()
    if same and dst_row0 < src_row0 + 5 * n_out and src_row0 < dst_row0 + n_out:
        raise ValueError("convkv_compress: output rows overlap the input rows (in-place hazard); "
                         "write to a scratch buffer")
    if src_row0 + 5 * n_out > n:
        raise ValueError(f"convkv_compress: source rows up to {src_row0 + 5 * n_out} exceed the {n} cache rows")
    fp8 = x_scale is not None
    w = _check_weight(weight, h, d)
    w = x if w is None else w
    xs = x_scale if fp8 else x
    ys = out_scale if fp8 else out
    _convkv_kernel[(h, triton.cdiv(n_out, bt), b)](
        x, xs, w, out, ys, n_out, h, src_row0, dst_row0,
        x.stride(0), x.stride(1), xs.stride(0) if fp8 else 0, out.stride(0), out.stride(1),
        ys.stride(0) if fp8 else 0,
        FP8=fp8, MEAN=weight is None, EMU=INTERPRET, D=d, BT=bt, num_warps=4)


def _slot2_readers(fl: int) -> int:
    """T1 = ceil(Fl / 5): outputs t < T1 of C(slots 2..6) read rows 5t..5t+4 of which some lie in slot 2
    (relative rows < Fl); outputs t >= T1 read only slots 3..6 (rows >= 5 T1 >= Fl)."""
    return (fl + 4) // 5


def kv_memory_update(k, v, k_scale, v_scale, weight: Optional[torch.Tensor], tokens_per_frame: int,
                     bt: Optional[int] = None, num_warps: Optional[int] = None, config=None):
    """In-place ConvKV update of one layer cache (SPEC 4.2 step 3) for K and V, both with `weight`
    (memory_proj_k; None = mean memory), in three launches.  k, v [B, 14*Fl, H, D] bf16, or e4m3 with
    fp32 scales k_scale, v_scale [B, 14*Fl, H, 1] (None for a bf16 cache); k and v (and their
    scales) must have the same shape and strides.  config: per launch (BT, warps, fast fp8 dequant),
    default _LAUNCH; bt (tokens or rows per program) and num_warps override it for all three launches."""
    fl = tokens_per_frame
    if fl < 1 or k.shape[1] < 14 * fl:
        raise ValueError(f"kv_memory_update needs 14 slots of {fl} tokens, the cache has {k.shape[1]} rows")
    _check_rows("kv_memory_update: k", k)
    if k.shape != v.shape or k.stride() != v.stride() or k.dtype != v.dtype:
        raise ValueError("kv_memory_update: k and v must have the same shape, strides and dtype")
    fp8 = k_scale is not None
    if fp8 and (v_scale is None or k_scale.stride() != v_scale.stride() or k_scale.stride(1) != k.shape[2]
                or k_scale.stride(2) != 1):
        raise ValueError("kv_memory_update: k_scale and v_scale must be contiguous [B, N, H, 1] tensors "
                         "with equal strides")
    b, _, h, d = k.shape
    cfg = [(bt or c[0], num_warps or c[1], fp8 and c[2]) for c in (config or _LAUNCH[fp8])]
    w = _check_weight(weight, h, d)
    w = k if w is None else w
    t1 = _slot2_readers(fl)
    sc = torch.empty((2, b, t1, h, d), dtype=k.dtype, device=k.device)
    scs = torch.empty((2, b, t1, h), dtype=torch.float32, device=k.device) if fp8 else sc
    ks, vs = (k_scale, v_scale) if fp8 else (k, v)
    strides = (k.stride(0), k.stride(1), ks.stride(0) if fp8 else 0, sc.stride(0), sc.stride(1), sc.stride(2),
               scs.stride(0) if fp8 else 0, scs.stride(1) if fp8 else 0)
    args = (k, ks, v, vs, w, sc, scs, fl, t1, h)
    for phase, (bt_, nw, fast) in enumerate(cfg):
        nt1 = triton.cdiv(t1, bt_)
        n_a = (nt1, triton.cdiv(fl - t1, bt_), triton.cdiv(fl, bt_))[phase]       # compressing programs
        n_b = (0, nt1, triton.cdiv(2 * fl, bt_))[phase]                           # copying programs
        _kvmem_kernel[(h, n_a + n_b, 2 * b)](*args, n_a, *strides, PHASE=phase, FP8=fp8, MEAN=weight is None,
                                             EMU=INTERPRET, D=d, BT=bt_, FASTDQ=fast, num_warps=nw)
