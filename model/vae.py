"""Wan2.1 VAE (`Wan2.1_VAE.pth`), checkpoint-compatible, with a streaming decoder (shared/SPEC-ENCODERS.md 1).

Two implementations of the same network share one set of parameters (named exactly as the published state dict,
194 tensors at dim=96):

* the *reference* path (`WanVAE.encode/decode(..., reference=True)`): the published chunked recurrence, one latent
  frame per decoder call (encoder: chunks of 1, 4, 4, ... frames) with the causal feature-cache list, cleared at the
  start of every call. It is the "plain PyTorch decode of the published structure" used as the baseline.
* the *batched* path (default): every frame of a call at once (large GEMM M), using the exact whole-sequence
  equivalents of SPEC-ENCODERS 1.6/1.7, with an explicit causal state that can be carried from call to call:
  for each cached 3x3x3 conv the last 2 input frames of its level (zeros before the first frame), for each
  upsample3d time_conv the last 2 inputs after latent 0 plus the "latent 0 seen" flag, for each downsample3d the
  last frame. On CUDA it runs channels-last in bf16 with the fused RMS-norm+SiLU Triton kernel
  (kernels/vae_fused.py) writing straight into the next conv's input buffer, and the nearest-2x + 3x3 up-convs as
  four 2x2 convs (sub-pixel form, 2.25x fewer FLOPs, exact in real arithmetic).

`StreamingDecoder(vae, mode="carry")` decodes chunk after chunk with the carried state (first chunk of T latents ->
1+4(T-1) frames, each later chunk of F latents -> 4F frames), equal to one decode of all latents concatenated.
`mode="overlap"` reproduces the published runtime (SPEC.md 5.8): chunk n >= 1 re-decodes [last 3 latents of the
previous chunk ; new latents] from a cleared cache and drops the first 1 + 4*2 = 9 frames.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, key_mismatch_lines

CACHE_T = 2
Z_DIM = 16
DIM_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
TEMPORAL_DOWNSAMPLE = (False, True, True)
VAE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
VAE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
CL3 = torch.channels_last_3d
CL2 = torch.channels_last


class VAECheckpointError(CheckpointError, ValueError):
    """A VAE checkpoint that cannot be loaded; the message names the file, the keys and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# building blocks (parameter names = the published state dict)

class CausalConv3d(nn.Conv3d):
    """Conv3d with 2*pt zero frames in front of time (none behind) and symmetric spatial zero padding."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self._padding = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x, cache_x=None):
        pad = list(self._padding)
        if cache_x is not None and self._padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pad[4] -= cache_x.shape[2]
        return super().forward(F.pad(x, pad))


class RMS_norm(nn.Module):  # noqa: N801  (published class name)
    """Channel RMS norm: x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma (no bias, no eps in the root)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest x2 in H and W (nearest-exact == nearest for factor 2). Like the published module it interpolates in
    fp32 and casts back (exact for nearest; kept so the reference path costs what the published one does)."""

    def forward(self, x):
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)


def _ref_cached_conv(conv: CausalConv3d, x, feat_cache, feat_idx):
    """The published cache rule of a 3x3x3 conv: keep its last 2 input frames (pad a 1-frame call with the
    previous cache's last frame)."""
    idx = feat_idx[0]
    cache_x = x[:, :, -CACHE_T:].clone()
    if cache_x.shape[2] < 2 and feat_cache[idx] is not None:
        cache_x = torch.cat([feat_cache[idx][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    x = conv(x, feat_cache[idx])
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, feat_cache=None, feat_idx=None):
        h = self.shortcut(x)
        for layer in self.residual:
            if isinstance(layer, CausalConv3d) and feat_cache is not None:
                x = _ref_cached_conv(layer, x, feat_cache, feat_idx)
            else:
                x = layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head per-frame spatial self-attention (no temporal mixing, no cache)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, feat_cache=None, feat_idx=None):
        identity = x
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.norm(x)
        qkv = self.to_qkv(x).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        x = x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + identity


class Resample(nn.Module):
    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        else:
            raise ValueError(f"Resample: unknown mode {mode!r}")

    def forward(self, x, feat_cache=None, feat_idx=None):
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and feat_cache is not None:
            idx = feat_idx[0]
            if feat_cache[idx] is None:
                feat_cache[idx] = "Rep"  # first latent: no temporal upsampling, no history
            else:
                rep = isinstance(feat_cache[idx], str)
                cache_x = x[:, :, -CACHE_T:].clone()
                if cache_x.shape[2] < 2:
                    prev = torch.zeros_like(cache_x) if rep else feat_cache[idx][:, :, -1:]
                    cache_x = torch.cat([prev, cache_x], dim=2)
                x = self.time_conv(x) if rep else self.time_conv(x, feat_cache[idx])
                feat_cache[idx] = cache_x
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
            feat_idx[0] += 1
        t = x.shape[2]
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.resample(x)
        x = x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d" and feat_cache is not None:
            idx = feat_idx[0]
            if feat_cache[idx] is None:
                feat_cache[idx] = x.clone()
            else:
                cache_x = x[:, :, -1:].clone()
                x = self.time_conv(torch.cat([feat_cache[idx][:, :, -1:], x], dim=2))
                feat_cache[idx] = cache_x
            feat_idx[0] += 1
        return x


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult=DIM_MULT, num_res_blocks=NUM_RES_BLOCKS,
                 temperal_downsample=TEMPORAL_DOWNSAMPLE):
        super().__init__()
        dims = [dim * u for u in (1,) + tuple(dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                layers.append(Resample(cout, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(RMS_norm(c, images=False), nn.SiLU(), CausalConv3d(c, z_dim, 3, padding=1))

    def forward(self, x, feat_cache, feat_idx):
        x = _ref_cached_conv(self.conv1, x, feat_cache, feat_idx)
        for layer in self.downsamples:
            x = layer(x, feat_cache, feat_idx)
        for layer in self.middle:
            x = layer(x, feat_cache, feat_idx)
        x = self.head[1](self.head[0](x))
        return _ref_cached_conv(self.head[2], x, feat_cache, feat_idx)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult=DIM_MULT, num_res_blocks=NUM_RES_BLOCKS,
                 temperal_upsample=TEMPORAL_DOWNSAMPLE[::-1]):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1],) + tuple(dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        layers = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):
                cin = cin // 2
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                layers.append(Resample(cout, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x, feat_cache, feat_idx):
        x = _ref_cached_conv(self.conv1, x, feat_cache, feat_idx)
        for layer in self.middle:
            x = layer(x, feat_cache, feat_idx)
        for layer in self.upsamples:
            x = layer(x, feat_cache, feat_idx)
        x = self.head[1](self.head[0](x))
        return _ref_cached_conv(self.head[2], x, feat_cache, feat_idx)


def _count_cached(module: nn.Module) -> int:
    n = 0
    for m in module.modules():
        if isinstance(m, CausalConv3d) and m.kernel_size != (1, 1, 1):
            n += 1
    return n


class WanVAEModel(nn.Module):
    """The published module tree: encoder, conv1 (32->32), conv2 (16->16), decoder."""

    def __init__(self, dim: int = 96, z_dim: int = Z_DIM):
        super().__init__()
        self.dim, self.z_dim = dim, z_dim
        self.encoder = Encoder3d(dim, z_dim * 2)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim)

    # ---- the published chunked recurrence (reference) ----
    def ref_encode(self, x, mean, inv_std):
        cache = [None] * _count_cached(self.encoder)
        t = x.shape[2]
        outs = []
        for i in range(1 + (t - 1) // 4):
            chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1):1 + 4 * i]
            outs.append(self.encoder(chunk, cache, [0]))
        mu = self.conv1(torch.cat(outs, 2)).chunk(2, dim=1)[0]
        return (mu - mean.view(1, -1, 1, 1, 1)) * inv_std.view(1, -1, 1, 1, 1)

    def ref_decode(self, z, mean, inv_std):
        cache = [None] * _count_cached(self.decoder)
        z = z / inv_std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
        x = self.conv2(z)
        outs = [self.decoder(x[:, :, i:i + 1], cache, [0]) for i in range(x.shape[2])]
        return torch.cat(outs, 2)


# ---------------------------------------------------------------------------------------------------------------
# batched path with an explicit, carryable causal state

def _subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """[Co, Ci, 3, 3] conv after nearest-2x  ->  [4*Co, Ci, 2, 2] convs on the low-res input, group g = 2a + b for
    output parity (a, b). Parity 0 sees low-res taps (i-1, i) with weights (W0, W1+W2); parity 1 sees (i, i+1)
    with (W0+W1, W2); the same along columns."""
    r = torch.tensor([[[1., 0., 0.], [0., 1., 1.]], [[1., 1., 0.], [0., 0., 1.]]], device=w.device)
    out = torch.einsum("aph,oihw,bqw->aboipq", r, w.float(), r)
    return out.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(w.dtype)


def _to4d(x):  # [1, C, T, H, W] -> [T, C, H, W]  (a view for channels-last-3d)
    return x[0].transpose(0, 1)


def _to5d(y):  # [T, C, H, W] -> [1, C, T, H, W]  (a view)
    return y.transpose(0, 1).unsqueeze(0)


def _to5d_rows(r):  # [1, T, H, W, C] rows -> [1, C, T, H, W] channels-last-3d (a view)
    return r.permute(0, 4, 1, 2, 3)


class BatchedVAE:
    """Whole-call (all frames at once) encoder/decoder with explicit causal state (see the module docstring).

    fused: channels-last layout + the Triton RMS-norm/SiLU kernel (default: on CUDA). conv_mode: "conv3d" (cuDNN
    Conv3d over the [cache ; new] buffer), "stack2d" (temporal taps folded into channels, one Conv2d) or "hybrid"
    (stack2d for convs whose input has at most `dim` channels, i.e. the full-resolution stage, conv3d elsewhere).
    subpixel: up-convs as four 2x2 convs (default: with fused)."""

    def __init__(self, model: WanVAEModel, fused: Optional[bool] = None, conv_mode: str = "conv3d",
                 subpixel: Optional[bool] = None):
        if conv_mode not in ("conv3d", "stack2d", "hybrid"):
            raise ValueError(f"conv_mode must be 'conv3d', 'stack2d' or 'hybrid', got {conv_mode!r}")
        self.model = model
        p = next(model.parameters())
        self.fused = (p.device.type == "cuda") if fused is None else bool(fused)
        self.subpixel = self.fused if subpixel is None else bool(subpixel)
        self.conv_mode = conv_mode
        self._prep = {}
        if self.fused:
            from ..kernels.vae_fused import bias_residual_, rms_act_rows
            self._rms_act_rows, self._bias_residual_ = rms_act_rows, bias_residual_

    # ---- prepared weights (derived once from the module parameters) ----
    def _w(self, mod, kind):
        key = (id(mod), kind)
        if key not in self._prep:
            w = mod.weight.detach()
            if kind == "conv3d":
                v = w.contiguous(memory_format=CL3) if self.fused else w
            elif kind == "stack2d":  # [Co, Ci, 3, 3, 3] -> [Co, 3*Ci, 3, 3], slot k = temporal tap k
                v = w.permute(0, 2, 1, 3, 4).reshape(w.shape[0], 3 * w.shape[1], 3, 3).contiguous(memory_format=CL2)
            elif kind == "subpixel":
                v = (_subpixel_weight(w).contiguous(memory_format=CL2 if self.fused else torch.contiguous_format),
                     mod.bias.detach().repeat(4))
            elif kind == "conv2d":
                v = w.contiguous(memory_format=CL2) if self.fused else w
            elif kind == "linear":
                v = w.reshape(w.shape[0], w.shape[1]).contiguous()
            else:
                raise KeyError(kind)
            self._prep[key] = v
        return self._prep[key]

    def _fmt(self, x):
        return x.contiguous(memory_format=CL3) if self.fused else x.contiguous()

    def _zeros(self, like, c, frames=2):
        _, _, _, h, w = like.shape
        z = torch.zeros((1, c, frames, h, w), dtype=like.dtype, device=like.device)
        return self._fmt(z)

    # ---- causal convs ----
    def conv_cached(self, st, conv, s_new):
        """3x3x3 causal conv over [cache ; s_new] (no norm before it); updates the cache."""
        prev = st.get(conv)
        if prev is None:
            prev = self._zeros(s_new, s_new.shape[1])
        s = torch.cat([prev, self._fmt(s_new)], 2)
        st[conv] = s[:, :, -CACHE_T:].clone()
        return F.conv3d(s, self._w(conv, "conv3d"), conv.bias, padding=(0, 1, 1))

    def norm_act_conv(self, st, x, norm, conv, in_bias=None, out_bias=True):
        """conv(silu(rms_norm(x + in_bias))) with the conv's causal cache carried in `st`; out_bias=False leaves the
        conv's bias out (the caller folds it into the next fused pass). in_bias/out_bias only on the fused path."""
        if not self.fused:
            a = F.silu(norm(x))
            return self.conv_cached(st, conv, a)
        cbias = conv.bias if out_bias else None
        x = self._fmt(x)
        _, c, t, h, w = x.shape
        prev = st.get(conv)
        if prev is None:
            prev = self._zeros(x, c)
        rows = x.permute(0, 2, 3, 4, 1)  # [1, T, H, W, C] contiguous view
        mode = self.conv_mode
        if mode == "hybrid":
            mode = "stack2d" if c <= self.model.dim else "conv3d"
        if mode == "conv3d":
            buf = torch.empty((1, c, t + 2, h, w), dtype=x.dtype, device=x.device, memory_format=CL3)
            buf[:, :, :2] = prev
            self._rms_act_rows(rows, norm.gamma, buf.permute(0, 2, 3, 4, 1), silu=True, hw=h * w, ntaps=1,
                               shift=2, t_dst=t + 2, bias=in_bias)
            st[conv] = buf[:, :, -CACHE_T:].clone(memory_format=CL3)
            return F.conv3d(buf, self._w(conv, "conv3d"), cbias, padding=(0, 1, 1))
        # stack2d: stacked frame j = [s[j], s[j+1], s[j+2]] of s = [prev0, prev1, x0, x1, ...]
        buf = torch.empty((t, 3 * c, h, w), dtype=x.dtype, device=x.device, memory_format=CL2)
        phys = buf.permute(0, 2, 3, 1).view(t, h, w, 3, c)
        self._rms_act_rows(rows, norm.gamma, phys, silu=True, hw=h * w, ntaps=3, shift=2, t_dst=t, bias=in_bias)
        pv = prev[0].permute(1, 2, 3, 0)  # [2, H, W, C]
        phys[0, :, :, 0] = pv[0]
        phys[0, :, :, 1] = pv[1]
        if t >= 2:
            phys[1, :, :, 0] = pv[1]
        last = [phys[t + j - 2, :, :, 2] if t + j >= 2 else pv[t + j] for j in range(2)]
        st[conv] = torch.stack(last, 0).permute(3, 0, 1, 2).unsqueeze(0).contiguous(memory_format=CL3)
        return _to5d(F.conv2d(buf, self._w(conv, "stack2d"), cbias, padding=1))

    def pointwise(self, conv, x):
        return F.conv3d(x, self._w(conv, "conv3d"), conv.bias)

    # ---- blocks ----
    def res_block(self, st, blk: ResidualBlock, x):
        r = blk.residual
        sc = self.pointwise(blk.shortcut, x) if isinstance(blk.shortcut, CausalConv3d) else x
        if not self.fused:
            h = self.norm_act_conv(st, x, r[0], r[2])
            return self.norm_act_conv(st, h, r[3], r[6]).add_(sc)
        # conv biases folded: residual.2's into the next norm, residual.6's into the residual add
        h = self.norm_act_conv(st, x, r[0], r[2], out_bias=False)
        h = self.norm_act_conv(st, h, r[3], r[6], in_bias=r[2].bias, out_bias=False)
        h, sc = self._fmt(h), self._fmt(sc)
        return _to5d_rows(self._bias_residual_(h.permute(0, 2, 3, 4, 1), r[6].bias, sc.permute(0, 2, 3, 4, 1)))

    def attn_block(self, blk: AttentionBlock, x):
        x = self._fmt(x)
        _, c, t, h, w = x.shape
        rows = x.permute(0, 2, 3, 4, 1).reshape(t, h * w, c)
        if self.fused:
            n = self._rms_act_rows(rows.contiguous(), blk.norm.gamma, silu=False)
        else:
            n = F.normalize(rows, dim=-1) * blk.norm.scale * blk.norm.gamma.reshape(-1)
        qkv = F.linear(n, self._w(blk.to_qkv, "linear"), blk.to_qkv.bias)
        q, k, v = (u.unsqueeze(1) for u in qkv.split(c, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        o = F.linear(o, self._w(blk.proj, "linear"), blk.proj.bias)
        o = o.reshape(1, t, h, w, c).permute(0, 4, 1, 2, 3)
        return self._fmt(o).add_(x)

    def up_conv(self, r: Resample, x):
        """nearest-2x + 3x3 conv on every frame: [1, C, T, h, w] -> [1, C/2, T, 2h, 2w]."""
        conv = r.resample[1]
        x4 = _to4d(self._fmt(x))
        if not self.subpixel:
            y = F.conv2d(F.interpolate(x4, scale_factor=2.0, mode="nearest"), self._w(conv, "conv2d"), conv.bias,
                         padding=1)
            return self._fmt(_to5d(y))
        w4, b4 = self._w(conv, "subpixel")
        co = conv.out_channels
        if self.fused:  # conv without bias, then interleave into channels-last [T, h, 2, w, 2, Co] + bias
            o = F.conv2d(x4, w4, None, padding=1)  # [T, 4Co, h+1, w+1]
            t, _, hp, wp = o.shape
            h, w = hp - 1, wp - 1
            oo = o.permute(0, 2, 3, 1)
            res = torch.empty((t, h, 2, w, 2, co), dtype=o.dtype, device=o.device)
            for a in (0, 1):
                for b in (0, 1):
                    g = 2 * a + b
                    torch.add(oo[:, a:a + h, b:b + w, g * co:(g + 1) * co], conv.bias, out=res[:, :, a, :, b, :])
            return res.view(1, t, 2 * h, 2 * w, co).permute(0, 4, 1, 2, 3)
        o = F.conv2d(x4, w4, b4, padding=1)  # [T, 4Co, h+1, w+1]
        t, _, hp, wp = o.shape
        h, w = hp - 1, wp - 1
        res = torch.empty((t, co, h, 2, w, 2), dtype=o.dtype, device=o.device)
        for a in (0, 1):
            for b in (0, 1):
                g = 2 * a + b
                res[:, :, :, a, :, b] = o[:, g * co:(g + 1) * co, a:a + h, b:b + w]
        return _to5d(res.view(t, co, 2 * h, 2 * w)).contiguous()

    def upsample3d_time(self, st, r: Resample, x):
        """Causal time_conv C -> 2C over the frames after latent 0 (zero history), sub-frames interleaved."""
        _, c, t, h, w = x.shape
        cache = st.get(r)
        if cache is None:  # this call holds latent 0: it bypasses the temporal upsampler
            x0, rest, cache = x[:, :, :1], x[:, :, 1:], self._zeros(x, c)
        else:
            x0, rest = None, x
        st[r] = cache
        if rest.shape[2] == 0:
            return self._fmt(x0)
        s = torch.cat([cache, self._fmt(rest)], 2)
        st[r] = s[:, :, -CACHE_T:].clone()
        y = F.conv3d(s, self._w(r.time_conv, "conv3d"), r.time_conv.bias)  # [1, 2C, T', h, w]
        tt = y.shape[2]
        if self.fused:  # physical [T', h, w, 2, C] -> [T', 2, h, w, C]
            yy = y.permute(0, 2, 3, 4, 1).reshape(1, tt, h, w, 2, c).permute(0, 1, 4, 2, 3, 5)
            inter = yy.reshape(1, 2 * tt, h, w, c).permute(0, 4, 1, 2, 3)
        else:
            yy = y.reshape(1, 2, c, tt, h, w)
            inter = torch.stack((yy[:, 0], yy[:, 1]), 3).reshape(1, c, 2 * tt, h, w)
        return self._fmt(torch.cat([x0, inter], 2) if x0 is not None else inter)

    def resample(self, st, r: Resample, x):
        if r.mode == "upsample3d":
            return self.up_conv(r, self.upsample3d_time(st, r, x))
        if r.mode == "upsample2d":
            return self.up_conv(r, x)
        conv = r.resample[1]
        y = _to4d(self._fmt(x))
        y = _to5d(F.conv2d(F.pad(y, (0, 1, 0, 1)), self._w(conv, "conv2d"), conv.bias, stride=2))
        y = self._fmt(y)
        if r.mode == "downsample2d":
            return y
        prev = st.get(r)
        tc, tw = r.time_conv, self._w(r.time_conv, "conv3d")
        if prev is None:  # first call: frame 0 passes through, then a valid stride-2 conv over all frames
            out = y[:, :, :1]
            if y.shape[2] > 1:
                out = torch.cat([out, F.conv3d(y, tw, tc.bias, stride=(2, 1, 1))], 2)
        else:
            out = F.conv3d(torch.cat([prev, y], 2), tw, tc.bias, stride=(2, 1, 1))
        st[r] = y[:, :, -1:].clone()
        return self._fmt(out)

    def _layer(self, st, layer, x):
        if isinstance(layer, ResidualBlock):
            return self.res_block(st, layer, x)
        if isinstance(layer, AttentionBlock):
            return self.attn_block(layer, x)
        return self.resample(st, layer, x)

    # ---- networks ----
    def decode_latents(self, st: dict, x):
        """Decoder3d over x = conv2(denormalised latents) [1, 16, T, h, w], carrying `st`."""
        d = self.model.decoder
        x = self.conv_cached(st, d.conv1, x)
        for layer in list(d.middle) + list(d.upsamples):
            x = self._layer(st, layer, x)
        return self.norm_act_conv(st, x, d.head[0], d.head[2])

    def encode_frames(self, st: dict, x):
        """Encoder3d over pixel frames x [1, 3, T, H, W] (first call: 1+4k frames, later calls: 4k), carrying `st`."""
        e = self.model.encoder
        x = self.conv_cached(st, e.conv1, x)
        for layer in list(e.downsamples) + list(e.middle):
            x = self._layer(st, layer, x)
        return self.norm_act_conv(st, x, e.head[0], e.head[2])


# ---------------------------------------------------------------------------------------------------------------
# checkpoint I/O

def build_model(dim: int = 96, device="cpu", dtype=torch.float32) -> WanVAEModel:
    with torch.device("meta"):
        m = WanVAEModel(dim)
    m.to(dtype)
    if str(device) != "meta":
        m.to_empty(device=device)
    return m.eval().requires_grad_(False)


def expected_shapes(dim: int = 96) -> dict:
    return {k: tuple(v.shape) for k, v in build_model(dim, "meta").state_dict().items()}


def random_vae_state_dict(dim: int = 96, seed: int = 0, dtype=torch.float32, device="cpu") -> dict:
    """Deterministic random weights in the published key layout: conv weights ~ U(+-1/sqrt(fan_in)) (PyTorch's
    default bound), biases ~ 0.02 N(0,1), RMS gammas ~ 1 + 0.1 N(0,1)."""
    out = {}
    gen = torch.Generator(device=device)
    for i, (name, shape) in enumerate(expected_shapes(dim).items()):
        gen.manual_seed(seed * 1000003 + i)
        if name.endswith("gamma"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=gen, device=device)
        else:
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
            t = (torch.rand(shape, generator=gen, device=device) * 2 - 1) * bound
        out[name] = t.to(dtype)
    return out


def write_random_vae(path, dim: int = 96, seed: int = 0, dtype=torch.float32) -> Path:
    """Write a random VAE checkpoint (a plain state dict, torch.save) in the published key layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_vae_state_dict(dim, seed, dtype), str(path))
    return path


_FIX = ("Fix: pass the Wan2.1 VAE checkpoint `Wan2.1_VAE.pth` of the Wan2.1-I2V-14B release (194 tensors: "
        "encoder.*, decoder.*, conv1.*, conv2.*), or write a random one with "
        "liveact.model.vae.write_random_vae(path, dim=96).")


def _load_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise VAECheckpointError(f"{path}: no such file. {_FIX}")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors come in many types
        raise VAECheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e}). "
                                 f"The file is corrupt or not a .pth state dict. {_FIX}") from None
    if isinstance(sd, dict) and len(sd) == 1 and isinstance(next(iter(sd.values())), dict):
        sd = next(iter(sd.values()))  # {"state_dict": {...}} wrappers
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VAECheckpointError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}. {_FIX}")
    return sd


def check_vae_keys(sd: dict, dim: int, where: str) -> None:
    """Raise one VAECheckpointError listing every missing / unexpected key and shape mismatch."""
    want = expected_shapes(dim)
    lines = key_mismatch_lines(want, {k: v.shape for k, v in sd.items()})
    if lines:
        raise VAECheckpointError("\n".join([f"{where}: the weights do not match the Wan2.1 VAE (dim={dim}, "
                                             f"{len(want)} tensors expected, {len(sd)} in the file):", *lines,
                                             "  " + _FIX + " Nothing was loaded."]))


# ---------------------------------------------------------------------------------------------------------------
# public API

class WanVAE:
    """The Wan2.1 VAE as LiveAct runs it: weights and activations in `dtype` (bf16), latent mean / (1/std) in
    `dtype`, encode -> normalised latents [16, T_lat, H/8, W/8], decode -> [1, 3, T, 8h, 8w] clamped to [-1, 1].
    On CUDA it turns on cudnn.benchmark (as the reference runtime does)."""

    def __init__(self, model: WanVAEModel, fused: Optional[bool] = None, conv_mode: str = "conv3d",
                 subpixel: Optional[bool] = None):
        p = next(model.parameters())
        self.model = model.eval().requires_grad_(False)
        self.device, self.dtype = p.device, p.dtype
        self.mean = torch.tensor(VAE_MEAN, dtype=self.dtype, device=self.device)
        self.inv_std = 1.0 / torch.tensor(VAE_STD, dtype=self.dtype, device=self.device)
        self.batched = BatchedVAE(model, fused=fused, conv_mode=conv_mode, subpixel=subpixel)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def dim(self) -> int:
        return self.model.dim

    @classmethod
    def load(cls, path, device="cuda", dtype=torch.bfloat16, dim: Optional[int] = None, **kw) -> "WanVAE":
        """Strictly load `Wan2.1_VAE.pth` (or a random file of the same layout); dim=None reads it from the file."""
        path = Path(path)
        sd = _load_state_dict(path)
        g = sd.get("decoder.head.0.gamma")
        file_dim = int(g.shape[0]) if g is not None and g.dim() == 4 else None
        if dim is None:
            dim = file_dim if file_dim is not None else 96
        elif file_dim is not None and dim != file_dim:
            raise VAECheckpointError(f"{path}: the file holds a VAE of base width dim={file_dim} (decoder.head.0.gamma "
                                     f"{tuple(g.shape)}), but dim={dim} was asked for. Fix: pass dim=None (read it "
                                     f"from the file) or dim={file_dim}; nothing was loaded.")
        check_vae_keys(sd, dim, str(path))
        model = build_model(dim, "meta", dtype)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        return cls(model.eval().requires_grad_(False), **kw)

    @classmethod
    def random(cls, dim: int = 96, seed: int = 0, device="cpu", dtype=torch.float32, **kw) -> "WanVAE":
        model = build_model(dim, "meta", dtype)
        sd = random_vae_state_dict(dim, seed, torch.float32, device)
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
        return cls(model.eval().requires_grad_(False), **kw)

    # ---- input checks ----
    def _latents(self, z) -> torch.Tensor:
        if z.dim() == 4:
            z = z.unsqueeze(0)
        if z.dim() != 5 or z.shape[0] != 1 or z.shape[1] != self.model.z_dim or z.shape[2] < 1:
            raise ValueError(f"VAE decode: expected latents [16, T, h, w] (or [1, 16, T, h, w]) with T >= 1, "
                             f"got {tuple(z.shape)}")
        return z.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def denormalize(self, z):
        """Normalised latents [1, 16, T, h, w] -> conv2 input of the decoder (z / (1/std) + mean, then conv2)."""
        z = z / self.inv_std.view(1, -1, 1, 1, 1) + self.mean.view(1, -1, 1, 1, 1)
        return F.conv3d(z, self.model.conv2.weight, self.model.conv2.bias)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, reference: bool = False, frames_per_call: Optional[int] = None):
        """video [1, 3, T, H, W] (or [3, T, H, W]) in [-1, 1], T = 1 + 4k, H and W multiples of 8
        -> normalised latents [16, 1 + k, H/8, W/8]. frames_per_call (a multiple of 4) bounds memory."""
        if video.dim() == 4:
            video = video.unsqueeze(0)
        if video.dim() != 5 or video.shape[:2] != (1, 3):
            raise ValueError(f"VAE encode: expected video [1, 3, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % 4 or h % 8 or w % 8:
            raise ValueError(f"VAE encode: need T = 1 + 4k frames and H, W multiples of 8, got T={t}, H={h}, W={w}; "
                             "pad or trim the clip (the reference silently drops trailing frames)")
        x = video.to(device=self.device, dtype=self.dtype)
        if reference:
            mu = self.model.ref_encode(x, self.mean, self.inv_std)
            return mu[0]
        step = t if frames_per_call is None else int(frames_per_call)
        if step % 4 and step < t:
            raise ValueError(f"VAE encode: frames_per_call must be a multiple of 4, got {frames_per_call}")
        st, outs, start = {}, [], 0
        while start < t:
            n = min(t - start, step + 1 if start == 0 else step)
            outs.append(self.batched.encode_frames(st, x[:, :, start:start + n]))
            start += n
        mu = F.conv3d(torch.cat(outs, 2), self.model.conv1.weight, self.model.conv1.bias)[:, :self.model.z_dim]
        mu = (mu - self.mean.view(1, -1, 1, 1, 1)) * self.inv_std.view(1, -1, 1, 1, 1)
        return mu[0].contiguous()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, reference: bool = False, clamp: bool = True):
        """Normalised latents [16, T, h, w] -> frames [1, 3, 1 + 4(T-1), 8h, 8w] (fresh causal state)."""
        z = self._latents(z)
        if reference:
            out = self.model.ref_decode(z, self.mean, self.inv_std)
        else:
            out = self.batched.decode_latents({}, self.denormalize(z))
        out = out.contiguous()
        return out.clamp_(-1, 1) if clamp else out

    def streaming_decoder(self, mode: str = "carry", **kw) -> "StreamingDecoder":
        return StreamingDecoder(self, mode=mode, **kw)


class StreamingDecoder:
    """Chunk-by-chunk decode.

    mode="carry": the causal state is carried; a chunk of F latents decodes only its own frames (first chunk
    1 + 4(F-1), later chunks 4F) and the concatenation equals one decode of all latents.
    mode="overlap": the published runtime (SPEC.md 5.8): chunk n >= 1 decodes [last `overlap` latents of the previous
    chunk ; new] with a cleared state and drops the first 1 + 4(overlap-1) frames (21 + 32(N-1) frames in all for
    chunks of 6, 8, 8, ...). reference=True uses the published frame-by-frame recurrence for each decode."""

    def __init__(self, vae: WanVAE, mode: str = "carry", overlap: int = 3, reference: bool = False,
                 clamp: bool = True):
        if mode not in ("carry", "overlap"):
            raise ValueError(f"StreamingDecoder: mode must be 'carry' or 'overlap', got {mode!r}")
        if reference and mode == "carry":
            raise ValueError("StreamingDecoder: reference=True exists only for mode='overlap' (the published "
                             "recurrence never carries its cache across calls)")
        self.vae, self.mode, self.overlap, self.reference, self.clamp = vae, mode, int(overlap), reference, clamp
        self.reset()

    def reset(self):
        """Start a new video."""
        self.state, self.tail, self.grid, self.chunks, self.frames = {}, None, None, 0, 0

    @torch.no_grad()
    def decode_chunk(self, z_new: torch.Tensor) -> torch.Tensor:
        """z_new [16, F, h, w] normalised latents -> the chunk's new frames [1, 3, T, 8h, 8w]."""
        z = self.vae._latents(z_new)
        if self.grid is not None and tuple(z.shape[3:]) != self.grid:
            raise ValueError(f"StreamingDecoder: latent grid changed from {self.grid} to {tuple(z.shape[3:])}; "
                             "call reset() before decoding a new video")
        self.grid = tuple(z.shape[3:])
        if self.mode == "carry":
            out = self.vae.batched.decode_latents(self.state, self.vae.denormalize(z)).contiguous()
            if self.clamp:
                out.clamp_(-1, 1)
        else:
            k = 0 if self.tail is None else self.tail.shape[2]
            full = z if k == 0 else torch.cat([self.tail, z], 2)
            out = self.vae.decode(full, reference=self.reference, clamp=self.clamp)
            if k:
                out = out[:, :, 1 + 4 * (k - 1):].contiguous()
            self.tail = full[:, :, -self.overlap:].clone() if self.overlap > 0 else None
        self.chunks += 1
        self.frames += out.shape[2]
        return out
