"""`liveact calibrate`: measure each linear layer's FP8 (W8A8) error and write a precision policy.

Runs one chunk forward (one denoising step, audio branch on) of the model on random or given inputs.  The
forward follows the bf16 path (every layer returns its bf16 output), and each Linear additionally runs the
FP8 GEMM on the same input: rel_err = ||y_fp8 - y_bf16|| / ||y_bf16|| (max over its calls).  Layers with
rel_err > --threshold are written to the policy's "bf16" list, next to the default bf16 layers (embeddings,
head; kernels/fp8_linear_ops.DEFAULT_POLICY).  Use the file with FP8LinearOps(policy=PATH) /
`--precision-policy PATH`.

On a CPU the FP8 GEMMs run through the Triton interpreter (tiny preset only, in practice).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--preset", default="tiny", help="model preset when no --ckpt-dir is given (tiny, liveact-18b)")
    p.add_argument("--ckpt-dir", default=None, help="LiveAct checkpoint directory (default: random weights)")
    p.add_argument("--size", default=None, help="video W*H (default 80*64 for tiny, 416*720 otherwise)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--chunk", type=int, default=1, help="chunk index to run (0: first chunk; 1: a later chunk)")
    p.add_argument("--inputs", default=None, metavar="PT",
                   help="torch.save'd dict with latent [16,F,h,w], y [20,F,h,w], text [L,text_dim], clip [1,257,"
                        "clip_dim], audio [1,53,window,layers,channels] (default: random)")
    p.add_argument("--threshold", type=float, default=0.08,
                   help="keep layers whose FP8 rel. error exceeds this in bf16 (default 0.08)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fp8_policy.json", help="policy JSON to write")


def _inputs(args, cfg, geo, chunk, device):
    import torch
    if args.inputs:
        path = Path(args.inputs)
        if not path.exists():
            raise ValueError(f"--inputs {path}: not found")
        d = torch.load(path, map_location="cpu")
        missing = {"latent", "y", "text", "clip", "audio"} - set(d)
        if missing:
            raise ValueError(f"--inputs {path} lacks {sorted(missing)}; see `liveact calibrate --help`")
        return {k: v.to(device) for k, v in d.items()}
    g = torch.Generator().manual_seed(args.seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device)
    return dict(latent=r(16, chunk.frames, geo.lat_h, geo.lat_w), y=r(20, chunk.frames, geo.lat_h, geo.lat_w),
                text=r(min(cfg.text_len, 64), cfg.text_dim), clip=r(1, 257, cfg.clip_dim),
                audio=r(1, 53, cfg.audio_window, cfg.audio_layers, cfg.audio_channels))


def measure(model, inputs, geo, chunk, force_triton=False) -> dict:
    """{layer name: (rel_err, N, K)} for every FP8-eligible Linear of `model` over one forward."""
    import torch

    from ..kernels.fp8_linear_ops import FP8LinearOps
    from ..model.ops import ReferenceOps
    from ..model.rope import Rope3D

    errors = {}

    class CalibOps(FP8LinearOps):
        name = "calibrate"
        norm_modulate = ReferenceOps.norm_modulate
        layer_norm = ReferenceOps.layer_norm
        qkv_linear = ReferenceOps.qkv_linear
        linear_gelu = ReferenceOps.linear_gelu
        linear_gated_residual = ReferenceOps.linear_gated_residual
        linear_residual = ReferenceOps.linear_residual

        def linear(self, x, lin):
            y = ReferenceOps.linear(self, x, lin)
            if self._is_fp8(lin):
                y8 = self._gemm(x, lin.w_fp8, lin.w_scale, lin.bias, lin.w_fp8.shape[0])
                err = ((y8.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()
                name = self._names[id(lin)]
                errors[name] = (max(err, errors.get(name, (0.0,))[0]), *lin.weight.shape)
            return y

    ops = CalibOps(policy={"default": "fp8", "bf16": []}, force_triton=force_triton)
    model.set_ops(ops)
    if not ops.enabled:
        raise ValueError("calibration needs FP8 GEMMs: run it on an FP8 GPU (capability >= 8.9), or on a CPU "
                         "with the Triton interpreter (--device cpu)")
    dev = model.device
    rope = Rope3D(geo.grid_h, geo.grid_w, device=dev)
    with torch.no_grad():
        ctx = model.embed_context(inputs["text"], inputs["clip"])
        audio = model.embed_audio(inputs["audio"])
        e, e0 = model.embed_time(torch.tensor([937.5], device=dev))
        caches = model.alloc_caches(geo.tokens_per_frame)
        model(inputs["latent"], inputs["y"], e, e0, ctx, model.chunk_audio_kv(audio, chunk), caches, rope, chunk)
    return errors


def run(args) -> int:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    force = torch.device(device).type == "cpu"
    if force and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        import sys
        if "liveact.kernels.fp8_gemm" in sys.modules:
            raise ValueError("calibrating on a CPU needs TRITON_INTERPRET=1 set before the kernels are imported: "
                             "run `TRITON_INTERPRET=1 liveact calibrate --device cpu ...`")
        os.environ["TRITON_INTERPRET"] = "1"
    from ..kernels.fp8_linear_ops import DEFAULT_POLICY
    from ..model import ChunkLayout, VideoGeometry, get_preset
    from ..model.checkpoint import build_empty, init_random_, load_model

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.ckpt_dir:
        model = load_model(args.ckpt_dir, device=device, dtype=dtype)
    else:
        model = init_random_(build_empty(get_preset(args.preset), device, dtype), seed=args.seed)
    cfg = model.cfg
    geo = VideoGeometry.parse(args.size or ("80*64" if cfg.dim <= 512 else "416*720"))
    chunk = ChunkLayout.for_chunk(args.chunk)
    errors = measure(model, _inputs(args, cfg, geo, chunk, device), geo, chunk, force_triton=force)

    above = sorted(n for n, (e, _, _) in errors.items() if e > args.threshold)
    policy = {"default": "fp8", "bf16": list(DEFAULT_POLICY["bf16"]) + above, "threshold": args.threshold,
              "errors": {n: round(e, 6) for n, (e, _, _) in sorted(errors.items())}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(policy, indent=1) + "\n")

    print(f"{'layer':40} {'N x K':>14} {'rel_err':>9}  precision")
    for name, (e, n, k) in sorted(errors.items(), key=lambda kv: -kv[1][0]):
        from ..kernels.fp8_linear_ops import PrecisionPolicy
        prec = "fp8" if PrecisionPolicy(policy).is_fp8(name) else "bf16"
        print(f"{name:40} {f'{n} x {k}':>14} {e:9.4f}  {prec}")
    print(f"{len(errors)} layers measured, {len(above)} above threshold {args.threshold} kept bf16; "
          f"policy written to {args.out}")
    return 0
