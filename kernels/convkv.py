"""ConvKV memory update (shared/SPEC.md 4.2 step 3, 4.4, 4.5; KERNELS.md 4).

Compressor C on a span of 5 slots: a depthwise Conv1d (kernel 5 = stride 5, no bias) along the
flattened token axis, channel c = h*128 + e:
    out[t, c] = sum_{j<5} w[c, j] * x[5t + j, c]      (w = memory_proj_k.weight [C, 1, 5]; mean memory: w = 1/5)
Update, for K and for V (both with memory_proj_k's weight, a published quirk):
    slot 2 <- C(slots 2..6);  slot 3 <- C(slots 7..11);  slots 4, 5 <- slots 12, 13.
In-place hazard: every written slot (2..5) lies inside C(slots 2..6)'s input.  Two launches, K and V
together (grid axis 2 = (batch, K or V)):
    kernel 1 `_kvmem_compress_kernel`: C(slots 2..6) -> scratch [2, B, Fl, H, D]   reads [2Fl, 7Fl)
    kernel 2 `_kvmem_move_kernel`, three program roles, none reading what another writes:
        C(slots 7..11) -> slot 3 (reads [7Fl, 12Fl));  slots 12, 13 -> 4, 5 (raw copy, values and
        fp8 scales);  scratch -> slot 2.
Values are identical to the previous 12-launch order (scratch, slot 3, copies) and to
ReferenceOps.kv_memory_update (bit-exact on CPU; GPU: the conv's fp32 sum may round differently
at bf16 ties).
Tiles: one program per (head, BT output tokens or copied rows, (batch, tensor)), tile [BT, 128]; the
5 source rows of each output token are 5 strided [BT, 128] loads; fp32 accumulation, bf16 rounding
of the result like the bf16 conv.  Cache formats: bf16, or e4m3 + per-(token, head) fp32 scale
(SPEC 4.6): inputs dequantized as bf16(q) * bf16(s), outputs re-quantized (s = max(amax/448, 1e-12),
e4m3(bf16(x) / bf16(s))) -- the values the reference's kv_read / kv_write produce.
Bytes per tensor: the minimum is read 10 Fl + write 4 Fl rows of H*D*e (+ H*4 scale bytes for fp8;
e = 2 bf16, 1 fp8); the scratch round trip makes it read 13 Fl + write 5 Fl (14/18 of the traffic
is the minimum; the scratch, 24 MB bf16 / 12 MB fp8 for K+V at 416x720, may partly stay in L2).
At 416x720 (Fl = 1170, 40 x 128, K + V) the minimum is 335 MB (bf16) / 173 MB (fp8).
Launch config: BT = 16 tokens (bf16) / 32 (fp8), 4 warps (memory bound; no autotune).
Measured (H100, Fl = 1170, 40 x 128, K and V, eager; ratio = a device copy of the same bytes / ours):
  previous version (4 Triton kernels + 4 torch copies for bf16, + 8 for FP8): bf16 0.173 ms (66 %),
  FP8 0.240 ms (27 %; 0.31-0.47 in other runs);
  this version (2 launches): bf16 0.149 ms (77 %; BT=32: 0.154), FP8 0.104 ms (63 %; BT=16: 0.106).
  The bf16 traffic actually moved (18 Fl rows per tensor) runs at 96 % of the 1 GiB copy rate: the rest
  is the scratch round trip.
`convkv_compress` (one compression into a non-overlapping output, TritonAttentionOps.convkv_compress)
uses the same tile code in `_convkv_kernel`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .attention import INTERPRET, to_bf16, to_e4m3


@triton.jit
def _compress(X, XS, W, Y, YS, b, h, t0, n_out, src0, dst0, H, sx_b, sx_s, sxs_b, sy_b, sy_s, sys_b,
              FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Y rows dst0 + t <- C(X rows src0 + 5t + j, j < 5) for t in t0 + [0, BT), t < n_out (one head h)."""
    offs_t = t0 + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    mask = offs_t < n_out
    c = h * D + offs_d
    acc = tl.zeros([BT, D], tl.float32)
    for j in tl.static_range(5):
        rows = src0 + 5 * offs_t + j
        x = tl.load(X + b * sx_b + rows[:, None] * sx_s + c[None, :], mask=mask[:, None], other=0.0)
        if FP8:   # kv_read: bf16(q) * bf16(s)
            xs = tl.load(XS + b * sxs_b + rows * H + h, mask=mask, other=0.0)
            x = to_bf16(x.to(tl.float32) * to_bf16(xs, EMU).to(tl.float32)[:, None], EMU)
        x = x.to(tl.float32)
        if MEAN:
            acc += x
        else:
            acc += tl.load(W + c * 5 + j).to(tl.float32)[None, :] * x
    if MEAN:
        acc = acc / 5.0
    y = to_bf16(acc, EMU).to(tl.float32)
    rows_out = dst0 + offs_t
    y_ptrs = Y + b * sy_b + rows_out[:, None] * sy_s + c[None, :]
    if FP8:   # kv_write: SPEC 4.6 quantization per (token, head)
        s = tl.maximum(tl.max(tl.abs(y), 1) / 448.0, 1e-12)
        qv = to_bf16(y / to_bf16(s, EMU).to(tl.float32)[:, None], EMU).to(tl.float32)
        tl.store(y_ptrs, to_e4m3(qv, EMU), mask=mask[:, None])
        tl.store(YS + b * sys_b + rows_out * H + h, s, mask=mask)
    else:
        tl.store(y_ptrs, y.to(tl.bfloat16), mask=mask[:, None])


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
def _kvmem_compress_kernel(K, KS, V, VS, W, SC, SCS, Fl, H, sx_b, sx_s, sxs_b, sc_t, sc_b, sc_s, scs_t, scs_b,
                           FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr,
                           BT: tl.constexpr):
    """Kernel 1: scratch[K or V] <- C(slots 2..6).  Grid (H, cdiv(Fl, BT), 2B): the heads of one row
    block run side by side (they share the rows' DRAM pages and fp8 scale sectors)."""
    h, pid_t, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = z // 2
    if z % 2 == 0:
        _compress(K, KS, W, SC, SCS, b, h, pid_t * BT, Fl, 2 * Fl, 0, H, sx_b, sx_s, sxs_b, sc_b, sc_s, scs_b,
                  FP8, MEAN, EMU, D, BT)
    else:
        _compress(V, VS, W, SC + sc_t, SCS + scs_t, b, h, pid_t * BT, Fl, 2 * Fl, 0, H, sx_b, sx_s, sxs_b,
                  sc_b, sc_s, scs_b, FP8, MEAN, EMU, D, BT)


@triton.jit
def _move_one(X, XS, W, SC, SCS, pid, b, h, Fl, H, nb1, nb2, sx_b, sx_s, sxs_b, sc_b, sc_s, scs_b,
              FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    if pid < nb1:                      # slot 3 <- C(slots 7..11)
        _compress(X, XS, W, X, XS, b, h, pid * BT, Fl, 7 * Fl, 3 * Fl, H, sx_b, sx_s, sxs_b, sx_b, sx_s, sxs_b,
                  FP8, MEAN, EMU, D, BT)
    elif pid < nb1 + nb2:              # slots 4, 5 <- slots 12, 13
        _copy_rows(X, XS, X, XS, b, h, (pid - nb1) * BT, 2 * Fl, 12 * Fl, 4 * Fl, H, sx_b, sx_s, sxs_b,
                   sx_b, sx_s, sxs_b, FP8, D, BT)
    else:                              # slot 2 <- scratch
        _copy_rows(SC, SCS, X, XS, b, h, (pid - nb1 - nb2) * BT, Fl, 0, 2 * Fl, H, sc_b, sc_s, scs_b,
                   sx_b, sx_s, sxs_b, FP8, D, BT)


@triton.jit
def _kvmem_move_kernel(K, KS, V, VS, W, SC, SCS, Fl, H, nb1, nb2, sx_b, sx_s, sxs_b, sc_t, sc_b, sc_s, scs_t, scs_b,
                       FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Kernel 2: programs [0, nb1) compress into slot 3, [nb1, nb1 + nb2) copy slots 12, 13, the rest
    copy the scratch into slot 2.  Grid (H, nb1 + nb2 + cdiv(Fl, BT), 2B)."""
    h, pid, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = z // 2
    if z % 2 == 0:
        _move_one(K, KS, W, SC, SCS, pid, b, h, Fl, H, nb1, nb2, sx_b, sx_s, sxs_b, sc_b, sc_s, scs_b,
                  FP8, MEAN, EMU, D, BT)
    else:
        _move_one(V, VS, W, SC + sc_t, SCS + scs_t, pid, b, h, Fl, H, nb1, nb2, sx_b, sx_s, sxs_b, sc_b, sc_s,
                  scs_b, FP8, MEAN, EMU, D, BT)


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


def kv_memory_update(k, v, k_scale, v_scale, weight: Optional[torch.Tensor], tokens_per_frame: int,
                     bt: Optional[int] = None, num_warps: int = 4):
    """In-place ConvKV update of one layer cache (SPEC 4.2 step 3) for K and V, both with `weight`
    (memory_proj_k; None = mean memory), in two launches.  k, v [B, 14*Fl, H, D] bf16, or e4m3 with
    fp32 scales k_scale, v_scale [B, 14*Fl, H, 1] (None for a bf16 cache); k and v (and their
    scales) must have the same shape and strides."""
    fl = tokens_per_frame
    if k.shape[1] < 14 * fl:
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
    bt = bt if bt is not None else (32 if fp8 else 16)
    w = _check_weight(weight, h, d)
    w = k if w is None else w
    sc = torch.empty((2, b, fl, h, d), dtype=k.dtype, device=k.device)
    scs = torch.empty((2, b, fl, h), dtype=torch.float32, device=k.device) if fp8 else sc
    ks, vs = (k_scale, v_scale) if fp8 else (k, v)
    strides = (k.stride(0), k.stride(1), ks.stride(0) if fp8 else 0, sc.stride(0), sc.stride(1), sc.stride(2),
               scs.stride(0) if fp8 else 0, scs.stride(1) if fp8 else 0)
    flags = dict(FP8=fp8, MEAN=weight is None, EMU=INTERPRET, D=d, BT=bt, num_warps=num_warps)
    nb = triton.cdiv(fl, bt)
    _kvmem_compress_kernel[(h, nb, 2 * b)](k, ks, v, vs, w, sc, scs, fl, h, *strides, **flags)
    nb2 = triton.cdiv(2 * fl, bt)
    _kvmem_move_kernel[(h, 2 * nb + nb2, 2 * b)](k, ks, v, vs, w, sc, scs, fl, h, nb, nb2, *strides, **flags)
