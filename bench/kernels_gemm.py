"""Benchmark: FP8 GEMM (kernels/fp8_gemm.py) and the norm/modulation/quantization producer (kernels/norm_quant.py).

Side by side in one run, at the LiveAct shapes (M = 9360 tokens of one 8-frame chunk at 416x720):
  gemm rows     ours (accurate accumulation, with the layer's epilogue), ours plain (accurate / fast accumulation),
                cuBLAS bf16 (F.linear), torch._scaled_mm row-wise (default and use_fast_accum=True),
                and the unfused torch path of the same epilogue (_scaled_mm + elementwise ops).
                TFLOP/s = 2MNK / time; ratio = vs cuBLAS bf16; vs_scaled_mm = vs _scaled_mm of the same
                accumulation kind.  rel_err = ||out - fp32 product of the same fp8 inputs|| / ||ref||,
                rel_err_bf16 = vs the bf16 product of the unquantized inputs.
  producer rows norm_modulate_quant / layer_norm_quant / quantize_rows / bf16 variant / the torch reference chain,
                TB/s = bytes moved / time, ratio = vs a device-to-device copy of the same bytes.
Times: triton.testing.do_bench medians on random data; GEMM and producer rows: the median of 3 interleaved rounds.

    python -m liveact.bench.kernels_gemm [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = [  # (name, M, K, N, epilogue of that layer in the model)
    ("o_proj", 9360, 5120, 5120, "gated_residual"),
    ("ffn_up", 9360, 5120, 13824, "gelu"),
    ("ffn_down", 9360, 13824, 5120, "gated_residual"),
    ("qkv", 9360, 5120, 15360, "none"),
    ("audio_kv", 257, 768, 10240, "none"),
]


ROUNDS = 3   # each GEMM timing = median of ROUNDS interleaved do_bench medians


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def _bench(fn, quick):
    import triton
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100)


def _problem(m, k, n, dev):
    """Random GEMM operands of one shape: x [m, k], w [n, k], bias, gate [n], residual [m, n] (bf16)."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g).bfloat16()
    w = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).bfloat16()
    bias = (0.1 * torch.randn(n, device=dev, generator=g)).bfloat16()
    gate = torch.randn(n, device=dev, generator=g).bfloat16()
    res = torch.randn(m, n, device=dev, generator=g).bfloat16()
    return x, w, bias, gate, res


def _gemm_rows(name, m, k, n, epi, quick, dev):
    from ..kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, quantize_weight
    from ..kernels.norm_quant import quantize_rows
    x, w, bias, gate, res = _problem(m, k, n, dev)
    qa = quantize_rows(x)
    wq, ws = quantize_weight(w)
    sa = qa.scale.reshape(m, 1)
    flops = 2.0 * m * n * k
    shape = f"{m}x{k}->{n} ({name})" + (" graph" if m < 1024 else "")
    exact = fp8_gemm_ref(qa, None, wq, ws, bias=bias, out_dtype=torch.float32)
    bf16 = F.linear(x, w, bias)
    rows, timed = [], []

    def add(impl, fn, ref=exact, ref_bf16=bf16, kind=""):
        try:
            out = fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report the failure in the table, keep benchmarking
            rows.append(dict(kernel="gemm", shape=shape, impl=impl, error=f"{type(e).__name__}: {e}"[:300]))
            return
        row = dict(kernel="gemm", shape=shape, impl=impl, acc=kind, times=[],
                   rel_err=_rel(out, ref) if ref is not None else None,
                   rel_err_bf16=_rel(out, ref_bf16) if ref_bf16 is not None else None)
        rows.append(row)
        timed.append((row, fn))

    ek = dict(bias=bias, epilogue=epi, residual=res, gate=gate)
    if epi != "none":
        ref_epi = fp8_gemm_ref(qa, None, wq, ws, out_dtype=torch.float32, **{**ek, "residual": res.float(), "gate": gate.float()})
        bf_epi = {"gelu": lambda: F.gelu(bf16, approximate="tanh"), "gated_residual": lambda: res + bf16 * gate}[epi]()
        add(f"ours+{epi}", lambda: fp8_gemm(qa, None, wq, ws, **ek), ref=ref_epi, ref_bf16=bf_epi, kind="accurate")
    add("ours", lambda: fp8_gemm(qa, None, wq, ws, bias=bias), kind="accurate")
    add("ours_fast", lambda: fp8_gemm(qa, None, wq, ws, bias=bias, fast_accum=True), kind="fast")
    from ..kernels import fp8_gemm_gluon as GG
    if GG.available() and GG.supported(m, n, k, torch.bfloat16):   # the Gluon kernel called directly
        sa1 = qa.scale.reshape(m).float()
        gk = dict(bias=bias) if epi == "none" else dict(ek)
        add("gluon" + ("" if epi == "none" else "+" + epi), lambda: GG.fp8_gemm_gluon(qa.data, sa1, wq, ws, **gk),
            ref=exact if epi == "none" else ref_epi, ref_bf16=bf16 if epi == "none" else bf_epi, kind="accurate")
        if epi != "none":
            add("gluon", lambda: GG.fp8_gemm_gluon(qa.data, sa1, wq, ws, bias=bias), kind="accurate")
        add("gluon_fast", lambda: GG.fp8_gemm_gluon(qa.data, sa1, wq, ws, bias=bias, fast_accum=True), kind="fast")
    add("cublas_bf16", lambda: F.linear(x, w, bias), ref=None, kind="bf16")
    for fast in (False, True):
        fn = lambda fast=fast: torch._scaled_mm(qa.data, wq.t(), scale_a=sa, scale_b=ws.reshape(1, n), bias=bias,
                                               out_dtype=torch.bfloat16, use_fast_accum=fast)
        add("scaled_mm_fast" if fast else "scaled_mm", fn, kind="fast" if fast else "accurate")
    if epi == "gated_residual":
        def unfused():
            y = torch._scaled_mm(qa.data, wq.t(), scale_a=sa, scale_b=ws.reshape(1, n), bias=bias, out_dtype=torch.bfloat16)
            return res + y * gate
        add("torch_unfused+gated_residual", unfused, ref=ref_epi, ref_bf16=bf_epi, kind="accurate")
    elif epi == "gelu":
        def unfused():
            y = torch._scaled_mm(qa.data, wq.t(), scale_a=sa, scale_b=ws.reshape(1, n), bias=bias, out_dtype=torch.bfloat16)
            return F.gelu(y, approximate="tanh")
        add("torch_unfused+gelu", unfused, ref=ref_epi, ref_bf16=bf_epi, kind="accurate")
    # small M (the audio projection): eager calls are host-bound (~0.1 ms of Python and descriptors per call vs
    # ~0.015 ms on the GPU), so every implementation of that shape is timed as CUDA-graph replay, as the engine runs it
    import triton
    bench = _bench if m >= 1024 else (lambda fn, quick: triton.testing.do_bench_cudagraph(fn))
    for _ in range(ROUNDS):   # interleaved rounds: clock / thermal drift hits every implementation alike
        for row, fn in timed:
            row["times"].append(bench(fn, quick))
    for row, _ in timed:
        row["ms"] = sorted(row["times"])[len(row["times"]) // 2]
        row["tflops"] = flops / row["ms"] * 1e-9
    base = {r["impl"]: r.get("ms") for r in rows}
    for r in rows:
        if "ms" not in r or not base.get("cublas_bf16"):
            continue
        r["ratio"] = base["cublas_bf16"] / r["ms"]
        sm = base.get("scaled_mm_fast" if r["acc"] == "fast" else "scaled_mm")
        r["vs_scaled_mm"] = sm / r["ms"] if sm and r["acc"] in ("fast", "accurate") else None
    return rows


def _producer_rows(quick, dev, m=9360, k=5120):
    """Producer kernels at the model's shape next to a copy of the same bytes; each time = the median of ROUNDS
    interleaved do_bench rounds (these issue-bound kernels follow the SM clock; single timings moved 30 %)."""
    from ..kernels.norm_quant import (layer_norm_quant, layer_norm_ref, norm_modulate_quant, quantize_rows,
                                      quantize_rows_ref, rms_norm)
    from ..model.ops import ReferenceOps
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, m, k, device=dev, generator=g).bfloat16()
    shift = (0.1 * torch.randn(1, 1, k, device=dev, generator=g)).bfloat16()
    scale = (0.1 * torch.randn(1, 1, k, device=dev, generator=g)).bfloat16()
    w = (1 + 0.1 * torch.randn(k, device=dev, generator=g)).bfloat16()
    b = (0.1 * torch.randn(k, device=dev, generator=g)).bfloat16()
    ref = ReferenceOps()
    quant_bytes = m * k * 2 + m * k + m * 4
    bf16_bytes = m * k * 4
    src = torch.empty(m * k, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    big = torch.empty(2 ** 30, device=dev, dtype=torch.bfloat16)
    big2 = torch.empty_like(big)
    big_ms = _bench(lambda: big2.copy_(big), quick)
    rows = [dict(kernel="producer", shape="2 GiB", impl="copy 2 GiB", ms=big_ms,
                 tbps=2 * big.numel() * 2 / big_ms * 1e-9, ratio=None)]
    del big, big2
    nm_ref = ref.norm_modulate(x, shift, scale, 1e-6)
    ln_ref = ref.layer_norm(x, w, b, 1e-6)
    deq = lambda qs: qs[0].float() * qs[1][..., None]   # noqa: E731
    refs = dict(nm=deq(quantize_rows_ref(nm_ref)), nmb=nm_ref, ln=deq(layer_norm_ref(x, w, b, 1e-6)), lnb=ln_ref,
                q=deq(quantize_rows_ref(x)), rms=ref.rms_norm(x, w, 1e-6))
    cases = [   # (impl, fn, bytes moved, reference key); rel_err: dequantized (or bf16) output vs the reference
        ("copy (same bytes as bf16->bf16)", lambda: dst.copy_(src), bf16_bytes, None),
        ("norm_modulate_quant", lambda: norm_modulate_quant(x, shift, scale, 1e-6), quant_bytes, "nm"),
        ("norm_modulate bf16 out", lambda: norm_modulate_quant(x, shift, scale, 1e-6, quant=False), bf16_bytes, "nmb"),
        ("layer_norm_quant (affine)", lambda: layer_norm_quant(x, w, b, 1e-6), quant_bytes, "ln"),
        ("layer_norm bf16 out (affine)", lambda: layer_norm_quant(x, w, b, 1e-6, quant=False), bf16_bytes, "lnb"),
        ("quantize_rows", lambda: quantize_rows(x), quant_bytes, "q"),
        ("rms_norm (affine, bf16 out)", lambda: rms_norm(x, w, 1e-6), bf16_bytes, "rms"),
        ("torch reference chain (norm_modulate + quantize)",
         lambda: quantize_rows_ref(ref.norm_modulate(x, shift, scale, 1e-6)), quant_bytes, None),
    ]
    timed = []
    for impl, fn, nbytes, check in cases:
        out = fn()
        err = None
        if check is not None:
            err = _rel(out if isinstance(out, torch.Tensor) else out.data.float() * out.scale[..., None], refs[check])
        del out
        timed.append((dict(kernel="producer", shape=f"{m}x{k}", impl=impl, rel_err=err, times=[]), fn, nbytes))
    del refs
    for _ in range(ROUNDS):
        for row, fn, _n in timed:
            row["times"].append(_bench(fn, quick))
    rows += _vs_copy([(row, nbytes) for row, _fn, nbytes in timed])
    return rows


def _vs_copy(timed) -> list[dict]:
    """(row with ROUNDS interleaved times, bytes moved), the first row a same-size copy -> the rows with the
    median ms, TB/s and ratio = TB/s / the copy's."""
    copy_tbps = None
    for row, nbytes in timed:
        row["ms"] = sorted(row.pop("times"))[ROUNDS // 2]
        row["tbps"] = nbytes / row["ms"] * 1e-9
        copy_tbps = copy_tbps or row["tbps"]
        row["ratio"] = row["tbps"] / copy_tbps
    return [row for row, _ in timed]


def run(device="cuda", quick=False) -> list[dict]:
    """All rows (GEMM shapes, then producer).  Needs a CUDA device with FP8 (capability >= 8.9)."""
    if not torch.cuda.is_available():
        raise ValueError("bench.kernels_gemm needs a CUDA GPU (FP8 tensor cores, capability >= 8.9)")
    rows = []
    shapes = SHAPES[:2] if quick else SHAPES
    for name, m, k, n, epi in shapes:
        try:
            rows += _gemm_rows(name, m, k, n, epi, quick, device)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kernel="gemm", shape=name, impl="setup", error=f"{type(e).__name__}: {e}"[:300]))
        torch.cuda.empty_cache()
    try:
        rows += _producer_rows(quick, device)
    except Exception as e:  # noqa: BLE001
        rows.append(dict(kernel="producer", shape="", impl="setup", error=f"{type(e).__name__}: {e}"[:300]))
    return rows


# ------------------------------------------------------------------------------------------------ tuning sweep
def _c(bm, bn, bk, stages, **kw):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, **{"num_warps": 8, **kw})


# Session 4 candidates (sessions 1-2 swept 256x128 / 128x256 with 3-4 stages, warp specialization, BK 256 and
# GROUP_M 16: bench/NOTES.md).  New: 128x128 tiles with 5-6 stages (cuBLAS's own pick for this shape is a
# 128x128, 6-stage kernel), and 128x128 with one warpgroup per CTA, two CTAs per SM (254 registers, 115 KB).
SWEEP_GEMM = {  # name: (fast_accum, config) -- explicit configs, bypassing the fixed table
    "acc 256x128x128 s3 sub": (False, _c(256, 128, 128, 3, SUBTILE=True)),
    "acc 128x128x128 s6 sub": (False, _c(128, 128, 128, 6, SUBTILE=True)),
    "acc 128x128x128 s5 sub": (False, _c(128, 128, 128, 5, SUBTILE=True)),
    "acc 128x128x128 s6 sub ws": (False, _c(128, 128, 128, 6, SUBTILE=True, WARP_SPEC=True)),
    "acc 128x128x128 s3 w4 sub 2cta": (False, _c(128, 128, 128, 3, SUBTILE=True, num_warps=4, CTAS_PER_SM=2)),
    "fast 128x256x128 s4 sub": (True, _c(128, 256, 128, 4, SUBTILE=True)),
    "fast 128x128x128 s6 sub": (True, _c(128, 128, 128, 6, SUBTILE=True)),
    "fast 128x128x128 s3 w4 sub 2cta": (True, _c(128, 128, 128, 3, SUBTILE=True, num_warps=4, CTAS_PER_SM=2)),
}
SWEEP_EPILOGUE = {  # configs tried with the layer's own epilogue (gelu / gated residual)
    "gelu": ["acc 256x128x128 s3 sub", "acc 128x128x128 s6 sub", "acc 128x128x128 s3 w4 sub 2cta"],
    "gated_residual": ["acc 256x128x128 s3 sub", "acc 128x128x128 s6 sub", "acc 128x128x128 s3 w4 sub 2cta"],
}
SWEEP_RISKY = {  # warp specialization with an epilogue: may abort the compiler (KERNELS.md 0) -> own process
    "gelu": ["acc 128x128x128 s6 sub ws"], "gated_residual": ["acc 128x128x128 s6 sub ws"]}
SWEEP_PRODUCER = {  # (rows per program, warps, hardware e4m3 cast, split K into unpadded power-of-two parts)
    5120: [(1, 2, True, True), (1, 1, True, True), (1, 4, True, True), (1, 4, True, False), (2, 2, True, True)],
    13824: [(1, 8, True, True), (1, 4, True, True)]}


def sweep(device="cuda", quick=False, parts=("gemm", "small", "producer")) -> list[dict]:
    """Explicit-config timings (tile shape, stages, C subtiling, warp specialization; producer rows/warps and
    hardware vs hand-rounded e4m3 conversion), next to _scaled_mm, plus host overhead at a small M."""
    from ..kernels import norm_quant as nq
    from ..kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, quantize_weight
    rows = []
    risky = "risky" in parts
    for name, m, k, n, epi in (SHAPES[:4] if "gemm" in parts or risky else []):
        if risky and epi == "none":
            continue
        x, w, bias, gate, res = _problem(m, k, n, device)
        qa, (wq, ws) = nq.quantize_rows(x), quantize_weight(w)
        exact = fp8_gemm_ref(qa, None, wq, ws, bias=bias, out_dtype=torch.float32)
        flops = 2.0 * m * n * k
        shape = f"{m}x{k}->{n} ({name})"
        cases = [(f"scaled_mm{'_fast' if f else ''}", lambda f=f: torch._scaled_mm(
            qa.data, wq.t(), scale_a=qa.scale.reshape(m, 1), scale_b=ws.reshape(1, n), bias=bias,
            out_dtype=torch.bfloat16, use_fast_accum=f), exact) for f in (False, True)]
        for cname, (fast, cfg) in SWEEP_GEMM.items():
            cases.append((cname, lambda fast=fast, cfg=cfg: fp8_gemm(qa, None, wq, ws, bias=bias, fast_accum=fast,
                                                                     config=dict(cfg)), exact))
        if risky:
            cases = []
        if epi != "none":
            ref_epi = fp8_gemm_ref(qa, None, wq, ws, bias=bias, epilogue=epi, residual=res.float(), gate=gate.float(),
                                   out_dtype=torch.float32)
            ek = dict(bias=bias, epilogue=epi, residual=res, gate=gate)
            cases.append(("table +" + epi, lambda: fp8_gemm(qa, None, wq, ws, **ek), ref_epi))
            for cname in (SWEEP_RISKY if risky else SWEEP_EPILOGUE)[epi]:
                cfg = SWEEP_GEMM[cname][1]
                cases.append((cname + " +" + epi, lambda cfg=cfg: fp8_gemm(qa, None, wq, ws, config=dict(cfg), **ek),
                              ref_epi))
        if not risky:
            cases.append(("table", lambda: fp8_gemm(qa, None, wq, ws, bias=bias), exact))
        timed = []
        for cname, fn, ref in cases:
            try:
                out = fn()
                row = dict(kernel="sweep-gemm", shape=shape, impl=cname, rel_err=_rel(out, ref), times=[])
                timed.append((row, fn))
            except Exception as e:  # noqa: BLE001
                row = dict(kernel="sweep-gemm", shape=shape, impl=cname, error=f"{type(e).__name__}: {e}"[:200])
            rows.append(row)
        for _ in range(ROUNDS):   # interleaved rounds, as in run(): drift hits every config alike
            for row, fn in timed:
                row["times"].append(_bench(fn, quick))
        for row, _ in timed:
            row["ms"] = sorted(row.pop("times"))[ROUNDS // 2]
            row["tflops"] = flops / row["ms"] * 1e-9
        del qa, wq, ws, exact, res
        torch.cuda.empty_cache()

    if "small" in parts:
        rows += _sweep_small(device)
    if "producer" in parts:
        rows += _sweep_producer(device, quick)
    return rows


def _sweep_small(device):
    """Host overhead per call and CUDA-graph GPU time at a small M (audio kv_linear)."""
    import time

    import triton

    from ..kernels import norm_quant as nq
    from ..kernels.fp8_gemm import fp8_gemm, quantize_weight
    rows = []
    m, k, n = 257, 768, 10240
    x = torch.randn(m, k, device=device).bfloat16()
    w = (torch.randn(n, k, device=device) / k ** 0.5).bfloat16()
    qa, (wq, ws) = nq.quantize_rows(x), quantize_weight(w)
    fns = {"ours": lambda: fp8_gemm(qa, None, wq, ws),
           "scaled_mm": lambda: torch._scaled_mm(qa.data, wq.t(), scale_a=qa.scale.reshape(m, 1),
                                                 scale_b=ws.reshape(1, n), out_dtype=torch.bfloat16)}
    for cname, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        host_us = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
        try:
            graph_ms = triton.testing.do_bench_cudagraph(fn)
        except Exception as e:  # noqa: BLE001
            graph_ms = None
            rows.append(dict(kernel="sweep-small", shape=f"{m}x{k}->{n}", impl=cname + " graph", error=str(e)[:200]))
        rows.append(dict(kernel="sweep-small", shape=f"{m}x{k}->{n}", impl=cname, ms=graph_ms,
                         tflops=2.0 * m * n * k / graph_ms * 1e-9 if graph_ms else None, host_us=host_us))

    return rows


def _sweep_producer(device, quick, m=9360):
    """Rows per program, warps, hardware vs hand-rounded e4m3 cast, split; next to a copy of the same bytes
    (ratio); same_bits = output equal to the default settings' output.  Median of ROUNDS interleaved rounds."""
    from ..kernels import norm_quant as nq
    rows = []
    for k, overrides in SWEEP_PRODUCER.items():
        x = torch.randn(1, m, k, device=device).bfloat16()
        shift = (0.1 * torch.randn(1, 1, k, device=device)).bfloat16()
        scale = (0.1 * torch.randn(1, 1, k, device=device)).bfloat16()
        qbytes, bbytes = m * k * 3 + m * 4, m * k * 4
        w = (1 + 0.1 * torch.randn(k, device=device)).bfloat16()
        b = (0.1 * torch.randn(k, device=device)).bfloat16()
        src = torch.empty(m * k, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        fns = {"q": (lambda: nq.quantize_rows(x), qbytes)}
        if k in (5120, 160):   # the model's width (160: CPU smoke test)
            fns["nm"] = (lambda: nq.norm_modulate_quant(x, shift, scale, 1e-6), qbytes)
            fns["ln"] = (lambda: nq.layer_norm_quant(x, w, b, 1e-6), qbytes)
            fns["rms"] = (lambda: nq.rms_norm(x, w, 1e-6), bbytes)
        bits = lambda o: (o if isinstance(o, torch.Tensor) else o.data).view(torch.uint8)  # noqa: E731
        base = {c: bits(f()).clone() for c, (f, _) in fns.items()}
        timed = [(dict(kernel="sweep-producer", shape=f"{m}x{k}", impl="copy (bf16 -> bf16, same bytes)", times=[]),
                  None, lambda: dst.copy_(src), bbytes)]
        for ov in overrides:
            nq.SETTINGS_OVERRIDE = ov
            for cname, (fn, nbytes) in fns.items():
                row = dict(kernel="sweep-producer", shape=f"{m}x{k}", times=[],
                           impl=f"{cname} rows{ov[0]} w{ov[1]} hw{int(ov[2])} split{int(ov[3])}")
                try:
                    row["same_bits"] = torch.equal(bits(fn()), base[cname])
                    timed.append((row, ov, fn, nbytes))
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(row, error=str(e)[:200]))
            nq.SETTINGS_OVERRIDE = None
        try:
            for _ in range(ROUNDS):
                for row, ov, fn, _n in timed:
                    nq.SETTINGS_OVERRIDE = ov
                    row["times"].append(_bench(fn, quick))
        finally:
            nq.SETTINGS_OVERRIDE = None
        rows += _vs_copy([(row, nbytes) for row, _ov, _fn, nbytes in timed])
    return rows


def _fmt(v, f):
    return "" if v is None else format(v, f)


def print_table(rows):
    print(f"{'kernel':9} {'shape':28} {'impl':48} {'ms':>8} {'TFLOP/s':>8} {'TB/s':>6} {'ratio':>6} {'vs_smm':>6} "
          f"{'rel_err':>9} {'err_bf16':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:9} {r['shape']:28} {r['impl']:48} ERROR {r['error']}")
            continue
        print(f"{r['kernel']:9} {r['shape']:28} {r['impl']:48} {_fmt(r.get('ms'), '8.4f')} "
              f"{_fmt(r.get('tflops'), '8.1f'):>8} {_fmt(r.get('tbps'), '6.2f'):>6} {_fmt(r.get('ratio'), '6.3f'):>6} "
              f"{_fmt(r.get('vs_scaled_mm'), '6.3f'):>6} {_fmt(r.get('rel_err'), '9.2e'):>9} "
              f"{_fmt(r.get('rel_err_bf16'), '9.2e'):>9}"
              + (f" host {r['host_us']:.1f} us/call" if r.get("host_us") else "")
              + (f" same_bits={r['same_bits']}" if "same_bits" in r else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two GEMM shapes, shorter timing")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--sweep", nargs="?", const="gemm,small,producer", default=None, metavar="PARTS",
                   help="tuning sweep (explicit configs) instead of the comparison; parts: gemm,small,producer,risky "
                        "(risky = warp specialization with epilogues, may abort the compiler: run it alone)")
    args = p.parse_args(argv)
    rows = sweep(quick=args.quick, parts=args.sweep.split(",")) if args.sweep else run(quick=args.quick)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
