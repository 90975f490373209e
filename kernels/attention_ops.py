"""TritonAttentionOps: the attention-side ops of the seam (model/ops.py) on Triton kernels.

Overrides (each tested against the ReferenceOps method it replaces, tests/test_attention_ops.py):
  self_attention   qk_prep (RMSNorm + q RoPE + q quantization + cache write of normalised k and v)
                   -> rope_keys (rotate + smooth + quantize the key set: cache rows [0, write_start)
                   ++ the chunk's fresh keys) -> quantize_v -> attention kernel
  attention, attention_lse, cross_attention (two softmaxes summed: quantized = q quantized once, two
                   launches, the second adds into the first's output; bf16 = one fused kernel; the context
                   K/V are quantized once: by prepare_context_kv per prompt on sm90, else memoized per
                   tensor version), prepare_context_kv, audio_attention
                   (bf16 kernel, batch = frames), kv_memory_update (ConvKV kernel).
The cache format is the reference's (LayerKV: bf16, or e4m3 + per-(token, head) scales), so
alloc_kv / kv_write / kv_read are inherited unchanged.

quantized=True: INT8 Q.K + FP8 P.V (needs sm_89+; falls back to bf16 on older GPUs); False: bf16.
attention_kernel: the self-attention kernel: "triton"; "gluon" (kernels/attention_gluon.py, same inputs, per-key
K scales, 1.03-1.07x the Triton kernel on the H100); "gluon-kblock" (the keys requantized to one scale per
128-key block by one extra pass, requantize_k_blocks, then the Gluon kernel's 3-CTA per-block config:
self-attention 206 -> 158 ms + 3.2 ms of requantization per step at 416x720, attention cos 0.99924 vs 0.99928
against fp32); "auto" (default) = "gluon-kblock" where Gluon runs (sm90), else "triton".
Cross-attention on sm90 (self-attention kernel gluon-kblock): q quantized once, the Gluon per-block kernel
once per context (text 512 keys, image 257), the second launch adding into the first's output: 0.420 ms vs
0.430 for SDPA x2 at 9360 x (512 + 257) keys, cos vs fp32 0.99931 (bench/NOTES.md, session 3).  Other GPUs
(or attention_kernel triton / gluon) run the reference SDPA (flash) path, which measured 0.425 ms against
0.517 ms for the Triton quantized kernel; the Triton cross-attention kernels serve the CPU / forced path.
Kernels run when the tensors are on CUDA, or everywhere with force=True (CPU: Triton interpreter);
other dtypes / head sizes fall back to the reference methods.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import torch

from ..model.ops import LayerKV, ReferenceOps, fp8_dequantize_per_head
from ..model.rope import Rope3D
from . import attention as A
from . import convkv as C
from . import qk_prep as P


ATTENTION_KERNELS = ("auto", "triton", "gluon", "gluon-kblock")
# the Gluon config "gluon-kblock" runs (self- and cross-attention); LIVEACT_GLUON_KBLOCK_CONFIG overrides it for
# A/B benchmarks (any KBLOCK config of kernels/attention_gluon.py CONFIGS)
KBLOCK_CONFIG = os.environ.get("LIVEACT_GLUON_KBLOCK_CONFIG", "plain_s2_kblock_3cta_lmma")


class TritonAttentionOps(ReferenceOps):
    name = "triton-attention"

    def __init__(self, quantized: bool = True, force: bool = False, autotune: bool = True, memo_size: int = 256,
                 attention_kernel: str = "auto"):
        if attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}")
        self.quantized = quantized
        self.attention_kernel = attention_kernel
        self.force = force
        self.autotune = autotune
        self._tables = {}
        self._memo: OrderedDict = OrderedDict()
        self._memo_size = memo_size

    # ------------------------------------------------------------------ dispatch
    def _use(self, *ts) -> bool:
        if not all(t.dtype in (torch.bfloat16, torch.float8_e4m3fn) and t.shape[-1] == A.HEAD_DIM for t in ts):
            return False
        return self.force or all(t.is_cuda for t in ts)

    def _quantized_attention(self, t: torch.Tensor) -> bool:
        if not self.quantized:
            return False
        if t.is_cuda:
            return torch.cuda.get_device_capability(t.device) >= (8, 9)
        return True

    def self_attention_kernel(self, t: Optional[torch.Tensor] = None) -> str:
        """The kernel the quantized self-attention of tensor t (default: on the current CUDA device) runs:
        "triton", "gluon" or "gluon-kblock"."""
        if self.attention_kernel == "triton" or (t is not None and not t.is_cuda):
            return "triton"
        from . import attention_gluon as G
        if not G.available():
            return "triton"
        return "gluon-kblock" if self.attention_kernel == "auto" else self.attention_kernel

    def _cos_sin(self, rope: Rope3D, device):
        key = (id(rope), str(device))
        ent = self._tables.get(key)
        if ent is None or ent[0] is not rope:
            cos, sin = rope.cos_sin()
            ent = (rope, cos.to(device).contiguous(), sin.to(device).contiguous())
            self._tables[key] = ent
        return ent[1], ent[2]

    @staticmethod
    def _per_block(kv: A.QuantKV, block: int) -> A.QuantKV:
        """kv with its per-key int8 keys requantized to one K scale per `block` keys (requantize_k_blocks: the
        Gluon per-block kernel's input, rows in its shuffle-free order key_row_order16)."""
        return A.QuantKV(*A.requantize_k_blocks(kv.k8, kv.k_scale, block=block, perm16=True), kv.vt, kv.v_scale,
                         kv.km, k_perm=True)

    @classmethod
    def _quantize_kv(cls, k, v, block: int) -> A.QuantKV:
        kv = A.quantize_kv(k, v)
        return cls._per_block(kv, block) if block else kv

    def _quant_kv(self, k, v, block: int = 0) -> A.QuantKV:
        """Quantized K/V (per key, or one K scale per `block` keys), memoized: cross/audio context K/V are
        constant per prompt / chunk."""
        if k.is_cuda and torch.cuda.is_current_stream_capturing():
            # inside a CUDA graph the quantization must be part of the graph: the engine's static context
            # buffers are refilled in place (edit prompts), and a host-side memo would go stale on replay
            return self._quantize_kv(k, v, block)
        key = (k.data_ptr(), v.data_ptr(), k._version, v._version, tuple(k.shape), tuple(k.stride()), tuple(v.stride()),
               block)
        ent = self._memo.get(key)
        if ent is not None:
            self._memo.move_to_end(key)
            return ent[2]
        qkv = self._quantize_kv(k, v, block)
        self._memo[key] = (k, v, qkv)   # holding k, v keeps their memory from being reused
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return qkv

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v) -> torch.Tensor:
        if not self._use(q, k, v):
            return super().attention(q, k, v)
        return A.attention(q, k, v, quantized=self._quantized_attention(q), autotune=self.autotune)

    def attention_lse(self, q, k, v):
        if not self._use(q, k, v):
            return super().attention_lse(q, k, v)
        return A.attention(q, k, v, quantized=self._quantized_attention(q), return_lse=True, autotune=self.autotune)

    def _gluon_cross(self, *ts) -> bool:
        """Whether cross-attention over these bf16 tensors runs the Gluon per-block kernel (sm90, auto)."""
        return (ts[0].is_cuda and not self.force and self._quantized_attention(ts[0])
                and self.self_attention_kernel(ts[0]) == "gluon-kblock"
                and all(t.dtype == torch.bfloat16 for t in ts))

    def prepare_context_kv(self, k, v) -> tuple:
        """(k, v) + their per-block quantization (k8, k_scale, vt, v_scale, km) where the Gluon cross-attention
        runs: quantized once per prompt, outside the captured graphs (which then read the engine's static copy)."""
        if self._gluon_cross(k, v):
            from . import attention_gluon as G
            kv = self._quantize_kv(k, v, G.BLOCK_N)
            return (k, v, kv.k8, kv.k_scale, kv.vt, kv.v_scale, kv.km)
        return (k, v)

    def cross_attention(self, q, kv_pairs) -> torch.Tensor:
        kv_pairs = list(kv_pairs)
        if self._gluon_cross(q, *[t for pair in kv_pairs for t in pair[:2]]):
            # sm90: the Gluon per-block kernel, q quantized once; two contexts (text, image) in ONE launch (each
            # Q tile attends to both, the second result added into the first's bf16 output), otherwise one launch
            # per context adding into the output; K/V quantized by prepare_context_kv (else here, memoized)
            from . import attention_gluon as G
            q8, qs = A.quantize_q(q)
            kvs = []
            for pair in kv_pairs:
                A._check_qkv(q, pair[0], pair[1])
                kvs.append(A.QuantKV(*pair[2:], k_perm=True) if len(pair) > 2     # made by _per_block
                           else self._quant_kv(pair[0], pair[1], block=G.BLOCK_N))
            if len(kvs) == 2:
                return G.attention_gluon(q8, qs, kvs[0], kv2=kvs[1], config=KBLOCK_CONFIG)
            out = None
            for kv in kvs:
                out = G.attention_gluon(q8, qs, kv, out=out, accumulate=out is not None, config=KBLOCK_CONFIG)
            return out
        kv_pairs = [(pair[0], pair[1]) for pair in kv_pairs]
        if q.is_cuda and not self.force:   # GPU: SDPA (flash) measured faster at 769 keys: the reference math
            out = None
            for k, v in kv_pairs:
                o = ReferenceOps.attention(self, q, k, v)
                out = o if out is None else out + o
            return out
        if not self._use(q, *[t for kv in kv_pairs for t in kv]):
            return super().cross_attention(q, kv_pairs)
        quant = self._quantized_attention(q)
        if len(kv_pairs) == 2 and not quant:
            # bf16: one fused kernel, two softmaxes summed in its epilogue (H100: 0.666 vs 0.69 ms for
            # two launches).  Quantized: two launches + accumulate measured faster (0.513 vs 0.549 ms).
            return A.cross_attention2(q, *kv_pairs, quantized=False)
        out = None
        if quant:
            q8, qs = A.quantize_q(q)
            for k, v in kv_pairs:
                A._check_qkv(q, k, v)
                out = A.attention_quant_prepared(q8, qs, self._quant_kv(k, v), out=out, accumulate=out is not None,
                                                 autotune=self.autotune)
        else:
            for k, v in kv_pairs:
                out = A.attention_bf16(q, k, v, out=out, accumulate=out is not None, autotune=self.autotune)
        return out

    def audio_attention(self, q, k, v) -> torch.Tensor:
        """bf16 kernel (4 * 1170 * 32 * 128 FLOPs per head-frame: latency bound, no point quantizing)."""
        if not self._use(q, k, v):
            return super().audio_attention(q, k, v)
        return A.attention_bf16(q, k, v, autotune=self.autotune)

    # ------------------------------------------------------------------ KV cache
    def convkv_compress(self, x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        if not self._use(x) or x.dtype != torch.bfloat16 or x.shape[1] % 5:
            return super().convkv_compress(x, weight)
        x = x.contiguous()
        b, n, h, d = x.shape
        out = torch.empty((b, n // 5, h, d), dtype=x.dtype, device=x.device)
        C.convkv_compress(x, None, weight, out, None, 0, 0, n // 5)
        return out

    def kv_memory_update(self, kv: LayerKV, weight: Optional[torch.Tensor], tokens_per_frame: int,
                         dtype=torch.bfloat16) -> None:
        if not self._use(kv.k) or dtype != torch.bfloat16 or (not kv.fp8 and kv.k.dtype != torch.bfloat16):
            return super().kv_memory_update(kv, weight, tokens_per_frame, dtype)
        C.kv_memory_update(kv.k, kv.v, kv.k_scale, kv.v_scale, weight, tokens_per_frame)

    def prepare_self_attention(self, q, k, v, norm_q, norm_k, eps: float, kv: LayerKV, rope: Rope3D,
                               q_frame0: int, write_start: int):
        """qk_prep + rope_keys (+ quantize_v): the fused first half of self_attention (see ReferenceOps)."""
        ok = (self._use(q, k, v, kv.k) and q.dtype == torch.bfloat16 and norm_q.dtype == torch.bfloat16
              and (kv.fp8 or kv.k.dtype == torch.bfloat16))
        if not ok:
            return super().prepare_self_attention(q, k, v, norm_q, norm_k, eps, kv, rope, q_frame0, write_start)
        b, l, h, d = q.shape
        ws, fl = write_start, rope.tokens_per_frame
        cos, sin = self._cos_sin(rope, q.device)
        quant = self._quantized_attention(q)
        # 1. RMSNorm + q RoPE (+ int8) + cache write of the normalised k and of v
        if kv.fp8:
            kn = torch.empty((b, l, h, d), dtype=torch.bfloat16, device=q.device)
            qo, qs = P.qk_prep(q, k, v, norm_q, norm_k, eps, cos, sin, q_frame0 * fl, kn, None,
                               (kv.k[:, ws:ws + l], kv.k_scale[:, ws:ws + l]),
                               (kv.v[:, ws:ws + l], kv.v_scale[:, ws:ws + l]), quantize_q=quant)
            # keys: dequantized cache rows ++ the fresh (un-requantized) chunk, as the published model
            ksrc = [P.KSource(kv.k[:, :ws], kv.k_scale[:, :ws]), P.KSource(kn)]
            vsrc = [A.VSource(kv.v[:, :ws], kv.v_scale[:, :ws]), A.VSource(v)]
        else:
            qo, qs = P.qk_prep(q, k, v, norm_q, norm_k, eps, cos, sin, q_frame0 * fl,
                               kv.k[:, ws:ws + l], kv.v[:, ws:ws + l], quantize_q=quant)
            ksrc = [P.KSource(kv.k[:, :ws + l])]
            vsrc = [A.VSource(kv.v[:, :ws + l])]
        # 2. keys rotated at their row position (slot index * Fl + in-frame position), quantized
        if quant:
            k8, ks, km = P.rope_keys(ksrc, cos, sin, quantize=True)
            vt, vs = A.quantize_v(vsrc)
            return ("int8fp8", qo, qs), (k8, ks, vt, vs, km)
        kr, _, _ = P.rope_keys(ksrc, cos, sin, quantize=False)
        if kv.fp8:
            v_all = torch.cat([fp8_dequantize_per_head(kv.v[:, :ws], kv.v_scale[:, :ws]), v], dim=1)
        else:
            v_all = kv.v[:, :ws + l]
        return ("bf16", qo), (kr, v_all)

    def attend_prepared(self, qp, kvp, return_lse: bool = False):
        if qp[0] == "int8fp8":
            kernel = self.self_attention_kernel(qp[1])
            if kernel != "triton":   # same inputs and outputs; elsewhere the Triton kernel runs
                from . import attention_gluon as G
                kv, config = A.QuantKV(*kvp), G.DEFAULT_CONFIG
                if kernel == "gluon-kblock":
                    kv, config = self._per_block(kv, G.BLOCK_N), KBLOCK_CONFIG
                return G.attention_gluon(qp[1], qp[2], kv, return_lse=return_lse, config=config)
            return A.attention_quant_prepared(qp[1], qp[2], A.QuantKV(*kvp), return_lse=return_lse,
                                              autotune=self.autotune)
        if qp[0] == "bf16":
            return A.attention_bf16(qp[1], *kvp, return_lse=return_lse, autotune=self.autotune)
        return super().attend_prepared(qp, kvp, return_lse)
