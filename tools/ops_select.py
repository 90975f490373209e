"""Choosing the ops implementation from command-line flags.

--ops reference: plain PyTorch (cuBLAS GEMMs, SDPA attention): the baseline.
--ops triton: our kernels where they exist for this GPU (FP8 GEMMs and FP8 attention on Hopper),
              the reference elsewhere.  --fp8-gemm/--no-fp8-gemm and --fp8-attention/--no-fp8-attention
              refine it; --precision-policy FILE chooses FP8 or bf16 per linear layer.
"""
from __future__ import annotations

import argparse


def add_ops_arguments(p: argparse.ArgumentParser):
    p.add_argument("--ops", default="reference", choices=["reference", "triton"],
                   help="reference = PyTorch (cuBLAS + SDPA), triton = our kernels (default reference)")
    p.add_argument("--fp8-gemm", dest="fp8_gemm", action="store_true", default=None,
                   help="FP8 W8A8 GEMMs (with --ops triton; Hopper+)")
    p.add_argument("--no-fp8-gemm", dest="fp8_gemm", action="store_false")
    p.add_argument("--fp8-attention", dest="fp8_attention", action="store_true", default=None,
                   help="INT8/FP8 attention (with --ops triton; Hopper+)")
    p.add_argument("--no-fp8-attention", dest="fp8_attention", action="store_false")
    p.add_argument("--precision-policy", default=None, metavar="JSON",
                   help="per-layer FP8/bf16 policy written by `liveact calibrate`")


def make_ops(args, device):
    from ..model.ops import ReferenceOps
    if getattr(args, "ops", "reference") == "reference":
        return ReferenceOps()
    try:
        from ..kernels.ops import make_triton_ops
    except ImportError as e:
        raise SystemExit(f"error: --ops triton is not available in this build ({e}); use --ops reference") from None
    return make_triton_ops(device=device, fp8_gemm=args.fp8_gemm, fp8_attention=args.fp8_attention,
                           policy=args.precision_policy)


def ops_description(ops) -> str:
    d = getattr(ops, "describe", None)
    return d() if callable(d) else getattr(ops, "name", type(ops).__name__)
