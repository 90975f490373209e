"""Launch one kernel of interest a few times at the real shape, for Nsight Compute to read its counters.

    source bench/devenv.sh
    ncu --clock-control none -k regex:_attn_fwd_gluon --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis python3 -m liveact.bench.ncu_probe attn

Modes:
  attn [config]   Gluon self-attention, 9360 queries x 16380 keys x 40 heads x 128, per-block K scales
                  (config default plain_s2_kblock_3cta)
  gemm [epi]      our FP8 GEMM at the O-proj shape 9360x5120->5120, epilogue none|gated_residual
  scaled_mm       torch._scaled_mm row-wise FP8 at the same shape (cuBLAS)
Each mode runs its kernel 4 times (kernel names: _attn_fwd_gluon, _fp8_gemm_kernel, cuBLAS's).
"""
from __future__ import annotations

import sys

import torch


def attn(config: str = "plain_s2_kblock_3cta") -> None:
    from ..kernels import attention as A
    from ..kernels import attention_gluon as G
    from .attention_gluon_bench import SHAPE, _inputs
    b, sq, sk, h, _ = SHAPE
    q, k, v = _inputs(b, sq, sk, h, seed=1)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    if G.CONFIGS[config].get("KBLOCK", False):
        kv = G.requantize_kv_per_block(kv)
    out = torch.empty_like(q)
    for _ in range(4):
        G.attention_gluon(q8, qs, kv, out=out, config=config)
    torch.cuda.synchronize()


def gemm(epi: str = "none", scaled_mm: bool = False) -> None:
    from ..kernels.fp8_gemm import fp8_gemm, quantize_weight
    from ..kernels.norm_quant import quantize_rows
    from .kernels_gemm import _problem
    m, k, n = 9360, 5120, 5120
    x, w, bias, gate, res = _problem(m, k, n, "cuda")
    qa = quantize_rows(x)
    wq, ws = quantize_weight(w)
    for _ in range(4):
        if scaled_mm:
            torch._scaled_mm(qa.data, wq.t(), scale_a=qa.scale.reshape(m, 1), scale_b=ws.reshape(1, n), bias=bias,
                             out_dtype=torch.bfloat16)
        else:
            fp8_gemm(qa, None, wq, ws, bias=bias, epilogue=epi, residual=res, gate=gate)
    torch.cuda.synchronize()


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv[0] if argv else "attn"
    if mode == "attn":
        attn(*argv[1:2])
    elif mode == "gemm":
        gemm(*argv[1:2])
    elif mode == "scaled_mm":
        gemm(scaled_mm=True)
    else:
        raise SystemExit(f"ncu_probe: unknown mode {mode!r}; use attn [config], gemm [none|gated_residual] or scaled_mm")


if __name__ == "__main__":
    main()
