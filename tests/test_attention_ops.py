"""TritonAttentionOps (kernels/attention_ops.py) against ReferenceOps through the ops seam: each
overridden op on fresh random inputs, and the tiny model's forward over 3 chunks (chunk 2 runs the
ConvKV memory update) with an FP8 cache + quantized attention and a bf16 cache + bf16 attention."""
import pytest
import torch

from liveact.kernels.attention_ops import TritonAttentionOps
from liveact.model.checkpoint import build_empty, init_random_
from liveact.model.config import get_preset
from liveact.model.dit import ChunkLayout
from liveact.model.ops import ReferenceOps
from liveact.model.rope import Rope3D

from helpers import cos


def rnd(*shape, seed, device, offset=0.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if offset:
        x += offset * torch.randn(shape[-2:], generator=g)
    return x.bfloat16().to(device)


@pytest.mark.parametrize("fp8,quant", [(True, True), (False, True), (False, False)])
def test_self_attention_op(fp8, quant, device):
    """Chunk at write_start = 6 frames against a filled cache (rows [0, 6 Fl))."""
    h, d, fl = 2, 128, 10
    rope = Rope3D(2, 5, device=device)
    ref, tri = ReferenceOps(), TritonAttentionOps(quantized=quant, force=True)
    caches = [ref.alloc_kv(1, 14 * fl, h, d, torch.bfloat16, device, fp8=fp8) for _ in range(2)]
    for c in caches:
        ref.kv_write(c, 0, rnd(1, 6 * fl, h, d, seed=1, device=device, offset=2.0),
                     rnd(1, 6 * fl, h, d, seed=2, device=device))
    q, k, v = (rnd(1, 8 * fl, h, d, seed=s, device=device, offset=1.0) for s in (3, 4, 5))
    w = (1 + 0.1 * rnd(h * d, seed=6, device=device).float()).bfloat16()
    o_ref = ref.self_attention(q, k, v, w, w, 1e-6, caches[0], rope, 6, 6 * fl)
    o = tri.self_attention(q, k, v, w, w, 1e-6, caches[1], rope, 6, 6 * fl)
    assert not o.isnan().any()
    assert cos(o, o_ref) >= (0.999 if quant else 0.99999)
    for a, b in zip(caches[1].tensors(), caches[0].tensors()):   # the chunk's cache rows
        assert cos(a.float(), b.float()) >= 0.99999


def _self_attention_case(ops, device, fl=10, h=2, fp8=True):
    rope = Rope3D(2, 5 if fl == 10 else fl // 2, device=device)
    cache = ReferenceOps().alloc_kv(1, 14 * fl, h, 128, torch.bfloat16, device, fp8=fp8)
    ReferenceOps().kv_write(cache, 0, rnd(1, 6 * fl, h, 128, seed=1, device=device, offset=2.0),
                            rnd(1, 6 * fl, h, 128, seed=2, device=device))
    q, k, v = (rnd(1, 8 * fl, h, 128, seed=s, device=device, offset=1.0) for s in (3, 4, 5))
    w = (1 + 0.1 * rnd(h * 128, seed=6, device=device).float()).bfloat16()
    return ops.self_attention(q, k, v, w, w, 1e-6, cache, rope, 6, 6 * fl)


def test_gluon_choice_falls_back_off_hopper(device):
    """attention_kernel='gluon' runs the Triton kernel where Gluon cannot (CPU interpreter, non-sm90)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("sm90: the Gluon kernel itself runs (see the gpu test)")
    a = _self_attention_case(TritonAttentionOps(force=True, attention_kernel="gluon"), device)
    b = _self_attention_case(TritonAttentionOps(force=True), device)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="attention_kernel"):
        TritonAttentionOps(attention_kernel="sage")


@pytest.mark.gpu
def test_cross_attention_gpu():
    """GPU cross-attention (text 512 + image 257 keys): with the Gluon per-block kernel (auto on sm90) both
    contexts in one launch, the second added into the first's bf16 output; otherwise the reference SDPA math,
    bit-exact."""
    from liveact.kernels import attention_gluon as G
    q = rnd(1, 300, 4, 128, seed=1, device="cuda")
    pairs = [(rnd(1, 512, 4, 128, seed=2, device="cuda", offset=2.0), rnd(1, 512, 4, 128, seed=3, device="cuda")),
             (rnd(1, 257, 4, 128, seed=4, device="cuda", offset=2.0), rnd(1, 257, 4, 128, seed=5, device="cuda"))]
    ref = ReferenceOps().cross_attention(q, pairs)
    assert torch.equal(TritonAttentionOps(attention_kernel="triton").cross_attention(q, pairs), ref)
    assert torch.equal(TritonAttentionOps(attention_kernel="gluon").cross_attention(q, pairs), ref)
    if not G.available():
        return
    ops = TritonAttentionOps()
    o = ops.cross_attention(q, pairs)
    assert not o.isnan().any() and cos(o, ref) >= 0.999
    one = [ops.cross_attention(q, [p]) for p in pairs]             # each context alone, then their bf16 sum
    assert torch.equal(o, one[0] + one[1])                         # (both contexts run in one launch)
    assert torch.equal(ops.cross_attention(q, pairs), o)          # memoized K/V: the same result
    prepared = [ops.prepare_context_kv(k, v) for k, v in pairs]      # quantized once per prompt
    assert all(len(p) == 7 and p[0] is k for p, (k, _) in zip(prepared, pairs))
    assert torch.equal(ops.cross_attention(q, prepared), o)
    assert ReferenceOps().prepare_context_kv(*pairs[0]) == pairs[0]


@pytest.mark.gpu
def test_gluon_self_attention_op_gpu():
    from liveact.kernels import attention_gluon as G
    if not G.available():
        pytest.skip("needs sm90 + gluon")
    for fp8 in (True, False):
        args = dict(device="cuda", fl=120, h=4, fp8=fp8)
        o_t = _self_attention_case(TritonAttentionOps(attention_kernel="triton"), **args)
        o_r = _self_attention_case(ReferenceOps(), **args)
        # per-key scales: the Triton kernel's math; per-block scales: one more int8 rounding of the keys
        for kernel, tol in (("gluon", 0.9999), ("gluon-kblock", 0.9995)):
            ops = TritonAttentionOps(attention_kernel=kernel)
            assert ops.self_attention_kernel(o_t) == kernel
            o_g = _self_attention_case(ops, **args)
            assert not o_g.isnan().any()
            assert cos(o_g, o_t) >= tol and cos(o_g, o_r) >= 0.999


def test_attention_lse_cross_audio_ops(device):
    ref, tri = ReferenceOps(), TritonAttentionOps(quantized=True, force=True)
    q, k, v = rnd(1, 30, 2, 128, seed=1, device=device), rnd(1, 45, 2, 128, seed=2, device=device, offset=2.0), \
        rnd(1, 45, 2, 128, seed=3, device=device)
    o, lse = tri.attention_lse(q, k, v)
    o_r, lse_r = ref.attention_lse(q.float(), k.float(), v.float())
    assert cos(o, o_r) >= 0.999 and (lse - lse_r).abs().max().item() <= 0.1
    pairs = [(rnd(1, 64, 2, 128, seed=4, device=device, offset=2.0), rnd(1, 64, 2, 128, seed=5, device=device)),
             (rnd(1, 33, 2, 128, seed=6, device=device, offset=2.0), rnd(1, 33, 2, 128, seed=7, device=device))]
    o = tri.cross_attention(q, pairs)
    assert cos(o, ref.cross_attention(q, pairs)) >= 0.999
    o2 = tri.cross_attention(q, pairs)          # second call: memoized quantized K/V
    assert torch.equal(o, o2) and len(tri._memo) == 2
    qa, ka, va = rnd(3, 20, 2, 128, seed=8, device=device), rnd(3, 32, 2, 128, seed=9, device=device), \
        rnd(3, 32, 2, 128, seed=10, device=device)
    assert cos(tri.audio_attention(qa, ka, va), ref.audio_attention(qa, ka, va)) >= 0.99999


@pytest.mark.slow
@pytest.mark.parametrize("fp8,quant", [(True, True), (False, False)])
def test_tiny_model_three_chunks(fp8, quant, device):
    cfg = get_preset("tiny").replace(text_len=64)
    model = init_random_(build_empty(cfg, device=device, dtype=torch.bfloat16), seed=1)
    gh, gw = 2, 5
    fl = gh * gw
    rope = Rope3D(gh, gw, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    ctx = model.embed_context(torch.randn(7, cfg.text_dim, generator=g).to(device),
                              torch.randn(1, 33, cfg.clip_dim, generator=g).to(device))
    audio = torch.randn(14, cfg.context_tokens, cfg.output_dim, generator=g).bfloat16().to(device)
    e, e0 = model.embed_time(torch.tensor([937.5], device=device))
    ops = {"ref": ReferenceOps(), "tri": TritonAttentionOps(quantized=quant, force=True)}
    caches = {}
    for name, o in ops.items():
        model.set_ops(o)
        caches[name] = model.alloc_caches(fl, fp8=fp8)
    for n in range(3):
        ch = ChunkLayout.for_chunk(n)
        lat = torch.randn(16, ch.frames, 2 * gh, 2 * gw, generator=g).to(device)
        y = torch.randn(20, ch.frames, 2 * gh, 2 * gw, generator=g).to(device)
        outs = {}
        for name, o in ops.items():
            model.set_ops(o)
            if n >= 2:
                model.memory_update(caches[name], fl)
            akv = None if n == 0 else model.chunk_audio_kv(audio, ch)
            outs[name] = model(lat, y, e, e0, ctx, akv, caches[name], rope, ch)
        assert not outs["tri"].isnan().any()
        c = cos(outs["tri"], outs["ref"])
        assert c >= 0.99, (n, c)
        for a, b in zip(caches["tri"], caches["ref"]):
            ka = a.k.float() * (a.k_scale if fp8 else 1)
            kb = b.k.float() * (b.k_scale if fp8 else 1)
            assert cos(ka, kb) >= 0.999, n
