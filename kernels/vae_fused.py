"""Fused channel RMS norm (+ SiLU) of the Wan2.1 VAE, written straight into the next causal conv's input.

Math (shared/SPEC-ENCODERS.md 1.2, RMS_norm then SiLU), per voxel row v of a channels-last tensor [V, C]:

    x'[v, c] = x[v, c] + b[c]   (optional: the bias of the conv that produced x, which then runs without it)
    y[v, c]  = act( x'[v, c] / max(||x'[v, :]||_2, 1e-12) * sqrt(C) * gamma[c] ),   act = SiLU or identity

accumulated in fp32, rounded once to the output dtype. (PyTorch's cuDNN conv path adds a conv bias in a separate
broadcast pass over the whole output; folding it here and in `bias_residual_` removes that pass.)

Second kernel of the family, `bias_residual_`: h <- h + b[c] + r (a residual block's last conv without its bias,
plus the bias, plus the shortcut) in one pass: 3 bf16 tensors touched, 2 FLOPs per element; BLOCK = 4096 flat
elements, num_warps = 8.

Destination mapping (what makes it a fusion and not just a norm). Row v belongs to frame f = v // HW, pixel
p = v % HW. For k = 0 .. NTAPS-1 the row is stored to frame t = f + SHIFT - k, channel slot k, of an output laid
out as [T_dst, HW, NTAPS * C] (rows written only where 0 <= t < T_dst):
  - NTAPS=1, SHIFT=2, T_dst=T+2: the channels-last input buffer [2 cache frames ; T new frames] of a causal 3x3x3
    Conv3d (the two cache frames are copied in by the caller), so no torch.cat / pad pass is needed;
  - NTAPS=3, SHIFT=2, T_dst=T: the "temporal taps folded into channels" input [T, H, W, 3C] of an equivalent
    Conv2d (stacked frame t = [s[t], s[t+1], s[t+2]] of the cache-prefixed sequence s);
  - NTAPS=1, SHIFT=0, HW=V: a plain row norm (the attention block's norm, act = identity).

Cost: FLOPs about 8*V*C (memory bound); bytes (bf16) = 2*V*C read + 2*NTAPS*V*C written (+ 4*C for gamma).
Configuration (fixed, no autotune): BLOCK_C = next_pow2(C) (masked), BLOCK_V = max(1, 8192 // BLOCK_C) rows per
program (C=96: 64, C=192: 32, C=384: 16), num_warps = 8 when BLOCK_V*BLOCK_C >= 8192 else 4. Offsets are int64
(the stacked buffer at 720x416x32 frames has 2.8e9 elements).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_act_kernel(x_ptr, b_ptr, g_ptr, out_ptr, V, HW, C, T_dst, scale,
                    NTAPS: tl.constexpr, SHIFT: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < V
    cmask = cols < C
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    if HAS_BIAS:  # the previous conv's bias, left out of the conv (PyTorch adds it in an extra pass)
        x = x + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        x = tl.where(rmask[:, None] & cmask[None, :], x, 0.0)
    inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = x * inv[:, None] * g[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    y = y.to(out_ptr.dtype.element_ty)
    f = rows64 // HW
    p = rows64 - f * HW
    for k in tl.static_range(NTAPS):
        t = f + (SHIFT - k)
        ok = rmask & (t >= 0) & (t < T_dst)
        dst = (t * HW + p) * (NTAPS * C) + k * C
        tl.store(out_ptr + dst[:, None] + cols[None, :], y, mask=ok[:, None] & cmask[None, :])


@triton.jit
def _bias_residual_kernel(h_ptr, b_ptr, r_ptr, N, C, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs % C, mask=m, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (h + b + r).to(h_ptr.dtype.element_ty), mask=m)


def bias_residual_(h: torch.Tensor, bias: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """h <- h + bias[c] + r in place (rows [..., C] contiguous, fp32 math, one rounding): a residual block's last
    conv output (conv run without its bias) plus the bias plus the shortcut, in one pass instead of two."""
    c = h.shape[-1]
    if not (h.is_contiguous() and r.is_contiguous() and r.shape == h.shape and bias.numel() == c):
        raise ValueError(f"bias_residual_: need contiguous h, r of one shape [..., C] and bias [C], got "
                         f"{tuple(h.shape)}, {tuple(r.shape)}, {tuple(bias.shape)}")
    n = h.numel()
    block = 4096
    _bias_residual_kernel[(triton.cdiv(n, block),)](h, bias.contiguous(), r, n, c, BLOCK=block, num_warps=8)
    return h


def bias_residual_reference(h, bias, r):
    return (h.float() + bias.float().reshape(-1) + r.float()).to(h.dtype)


def _config(c: int):
    block_c = triton.next_power_of_2(c)
    block_v = max(1, 8192 // block_c)
    return block_v, block_c, (8 if block_v * block_c >= 8192 else 4)


def rms_act_rows(x: torch.Tensor, gamma: torch.Tensor, out: torch.Tensor | None = None, *, silu: bool = True,
                 hw: int | None = None, ntaps: int = 1, shift: int = 0, t_dst: int | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Channel RMS norm (+SiLU) of the rows of `x` ([..., C], rows contiguous) into `out` (see module docstring).

    out: any contiguous tensor with T_dst*HW*NTAPS*C elements (allocated as x.shape when None, plain mapping).
    Rows of `out` that the mapping does not reach are left untouched (the caller fills the cache frames)."""
    c = x.shape[-1]
    if not x.is_contiguous():
        raise ValueError("rms_act_rows: x must be row-contiguous [..., C] (use a channels-last layout)")
    if gamma.numel() != c:
        raise ValueError(f"rms_act_rows: gamma has {gamma.numel()} elements, expected C={c}")
    v = x.numel() // c
    if hw is None:
        hw, shift, ntaps, t_dst = v, 0, 1, 1
    if t_dst is None:
        t_dst = v // hw + shift
    if out is None:
        out = torch.empty_like(x)
    if not out.is_contiguous() or out.numel() != t_dst * hw * ntaps * c:
        raise ValueError(f"rms_act_rows: out must be contiguous with {t_dst}*{hw}*{ntaps}*{c} elements, "
                         f"got {tuple(out.shape)}")
    block_v, block_c, warps = _config(c)
    grid = (triton.cdiv(v, block_v),)
    if bias is not None and bias.numel() != c:
        raise ValueError(f"rms_act_rows: bias has {bias.numel()} elements, expected C={c}")
    g = gamma.reshape(-1).contiguous()
    _rms_act_kernel[grid](x, g if bias is None else bias.contiguous(), g, out, v, hw, c, t_dst, math.sqrt(c),
                          NTAPS=ntaps, SHIFT=shift, SILU=silu, HAS_BIAS=bias is not None, BLOCK_V=block_v,
                          BLOCK_C=block_c, num_warps=warps)
    return out


def rms_act_reference(x: torch.Tensor, gamma: torch.Tensor, silu: bool = True, bias=None) -> torch.Tensor:
    """PyTorch reference of the row math in fp32: act(x / max(||x||, 1e-12) * sqrt(C) * gamma), x += bias first."""
    xf = x.float() if bias is None else x.float() + bias.float().reshape(-1)
    c = x.shape[-1]
    y = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(c) * gamma.reshape(-1).float()
    return torch.nn.functional.silu(y) if silu else y
