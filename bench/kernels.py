"""`liveact bench kernels`: kernel microbenchmarks, each measured side by side with its baseline
(cuBLAS bf16, torch._scaled_mm, SDPA, sageattention when installed, a plain PyTorch VAE) in one run.

Each family lives in its own module with `run(device, quick) -> list[dict]`; rows carry
kernel, shape, impl, ms and whichever of tflops / tbps / ratio / rel_err / cos apply.
"""
from __future__ import annotations

import importlib
import json
import sys

FAMILIES = {"gemm": "liveact.bench.kernels_gemm", "attention": "liveact.bench.kernels_attention",
            "vae": "liveact.bench.vae"}
COLUMNS = ("kernel", "shape", "impl", "ms", "tflops", "tbps", "ratio", "rel_err", "cos", "rel_l1")


def format_table(rows) -> str:
    cols = [c for c in COLUMNS if any(c in r and r[c] is not None for r in rows)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) if r.get(c) is not None else "" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(args) -> int:
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("error: `liveact bench kernels` needs a CUDA GPU (kernel correctness on CPU: pytest)")
    names = args.only.split(",") if args.only else list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"error: unknown --only {unknown}; choose from {sorted(FAMILIES)}")
    all_rows = []
    for name in names:
        try:
            mod = importlib.import_module(FAMILIES[name])
        except ImportError as e:
            print(f"[{name}] not available in this build: {e}", file=sys.stderr)
            continue
        rows = mod.run(device="cuda", quick=args.quick)
        print(f"\n== {name} ==\n{format_table(rows)}")
        all_rows.extend(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=2)
    return 0
