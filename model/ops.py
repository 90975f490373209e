"""The ops seam: every heavy operation of the LiveAct DiT, in plain PyTorch.

The model (model/dit.py) calls only these methods for its heavy work.  `ReferenceOps` is the
reference path: it computes exactly what the published model computes under
`torch.autocast('cuda', bfloat16)` (shared/SPEC.md section 3, quirks included), in the model's
dtype (bf16, or fp32 for tight CPU tests), with RoPE in float64.  Faster implementations
(kernels/, e.g. `liveact.kernels.ops.TritonOps`) subclass it and override methods; each override
is tested against the method it replaces.

Conventions
- Activations are [B, L, C]; attention tensors are [B, S, H, D] (the layout the model holds).
- `lin` arguments are `model.dit.Linear` modules (`.weight` [N, K], `.bias` [N] or None). Fast ops
  may attach prepared forms (FP8 weights, scales) to them in `prepare(model)`.
- An op that returns an "activation" may return something other than a Tensor in a subclass (for
  example an FP8 tensor with per-token scales); the model only hands it on to a linear op.
- KV caches are `LayerKV` objects created by `alloc_kv`, so an ops implementation chooses its own
  cache format; the model and runtime only call the kv_* methods and `self_attention`.
- Cross-attention contexts are `prepare_context_kv` tuples (k, v, ...), made once per prompt: an ops
  implementation may append tensors derived from k, v (their quantized form); the engine keeps all of them
  in its static context buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .rope import Rope3D, rope_apply_reference

FP8_MAX = 448.0


@dataclass
class LayerKV:
    """One layer's self-attention cache: `tokens` rows of [heads, head_dim] for K and V.

    bf16/fp32: k, v hold values.  fp8: k, v are float8_e4m3fn with fp32 per-(token, head)
    scales k_scale, v_scale [B, N, H, 1] (shared/SPEC.md 4.6).  K is stored RMS-normalised and
    un-rotated; V as is.
    """
    k: torch.Tensor
    v: torch.Tensor
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None

    @property
    def fp8(self) -> bool:
        return self.k_scale is not None

    def tensors(self):
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]


def fp8_quantize_per_head(x: torch.Tensor):
    """x [B, N, H, D] -> (e4m3 [B, N, H, D], fp32 scale [B, N, H, 1]); shared/SPEC.md 4.6:
    s = max(amax_D(|x|) / 448, 1e-12); q = e4m3(x / bf16(s)) with the division in bf16."""
    s = x.abs().amax(dim=-1, keepdim=True).float()
    s = torch.clamp(s / FP8_MAX, min=1e-12)
    q = (x.to(torch.bfloat16) / s.to(torch.bfloat16)).float().clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), s


def fp8_dequantize_per_head(q: torch.Tensor, s: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """x = bf16(q) * bf16(s) (shared/SPEC.md 4.6), returned in `dtype`."""
    return (q.to(torch.bfloat16) * s.to(torch.bfloat16)).to(dtype)


def convkv_compress_reference(x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """ConvKV compressor C of shared/SPEC.md 4.4 on a contiguous 5-slot span.

    x [B, 5*Fl, H, D] -> [B, Fl, H, D]:  out[t, h, e] = sum_j W[h*D+e, 0, j] * x[5t+j, h, e]
    (a depthwise Conv1d, kernel 5 = stride 5, along the flattened token axis).  weight=None is the
    mean-memory variant (W = 1/5).  Computed like the published conv: in the input dtype.
    """
    b, n, h, d = x.shape
    assert n % 5 == 0, "ConvKV span must be 5 slots"
    xc = x.reshape(b, n, h * d).transpose(1, 2)                      # [B, C, 5*Fl]
    if weight is None:
        return x.reshape(b, n // 5, 5, h, d).mean(dim=2)
    out = F.conv1d(xc, weight.to(x.dtype), stride=5, groups=h * d)  # [B, C, Fl]
    return out.transpose(1, 2).reshape(b, n // 5, h, d)


class ReferenceOps:
    """Plain-PyTorch implementation of every op (the reference path)."""

    name = "reference"

    def prepare(self, model) -> None:
        """Called once after the weights are loaded (fast ops quantize weights here)."""

    # ------------------------------------------------------------------ linear layers
    def linear(self, x, lin) -> torch.Tensor:
        return F.linear(x, lin.weight, lin.bias)

    def qkv_linear(self, x, q, k, v):
        """The three self-attention projections of one input (a fused GEMM in fast ops)."""
        return self.linear(x, q), self.linear(x, k), self.linear(x, v)

    def linear_gelu(self, x, lin) -> torch.Tensor:
        """GELU(tanh)(x W^T + b): FFN up projection."""
        return F.gelu(self.linear(x, lin), approximate="tanh")

    def linear_gated_residual(self, x, lin, residual, gate) -> torch.Tensor:
        """residual + (x W^T + b) * gate, each op rounded to the model dtype like the published bf16 code."""
        return residual + self.linear(x, lin) * gate

    def linear_residual(self, x, lin, residual, skip_rows: int = 0) -> torch.Tensor:
        """residual + (x W^T + b); the first `skip_rows` token rows of the update are zeroed
        (the audio branch zeroes latent frame 0 of chunk 0)."""
        y = self.linear(x, lin)
        if skip_rows:
            y = y.clone()
            y[:, :skip_rows] = 0
        return residual + y

    # ------------------------------------------------------------------ norms
    def norm_modulate(self, x, shift, scale, eps: float):
        """adaLN input: (LN_noaffine(x) in fp32 -> x.dtype) in fp32 * (1 + scale) + shift -> x.dtype.
        (1 + scale) is formed in the modulation dtype first, as published."""
        u = F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
        return (u.float() * (1 + scale) + shift).to(x.dtype)

    def layer_norm(self, x, weight, bias, eps: float):
        """LayerNorm computed in fp32 (affine params upcast), output in x.dtype."""
        w = weight.float() if weight is not None else None
        b = bias.float() if bias is not None else None
        return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)

    def rms_norm(self, x, weight, eps: float) -> torch.Tensor:
        """WanRMSNorm over the last dim: (x * rsqrt(mean(x^2) + eps)) in fp32 -> x.dtype, then * weight."""
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
        return y * weight

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v) -> torch.Tensor:
        """Non-causal softmax(q k^T / sqrt(D)) v on [B, S, H, D] tensors; returns [B, Sq, H, D]."""
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)

    def attention_lse(self, q, k, v):
        """Like `attention`, also returning the natural-log log-sum-exp of the scaled scores,
        lse [B, H, Sq] fp32 (ring attention merges partial results with it)."""
        d, h = q.shape[-1], q.shape[2]
        step = max(1, min(h, (1 << 28) // max(1, q.shape[0] * q.shape[1] * k.shape[1])))  # bound fp32 scores
        outs, lses = [], []
        for h0 in range(0, h, step):
            sl = slice(h0, h0 + step)
            s = torch.einsum("bqhd,bkhd->bhqk", q[:, :, sl].float(), k[:, :, sl].float()) / d ** 0.5
            lses.append(torch.logsumexp(s, dim=-1))
            outs.append(torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v[:, :, sl].float()))
            del s
        return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=1)

    def prepare_context_kv(self, k, v) -> tuple:
        """A context's (k, v) as cross_attention will take it, once per prompt (Block.context_kv): a tuple
        whose first two tensors are k and v; kernel ops may append tensors derived from them (e.g. their
        quantized form), which the engine's static context buffers then hold and refill as well."""
        return (k, v)

    def cross_attention(self, q, kv_pairs) -> torch.Tensor:
        """Sum of separate softmax attentions of q over each context pair (image + text context); a pair is
        a prepare_context_kv tuple (k, v, ...)."""
        out = None
        for pair in kv_pairs:
            o = self.attention(q, pair[0], pair[1])
            out = o if out is None else out + o
        return out

    def audio_attention(self, q, k, v) -> torch.Tensor:
        """Per-frame audio cross-attention: q [F, Lf, H, D] attends to its frame's k, v [F, T, H, D]."""
        return self.attention(q, k, v)

    # ------------------------------------------------------------------ KV cache
    def alloc_kv(self, batch: int, tokens: int, heads: int, head_dim: int, dtype, device,
                 fp8: bool = False) -> LayerKV:
        shape = (batch, tokens, heads, head_dim)
        if fp8:
            return LayerKV(torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
                           torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
                           torch.ones(shape[:-1] + (1,), dtype=torch.float32, device=device),
                           torch.ones(shape[:-1] + (1,), dtype=torch.float32, device=device))
        return LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def kv_write(self, kv: LayerKV, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, L, H, D] into cache rows [start, start + L)."""
        n = k.shape[1]
        if kv.fp8:
            for src, dst, sc in ((k, kv.k, kv.k_scale), (v, kv.v, kv.v_scale)):
                q, s = fp8_quantize_per_head(src)
                dst[:, start:start + n] = q
                sc[:, start:start + n] = s
        else:
            kv.k[:, start:start + n] = k
            kv.v[:, start:start + n] = v

    def kv_read(self, kv: LayerKV, start: int, stop: int, dtype):
        """Rows [start, stop) of K and V as `dtype` values (dequantized for fp8)."""
        if kv.fp8:
            return (fp8_dequantize_per_head(kv.k[:, start:stop], kv.k_scale[:, start:stop], dtype),
                    fp8_dequantize_per_head(kv.v[:, start:stop], kv.v_scale[:, start:stop], dtype))
        return kv.k[:, start:stop], kv.v[:, start:stop]

    def convkv_compress(self, x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """The ConvKV compressor C on a contiguous span x [B, 5n, H, D] -> [B, n, H, D] (values, not a cache)."""
        return convkv_compress_reference(x, weight)

    def kv_memory_update(self, kv: LayerKV, weight: Optional[torch.Tensor], tokens_per_frame: int,
                         dtype=torch.bfloat16) -> None:
        """ConvKV memory update of shared/SPEC.md 4.2 step 3, for K and V (both with memory_proj_k's
        weight, a published quirk; weight=None = mean memory):
            slot 2 <- C(slots 2..6);  slot 3 <- C(slots 7..11);  slots 4, 5 <- slots 12, 13.
        Every source range is read before its destination is written."""
        fl = tokens_per_frame
        k_a, v_a = self.kv_read(kv, 2 * fl, 7 * fl, dtype)
        k_b, v_b = self.kv_read(kv, 7 * fl, 12 * fl, dtype)
        new = [(self.convkv_compress(k_a, weight), self.convkv_compress(v_a, weight)),
               (self.convkv_compress(k_b, weight), self.convkv_compress(v_b, weight))]
        for t in kv.tensors():  # raw copy of slots 12, 13 (values and, for fp8, their scales)
            t[:, 4 * fl:6 * fl] = t[:, 12 * fl:14 * fl].clone()
        for i, (kc, vc) in enumerate(new):
            self.kv_write(kv, (2 + i) * fl, kc, vc)

    def self_attention(self, q, k, v, norm_q, norm_k, eps: float, kv: LayerKV, rope: Rope3D,
                       q_frame0: int, write_start: int) -> torch.Tensor:
        """Self-attention of one chunk against its step cache (shared/SPEC.md 3.5.1 and 4.2).

        q, k, v: [B, L, H, D] projections of the chunk (before the q/k RMSNorm over all H*D
        channels).  K (normalised, un-rotated) and V are stored at rows [write_start, write_start+L);
        the keys are cache rows [0, write_start) followed by the chunk's own fresh k, v (the
        published model attends to the un-requantized current chunk also with an FP8 cache).
        Queries are rotated at time positions q_frame0.., keys at their slot index.
        Returns [B, L, H*D].  = attend_prepared(*prepare_self_attention(...)).
        """
        b, l, h, d = q.shape
        qp, kvp = self.prepare_self_attention(q, k, v, norm_q, norm_k, eps, kv, rope, q_frame0, write_start)
        return self.attend_prepared(qp, kvp).reshape(b, l, h * d)

    def prepare_self_attention(self, q, k, v, norm_q, norm_k, eps: float, kv: LayerKV, rope: Rope3D,
                               q_frame0: int, write_start: int):
        """Everything of self_attention before the attention itself: q/k RMSNorm, the cache write,
        RoPE, and whatever input format the attention wants.  Returns (q_prepared, kv_prepared):
        q_prepared = (kind, *tensors), kv_prepared = a tuple of tensors that `attend_prepared` takes
        (sequence parallelism passes kv_prepared round the ring as is)."""
        b, l, h, d = q.shape
        q = self.rms_norm(q.reshape(b, l, h * d), norm_q, eps).reshape(b, l, h, d)
        k = self.rms_norm(k.reshape(b, l, h * d), norm_k, eps).reshape(b, l, h, d)
        self.kv_write(kv, write_start, k, v)
        if write_start:
            k_mem, v_mem = self.kv_read(kv, 0, write_start, q.dtype)
            k_all, v_all = torch.cat([k_mem, k], dim=1), torch.cat([v_mem, v], dim=1)
        else:
            k_all, v_all = k, v
        fl = rope.tokens_per_frame
        q_r = rope_apply_reference(q, rope.table(q_frame0, l // fl))
        k_r = rope_apply_reference(k_all, rope.table(0, k_all.shape[1] // fl))
        return ("reference", q_r), (k_r, v_all)

    def attend_prepared(self, qp, kvp, return_lse: bool = False):
        """The attention of prepared queries over prepared keys/values: o [B, L, H, D]
        (and lse [B, H, L] natural log with return_lse)."""
        q = qp[1]
        return self.attention_lse(q, *kvp) if return_lse else self.attention(q, *kvp)
