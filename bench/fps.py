"""`liveact bench fps`: the end-to-end streaming benchmark (DiT chunks, optionally VAE decode).

Builds the model (random weights in the published layout, generated on the device, or --ckpt-dir),
runs the streaming loop on random conditioning and prints a per-chunk table and a summary:
steady-state FPS = video frames / wall time over the chunks after --warmup (32 frames per chunk),
time to first chunk, peak GPU memory, GPU name, SM clock and power (nvml).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..model.checkpoint import build_empty, count_parameters, init_random_, load_model
from ..model.config import CACHE_FRAMES, VideoGeometry, get_preset
from ..runtime.engine import EngineOptions, StreamingEngine, video_frames_of_chunk
from ..tools.ops_select import add_ops_arguments, make_ops, ops_description, uses_fp8_weights
from ..tools.telemetry import gpu_telemetry


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--preset", default="tiny", help="model preset: tiny or liveact-18b (default tiny)")
    p.add_argument("--ckpt-dir", default=None, help="load this checkpoint instead of random weights")
    p.add_argument("--size", default="416*720", help="W*H, e.g. 416*720, 512*512, 480*832 (default 416*720)")
    p.add_argument("--chunks", type=int, default=6, help="chunks to generate (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="chunks excluded from the steady-state FPS (default 2)")
    p.add_argument("--fp8-kv-cache", action="store_true", help="e4m3 KV caches with per-token-per-head scales")
    p.add_argument("--mean-memory", action="store_true", help="mean instead of ConvKV memory compression")
    p.add_argument("--audio-cfg", type=float, default=1.0, help="audio CFG scale (>1 adds null-audio passes)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run every step eagerly (debugging)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="model dtype (default bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ring", action="store_true", help="use the ring-attention sequence-parallel path even on one "
                   "process (under torchrun with N > 1 processes it is used automatically)")
    p.add_argument("--vae", action="store_true", help="include the streaming VAE decode of every chunk")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="after the measured chunks, profile one more chunk (torch.profiler, CUDA kernels) and "
                        "write the per-kernel table to PATH; a top-15 summary is printed")
    p.add_argument("--vae-mode", default="carry", choices=["carry", "overlap"],
                   help="carry = decode only the new latents with the carried causal cache; overlap = published")
    add_ops_arguments(p)


def estimate_memory(cfg, geo: VideoGeometry, fp8_kv: bool, audio_cfg: float, dtype_bytes: int = 2,
                    fp8_weights: bool = False) -> dict:
    """Rough GPU memory need in bytes: weights, caches, activations of one 8-frame step."""
    fl = geo.tokens_per_frame
    rows = CACHE_FRAMES * fl
    per_tok = cfg.dim * (1 if fp8_kv else dtype_bytes) + (cfg.num_heads * 4 if fp8_kv else 0)
    n_caches = 3 + (2 if audio_cfg > 1 else 0)
    caches = 2 * rows * per_tok * cfg.num_layers * n_caches
    m = 8 * fl
    acts = m * (cfg.ffn_dim * 2 * dtype_bytes + cfg.dim * dtype_bytes * 12) + rows * cfg.dim * 8 * 3
    ctx = cfg.num_layers * 4 * (cfg.text_len + 257) * cfg.dim * dtype_bytes
    weights = count_parameters(cfg) * (1.02 if fp8_weights else dtype_bytes)  # FP8: e4m3 + scales, small layers bf16
    return {"weights": weights, "caches": caches, "activations": acts + ctx, "total": weights + caches + acts + ctx}


def check_fits(cfg, geo, args, device, world: int = 1) -> None:
    if device.type != "cuda":
        return
    fp8w = uses_fp8_weights(args)
    est = estimate_memory(cfg, geo, args.fp8_kv_cache, args.audio_cfg, 4 if args.dtype == "fp32" else 2, fp8w)
    est["caches"] //= world  # sequence parallelism: each rank holds 1/N of every cache
    est["total"] = est["weights"] + est["caches"] + est["activations"]
    free, total = torch.cuda.mem_get_info(device)
    margin = 3 * 2**30  # allocator fragmentation, cuBLAS workspaces, CUDA-graph pools
    if est["total"] + margin > free:
        g = lambda b: f"{b / 2**30:.1f} GiB"
        hints = []
        if not args.fp8_kv_cache:
            e2 = estimate_memory(cfg, geo, True, args.audio_cfg, fp8_weights=fp8w)
            hints.append(f"--fp8-kv-cache (caches {g(est['caches'])} -> {g(e2['caches'])})")
        if args.audio_cfg > 1:
            hints.append("--audio-cfg 1 (drops the null-audio caches)")
        if not fp8w:
            hints.append("--ops triton (FP8 weights: ~18 GiB instead of 35)")
        hints.append("a smaller --size")
        raise SystemExit(
            f"error: this configuration needs about {g(est['total'])} of GPU memory (weights {g(est['weights'])}, "
            f"KV caches {g(est['caches'])}, activations {g(est['activations'])}) but only {g(free)} of "
            f"{g(total)} is free on {torch.cuda.get_device_name(device)}.\n  To fit, try: " + "; ".join(hints))


def random_conditioning(model, geo: VideoGeometry, seed: int):
    cfg, dev = model.cfg, model.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    text = torch.randn(64, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, cfg.clip_dim, generator=g)
    y = torch.randn(cfg.in_dim - cfg.out_dim, CACHE_FRAMES, geo.lat_h, geo.lat_w, generator=g)
    y[:4] = 0
    y[:4, 0] = 1  # the mask: latent frame 0 is the reference frame
    ctx = model.embed_context(text.to(dev), clip.to(dev))
    return y.to(dev), ctx


def random_audio_window(cfg, n: int, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed * 7919 + n)
    return torch.randn(1, 53, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g)


def build_model(args, device, dtype):
    t0 = time.perf_counter()
    if args.ckpt_dir:
        model = load_model(args.ckpt_dir, device=device, dtype=dtype)
    else:
        model = init_random_(build_empty(get_preset(args.preset), device=device, dtype=dtype), seed=args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - t0


def run(args) -> dict:
    from ..runtime.ring import launch_info, rank0_errors
    info = launch_info()
    with rank0_errors(info.rank):
        return _run(args, info)


def _run(args, info) -> dict:
    sp = info.sequence_parallel() if (info.world_size > 1 or args.ring) else None
    device = info.device if info.world_size > 1 else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    main_rank = info.rank == 0
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    geo = VideoGeometry.parse(args.size)
    if args.chunks < 1 or args.warmup < 0:
        raise SystemExit("error: --chunks must be >= 1 and --warmup >= 0")
    if args.warmup >= args.chunks:
        raise SystemExit(f"error: --warmup {args.warmup} leaves no measured chunk of --chunks {args.chunks}; "
                         f"use --chunks {args.warmup + 4} or more")
    cfg = get_preset(args.preset) if not args.ckpt_dir else None
    if sp is not None:
        from ..runtime.sequence_parallel import check_sequence_parallel
        check_sequence_parallel(geo, sp.world)
    if cfg is not None:
        check_fits(cfg, geo, args, device, world=info.world_size)
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    model, build_s = build_model(args, device, dtype)
    model.set_ops(make_ops(args, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    y, ctx = random_conditioning(model, geo, args.seed)
    eng = StreamingEngine(model, geo, EngineOptions(fp8_kv_cache=args.fp8_kv_cache, mean_memory=args.mean_memory,
                                                    audio_cfg=args.audio_cfg, cuda_graphs=not args.no_cuda_graph,
                                                    seed=args.seed), sp=sp)
    eng.start(y, {"main": ctx})
    decoder = None
    if args.vae:
        from ..model.vae import StreamingDecoder, WanVAE
        vae_dim = 96 if model.cfg.clip_dim == 1280 else 8  # the published VAE for the published model
        decoder = StreamingDecoder(WanVAE.random(dim=vae_dim, seed=args.seed, device=device, dtype=dtype),
                                   mode=args.vae_mode)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    use_bar = not args.no_progress and sys.stderr.isatty() and main_rank
    bar = None
    if use_bar:
        from tqdm import tqdm
        bar = tqdm(total=args.chunks, desc="chunks", unit="chunk", file=sys.stderr)
    sync()
    t_start = time.perf_counter()
    mem_series = []
    for n in range(args.chunks):
        audio = random_audio_window(model.cfg, n, args.seed)
        step_t = []
        t0 = time.perf_counter()

        def on_step(i):
            sync()
            step_t.append(time.perf_counter())
        latent = eng.generate_chunk(n, audio, on_step=on_step)
        vae_ms = None
        if decoder is not None:
            frames = decoder.decode_chunk(latent)
            sync()
            vae_ms = round((time.perf_counter() - step_t[-1]) * 1e3, 2)
            assert frames.shape[2] == video_frames_of_chunk(n)
        sync()
        t1 = time.perf_counter()
        steps_ms = [(b - a) * 1e3 for a, b in zip([t0] + step_t[:-1], step_t)]
        mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        mem_series.append(mem)
        rows.append({"chunk": n, "frames": video_frames_of_chunk(n), "ms_per_step": [round(s, 2) for s in steps_ms],
                     "ms_chunk": round((t1 - t0) * 1e3, 2), "ms_vae": vae_ms, "t_end_s": round(t1 - t_start, 4),
                     "mem_allocated_gib": round(mem / 2**30, 3)})
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    profile = _profile_chunk(eng, model.cfg, args, sync) if args.profile and main_rank else None
    measured = rows[args.warmup:]
    wall = sum(r["ms_chunk"] for r in measured) / 1e3
    frames = sum(r["frames"] for r in measured)
    tel = gpu_telemetry(device.index or 0) if device.type == "cuda" else {}
    summary = {
        "preset": args.preset if not args.ckpt_dir else str(args.ckpt_dir), "size": str(geo),
        "tokens_per_frame": geo.tokens_per_frame, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ops": ops_description(model.ops), "world_size": info.world_size, "ring": sp is not None, "dtype": args.dtype, "cuda_graphs": eng.graphs.enabled,
        "fp8_kv_cache": args.fp8_kv_cache, "mean_memory": args.mean_memory, "audio_cfg": args.audio_cfg,
        "chunks": args.chunks, "warmup": args.warmup,
        "steady_fps": round(frames / wall, 3) if wall > 0 else None,
        "ms_per_step_steady": round(1e3 * wall / (3 * len(measured)), 2),
        "ms_per_chunk_steady": round(1e3 * wall / len(measured), 2),
        "vae": args.vae and args.vae_mode,
        "ms_vae_steady": round(sum(r["ms_vae"] for r in measured) / len(measured), 2) if args.vae else None,
        "time_to_first_chunk_s": round(rows[0]["t_end_s"], 3),
        "model_build_s": round(build_s, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "cache_gib": round(eng.cache_bytes() / 2**30, 3),
        "mem_flat_after_chunk3": (max(mem_series[3:]) == min(mem_series[3:]))
        if len(mem_series) > 4 and device.type == "cuda" else None,
        **tel,
    }
    return {"summary": summary, "chunks": rows, "main_rank": main_rank, "profile": profile}


def _profile_chunk(eng, cfg, args, sync) -> dict:
    """One more chunk under torch.profiler: GPU time per kernel name (per denoising step), the table to a file."""
    from torch.profiler import ProfilerActivity, profile
    audio = random_audio_window(cfg, args.chunks, args.seed)
    sync()
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and eng.model.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        eng.generate_chunk(args.chunks, audio)
        sync()
    wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    if cuda:   # GPU time of each kernel
        dev_us = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    else:      # CPU: self time of each op
        dev_us = lambda e: e.self_cpu_time_total
    kernels = sorted(((e.key, dev_us(e) / 1e3 / 3, e.count // 3) for e in events if dev_us(e) > 0),
                     key=lambda t: -t[1])
    with open(args.profile, "w") as f:
        f.write(f"one chunk (3 steps) profiled; wall {wall_ms:.1f} ms (profiler overhead included)\n")
        f.write(f"{'ms/step':>9} {'calls/step':>10}  kernel\n")
        for name, ms, calls in kernels:
            f.write(f"{ms:9.3f} {calls:10d}  {name[:160]}\n")
    return {"wall_ms_chunk": round(wall_ms, 1), "kernel_ms_per_step": round(sum(k[1] for k in kernels), 2),
            "top": [{"kernel": n[:120], "ms_per_step": round(ms, 3), "calls_per_step": c} for n, ms, c in kernels[:15]]}


def print_report(res: dict, max_rows: int = 40) -> None:
    rows, s = res["chunks"], res["summary"]
    print(f"{'chunk':>5} {'frames':>6} {'ms/step (s0, s1, s2)':>28} {'ms/chunk':>10} {'mem GiB':>8}")
    shown = rows if len(rows) <= max_rows else rows[:max_rows // 2] + rows[-max_rows // 2:]
    for r in shown:
        st = ", ".join(f"{x:.1f}" for x in r["ms_per_step"])
        print(f"{r['chunk']:>5} {r['frames']:>6} {st:>28} {r['ms_chunk']:>10.1f} {r['mem_allocated_gib']:>8.2f}")
    print()
    for k in ("device", "preset", "size", "ops", "world_size", "ring", "dtype", "cuda_graphs", "fp8_kv_cache", "vae", "steady_fps",
              "ms_per_step_steady", "ms_per_chunk_steady", "ms_vae_steady", "time_to_first_chunk_s", "model_build_s",
              "peak_mem_gib", "cache_gib", "mem_flat_after_chunk3", "sm_clock_mhz", "power_w"):
        if s.get(k) is not None:
            print(f"  {k:<24} {s[k]}")
    prof = res.get("profile")
    if prof:
        print(f"\nprofile of one chunk: kernel/op time {prof['kernel_ms_per_step']} ms/step "
              f"(wall {prof['wall_ms_chunk']} ms/chunk incl. profiler overhead); top kernels:")
        for t in prof["top"]:
            print(f"  {t['ms_per_step']:9.3f} ms/step {t['calls_per_step']:6d} calls  {t['kernel'][:90]}")


def main(args) -> int:
    res = run(args)
    if not res.pop("main_rank"):
        return 0
    print_report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
