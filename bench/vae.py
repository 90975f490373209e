"""Wan2.1 VAE timings at 416x720 (latent 90x52): the published frame-by-frame structure ("plain", PyTorch,
bf16, cudnn.benchmark) side by side with ours (batched, channels-last, fused RMS-norm+SiLU, sub-pixel up-convs,
carried causal state). Random weights at the published width (dim=96).

Rows {"kernel", "shape", "impl", "ms", "ratio"}; ratio = plain ms / this row's ms (1.0 on plain rows):
  vae_decode_8       plain decode of 8 latents -> 29 frames            vs ours (fresh state, same 29 frames)
  vae_decode_11      the reference overlap chunk: 11 latents -> 41     vs ours in mode="overlap" (fresh 11, keep 32)
  vae_stream_8       ours, mode="carry": one 8-latent chunk -> 32 frames after a warm-up chunk; ratio against the
                     plain overlap chunk (what the published runtime spends per 32 frames)
  vae_encode_53      the 53-frame conditioning clip -> 14 latents, plain chunked encode vs ours (one call)

Usage: python -m liveact.bench.vae [--quick] [--explore]   (--explore adds conv-layout variants and a profile)

Measured on one H100 80GB HBM3 (torch 2.11, triton 3.6), 2026-11-24, do_bench medians, random weights:
  decode 8 lat: plain 447.5 ms, ours 187.0 ms (2.39x) | overlap chunk 11 lat: plain 632.0 ms, ours 260.9 ms (2.42x)
  streaming 8-lat chunk (carried): ours 199.8 ms (conv3d), 200.1 (stack2d), 190.4 (hybrid); 3.16x vs the plain
  overlap chunk, 2.24x vs the plain 8-lat decode | encode 53 fr: plain 496.8 ms, ours 245.3 ms (2.03x)
"""
from __future__ import annotations

import argparse
import time

import torch


def _bench(fn, rep_ms: float) -> float:
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=1, rep=rep_ms, return_mode="median"))
    fn()
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def _setup(device: str, quick: bool, dim=None):
    from liveact.model.vae import WanVAE
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
        h, w = (45, 26) if quick else (90, 52)
        dim = dim or 96
        dtype = torch.bfloat16
    else:  # a CPU smoke run: tiny width, tiny frames
        h, w, dim, dtype = 4, 6, dim or 8, torch.float32
    vae = WanVAE.random(dim=dim, seed=0, device=device, dtype=dtype)
    return vae, h, w


def run(device: str = "cuda", quick: bool = False, variants: bool = False, log=None) -> list[dict]:
    from liveact.model.vae import WanVAE
    vae, h, w = _setup(device, quick)
    rep = 600 if quick else 1500
    g = torch.Generator(device=device).manual_seed(0)
    z6 = torch.randn(16, 6, h, w, generator=g, device=device).to(vae.dtype)
    z8 = torch.randn(16, 8, h, w, generator=g, device=device).to(vae.dtype)
    z11 = torch.randn(16, 11, h, w, generator=g, device=device).to(vae.dtype)
    video = (torch.rand(1, 3, 53, 8 * h, 8 * w, generator=g, device=device) * 2 - 1).to(vae.dtype)
    video[:, :, 1:] = 0  # the conditioning clip: the image then 52 grey frames
    shp = f"{8 * h}x{8 * w}"
    rows = []

    def add(kernel, shape, impl, ms, base):
        rows.append({"kernel": kernel, "shape": shape, "impl": impl, "ms": round(ms, 3),
                     "ratio": round(base / ms, 3) if base else 1.0})
        if log:
            log(rows[-1])

    p8 = _bench(lambda: vae.decode(z8, reference=True), rep)
    add("vae_decode_8", f"8 lat -> 29 fr @ {shp}", "plain", p8, None)
    add("vae_decode_8", f"8 lat -> 29 fr @ {shp}", "ours", _bench(lambda: vae.decode(z8), rep), p8)

    p11 = _bench(lambda: vae.decode(z11, reference=True), rep)
    add("vae_decode_11", f"3+8 lat -> 41 fr, keep 32 @ {shp}", "plain", p11, None)
    ov = vae.streaming_decoder("overlap")
    ov.decode_chunk(z6)
    add("vae_decode_11", f"3+8 lat -> 41 fr, keep 32 @ {shp}", "ours overlap", _bench(lambda: ov.decode_chunk(z8), rep),
        p11)

    sd = vae.streaming_decoder("carry")
    sd.decode_chunk(z6)
    s8 = _bench(lambda: sd.decode_chunk(z8), rep)
    add("vae_stream_8", f"8 lat -> 32 fr (carried) @ {shp}", "ours carry", s8, p11)
    if variants:
        for name, kw in (("ours carry stack2d", dict(conv_mode="stack2d")),
                         ("ours carry hybrid", dict(conv_mode="hybrid"))):
            v = WanVAE(vae.model, **kw)
            sv = v.streaming_decoder("carry")
            sv.decode_chunk(z6)
            add("vae_stream_8", f"8 lat -> 32 fr (carried) @ {shp}", name, _bench(lambda: sv.decode_chunk(z8), rep),
                p11)
            del v, sv

    pe = _bench(lambda: vae.encode(video, reference=True), rep)
    add("vae_encode_53", f"53 fr -> 14 lat @ {shp}", "plain", pe, None)
    add("vae_encode_53", f"53 fr -> 14 lat @ {shp}", "ours", _bench(lambda: vae.encode(video), rep), pe)
    return rows


def check(device: str = "cuda", quick: bool = False) -> list[str]:
    """bf16 agreement of ours with the plain decode/encode at the bench shape (random weights)."""
    vae, h, w = _setup(device, quick)
    g = torch.Generator(device=device).manual_seed(1)
    z = torch.randn(16, 14, h, w, generator=g, device=device).to(vae.dtype)
    out = []

    def cmp(name, a, b):
        a, b = a.float(), b.float()
        rel = ((a - b).norm() / b.norm()).item()
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        out.append(f"{name}: rel {rel:.3e}  cos {cos:.6f}  max|d| {(a - b).abs().max().item():.3e}  "
                   f"ref std {b.std().item():.3f}")

    ref8 = vae.decode(z[:, :8], reference=True, clamp=False)
    cmp("decode 8, ours vs plain (bf16, unclamped)", vae.decode(z[:, :8], clamp=False), ref8)
    sd = vae.streaming_decoder("carry", clamp=False)
    stream = torch.cat([sd.decode_chunk(z[:, :6]), sd.decode_chunk(z[:, 6:14])], 2)
    cmp("stream 6+8 vs ours whole 14 (bf16)", stream, vae.decode(z, clamp=False))
    ov = vae.streaming_decoder("overlap", clamp=False)
    o = torch.cat([ov.decode_chunk(z[:, :6]), ov.decode_chunk(z[:, 6:14])], 2)
    ovr = vae.streaming_decoder("overlap", clamp=False, reference=True)
    r = torch.cat([ovr.decode_chunk(z[:, :6]), ovr.decode_chunk(z[:, 6:14])], 2)
    cmp(f"overlap ({o.shape[2]} fr) ours vs plain (bf16)", o, r)
    video = (torch.rand(1, 3, 53, 8 * h, 8 * w, generator=g, device=device) * 2 - 1).to(vae.dtype)
    cmp("encode 53, ours vs plain (bf16)", vae.encode(video), vae.encode(video, reference=True))
    if device.startswith("cuda"):
        out.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return out


def profile(device: str = "cuda", quick: bool = False, row_limit: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile as tprof
    vae, h, w = _setup(device, quick)
    z = torch.randn(16, 14, h, w, device=device).to(vae.dtype)
    sd = vae.streaming_decoder("carry")
    sd.decode_chunk(z[:, :6])
    sd.decode_chunk(z[:, 6:14])
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CUDA]) as p:
        sd.decode_chunk(z[:, 6:14])
        torch.cuda.synchronize()
    return p.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit, max_name_column_width=70)


def print_table(rows):
    print(f"{'kernel':<15} {'shape':<38} {'impl':<24} {'ms':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['kernel']:<15} {r['shape']:<38} {r['impl']:<24} {r['ms']:>10.2f} {r['ratio']:>7.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--explore", action="store_true", help="conv-layout variants, bf16 checks and a profile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda"):
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    if a.explore:
        for line in check(a.device, a.quick):
            print(line, flush=True)
    rows = run(a.device, a.quick, variants=a.explore, log=lambda r: print(r, flush=True))
    print_table(rows)
    if a.explore and a.device.startswith("cuda"):
        print(profile(a.device, a.quick))
    return rows


if __name__ == "__main__":
    main()
