"""TritonOps: the whole ops seam on our kernels.

    FP8LinearOps        (kernels/fp8_linear_ops.py)  W8A8 FP8 GEMMs with fused producers and epilogues,
                                                     per-layer precision policy
    TritonAttentionOps  (kernels/attention_ops.py)   fused QK prep + INT8/FP8 attention, cross/audio
                                                     attention, ConvKV memory update

Each half falls back to the reference methods where its kernels do not apply (no FP8 hardware,
unsupported dtype), so `--ops triton` is safe on any GPU; `describe()` says what actually runs.
"""
from __future__ import annotations

from .attention_ops import TritonAttentionOps
from .fp8_linear_ops import FP8LinearOps


class TritonOps(FP8LinearOps, TritonAttentionOps):
    name = "triton"

    def __init__(self, fp8_gemm: bool = True, fp8_attention: bool = True, policy=None, force: bool = False,
                 fast_accum: bool = False, fp8_weights=None, discard_bf16: bool = False,
                 attention_kernel: str = "auto"):
        FP8LinearOps.__init__(self, policy=policy if fp8_gemm else {"default": "bf16"}, force_triton=force,
                              fast_accum=fast_accum, fp8_weights=fp8_weights, free_bf16_weights=discard_bf16)
        TritonAttentionOps.__init__(self, quantized=fp8_attention, force=force, attention_kernel=attention_kernel)
        self.fp8_gemm = fp8_gemm

    def describe(self) -> str:
        gemm = "fp8 W8A8" if (self.enabled and self._names and self.fp8_gemm) else "bf16 cuBLAS"
        attn = "int8/fp8" if self.quantized else "bf16"
        if self.quantized:
            attn += " " + self.self_attention_kernel()
        return f"triton (GEMM {gemm}{', fast-accum' if self.fast_accum else ''}, attention {attn})"


def make_triton_ops(device=None, fp8_gemm=None, fp8_attention=None, policy=None, fast_accum=False,
                    discard_bf16=False, attention_kernel="auto") -> TritonOps:
    """Flags left as None mean 'on where the hardware supports it'.  discard_bf16: after quantizing,
    drop the bf16 copies of FP8 layers (as the published FP8 path does); the model then runs only
    with these ops."""
    return TritonOps(fp8_gemm=True if fp8_gemm is None else fp8_gemm,
                     fp8_attention=True if fp8_attention is None else fp8_attention,
                     policy=policy, fast_accum=fast_accum, discard_bf16=discard_bf16,
                     attention_kernel=attention_kernel)
