"""The LiveAct DiT: Wan2.1-I2V-14B + audio cross-attention + audio projection (shared/SPEC.md 1-3).

One forward = one chunk x one denoising step x one CFG branch:

    x   = patchify([noisy latent ; y])                          tokens [1, F*Fl, D]
    for each of the 40 blocks, with m = modulation + e0 (shift/scale/gate x 2):
        x = x + gate_a * SelfAttn(LN(x)*(1+scale_a)+shift_a, this step's KV cache)
        x = x + CrossAttn(norm3(x), [CLIP image tokens ; T5 text tokens])
        x = x + AudioAttn(norm_x(x), this frame's 32 audio tokens)       (not at step 0)
        x = x + gate_f * FFN(LN(x)*(1+scale_f)+shift_f)
    v   = unpatchify(head(LN(x)*(1+scale_h)+shift_h))           flow velocity [16, F, h, w]

Parameter names and shapes are the published checkpoint's (shared/SPEC.md 2).  Heavy work goes
through `self.ops` (model/ops.py); conditioning that is constant per prompt (text + image context),
per chunk (audio tokens) or per step (timestep embedding) has its own embed_* method, so the
streaming runtime computes it once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LiveActConfig
from .ops import LayerKV, ReferenceOps
from .rope import Rope3D


class Linear(nn.Module):
    """nn.Linear's parameters (weight [out, in], bias [out]) without its init or forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None


class Norm(nn.Module):
    """Affine parameters of a LayerNorm (weight, bias) or an RMSNorm (weight only)."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None


class DepthwiseConv(nn.Module):
    """memory_proj_{k,v}: Conv1d(D, D, kernel 5, stride 5, groups D, no bias) weight [D, 1, 5]."""

    def __init__(self, dim: int, kernel: int = 5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel))


class Act(nn.Module):
    """A parameter-free slot in an nn.Sequential (keeps the published key indices)."""


@dataclass(frozen=True)
class ChunkLayout:
    """Where a chunk sits in the stream (shared/SPEC.md 4.3 and 5.5).

    frames: latent frames in the chunk (6 for chunk 0, 8 afterwards).
    q_frame0: RoPE time position of its first frame (0, then always 6) = its first cache slot.
    audio_frame0: first of its latent frames inside the 14-frame audio window (0, then 6).
    """
    frames: int
    q_frame0: int
    audio_frame0: int

    @classmethod
    def for_chunk(cls, n: int) -> "ChunkLayout":
        return cls(6, 0, 0) if n == 0 else cls(8, 6, 6)

    @property
    def first(self) -> bool:
        return self.audio_frame0 == 0


class SelfAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = Norm(dim, bias=False), Norm(dim, bias=False)
        self.memory_proj_k = DepthwiseConv(dim)
        self.memory_proj_v = DepthwiseConv(dim)  # loaded but never used: V is compressed with memory_proj_k


class CrossAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.k_img, self.v_img = Linear(dim, dim), Linear(dim, dim)
        self.norm_q, self.norm_k, self.norm_k_img = (Norm(dim, bias=False) for _ in range(3))


class AudioCrossAttention(nn.Module):
    def __init__(self, dim: int, audio_dim: int):
        super().__init__()
        self.q_linear = Linear(dim, dim)
        self.kv_linear = Linear(audio_dim, 2 * dim)
        self.proj = Linear(dim, dim)


class Block(nn.Module):
    def __init__(self, cfg: LiveActConfig):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.modulation = nn.Parameter(torch.empty(1, 6, d))
        self.self_attn = SelfAttention(d)
        self.norm3 = Norm(d)
        self.cross_attn = CrossAttention(d)
        self.ffn = nn.Sequential(Linear(d, cfg.ffn_dim), Act(), Linear(cfg.ffn_dim, d))
        self.audio_cross_attn = AudioCrossAttention(d, cfg.output_dim)
        self.norm_x = Norm(d)

    def forward(self, ops: ReferenceOps, x, e0, ctx_kv, audio_kv, kv: LayerKV, rope: Rope3D, chunk: ChunkLayout):
        cfg, eps = self.cfg, self.cfg.eps
        b, l, d = x.shape
        h, hd = cfg.num_heads, cfg.head_dim
        fl = rope.tokens_per_frame
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.modulation + e0).chunk(6, dim=1)

        # 1. self-attention against this step's cache (Neighbor Forcing + ConvKV memory)
        sa = self.self_attn
        u = ops.norm_modulate(x, shift_a, scale_a, eps)
        q, k, v = ops.qkv_linear(u, sa.q, sa.k, sa.v)
        y = ops.self_attention(q.view(b, l, h, hd), k.view(b, l, h, hd), v.view(b, l, h, hd),
                               sa.norm_q.weight, sa.norm_k.weight, eps, kv, rope,
                               q_frame0=chunk.q_frame0, write_start=chunk.q_frame0 * fl)
        x = ops.linear_gated_residual(y, sa.o, x, gate_a)

        # 2. text + image cross-attention: two softmaxes, summed before one o-projection, no gate
        ca = self.cross_attn
        u = ops.layer_norm(x, self.norm3.weight, self.norm3.bias, eps)
        q = ops.rms_norm(ops.linear(u, ca.q), ca.norm_q.weight, eps).view(b, l, h, hd)
        ctx_img, ctx_txt = ctx_kv[0], ctx_kv[1]          # prepare_context_kv tuples (k, v, ...)
        y = ops.cross_attention(q, [ctx_txt, ctx_img]).reshape(b, l, d)
        x = ops.linear_residual(y, ca.o, x)

        # 3. audio cross-attention: each latent frame's tokens attend to its own 32 audio tokens
        if audio_kv is not None:
            aa = self.audio_cross_attn
            nf = l // fl
            u = ops.layer_norm(x, self.norm_x.weight, self.norm_x.bias, eps)
            q = ops.linear(u, aa.q_linear).view(nf, fl, h, hd)
            k_a, v_a = audio_kv
            y = ops.audio_attention(q, k_a, v_a).reshape(b, l, d)
            x = ops.linear_residual(y, aa.proj, x, skip_rows=fl if chunk.first else 0)

        # 4. feed-forward
        u = ops.norm_modulate(x, shift_f, scale_f, eps)
        y = ops.linear_gelu(u, self.ffn[0])
        return ops.linear_gated_residual(y, self.ffn[2], x, gate_f)

    # constant per prompt / per chunk: projections of the context and audio tokens
    def context_kv(self, ops, ctx_img, ctx_txt):
        ca, eps, h, hd = self.cross_attn, self.cfg.eps, self.cfg.num_heads, self.cfg.head_dim
        k_img = ops.rms_norm(ops.linear(ctx_img, ca.k_img), ca.norm_k_img.weight, eps)
        v_img = ops.linear(ctx_img, ca.v_img)
        k_txt = ops.rms_norm(ops.linear(ctx_txt, ca.k), ca.norm_k.weight, eps)
        v_txt = ops.linear(ctx_txt, ca.v)
        sh = lambda t: t.view(t.shape[0], t.shape[1], h, hd)
        return ops.prepare_context_kv(sh(k_img), sh(v_img)), ops.prepare_context_kv(sh(k_txt), sh(v_txt))

    def audio_kv(self, ops, audio_tokens):
        """audio_tokens [F, T, C] (this chunk's frames) -> K, V [F, T, H, hd]."""
        kv = ops.linear(audio_tokens, self.audio_cross_attn.kv_linear)
        f, t, _ = kv.shape
        kv = kv.view(f, t, 2, self.cfg.num_heads, self.cfg.head_dim)
        return kv[:, :, 0], kv[:, :, 1]


class Head(nn.Module):
    def __init__(self, cfg: LiveActConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))
        self.head = Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)


class ImageEmbedding(nn.Module):
    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(Norm(clip_dim), Linear(clip_dim, clip_dim), Act(), Linear(clip_dim, dim), Norm(dim))


class AudioProjection(nn.Module):
    def __init__(self, cfg: LiveActConfig):
        super().__init__()
        self.cfg = cfg
        self.proj1 = Linear(cfg.audio_in_first, cfg.intermediate_dim)
        self.proj1_vf = Linear(cfg.audio_in_later, cfg.intermediate_dim)
        self.proj2 = Linear(cfg.intermediate_dim, cfg.intermediate_dim)
        self.proj3 = Linear(cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim)
        self.norm = Norm(cfg.output_dim)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """float64 sinusoid, cos first, frequencies 10000^(-k/half); returned as fp32 [N, dim]."""
    half = dim // 2
    pos = t.reshape(-1).to(torch.float64)
    s = torch.outer(pos, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half)))
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1).float()


@dataclass
class Context:
    """Per-prompt conditioning, projected once for every block: [(k_img, v_img, ...), (k_txt, v_txt, ...)]
    (ops.prepare_context_kv tuples)."""
    per_block: list


class LiveActDiT(nn.Module):
    def __init__(self, cfg: LiveActConfig, ops: ReferenceOps | None = None):
        super().__init__()
        self.cfg = cfg
        self.ops = ops or ReferenceOps()
        d = cfg.dim
        self.patch_embedding = nn.Module()
        self.patch_embedding.weight = nn.Parameter(torch.empty(d, cfg.in_dim, *cfg.patch_size))
        self.patch_embedding.bias = nn.Parameter(torch.empty(d))
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, d), Act(), Linear(d, d))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, d), Act(), Linear(d, d))
        self.time_projection = nn.Sequential(Act(), Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.img_emb = ImageEmbedding(cfg.clip_dim, d)
        self.audio_proj = AudioProjection(cfg)

    @property
    def dtype(self):
        return self.head.modulation.dtype

    @property
    def device(self):
        return self.head.modulation.device

    def set_ops(self, ops: ReferenceOps):
        self.ops = ops
        ops.prepare(self)
        return self

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def embed_time(self, t: torch.Tensor):
        """t on the 0..1000 scale -> (e [1, D], e0 [1, 6, D]) in the model dtype."""
        ops, te = self.ops, self.time_embedding
        emb = sinusoidal_embedding(t, self.cfg.freq_dim).to(self.dtype)
        e = ops.linear(F.silu(ops.linear(emb, te[0])), te[2])
        e0 = ops.linear(F.silu(e), self.time_projection[1]).unflatten(1, (6, self.cfg.dim))
        return e, e0

    @torch.no_grad()
    def embed_context(self, text: torch.Tensor, clip_fea: torch.Tensor) -> Context:
        """text: T5 output [L_txt, text_dim] (L_txt <= text_len; zero-padded, unmasked);
        clip_fea [1, 257, clip_dim].  Returns the per-block cross-attention K/V."""
        ops, cfg = self.ops, self.cfg
        if text.shape[0] > cfg.text_len:
            raise ValueError(f"text has {text.shape[0]} tokens, more than text_len {cfg.text_len}")
        txt = text.new_zeros(1, cfg.text_len, text.shape[-1]).to(self.dtype)
        txt[0, :text.shape[0]] = text.to(self.dtype)
        te = self.text_embedding
        ctx_txt = ops.linear(F.gelu(ops.linear(txt, te[0]), approximate="tanh"), te[2])
        p = self.img_emb.proj
        u = F.layer_norm(clip_fea.float(), (cfg.clip_dim,), p[0].weight.float(), p[0].bias.float(), 1e-5)
        u = ops.linear(F.gelu(ops.linear(u.to(self.dtype), p[1])), p[3])
        ctx_img = F.layer_norm(u.float(), (cfg.dim,), p[4].weight.float(), p[4].bias.float(), 1e-5).to(self.dtype)
        return Context([blk.context_kv(ops, ctx_img, ctx_txt) for blk in self.blocks])

    @torch.no_grad()
    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """audio window [1, 53, window, layers, channels] (wav2vec features, shared/SPEC.md 5.5)
        -> audio tokens [14, context_tokens, output_dim] (shared/SPEC.md 3.4)."""
        cfg, ops, ap = self.cfg, self.ops, self.audio_proj
        a = audio.to(self.dtype)[0]
        n_lat = (a.shape[0] - 1) // cfg.vae_scale
        mid = cfg.audio_window // 2
        first = a[0].reshape(1, -1)
        later = a[1:].reshape(n_lat, cfg.vae_scale, *a.shape[1:])
        later = torch.cat([later[:, 0, :mid + 1], later[:, 1:-1, mid], later[:, -1, mid:]], dim=1)
        later = later.reshape(n_lat, -1)
        h = torch.cat([F.relu(ops.linear(first, ap.proj1)), F.relu(ops.linear(later, ap.proj1_vf))], dim=0)
        h = ops.linear(F.relu(ops.linear(h, ap.proj2)), ap.proj3)
        h = h.reshape(n_lat + 1, cfg.context_tokens, cfg.output_dim)
        return F.layer_norm(h.float(), (cfg.output_dim,), ap.norm.weight.float(), ap.norm.bias.float(), 1e-5).to(self.dtype)

    def chunk_audio_kv(self, audio_tokens: torch.Tensor, chunk: ChunkLayout):
        """Per-block audio K/V for the chunk's frames [audio_frame0, audio_frame0 + frames)."""
        a = audio_tokens[chunk.audio_frame0:chunk.audio_frame0 + chunk.frames]
        return [blk.audio_kv(self.ops, a) for blk in self.blocks]

    # ------------------------------------------------------------------ the step
    def patchify(self, latent: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[16, F, h, w] + [20, F, h, w] -> tokens [1, F*(h/2)*(w/2), D] (Conv3d 1x2x2 as a GEMM)."""
        x = torch.cat([latent, y], dim=0).to(self.dtype)
        c, f, h, w = x.shape
        x = x.reshape(c, f, h // 2, 2, w // 2, 2).permute(1, 2, 4, 0, 3, 5).reshape(1, f * (h // 2) * (w // 2), c * 4)
        pe = self.patch_embedding
        return F.linear(x, pe.weight.reshape(pe.weight.shape[0], -1), pe.bias)

    def unpatchify(self, out: torch.Tensor, f: int, gh: int, gw: int) -> torch.Tensor:
        """[1, F*gh*gw, 64] -> [16, F, 2gh, 2gw]: feature (q*2 + r)*16 + c -> out[c, f, 2hh+q, 2ww+r]."""
        c = self.cfg.out_dim
        x = out[0].reshape(f, gh, gw, 2, 2, c).permute(5, 0, 1, 3, 2, 4)
        return x.reshape(c, f, gh * 2, gw * 2)

    @torch.no_grad()
    def forward(self, latent, y, e, e0, context: Context, audio_kv, caches, rope: Rope3D, chunk: ChunkLayout):
        """latent [16, F, h, w] noisy latent; y [20, F, h, w] mask + reference latent of the chunk;
        (e, e0) = embed_time(t); audio_kv: chunk_audio_kv(...) or None (step 0: no audio branch);
        caches: 40 LayerKV of this step (and CFG branch).  Returns the velocity [16, F, h, w]."""
        ops = self.ops
        _, f, h, w = latent.shape
        x = self.patchify(latent, y)
        for i, blk in enumerate(self.blocks):
            x = blk(ops, x, e0, context.per_block[i], None if audio_kv is None else audio_kv[i],
                    caches[i], rope, chunk)
        return self.unpatchify(self.head_out(x, e), f, h // 2, w // 2)

    def head_out(self, x, e):
        """Head: LN(x) * (1 + scale) + shift with (shift, scale) = head.modulation + e (not e0), all in
        the model dtype, then Linear -> [1, L, 64] patch features."""
        shift, scale = (self.head.modulation + e[:, None]).chunk(2, dim=1)
        u = F.layer_norm(x.float(), (self.cfg.dim,), eps=self.cfg.eps).to(x.dtype)
        return self.ops.linear(u * (1 + scale) + shift, self.head.head)

    def alloc_caches(self, tokens_per_frame: int, fp8: bool = False, frames: int = 14):
        cfg = self.cfg
        return [self.ops.alloc_kv(1, frames * tokens_per_frame, cfg.num_heads, cfg.head_dim, self.dtype,
                                  self.device, fp8=fp8) for _ in range(cfg.num_layers)]

    def memory_update(self, caches, tokens_per_frame: int, mean_memory: bool = False):
        """ConvKV memory update of every layer of one step cache (before chunks n >= 2)."""
        for blk, kv in zip(self.blocks, caches):
            w = None if mean_memory else blk.self_attn.memory_proj_k.weight
            self.ops.kv_memory_update(kv, w, tokens_per_frame, dtype=self.dtype)
