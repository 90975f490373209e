"""Gluon sm90 attention (kernels/attention_gluon.py) vs the plain-Triton INT8/FP8 kernel vs SDPA bf16.

    source bench/devenv.sh; python -m liveact.bench.attention_gluon_bench [--configs ws,ws_overlap] [--quick]
    source bench/devenv.sh; python -m liveact.bench.attention_gluon_bench --exp2-micro      (exp2 unit throughput)
    source bench/devenv.sh; python -m liveact.bench.attention_gluon_bench --kblock --budget 180
        (per-key-block K scales: plain_s2 vs plain_s2_kblock(_3cta) vs Triton vs SDPA)
    source bench/devenv.sh; python -m liveact.bench.attention_gluon_bench --kblock-probe \
        --configs plain_s2,plain_s2_kblock,plain_s2_kblock_3cta      (NaN probe on small shapes + short timing)

KBLOCK configs (per-key-block K scales) run on keys requantized from quantize_kv's per-key int8 keys with
kernels.attention_gluon.requantize_k_per_block; their correctness is checked against the Triton kernel on the
same requantized keys (scales repeated per key), against plain_s2 on the per-key input ("cos vs plain_s2"), and
against fp32 on 2 heads for both the requantized keys and keys quantized per block straight from bf16
("cos fp32 direct", what a per-block producer would emit).

Every Gluon config runs in its own subprocess (a hung or crashing variant costs only its own timeout):
correctness first (real shape 9360 x 16380 x 40 x 128 against the Triton kernel on all heads and an fp32
reference on 2 heads; B=2, Sq=300, Sk=1000, 3 heads with return_lse against the Triton kernel; outputs
poisoned with NaN), then timing (triton.testing.do_bench median).  A table is printed last; a log goes to
$OUT/attention_gluon_bench.log (or ./attention_gluon_bench.log).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

SHAPE = (1, 9360, 16380, 40, 128)   # B, Sq, Sk, H, D


def _inputs(b, sq, sk, h, seed, device="cuda"):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, sq, h, 128, generator=g, device=device)
    k = torch.randn(b, sk, h, 128, generator=g, device=device)
    k += 2.0 * torch.randn(h, 128, generator=g, device=device)          # per-channel offsets (DiT-like)
    k[..., :4] += 8.0 * torch.randn(h, 4, generator=g, device=device)   # outlier channels
    v = torch.randn(b, sk, h, 128, generator=g, device=device)
    return [t.bfloat16() for t in (q, k, v)]


def _metrics(o, r):
    import torch
    o, r = o.double().flatten(), r.double().flatten()
    return (torch.nn.functional.cosine_similarity(o, r, dim=0).item(),
            ((o - r).abs().sum() / r.abs().sum()).item())


def _ref_fp32(q, k, v, heads=2):
    import torch
    outs = []
    for hh in range(heads):
        qh, kh, vh = (t[0, :, hh].float() for t in (q, k, v))
        p = torch.softmax(qh @ kh.T / math.sqrt(128), dim=-1)
        outs.append(p @ vh)
        del p
    return torch.stack(outs, dim=1)[None]   # [1, Sq, heads, D]


def worker(name: str, quick: bool) -> dict:
    """One config; a name ending in "+perm" runs that config on per-block keys stored in key_row_order16
    (requantize_k_blocks(perm16=True), QuantKV(k_perm=True): the production input of the self-attention)."""
    import torch
    import triton
    from liveact.kernels import attention as A
    from liveact.kernels import attention_gluon as G

    res = {"name": name}
    perm = name.endswith("+perm")
    name = name.split("+")[0]

    def per_block(kv):
        if perm:
            return A.QuantKV(*A.requantize_k_blocks(kv.k8, kv.k_scale, perm16=True), kv.vt, kv.v_scale, kv.km,
                             k_perm=True)
        return G.requantize_kv_per_block(kv)
    b, sq, sk, h, d = SHAPE
    flops = 4.0 * b * sq * sk * h * d
    q, k, v = _inputs(b, sq, sk, h, seed=1)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    kblock = name != "baseline" and G.CONFIGS[name].get("KBLOCK", False)
    if kblock:
        kv_tok = kv
        kv_n = G.requantize_kv_per_block(kv)                      # per-block keys, per-block scales
        kv_t = A.QuantKV(kv_n.k8, G.per_key_scales(kv_n.k_scale, sk), kv.vt, kv.v_scale, kv.km)  # same, per key
        kv = per_block(kv_tok)
        del kv_n
        ref_t = A.attention_quant_prepared(q8, qs, kv_t, autotune=False)
    else:
        ref_t = A.attention_quant_prepared(q8, qs, kv, autotune=(name == "baseline"))
    torch.cuda.synchronize()
    if name == "baseline":
        r2 = _ref_fp32(q, k, v)
        res["cos_fp32"], res["rel_l1_fp32"] = _metrics(ref_t[:, :, :2], r2)
        fn_t = lambda: A.attention_quant_prepared(q8, qs, kv)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        fn_s = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        res["ms_triton"] = triton.testing.do_bench(fn_t, warmup=25, rep=200 if not quick else 50, return_mode="median")
        res["ms_sdpa"] = triton.testing.do_bench(fn_s, warmup=25, rep=200 if not quick else 50, return_mode="median")
        res["tf_triton"] = flops / res["ms_triton"] * 1e-9
        res["tf_sdpa"] = flops / res["ms_sdpa"] * 1e-9
        return res

    # correctness, real shape
    t0 = time.time()
    out = torch.full_like(ref_t, float("nan"))
    G.attention_gluon(q8, qs, kv, out=out, config=name)
    torch.cuda.synchronize()
    res["compile_run_s"] = time.time() - t0
    res["nan"] = bool(out.isnan().any().item())
    res["cos_triton"], res["rel_l1_triton"] = _metrics(out, ref_t)
    r2 = _ref_fp32(q, k, v)
    res["cos_fp32"], res["rel_l1_fp32"] = _metrics(out[:, :, :2], r2)
    if kblock:
        o_s2 = G.attention_gluon(q8, qs, kv_tok, config="plain_s2")           # per-key scales, same input
        res["cos_plain_s2"], res["rel_l1_plain_s2"] = _metrics(out, o_s2)
        res["cos_fp32_plain_s2"] = _metrics(o_s2[:, :, :2], r2)[0]
        del o_s2
        k8d, ksd = G.quantize_k_per_block(k, kv.km)                          # one rounding from bf16
        kvd = A.QuantKV(G.permute_key_rows(k8d) if perm else k8d, ksd, kv.vt, kv.v_scale, kv.km, k_perm=perm)
        od = G.attention_gluon(q8, qs, kvd, config=name)
        res["cos_fp32_direct"], res["rel_l1_fp32_direct"] = _metrics(od[:, :, :2], r2)
        del od, kvd, k8d
    del r2
    # small shapes with return_lse: B=2 with a key tail, a single partial block, one exact block, one key
    res["small_nan"], res["small_cos"], res["small_lse_maxdiff"] = False, 1.0, 0.0
    for i, (bb, sqa, ska, ha) in enumerate([(2, 300, 1000, 3), (1, 130, 100, 2), (1, 64, 128, 1), (1, 70, 1, 1)]):
        qa, ka, va = _inputs(bb, sqa, ska, ha, seed=2 + i)
        qa8, qas = A.quantize_q(qa)
        kva = A.quantize_kv(ka, va)
        if kblock:
            kvn = G.requantize_kv_per_block(kva)
            kva_t = A.QuantKV(kvn.k8, G.per_key_scales(kvn.k_scale, ska), kva.vt, kva.v_scale, kva.km)
            oa_t, la_t = A.attention_quant_prepared(qa8, qas, kva_t, return_lse=True, autotune=False)
            kva = per_block(kva)
        else:
            oa_t, la_t = A.attention_quant_prepared(qa8, qas, kva, return_lse=True, autotune=False)
        oa = torch.full_like(oa_t, float("nan"))
        la = torch.full_like(la_t, float("nan"))
        G.attention_gluon(qa8, qas, kva, out=oa, return_lse=True, lse=la, config=name)
        torch.cuda.synchronize()
        res["small_nan"] |= bool(oa.isnan().any().item() or la.isnan().any().item())
        res["small_cos"] = min(res["small_cos"], _metrics(oa, oa_t)[0])
        res["small_lse_maxdiff"] = max(res["small_lse_maxdiff"], (la - la_t).abs().max().item())
    # timing
    fn = lambda: G.attention_gluon(q8, qs, kv, out=out, config=name)
    res["ms"] = triton.testing.do_bench(fn, warmup=25, rep=200 if not quick else 50, return_mode="median")
    res["tf"] = flops / res["ms"] * 1e-9
    return res


def kblock_probe(configs: list[str]) -> None:
    """NaN / accuracy probe of the KBLOCK configs on small shapes (out and LSE poisoned, 3 runs each), including
    Sk = 1 with smoothed keys (all keys equal the mean: zero keys, scale 1e-12/127), then a short timing at the
    real shape.  Prints one line per (config, case)."""
    import torch
    import triton
    from liveact.kernels import attention as A
    from liveact.kernels import attention_gluon as G
    cases = [("deg_sk1", 1, 64, 1, 1, True), ("deg_sk1_sq70", 1, 70, 1, 1, True), ("sk1_nosmooth", 1, 64, 1, 1, False),
             ("sk100", 1, 130, 100, 2, True), ("sk128", 1, 64, 128, 1, True), ("sk129", 1, 64, 129, 1, True),
             ("sk1000_b2", 2, 300, 1000, 3, True)]
    for ci, (tag, b, sq, sk, h, smooth) in enumerate(cases):
        q, k, v = _inputs(b, sq, sk, h, seed=10 + ci)
        q8, qs = A.quantize_q(q)
        kv = A.quantize_kv(k, v, smooth=smooth)
        kvb = G.requantize_kv_per_block(kv)
        kvt = A.QuantKV(kvb.k8, G.per_key_scales(kvb.k_scale, sk), kv.vt, kv.v_scale, kv.km)
        o_t, l_t = A.attention_quant_prepared(q8, qs, kvt, return_lse=True, autotune=False)
        for name in configs:
            kvx = kv if not G.CONFIGS[name].get("KBLOCK", False) else kvb
            ref_o, ref_l = (o_t, l_t) if kvx is kvb else A.attention_quant_prepared(q8, qs, kv, return_lse=True,
                                                                                    autotune=False)
            bad = []
            for rep in range(3):
                o = torch.full_like(o_t, float("nan"))
                lse = torch.full_like(l_t, float("nan"))
                G.attention_gluon(q8, qs, kvx, out=o, return_lse=True, lse=lse, config=name)
                on = o.isnan().any(-1)                                   # [B, Sq, H]
                ln = lse.isnan()
                bad.append((int(on.sum()), int(ln.sum())))
                if rep == 0:
                    first = on.nonzero()[:4].tolist()
                    ok = ~on.permute(0, 2, 1)
                    c = _metrics(o.permute(0, 2, 1, 3)[ok], ref_o.permute(0, 2, 1, 3)[ok])[0] if ok.any() else 0
                    dl = (lse - ref_l)[ok & ~ln].abs().max().item() if (ok & ~ln).any() else float("nan")
            print(f"probe {tag:<14} {name:<22} nan rows (out, lse) x3 {bad} first {first} cos {c:.6f} "
                  f"lse diff {dl:.2e}", flush=True)
    b, sq, sk, h, d = SHAPE
    flops = 4.0 * b * sq * sk * h * d
    q, k, v = _inputs(b, sq, sk, h, seed=1)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    kvb = G.requantize_kv_per_block(kv)
    out = torch.empty_like(q)
    ref = G.attention_gluon(q8, qs, kvb, config="plain_s2_kblock")
    for name in configs:
        kvx = kvb if G.CONFIGS[name].get("KBLOCK", False) else kv
        G.attention_gluon(q8, qs, kvx, out=out, config=name)
        nan = bool(out.isnan().any())
        c = _metrics(out, ref)[0]
        ms = triton.testing.do_bench(lambda: G.attention_gluon(q8, qs, kvx, out=out, config=name), warmup=25,
                                     rep=100, return_mode="median")
        print(f"probe time {name:<22} {ms:.3f} ms {flops / ms * 1e-9:.0f} TF/s nan {nan} cos vs kblock {c:.6f}",
              flush=True)


def exp2_micro() -> list[tuple[str, float]]:
    """Throughput of one exp2 flavour in isolation (2^26 elements, 16 per thread, 256 dependent exp2 each,
    x <- 2^-x stays in (0, 1]): ex2.approx.ftz.f32 (MUFU), ex2.approx.f16x2 (MUFU.EX2.F16 x2 on sm90),
    and the kernel's FMA-pipe polynomial (kernels.attention_gluon._POLY_EXP2).  Returns (name, G exp2/s)."""
    import torch
    import triton
    import triton.language as tl
    from liveact.kernels import attention_gluon as G

    @triton.jit
    def _k(X, ITERS: tl.constexpr, ASM: tl.constexpr, F16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        for _ in range(ITERS):
            if F16:
                x = tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)
            else:
                x = tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        tl.store(X + offs, x)

    n, iters, block = 1 << 26, 256, 2048
    poly = "{ .reg .b32 y; neg.f32 y, $1; " + G._POLY_EXP2.format(o="$0", a="y") + " }"
    modes = [("ex2.approx.ftz.f32", "{ .reg .b32 y; neg.f32 y, $1; ex2.approx.ftz.f32 $0, y; }", False),
             ("ex2.approx.f16x2", "{ .reg .b32 y; xor.b32 y, $1, 0x80008000; ex2.approx.f16x2 $0, y; }", True),
             ("poly3 (FMA pipe)", poly, False)]
    out = []
    for name, asm, f16 in modes:
        x = torch.rand(n, device="cuda", dtype=torch.float16 if f16 else torch.float32)
        fn = lambda: _k[(n // block,)](x, ITERS=iters, ASM=asm, F16=f16, BLOCK=block, num_warps=4)
        ms = triton.testing.do_bench(fn, warmup=5, rep=100, return_mode="median")
        out.append((name, n * iters / ms * 1e-6))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="")
    ap.add_argument("--worker", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=int, default=100)
    ap.add_argument("--exp2-micro", action="store_true")
    ap.add_argument("--kblock", action="store_true",
                    help="configs plain_s2, plain_s2_kblock, plain_s2_kblock_3cta (per-key-block K scales)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="total seconds for all workers (0 = none): later workers get what is left, so the "
                         "table is printed before an outer timeout")
    ap.add_argument("--kblock-probe", action="store_true", help="NaN probe of the KBLOCK configs (+ --configs)")
    args = ap.parse_args()
    if args.kblock_probe:
        kblock_probe([n for n in args.configs.split(",") if n])
        return
    if args.kblock and not args.configs:
        args.configs = "plain_s2,plain_s2_kblock,plain_s2_kblock_3cta"
    if args.exp2_micro:
        import torch
        props = torch.cuda.get_device_properties(0)
        for name, g in exp2_micro():
            print(f"exp2 micro {name:<20} {g:8.0f} G/s = {g / props.multi_processor_count:6.2f} G/s per SM "
                  f"({_device()})", flush=True)
        return
    if args.worker:
        res = worker(args.worker, args.quick)
        print("RESULT " + json.dumps(res), flush=True)
        return
    from liveact.kernels import attention_gluon as G
    names = [n for n in args.configs.split(",") if n] or list(G.CONFIGS)
    log_path = os.path.join(os.environ.get("OUT", "."), "attention_gluon_bench.log")
    results = []
    t_start = time.time()
    with open(log_path, "w") as log:
        for name in ["baseline"] + names:
            cmd = [sys.executable, "-m", "liveact.bench.attention_gluon_bench", "--worker", name]
            if args.quick:
                cmd.append("--quick")
            t0 = time.time()
            tmo = args.timeout
            if args.budget > 0:
                tmo = min(tmo, args.budget - (t0 - t_start))
            if tmo < 5:
                text = f"SKIPPED: budget of {args.budget}s used up"
            else:
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=tmo)
                    text = p.stdout + p.stderr
                except subprocess.TimeoutExpired as e:
                    text = f"TIMEOUT after {tmo:.0f}s\n" + str(e.stdout or "") + str(e.stderr or "")
            log.write(f"===== {name} ({time.time() - t0:.1f}s)\n{text}\n")
            log.flush()
            res = {"name": name, "error": text.strip().splitlines()[-1][:200] if text.strip() else "no output"}
            for line in text.splitlines():
                if line.startswith("RESULT "):
                    res = json.loads(line[7:])
            results.append(res)
            print(json.dumps(res), flush=True)
    base = results[0]
    print(f"\ndevice: {_device()}  shape B,Sq,Sk,H,D = {SHAPE}  FLOPs/call = {4 * math.prod(SHAPE) / 1e12:.3f} T")
    print(f"{'impl':<22}{'ms':>8}{'TF/s':>8}{'x triton':>10}{'x sdpa':>8}{'cos vs triton':>15}{'cos vs fp32':>13}"
          f"{'small cos':>11}{'lse diff':>10}")
    if "ms_triton" in base:
        print(f"{'sdpa bf16':<22}{base['ms_sdpa']:8.3f}{base['tf_sdpa']:8.0f}{'':>10}{'':>8}")
        print(f"{'triton int8/fp8':<22}{base['ms_triton']:8.3f}{base['tf_triton']:8.0f}{1.0:10.3f}"
              f"{base['ms_sdpa'] / base['ms_triton']:8.3f}{'':>15}{base['cos_fp32']:13.6f}")
    else:
        print("baseline failed:", base.get("error"))
    for r in results[1:]:
        if "ms" not in r:
            print(f"{r['name']:<22} FAILED: {r.get('error')}")
            continue
        xt = base.get("ms_triton", float("nan")) / r["ms"]
        xs = base.get("ms_sdpa", float("nan")) / r["ms"]
        flag = " NaN!" if r["nan"] or r["small_nan"] else ""
        print(f"{r['name']:<22}{r['ms']:8.3f}{r['tf']:8.0f}{xt:10.3f}{xs:8.3f}{r['cos_triton']:15.6f}"
              f"{r['cos_fp32']:13.6f}{r['small_cos']:11.6f}{r['small_lse_maxdiff']:10.2e}{flag}")
    kb = [r for r in results[1:] if "cos_plain_s2" in r]
    if kb:
        s2 = [r for r in results[1:] if r["name"] == "plain_s2" and "ms" in r]
        print("\nKBLOCK configs (cos vs triton = Triton kernel on the same per-block keys; "
              "direct = keys quantized per block from bf16):")
        print(f"{'impl':<22}{'x plain_s2':>11}{'cos vs plain_s2':>17}{'cos fp32 (s2 same run)':>24}"
              f"{'cos fp32 direct':>17}")
        for r in kb:
            ratio = s2[0]["ms"] / r["ms"] if s2 and "ms" in r else float("nan")
            print(f"{r['name']:<22}{ratio:11.3f}{r['cos_plain_s2']:17.6f}"
                  f"{r['cos_fp32']:12.6f} ({r['cos_fp32_plain_s2']:.6f}){r['cos_fp32_direct']:17.6f}")


def _device():
    try:
        import torch
        return torch.cuda.get_device_name()
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
