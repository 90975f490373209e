"""ConvKV memory update (shared/SPEC.md 4.2 step 3, 4.4, 4.5; KERNELS.md 4).

Compressor C on a span of 5 slots: a depthwise Conv1d (kernel 5 = stride 5, no bias) along the
flattened token axis, channel c = h*128 + e:
    out[t, c] = sum_{j<5} w[c, j] * x[5t + j, c]      (w = memory_proj_k.weight [C, 1, 5]; mean memory: w = 1/5)
Update, for K and for V (both with memory_proj_k's weight, a published quirk):
    slot 2 <- C(slots 2..6);  slot 3 <- C(slots 7..11);  slots 4, 5 <- slots 12, 13.
In-place hazard: slot 2's output range lies inside C(slots 2..6)'s input, and slots 3..5 too.  Order used:
    1. C(slots 2..6)  -> scratch (Fl rows)           reads [2Fl, 7Fl)
    2. C(slots 7..11) -> slot 3 directly             reads [7Fl, 12Fl), writes [3Fl, 4Fl) (read in 1, done)
    3. slots 12, 13 -> slots 4, 5 (raw copy, values and fp8 scales)
    4. scratch -> slot 2
Kernel `_convkv_kernel`: one program per (BT output tokens, head, batch), tile [BT, 128]; the 5 source
rows of each output token are 5 strided [BT, 128] loads; fp32 accumulation, bf16 rounding of the
result like the bf16 conv.  Cache formats: bf16, or e4m3 + per-(token, head) fp32 scale (SPEC 4.6):
inputs dequantized as bf16(q) * bf16(s), outputs re-quantized (s = max(amax/448, 1e-12),
e4m3(bf16(x) / bf16(s))) -- the same values the reference's kv_read / kv_write produce.
Bytes per tensor (bf16): minimum read 10 Fl + write 4 Fl rows of H*D*2 B; this order moves
read 13 Fl + write 5 Fl = 18 Fl rows (the scratch round trip), so 14/18 of the traffic is the minimum.
Launch config: BT = 32 tokens, 4 warps (memory bound; no autotune).
Measured (H100, Fl = 1170, 40 x 128, K and V, eager): bf16 update 0.17-0.25 ms = 1.35-1.93 TB/s on
the minimum bytes (45-64 % of copy); FP8 update 0.36-0.47 ms, of which one compress kernel is only
0.026 ms (1.4 TB/s): the FP8 path is dominated by its 12 launches (4 Triton kernels + 8 small torch copies
for K and V) -- under a CUDA graph, or fused into one kernel with a slot ring, it would approach the bf16 time.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .attention import INTERPRET, to_bf16, to_e4m3


@triton.jit
def _convkv_kernel(X, XS, W, Y, YS, n_out, H, src0, dst0,
                   sx_b, sx_s, sxs_b, sy_b, sy_s, sys_b,
                   FP8: tl.constexpr, MEAN: tl.constexpr, EMU: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
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


def convkv_compress(x, x_scale, weight, out, out_scale, src_row0: int, dst_row0: int, n_out: int, bt: int = 32):
    """out rows [dst_row0, dst_row0 + n_out) <- C(x rows [src_row0, src_row0 + 5 n_out)).

    x, out: [B, N, H, D] bf16, or e4m3 with x_scale / out_scale [B, N, H, 1] fp32 (FP8 cache);
    weight [H*D, 1, 5] (memory_proj_k.weight) or None for the mean-memory variant.
    The source and destination ranges must not overlap (use a scratch output otherwise)."""
    b, n, h, d = x.shape
    if x.stride(-1) != 1 or x.stride(2) != d or out.stride(-1) != 1 or out.stride(2) != d:
        raise ValueError("convkv_compress: x and out must be [B, N, H, D] with heads and head_dim contiguous")
    same = x.data_ptr() == out.data_ptr()
    if same and dst_row0 < src_row0 + 5 * n_out and src_row0 < dst_row0 + n_out:
        raise ValueError("convkv_compress: output rows overlap the input rows (in-place hazard); "
                         "write to a scratch buffer")
    if src_row0 + 5 * n_out > n:
        raise ValueError(f"convkv_compress: source rows up to {src_row0 + 5 * n_out} exceed the {n} cache rows")
    fp8 = x_scale is not None
    if weight is not None:
        if weight.numel() != h * d * 5:
            raise ValueError(f"ConvKV weight must be [{h * d}, 1, 5], got {tuple(weight.shape)}")
        w = weight.contiguous()
    else:
        w = x
    xs = x_scale if fp8 else x
    ys = out_scale if fp8 else out
    _convkv_kernel[(triton.cdiv(n_out, bt), h, b)](
        x, xs, w, out, ys, n_out, h, src_row0, dst_row0,
        x.stride(0), x.stride(1), xs.stride(0) if fp8 else 0, out.stride(0), out.stride(1),
        ys.stride(0) if fp8 else 0,
        FP8=fp8, MEAN=weight is None, EMU=INTERPRET, D=d, BT=bt, num_warps=4)


def kv_memory_update(k, v, k_scale, v_scale, weight: Optional[torch.Tensor], tokens_per_frame: int):
    """In-place ConvKV update of one layer cache (SPEC 4.2 step 3) for K and V, both with `weight`
    (memory_proj_k; None = mean memory).  k, v [B, 14*Fl, H, D] bf16, or e4m3 with fp32 scales
    k_scale, v_scale [B, 14*Fl, H, 1] (None for a bf16 cache)."""
    fl = tokens_per_frame
    if k.shape[1] < 14 * fl:
        raise ValueError(f"kv_memory_update needs 14 slots of {fl} tokens, the cache has {k.shape[1]} rows")
    for x, xs in ((k, k_scale), (v, v_scale)):
        b, _, h, d = x.shape
        scratch = torch.empty((b, fl, h, d), dtype=x.dtype, device=x.device)
        scratch_s = torch.empty((b, fl, h, 1), dtype=torch.float32, device=x.device) if xs is not None else None
        convkv_compress(x, xs, weight, scratch, scratch_s, 2 * fl, 0, fl)          # 1. slot 2 -> scratch
        convkv_compress(x, xs, weight, x, xs, 7 * fl, 3 * fl, fl)                  # 2. slot 3 in place
        for t, sc in ((x, scratch), (xs, scratch_s)):
            if t is not None:
                t[:, 4 * fl:6 * fl].copy_(t[:, 12 * fl:14 * fl])                    # 3. slots 4, 5
                t[:, 2 * fl:3 * fl].copy_(sc)                                       # 4. slot 2
