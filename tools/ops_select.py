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
    p.add_argument("--fast-accum", action="store_true",
                   help="FP8 GEMMs accumulate inside the tensor core (faster, less accurate; default: precise)")
    p.add_argument("--attention-kernel", default="auto", choices=["auto", "triton", "gluon", "gluon-kblock"],
                   help="self-attention kernel with --ops triton: auto (default: gluon-kblock on Hopper, else "
                        "triton), triton, gluon (per-key K scales), gluon-kblock (per-128-key-block K scales, "
                        "1.25x gluon)")
    p.add_argument("--precision-policy", default=None, metavar="JSON",
                   help="per-layer FP8/bf16 policy written by `liveact calibrate`")


def make_ops(args, device):
    from ..model.ops import ReferenceOps
    if getattr(args, "ops", "reference") == "reference":
        asked = [f for f, on in (("--fp8-gemm", args.fp8_gemm), ("--fp8-attention", args.fp8_attention),
                                 ("--fast-accum", getattr(args, "fast_accum", False)),
                                 ("--precision-policy", args.precision_policy),
                                 ("--attention-kernel", getattr(args, "attention_kernel", "auto") != "auto"))
                 if on]
        if asked:
            raise SystemExit(f"error: {', '.join(asked)} select our Triton kernels: add --ops triton")
        return ReferenceOps()
    try:
        from ..kernels.ops import make_triton_ops
    except ImportError as e:
        raise SystemExit(f"error: --ops triton is not available in this build ({e}); use --ops reference") from None
    # the bf16 copies of FP8 layers are dropped after quantization (as published): ~17 GiB back for KV caches
    return make_triton_ops(device=device, fp8_gemm=args.fp8_gemm, fp8_attention=args.fp8_attention,
                           policy=args.precision_policy, fast_accum=getattr(args, "fast_accum", False),
                           discard_bf16=True, attention_kernel=getattr(args, "attention_kernel", "auto"))


def uses_fp8_weights(args) -> bool:
    return getattr(args, "ops", "reference") == "triton" and args.fp8_gemm is not False


def ops_description(ops) -> str:
    d = getattr(ops, "describe", None)
    return d() if callable(d) else getattr(ops, "name", type(ops).__name__)
