"""The `liveact` command.

    liveact checkpoint random --preset tiny --out ckpt/tiny     write a random checkpoint (published layout)
    liveact checkpoint check ckpt/tiny                           strict key/shape check, parameter count
    liveact bench fps --preset tiny --size 64*64                 streaming FPS benchmark
    liveact bench kernels --only gemm|attention|vae              kernel microbenchmarks (GPU)
    liveact calibrate ...                                        per-layer FP8/bf16 precision policy
    liveact generate ...                                         image + audio -> mp4

Errors a user can fix print one line `error: ...` (set LIVEACT_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time


def _progress(desc):
    """A tqdm-style callback(done, total) on stderr."""
    state = {"bar": None}

    def cb(done, total):
        if state["bar"] is None:
            from tqdm import tqdm
            state["bar"] = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False,
                                disable=not sys.stderr.isatty())
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()
    return cb


# ------------------------------------------------------------------------------------ checkpoint
def _checkpoint_random(args):
    import torch
    from ..model.checkpoint import count_parameters, write_random_checkpoint
    from ..model.config import get_preset
    cfg = get_preset(args.preset)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    out = write_random_checkpoint(cfg, args.out, seed=args.seed, dtype=dtype,
                                  max_shard_bytes=int(args.shard_gib * 2**30), device=device,
                                  progress=_progress("writing DiT"))
    print(f"wrote {args.preset} DiT ({count_parameters(cfg) / 1e9:.3f}B parameters, {args.dtype}) to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    if not args.dit_only:
        try:
            ra = importlib.import_module("liveact.tools.random_assets")
        except ImportError:
            print("note: encoders/VAE random assets are not available in this build (DiT only)")
            return 0
        ra.write_random_assets(args.preset, args.out, seed=args.seed)
        print(f"wrote random VAE, CLIP, T5 (+tokenizer) and wav2vec2 files to {out}")
    return 0


def _checkpoint_check(args):
    import torch
    from ..model.checkpoint import count_parameters, load_model
    model = load_model(args.dir, device=args.device or "cpu", dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                       progress=_progress("loading"))
    print(f"ok: {args.dir} loads strictly: {count_parameters(model.cfg):,} parameters, "
          f"dim {model.cfg.dim}, {model.cfg.num_layers} layers")
    return 0


def _add_checkpoint(sub):
    p = sub.add_parser("checkpoint", help="write or check checkpoints in the published layout")
    s = p.add_subparsers(dest="action", required=True)
    r = s.add_parser("random", help="write a random-weight checkpoint directory")
    r.add_argument("--preset", default="tiny", help="tiny or liveact-18b")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    r.add_argument("--shard-gib", type=float, default=5.0, help="shard size (default 5 GiB; tiny fits one file)")
    r.add_argument("--device", default=None, help="where random values are drawn (cuda is faster)")
    r.add_argument("--dit-only", action="store_true", help="skip the VAE / CLIP / T5 / wav2vec2 files")
    r.set_defaults(func=_checkpoint_random)
    c = s.add_parser("check", help="load a checkpoint strictly and report")
    c.add_argument("dir")
    c.add_argument("--device", default=None)
    c.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    c.set_defaults(func=_checkpoint_check)


# ------------------------------------------------------------------------------------ bench
def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks")
    s = p.add_subparsers(dest="bench", required=True)
    f = s.add_parser("fps", help="end-to-end streaming FPS")
    from ..bench import fps
    fps.add_arguments(f)
    f.set_defaults(func=fps.main)
    k = s.add_parser("kernels", help="kernel microbenchmarks vs cuBLAS / _scaled_mm / SDPA (GPU)")
    k.add_argument("--only", default=None, help="comma list of: gemm, attention, vae (default all available)")
    k.add_argument("--quick", action="store_true")
    k.add_argument("--json", default=None, metavar="PATH")
    k.set_defaults(func=lambda a: importlib.import_module("liveact.bench.kernels").main(a))


def _add_module_command(sub, name, module, help_):
    """A subcommand implemented by a module with add_arguments(parser) and run(args)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    p = sub.add_parser(name, help=help_)
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="liveact", description="Real-time LiveAct inference engine")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_checkpoint(sub)
    _add_bench(sub)
    _add_module_command(sub, "calibrate", "liveact.tools.calibrate", "write a per-layer FP8/bf16 precision policy")
    _add_module_command(sub, "generate", "liveact.tools.generate", "image + audio (+ prompt) -> lip-synced mp4")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..model.checkpoint import CheckpointError
    from ..model.config import ConfigError
    try:
        rc = args.func(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LIVEACT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
