"""Device-machine check for the foundation (issue 2): load a random 18B checkpoint in bf16 straight
to the GPU, report load time and peak memory, and run one chunk step (chunk 0 and chunk 1, step 1).

    python -m liveact.bench.gpu_foundation --ckpt-dir /tmp/ck18 --json $OUT/foundation.json
"""
import argparse
import json
import time

import torch

from ..model import ChunkLayout, Rope3D, VideoGeometry
from ..model.checkpoint import count_parameters, load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--size", default="416*720")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = load_model(a.ckpt_dir, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    peak_load = torch.cuda.max_memory_allocated() / 2**30
    geo = VideoGeometry.parse(a.size)
    cfg = m.cfg
    g = torch.Generator(device="cuda").manual_seed(0)
    ctx = m.embed_context(torch.randn(64, cfg.text_dim, device="cuda", generator=g),
                          torch.randn(1, 257, cfg.clip_dim, device="cuda", generator=g))
    rope = Rope3D(geo.grid_h, geo.grid_w, device="cuda")
    caches = m.alloc_caches(geo.tokens_per_frame, fp8=True)
    res = {"params": count_parameters(cfg), "load_s": round(load_s, 2), "peak_after_load_gib": round(peak_load, 2)}
    y = torch.randn(20, 14, geo.lat_h, geo.lat_w, device="cuda", generator=g)
    tokens = m.embed_audio(torch.randn(1, 53, 5, cfg.audio_layers, cfg.audio_channels, device="cuda", generator=g))
    for n in (0, 1):
        lay = ChunkLayout.for_chunk(n)
        e, e0 = m.embed_time(torch.tensor([937.5], device="cuda"))
        lat = torch.randn(16, lay.frames, geo.lat_h, geo.lat_w, device="cuda", generator=g, dtype=torch.bfloat16)
        akv = m.chunk_audio_kv(tokens, lay)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        v = m(lat, y[:, :6] if n == 0 else y[:, 6:14], e, e0, ctx, akv, caches, rope, lay)
        torch.cuda.synchronize()
        res[f"chunk{n}_step_s"] = round(time.perf_counter() - t0, 3)
        res[f"chunk{n}_finite"] = bool(torch.isfinite(v).all())
        res[f"chunk{n}_v_std"] = round(v.float().std().item(), 4)
    res["peak_total_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(res, indent=1))
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
