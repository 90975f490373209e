"""3-D rotary position embedding of the Wan2.1 DiT (shared/SPEC.md 3.6).

Head dim 128 = 64 complex pairs, interleaved (pair m = dims 2m, 2m+1), split 22/21/21 between
(time, row, column).  Frequencies w_t[k] = 10000^(-2k/44), w_h[k] = w_w[k] = 10000^(-2k/42).
A token at (P_t, r, c) is multiplied by [exp(i P_t w_t) | exp(i r w_h) | exp(i c w_w)].
The published model multiplies in float64, returns float32, and attention casts to bf16; the
reference below does the same.  Queries use P_t = q_frame0 + f; cached keys use P_t = slot index.
"""
from __future__ import annotations

import torch


def rope_frequencies(head_dim: int = 128, max_pos: int = 1024, theta: float = 10000.0) -> torch.Tensor:
    """complex128 table [max_pos, head_dim // 2]: the three parts of `rope_params` concatenated."""
    assert head_dim % 2 == 0
    d_t = head_dim - 4 * (head_dim // 6)
    d_hw = 2 * (head_dim // 6)
    parts = []
    for d in (d_t, d_hw, d_hw):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.outer(torch.arange(max_pos, dtype=torch.float64), freqs)
        parts.append(torch.polar(torch.ones_like(ang), ang))
    return torch.cat(parts, dim=1)


class Rope3D:
    """RoPE tables for one latent grid (grid_h x grid_w tokens per frame), positions 0..num_frames-1.

    `table(frame0, frames)` gives the complex128 factors [frames*Fl, 64] for tokens of consecutive
    frames starting at time position frame0, in the token order f*Fl + h*grid_w + w.
    `cos_sin()` exposes the same table as float64 cos/sin [num_frames*Fl, 64] for kernels.
    """

    def __init__(self, grid_h: int, grid_w: int, num_frames: int = 14, head_dim: int = 128, device=None):
        self.grid_h, self.grid_w, self.num_frames, self.head_dim = grid_h, grid_w, num_frames, head_dim
        self.tokens_per_frame = grid_h * grid_w
        f = rope_frequencies(head_dim)
        n_t = head_dim // 2 - 2 * (head_dim // 6)
        n_hw = head_dim // 6
        ft, fh, fw = f[:, :n_t], f[:, n_t:n_t + n_hw], f[:, n_t + n_hw:]
        full = torch.cat([
            ft[:num_frames, None, None, :].expand(num_frames, grid_h, grid_w, n_t),
            fh[None, :grid_h, None, :].expand(num_frames, grid_h, grid_w, n_hw),
            fw[None, None, :grid_w, :].expand(num_frames, grid_h, grid_w, n_hw),
        ], dim=-1).reshape(num_frames * self.tokens_per_frame, head_dim // 2)
        self.full = full.to(device) if device is not None else full

    def table(self, frame0: int, frames: int) -> torch.Tensor:
        fl = self.tokens_per_frame
        return self.full[frame0 * fl:(frame0 + frames) * fl]

    def cos_sin(self):
        return self.full.real.contiguous(), self.full.imag.contiguous()

    def to(self, device):
        self.full = self.full.to(device)
        return self


def rope_apply_reference(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] (any float dtype), factors complex128 [L, D/2] -> rotated x in x.dtype.

    float64 complex multiply, then float32, then x.dtype: exactly the published rounding chain.
    """
    b, l, h, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, l, h, d // 2, 2))
    out = torch.view_as_real(xc * factors.to(x.device)[None, :, None, :]).reshape(b, l, h, d)
    return out.float().to(x.dtype)
