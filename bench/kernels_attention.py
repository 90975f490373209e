"""Benchmark of the attention-side kernels at the LiveAct shapes (one 8-frame chunk, 416x720).

    python -m liveact.bench.kernels_attention [--producers] [--quick]     (needs CUDA)

Rows: {"kernel", "shape", "impl", "ms", "tflops", "tbps", "ratio", "cos", "rel_l1"}.
- self-attention 9360 q x 16380 k, 40 heads x 128 (FLOPs 4*Sq*Sk*H*D): ours int8/fp8 (kernel alone on
  prepared inputs, and end to end with quantization), ours bf16, SDPA bf16 default backend, and
  sageattention 1.0.6 when importable; ratio = vs SDPA; cos / rel_l1 (sum|o-r| / sum|r|) vs an fp32
  reference on 2 heads.  Keys carry per-channel offsets and a few outlier channels, like a DiT's.
- producers (`--producers` runs only these): qk_prep (RMSNorm+RoPE+int8 q+cache write), rope_keys,
  quantize_v (bf16 and fp8 cache sources), ConvKV update (bf16, fp8), requantize_k_blocks (per-key int8
  keys -> one scale per 128-key block): TB/s on the minimum bytes they must move; ratio = time of a
  device-to-device copy of the same bytes in the same run / ours.
- cross-attention (q vs 257 image + 512 text keys, two softmaxes summed) and audio attention
  (8 frames x 1170 q vs 32 keys): ours (the forced Triton kernels, and the GPU default: on sm90 the Gluon
  per-block kernel) vs SDPA; ratio = SDPA time / ours.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQ, SK, H, D, FL = 9360, 16380, 40, 128, 1170


def _bench(fn, quick):
    import triton
    return triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median")


def _metrics(o, r):
    o, r = o.double().flatten(), r.double().flatten()
    cos = F.cosine_similarity(o, r, dim=0).item()
    return cos, ((o - r).abs().sum() / r.abs().sum()).item()


def _keys(shape, device, gen):
    """DiT-like keys: N(0,1) + per-channel offset N(0, 1) + 4 outlier channels per head of size ~8."""
    k = torch.randn(shape, device=device, generator=gen)
    k += torch.randn(shape[2:], device=device, generator=gen)
    k[..., :4] += 8.0 * torch.randn(shape[2], 4, device=device, generator=gen)
    return k.bfloat16()


def _ref_fp32(q, k, v, heads=2):
    """fp32 reference on the first `heads` heads: [B, Sq, heads, D]."""
    outs = []
    for h in range(heads):
        qh, kh, vh = q[0, :, h].float(), k[0, :, h].float(), v[0, :, h].float()
        p = torch.softmax((qh @ kh.T) / math.sqrt(D), dim=-1)
        outs.append(p @ vh)
    return torch.stack(outs, dim=1)[None]


def _row(kernel, shape, impl, ms, flops=None, nbytes=None, ratio=None, cos=None, rel_l1=None):
    return {"kernel": kernel, "shape": shape, "impl": impl, "ms": ms,
            "tflops": flops / ms / 1e9 if flops else None, "tbps": nbytes / ms / 1e9 if nbytes else None,
            "ratio": ratio, "cos": cos, "rel_l1": rel_l1}


def _copy_ms(nbytes, device, quick):
    """A device-to-device copy that reads nbytes/2 and writes nbytes/2 (the same traffic)."""
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return _bench(lambda: dst.copy_(src), quick)


def run_producers(device="cuda", quick=False, gen=None) -> list[dict]:
    """qk_prep, rope_keys, quantize_v, ConvKV update, requantize_k_blocks at the LiveAct shapes (one
    8-frame chunk, 14-slot cache, Sk = 16380 keys = 7020 cache rows + 9360 fresh).  Bytes = the minimum
    the operation moves (each input byte read once, each output byte written once, RoPE table rows
    included); ratio = a device copy of the same number of bytes, timed in the same run / ours."""
    import triton

    from ..kernels import attention as A
    from ..kernels import convkv as C
    from ..kernels import qk_prep as P
    from ..model.ops import fp8_quantize_per_head
    from ..model.rope import Rope3D

    gen = gen if gen is not None else torch.Generator(device=device).manual_seed(0)
    rows = []
    nb = 1 << 30
    ms = _copy_ms(2 * nb, device, quick)
    rows.append(_row("copy", "1 GiB", "torch copy_", ms, nbytes=2 * nb, ratio=1.0))

    def add(kernel, shape, impl, fn, nbytes):
        ms = _bench(fn, quick)
        rows.append(_row(kernel, shape, impl, ms, nbytes=nbytes, ratio=_copy_ms(nbytes, device, quick) / ms))

    l, n, ws = 8 * FL, 14 * FL, 6 * FL
    rope = Rope3D(45, 26).to(device)
    cos, sin = (t.contiguous() for t in rope.cos_sin())
    qx, kx, vx = (torch.randn((1, l, H, D), device=device, generator=gen).bfloat16() for _ in range(3))
    w = (1 + 0.1 * torch.randn(H * D, device=device, generator=gen)).bfloat16()
    cache_k = _keys((1, n, H, D), device, gen)
    cache_v = torch.randn((1, n, H, D), device=device, generator=gen).bfloat16()
    e = l * H * D
    by = e * (6 + 1 + 2 + 2) + l * H * 4 + l * D * 8     # read q,k,v; write q8, kn, v; q scales; cos/sin
    add("qk_prep", f"{l}x{H}x{D}", "ours", lambda: P.qk_prep(qx, kx, vx, w, w, 1e-6, cos, sin, ws,
                                                               cache_k[:, ws:ws + l], cache_v[:, ws:ws + l]), by)
    # key / value sets as prepare_self_attention builds them: bf16 cache = one source of n rows;
    # fp8 cache = e4m3 rows [0, ws) + scales ++ the fresh bf16 chunk
    k8, ks8 = fp8_quantize_per_head(cache_k[:, :ws])
    v8, vs8 = fp8_quantize_per_head(cache_v[:, :ws])
    tab = n * (D // 2) * 8 * 2
    in_f8 = ws * H * (D + 4) + l * H * D * 2
    out_k = n * H * (D + 4)
    for name, src, nin in (("bf16 cache", [P.KSource(cache_k)], n * H * D * 2),
                           ("fp8 cache", [P.KSource(k8, ks8), P.KSource(cache_k[:, ws:])], in_f8)):
        add("rope_keys", f"{n}x{H}x{D} {name}", f"ours (km from 1/{P.KM_STRIDE} of the keys)",
            lambda: P.rope_keys(src, cos, sin, quantize=True), nin + out_k + tab)
    for name, src, nin in (("bf16 cache", [A.VSource(cache_v)], n * H * D * 2),
                           ("fp8 cache", [A.VSource(v8, vs8), A.VSource(cache_v[:, ws:])], in_f8)):
        add("quantize_v", f"{n}x{H}x{D} {name}", "ours (amax pass + quantize pass)",
            lambda: A.quantize_v(src), nin + A._pad16(n) * H * D)
    wconv = (0.2 + 0.05 * torch.randn(H * D, 1, 5, device=device, generator=gen)).bfloat16()
    add("convkv_update", f"{n}x{H}x{D} bf16 K+V", "ours (3 launches)",
        lambda: C.kv_memory_update(cache_k, cache_v, None, None, wconv, FL), 2 * 14 * FL * H * D * 2)
    ks8 = cache_k.to(torch.float8_e4m3fn)
    vs8 = cache_v.to(torch.float8_e4m3fn)
    ksc = torch.rand((1, n, H, 1), device=device, generator=gen) + 0.01
    vsc = torch.rand((1, n, H, 1), device=device, generator=gen) + 0.01
    add("convkv_update", f"{n}x{H}x{D} fp8 K+V", "ours (3 launches)",
        lambda: C.kv_memory_update(ks8, vs8, ksc, vsc, wconv, FL), 2 * 14 * FL * H * (D + 4))
    # per-key int8 keys of the whole key set (Sk = 16380) -> one scale per 128-key block (gluon kblock input):
    # read k8 + per-key scales, write k8 + block scales
    k8s, kss = A.quantize_int8(_keys((1, SK, H, D), device, gen))
    add("requantize_k_blocks", f"{SK}x{H}x{D} int8", "ours (1 pass)", lambda: A.requantize_k_blocks(k8s, kss),
        2 * SK * H * D + SK * H * 4 + H * triton.cdiv(SK, 128) * 4)
    return rows


def run(device="cuda", quick=False) -> list[dict]:
    from ..kernels import attention as A
    from ..model.rope import Rope3D

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # [B, H, S, D]

    # ---------------------------------------------------------------- self-attention
    sq, sk = (SQ, SK) if not quick else (2048, 4096)
    shape = f"{sq}x{sk} h{H} d{D}"
    q = torch.randn((1, sq, H, D), device=device, generator=gen).bfloat16()
    k = _keys((1, sk, H, D), device, gen)
    v = torch.randn((1, sk, H, D), device=device, generator=gen).bfloat16()
    ref = _ref_fp32(q, k, v)
    flops = 4 * sq * sk * H * D
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    ms_sdpa = _bench(lambda: sdpa(qt, kt, vt), quick)
    o = sdpa(qt, kt, vt).transpose(1, 2)
    rows.append(_row("self_attn", shape, "sdpa-bf16", ms_sdpa, flops, ratio=1.0, cos=_metrics(o[:, :, :2], ref)[0],
                     rel_l1=_metrics(o[:, :, :2], ref)[1]))
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    o = A.attention_quant_prepared(q8, qs, kv)
    c, r = _metrics(o[:, :, :2], ref)
    ms = _bench(lambda: A.attention_quant_prepared(q8, qs, kv), quick)
    rows.append(_row("self_attn", shape, "ours-int8fp8 kernel", ms, flops, ratio=ms_sdpa / ms, cos=c, rel_l1=r))
    from ..kernels import attention_gluon as G
    if G.available():
        o = G.attention_gluon(q8, qs, kv)
        c2, r2 = _metrics(o[:, :, :2], ref)
        ms = _bench(lambda: G.attention_gluon(q8, qs, kv), quick)
        rows.append(_row("self_attn", shape, f"ours-gluon {G.DEFAULT_CONFIG}", ms, flops, ratio=ms_sdpa / ms, cos=c2,
                         rel_l1=r2))
        # keys requantized to one scale per 128-key block, 3 CTAs per SM: natural key order + fp32 row sums
        # (session 4), rows in key_row_order16 (requantize_k_blocks(perm16=True), shuffle-free P), and as the
        # engine runs it on sm90: that + the row sums on the tensor cores (KBLOCK_CONFIG)
        from ..kernels.attention_ops import KBLOCK_CONFIG
        for label, perm, cfg in (("natural key order", False, "plain_s2_kblock_3cta"),
                                 ("key_row_order16", True, "plain_s2_kblock_3cta"), ("default", True, KBLOCK_CONFIG)):
            kvb = A.QuantKV(*A.requantize_k_blocks(kv.k8, kv.k_scale, perm16=perm), kv.vt, kv.v_scale, kv.km,
                            k_perm=perm)
            o = G.attention_gluon(q8, qs, kvb, config=cfg)
            c2, r2 = _metrics(o[:, :, :2], ref)
            ms = _bench(lambda: G.attention_gluon(q8, qs, kvb, config=cfg), quick)
            rows.append(_row("self_attn", shape, f"ours-gluon {cfg} ({label})", ms, flops,
                             ratio=ms_sdpa / ms, cos=c2, rel_l1=r2))
            del kvb
    o = A.attention_quant_prepared(q8, qs, kv, lazy=True)
    c2, r2 = _metrics(o[:, :, :2], ref)
    ms = _bench(lambda: A.attention_quant_prepared(q8, qs, kv, lazy=True), quick)
    rows.append(_row("self_attn", shape, "ours-int8fp8 kernel lazy-rescale", ms, flops, ratio=ms_sdpa / ms, cos=c2,
                     rel_l1=r2))
    ms = _bench(lambda: A.attention(q, k, v, quantized=True), quick)
    rows.append(_row("self_attn", shape, "ours-int8fp8 +quant", ms, flops, ratio=ms_sdpa / ms, cos=c, rel_l1=r))
    o = A.attention(q, k, v, quantized=False)
    c, r = _metrics(o[:, :, :2], ref)
    ms = _bench(lambda: A.attention(q, k, v, quantized=False), quick)
    rows.append(_row("self_attn", shape, "ours-bf16", ms, flops, ratio=ms_sdpa / ms, cos=c, rel_l1=r))
    o, lse = A.attention(q, k, v, quantized=True, return_lse=True)
    s = (q[0, :, :2].float().transpose(0, 1) @ k[0, :, :2].float().permute(1, 2, 0)) / math.sqrt(D)
    lse_err = (lse[0, :2] - torch.logsumexp(s, -1)).abs().max().item()
    rows.append(_row("self_attn_lse", shape, "ours-int8fp8 max|lse err|", None, cos=None, rel_l1=lse_err))
    del s
    try:
        from sageattention import sageattn
        o = sageattn(qt, kt, vt, tensor_layout="HND", is_causal=False).transpose(1, 2)
        c, r = _metrics(o[:, :, :2], ref)
        ms = _bench(lambda: sageattn(qt, kt, vt, tensor_layout="HND", is_causal=False), quick)
        rows.append(_row("self_attn", shape, "sageattention", ms, flops, ratio=ms_sdpa / ms, cos=c, rel_l1=r))
    except Exception as e:  # not installed (or failed): say so in the table
        rows.append(_row("self_attn", shape, f"sageattention n/a ({type(e).__name__})", None))
    del qt, kt, vt, ref

    rows += run_producers(device, quick, gen)
    l, n = 8 * FL, 14 * FL
    rope = Rope3D(45, 26).to(device)
    qx = torch.randn((1, l, H, D), device=device, generator=gen).bfloat16()
    w = (1 + 0.1 * torch.randn(H * D, device=device, generator=gen)).bfloat16()

    # ---------------------------------------------------------------- the self_attention op end to end
    from ..kernels.attention_ops import TritonAttentionOps
    from ..model.ops import ReferenceOps
    qx8, kx8, vx8 = (torch.randn((1, l, H, D), device=device, generator=gen).bfloat16() for _ in range(3))
    kx8 += torch.randn((H, D), device=device, generator=gen).bfloat16()
    flops = 4 * l * n * H * D
    k_init = _keys((1, n, H, D), device, gen)
    v_init = torch.randn((1, n, H, D), device=device, generator=gen).bfloat16()
    res = {}
    for name, ops in (("reference (SDPA + fp64 RoPE)", ReferenceOps()), ("ours-int8fp8", TritonAttentionOps(True)),
                      ("ours-bf16", TritonAttentionOps(False))):
        for fp8 in (False, True):
            kvc = ops.alloc_kv(1, n, H, D, torch.bfloat16, device, fp8=fp8)
            ops.kv_write(kvc, 0, k_init, v_init)
            fn = lambda: ops.self_attention(qx8, kx8, vx8, w, w, 1e-6, kvc, rope, 6, 6 * FL)
            o = fn()
            res[(name, fp8)] = o
            ms = _bench(fn, quick)
            c = r = None
            if name != "reference (SDPA + fp64 RoPE)":
                c, r = _metrics(o, res[("reference (SDPA + fp64 RoPE)", fp8)])
            if name.startswith("reference"):
                res[("ms", fp8)] = ms
            rows.append(_row("self_attention op", f"{l}q x {n}k, {'fp8' if fp8 else 'bf16'} cache", name, ms, flops,
                             ratio=res[("ms", fp8)] / ms, cos=c, rel_l1=r))
            del kvc

    # ---------------------------------------------------------------- cross / audio attention
    kimg, ktxt = _keys((1, 257, H, D), device, gen), _keys((1, 512, H, D), device, gen)
    vimg, vtxt = (torch.randn((1, s_, H, D), device=device, generator=gen).bfloat16() for s_ in (257, 512))
    qt = qx.transpose(1, 2)
    pairs_t = [(ktxt.transpose(1, 2), vtxt.transpose(1, 2)), (kimg.transpose(1, 2), vimg.transpose(1, 2))]
    ref_fn = lambda: sdpa(qt, *pairs_t[0]) + sdpa(qt, *pairs_t[1])
    ms_ref = _bench(ref_fn, quick)
    ref = ref_fn().transpose(1, 2)
    flops = 4 * l * (257 + 512) * H * D
    rows.append(_row("cross_attn", f"{l}x(512+257)", "sdpa-bf16 x2", ms_ref, flops, ratio=1.0))
    for quant in (True, False):
        ops = TritonAttentionOps(quantized=quant, force=True)   # force: our kernels (the GPU default is SDPA here)
        pairs = [(ktxt, vtxt), (kimg, vimg)]
        o = ops.cross_attention(qx, pairs)
        c, r = _metrics(o, ref)
        ms = _bench(lambda: ops.cross_attention(qx, pairs), quick)
        impl = "ours-int8fp8 ops (2 launches, kv memo)" if quant else "ours-bf16 ops (fused kernel)"
        rows.append(_row("cross_attn", f"{l}x(512+257)", impl, ms, flops, ratio=ms_ref / ms, cos=c, rel_l1=r))
    ops = TritonAttentionOps()   # the GPU default: on sm90 the Gluon per-block kernel, 2 launches + accumulate
    pairs = [(ktxt, vtxt), (kimg, vimg)]
    o = ops.cross_attention(qx, pairs)
    c, r = _metrics(o, ref)
    ms = _bench(lambda: ops.cross_attention(qx, pairs), quick)
    rows.append(_row("cross_attn", f"{l}x(512+257)", "ours default ops (sm90: gluon per-block, one launch)", ms,
                     flops, ratio=ms_ref / ms, cos=c, rel_l1=r))
    from ..kernels import attention_gluon as G
    if G.available():   # as the engine runs it: context K/V prepared once per prompt; one launch vs two
        from ..kernels.attention_ops import KBLOCK_CONFIG
        prepared = [ops.prepare_context_kv(k, v) for k, v in pairs]
        kvg = [A.QuantKV(*p[2:], k_perm=True) for p in prepared]   # prepare_context_kv: key_row_order16

        def gluon_two():
            q8, qs = A.quantize_q(qx)
            out = G.attention_gluon(q8, qs, kvg[0], config=KBLOCK_CONFIG)
            return G.attention_gluon(q8, qs, kvg[1], out=out, accumulate=True, config=KBLOCK_CONFIG)
        o = ops.cross_attention(qx, prepared)
        c, r = _metrics(o, ref)
        ms1 = _bench(lambda: ops.cross_attention(qx, prepared), quick)
        ms2 = _bench(gluon_two, quick)
        same = "same bits as two" if torch.equal(o, gluon_two()) else "DIFFERS from two launches"
        rows.append(_row("cross_attn", f"{l}x(512+257)", f"gluon per-block, prepared K/V, one launch ({same})", ms1,
                         flops, ratio=ms_ref / ms1, cos=c, rel_l1=r))
        rows.append(_row("cross_attn", f"{l}x(512+257)", "gluon per-block, prepared K/V, two launches (session 3)",
                         ms2, flops, ratio=ms_ref / ms2))
    kvq = [A.quantize_kv(ktxt, vtxt), A.quantize_kv(kimg, vimg)]

    def two_launches():
        q8, qs = A.quantize_q(qx)
        out = A.attention_quant_prepared(q8, qs, kvq[0])
        return A.attention_quant_prepared(q8, qs, kvq[1], out=out, accumulate=True)
    ms = _bench(lambda: A.cross_attention2(qx, kvq[0], kvq[1], quantized=True), quick)
    rows.append(_row("cross_attn", f"{l}x(512+257)", "ours-int8fp8 fused kernel", ms, flops, ratio=ms_ref / ms))
    ms = _bench(two_launches, quick)
    rows.append(_row("cross_attn", f"{l}x(512+257)", "ours-int8fp8 2 launches + accumulate", ms, flops,
                     ratio=ms_ref / ms))
    qa = torch.randn((8, FL, H, D), device=device, generator=gen).bfloat16()
    ka = torch.randn((8, 32, H, D), device=device, generator=gen).bfloat16()
    va = torch.randn((8, 32, H, D), device=device, generator=gen).bfloat16()
    qat, kat, vat = (t.transpose(1, 2) for t in (qa, ka, va))
    ms_ref = _bench(lambda: sdpa(qat, kat, vat), quick)
    ref = sdpa(qat, kat, vat).transpose(1, 2)
    flops = 4 * 8 * FL * 32 * H * D
    rows.append(_row("audio_attn", f"8x{FL}x32", "sdpa-bf16", ms_ref, flops, ratio=1.0))
    o = A.attention_bf16(qa, ka, va)
    c, r = _metrics(o, ref)
    ms = _bench(lambda: A.attention_bf16(qa, ka, va), quick)
    rows.append(_row("audio_attn", f"8x{FL}x32", "ours-bf16", ms, flops, ratio=ms_ref / ms, cos=c, rel_l1=r))
    return rows


def format_table(rows) -> str:
    cols = ["kernel", "shape", "impl", "ms", "tflops", "tbps", "ratio", "cos", "rel_l1"]
    def fmt(v, c):
        if v is None:
            return "-"
        if c == "cos":
            return f"{v:.6f}"
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    table = [cols] + [[fmt(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--producers", action="store_true",
                    help="only the memory-bound producers (qk_prep, rope_keys, quantize_v, ConvKV) vs copy")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels_attention needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(format_table(run_producers("cuda", quick=args.quick) if args.producers else run("cuda", quick=args.quick)))


if __name__ == "__main__":
    main()
