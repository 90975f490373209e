"""End-to-end accuracy of a fast ops path against the reference path on the same random weights,
conditioning and noise: latent cosine similarity and relative error after each chunk.

    python -m liveact.bench.accuracy --preset liveact-18b --size 416*720 --chunks 3 --ops triton --fp8-kv-cache

The reference run goes first and its latents are kept on the host; then the model switches to the
fast ops (which may quantize its weights) and the same chunks run again.
"""
from __future__ import annotations

import argparse
import json

import torch

from ..model.checkpoint import build_empty, init_random_
from ..model.config import VideoGeometry, get_preset
from ..model.ops import ReferenceOps
from ..runtime.engine import EngineOptions, StreamingEngine
from ..tools.ops_select import add_ops_arguments, make_ops, ops_description
from .fps import random_audio_window, random_conditioning


def run_chunks(model, geo, args, ops):
    model.set_ops(ops)
    y, ctx = random_conditioning(model, geo, args.seed)
    eng = StreamingEngine(model, geo, EngineOptions(fp8_kv_cache=args.fp8_kv_cache, cuda_graphs=False, seed=args.seed))
    eng.start(y, {"main": ctx})
    out = [eng.generate_chunk(n, random_audio_window(model.cfg, n, args.seed)).float().cpu() for n in range(args.chunks)]
    del eng
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", default="416*720")
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--fp8-kv-cache", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    add_ops_arguments(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    geo = VideoGeometry.parse(args.size)
    model = init_random_(build_empty(get_preset(args.preset), device=device, dtype=torch.bfloat16), seed=args.seed)
    ref = run_chunks(model, geo, args, ReferenceOps())
    fast_ops = make_ops(args, device)
    fast = run_chunks(model, geo, args, fast_ops)
    rows = []
    for n, (a, b) in enumerate(zip(fast, ref)):
        cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
        rel = ((a - b).double().norm() / b.double().norm()).item()
        rows.append({"chunk": n, "cos": round(cos, 6), "rel_err": round(rel, 5)})
        print(f"chunk {n}: latent cosine {cos:.6f}  rel. error {rel:.4f}")
    res = {"preset": args.preset, "size": str(geo), "ops": ops_description(fast_ops), "fp8_kv_cache": args.fp8_kv_cache,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "chunks": rows}
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)
    return res


if __name__ == "__main__":
    main()
