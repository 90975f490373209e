"""kernels/attention_gluon.py (Gluon, sm90 only) against the plain-Triton kernel on the same prepared inputs
and an fp32 torch reference on the unquantized inputs.  Keys are DiT-like (per-channel offsets + outlier
channels); outputs and LSE are poisoned with NaN before each run.  Gluon has no CPU interpreter: on CPU
only the availability / error contract is tested."""
import math

import pytest
import torch

from liveact.kernels import attention as A
from liveact.kernels import attention_gluon as G

from helpers import cos, dit_like

DEV = "cuda"


def ref32(q, k, v):
    """fp32 softmax(q k^T / sqrt(D)) v and natural-log LSE, [B, Sq, H, D] / [B, H, Sq]."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()), torch.logsumexp(s, -1)


def test_unavailable_without_cuda_raises_clearly():
    if torch.cuda.is_available() and G.available():
        pytest.skip("an sm90 GPU is present")
    assert G.available() is False
    q, k, v = dit_like(1, 8, 8, 1, "cpu")
    q8, qs = A.quantize_int8(q)        # CPU: the Triton interpreter
    kv = A.QuantKV(*A.quantize_int8(k), torch.zeros(1, 1, 128, 16, dtype=torch.float8_e4m3fn),
                   torch.ones(1, 1, 128))
    with pytest.raises(ValueError, match="sm90"):
        G.attention_gluon(q8, qs, kv)


def _emulate_poly_exp2(x: torch.Tensor) -> torch.Tensor:
    """fp32 emulation of G._POLY_EXP2 (the FMA-pipe exp2 of the poly configs), constants parsed from the PTX."""
    import re
    consts = [int(c, 16) for c in re.findall(r"0f([0-9A-F]{8})", G._POLY_EXP2)]
    lo, magic, _, c3, c2, c1, c0 = (torch.tensor(c - (c >> 31 << 32), dtype=torch.int32).view(torch.float32)
                                    for c in consts)
    xc = torch.maximum(x, lo)
    f = (torch.floor(xc.double()) + magic.double()).float()          # add.rm.f32: exact sum rounded down
    r = xc - (f - magic)
    p = (r * c3 + c2) * r + c1                                         # fma.rn (fp32 products are exact
    p = p * r + c0                                                     #  enough here: error << 1e-5)
    return (p.view(torch.int32) + (f.view(torch.int32) << 23)).view(torch.float32)


def test_poly_exp2_accuracy():
    """The polynomial exp2 is within 1e-4 (relative) of 2^x where P is not 0 in e4m3, and stays finite, >= 0
    and tiny (< 2^-125) for masked / far-below-max arguments (-inf, -1000)."""
    x = torch.cat([torch.linspace(-125.0, 9.0, 200_001), torch.rand(10_000) * 20 - 12])
    y = _emulate_poly_exp2(x)
    rel = (y.double() / torch.exp2(x.double()) - 1).abs().max().item()
    assert rel < 1e-4, rel
    low = _emulate_poly_exp2(torch.tensor([float("-inf"), -1000.0, -127.0]))
    assert torch.isfinite(low).all() and (low >= 0).all() and (low < 2.0 ** -125).all()
    assert "ex2.approx.ftz.f32" in G._ASM_POLY25 and G._ASM_POLY25.count("fma.rn.f32") == 3
    assert G._ASM_POLY50.count("fma.rn.f32") == 6 and G._ASM_POLY50.count("ex2.approx") == 2


PER_KEY_CONFIGS = [c for c in G.CONFIGS if not G.CONFIGS[c].get("KBLOCK", False)]
KBLOCK_CONFIGS = [c for c in G.CONFIGS if G.CONFIGS[c].get("KBLOCK", False)]


@pytest.mark.parametrize("b,sk,h", [(2, 300, 3), (1, 128, 1), (1, 1, 2)])
def test_requantize_k_per_block(b, sk, h):
    """Per-key int8 keys -> one scale per 128-key block: shapes, the reconstruction bound
    |k8_block * scale - k8 * ks| <= scale / 2 per element, +-127 reached in every block, round half away
    from zero, and the per-key expansion of the scales."""
    g = torch.Generator().manual_seed(sk)
    k8 = torch.randint(-127, 128, (b, sk, h, 128), generator=g, dtype=torch.int8)
    ks = torch.rand(b, h, sk, generator=g) * 0.1 + 1e-3                # per-key scales of different sizes
    k8b, ksb = G.requantize_k_per_block(k8, ks)
    nblk = (sk + 127) // 128
    assert k8b.dtype == torch.int8 and k8b.shape == k8.shape and ksb.shape == (b, h, nblk)
    assert ksb.dtype == torch.float32 and k8b.is_contiguous() and ksb.is_contiguous()
    x = k8.double() * ks.double().transpose(1, 2)[..., None]
    tok = G.per_key_scales(ksb, sk)                                      # [B, H, Sk]
    assert tok.shape == (b, h, sk)
    sc = tok.double().transpose(1, 2)[..., None]
    err = (k8b.double() * sc - x).abs()
    assert (err <= sc * (0.5 + 1e-5)).all(), (err / sc).max().item()
    amax = k8b.abs().view(b, sk, h, 128).to(torch.int32)
    for j in range(nblk):                                               # the block's amax maps to 127
        assert (amax[:, j * 128:(j + 1) * 128].amax(dim=(1, 3)) == 127).all()
    # round half away from zero (ties at +-0.5 go outwards), and a 1-key input keeps its single scale
    k1 = torch.tensor([[[[2, -1, 1, 0] + [0] * 124]]], dtype=torch.int8)   # [1, 1, 1, 128]
    q1, s1 = G.requantize_k_per_block(k1, torch.ones(1, 1, 1), block=128)
    assert s1.item() == pytest.approx(2 / 127) and q1[0, 0, 0, :4].tolist() == [127, -64, 64, 0]
    with pytest.raises(ValueError, match="per-key scale"):
        G.requantize_k_per_block(k8, torch.ones(b, h + 1, sk))
    # the QuantKV form: the same keys and scales, V and km passed through
    vt, vs, km = torch.zeros(b, h, 128, 16), torch.rand(b, h, 128), torch.rand(b, h, 128)
    kvb = G.requantize_kv_per_block(A.QuantKV(k8, ks, vt, vs, km))
    assert torch.equal(kvb.k8, k8b) and torch.equal(kvb.k_scale, ksb)
    assert kvb.vt is vt and kvb.v_scale is vs and kvb.km is km


def test_kblock_dispatch_by_scale_shape():
    """Host logic (CPU): per-key [B, H, Sk] vs per-block [B, H, cdiv(Sk, 128)] scales pick the kernel variant;
    wrong pairings raise ValueError naming the fix."""
    def kv(sk, n):
        return A.QuantKV(torch.zeros(1, sk, 2, 128, dtype=torch.int8), torch.ones(1, 2, n), None, None)
    assert G._kblock(kv(300, 300), "plain_s2") is False
    assert G._kblock(kv(300, 3), "plain_s2") is True
    assert G._kblock(kv(300, 3), "plain_s2_kblock") is True and G._kblock(kv(300, 3), "plain_s2_kblock_3cta")
    assert G._kblock(kv(1, 1), "plain_s2") is False and G._kblock(kv(1, 1), "plain_s2_kblock") is True
    with pytest.raises(ValueError, match="requantize_k_per_block"):
        G._kblock(kv(300, 300), "plain_s2_kblock")
    with pytest.raises(ValueError, match="plain_s2_kblock"):
        G._kblock(kv(300, 3), "ws_pp")


def test_kblock_exp2_argument_precision():
    """The KBLOCK softmax forms x = sb * a + (a0 + log2 448 - m) with sb = 1.5*2^23 + s (exact float), a = qs*kb,
    a0 = -1.5*2^23 * a, all fp32, one FFMA (emulated: exact product + one rounding).  Its error against the exact
    s * a + log2 448 - m stays within a few units of a (one unit of the int32 score), far below the int8 error."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-2_000_000, 2_000_001, (4096,), generator=g, dtype=torch.int64)
    for a in (3e-7, 1e-5, 4e-4):
        af = torch.tensor(a, dtype=torch.float32)
        a0 = (af * -12582912.0).float()
        sb = (s + 12582912).float()                                      # exact in fp32 (< 2^24)
        m = (sb.max() * af + a0).float()                                 # the row max as the kernel gets it
        cc = (a0 + (torch.tensor(8.807354922057604, dtype=torch.float32) - m)).float()
        x = (sb.double() * af.double() + cc.double()).float()            # FFMA
        exact = s.double() * af.double() + 8.807354922057604 - m.double()
        assert (x.double() - exact).abs().max().item() <= 4 * a
        assert x.max().item() <= 8.807354922057604 + 4 * a               # p <= ~448 (e4m3 cast saturates)


@pytest.mark.gpu
@pytest.mark.parametrize("b,sq,sk,h", [(1, 200, 1000, 3), (2, 300, 1000, 2), (1, 64, 1, 1), (1, 130, 128, 2),
                                       (1, 70, 100, 1), (1, 100, 512, 2)])
@pytest.mark.parametrize("config", KBLOCK_CONFIGS)
def test_gluon_kblock_matches_triton_and_fp32(b, sq, sk, h, config):
    """Per-key-block K scales: the Triton kernel on the same requantized keys (block scales repeated per key)
    is the reference; also fp32 and plain_s2 on the per-key keys.  Outputs and LSE poisoned.  The same keys
    in key_row_order16 (k_perm: the kernel's shuffle-free P layout) give the same result up to the fp32 order of
    the row sums (out within one bf16 ulp, LSE within 1e-5)."""
    if not G.available():
        pytest.skip("needs an sm90 GPU")
    q, k, v = dit_like(b, sq, sk, h, DEV, seed=sk + b + 1)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    kvb = G.requantize_kv_per_block(kv)
    kvt = A.QuantKV(kvb.k8, G.per_key_scales(kvb.k_scale, sk), kv.vt, kv.v_scale, kv.km)
    o_t, l_t = A.attention_quant_prepared(q8, qs, kvt, return_lse=True, autotune=False)
    out = torch.full_like(o_t, float("nan"))
    lse = torch.full_like(l_t, float("nan"))
    res = G.attention_gluon(q8, qs, kvb, out=out, return_lse=True, lse=lse, config=config)
    assert res[0] is out and res[1] is lse
    assert not out.isnan().any() and not lse.isnan().any()
    assert cos(out, o_t) >= 0.9999
    # LMMA: l = the sum of the e4m3 P (the Triton kernel sums the fp32 P): LSE within ~1e-2 of it
    lmma = G.CONFIGS[config].get("LMMA", False)
    assert (lse - l_t).abs().max().item() < (3e-2 if lmma else 1e-3)
    if lmma:   # (one-block inputs: measured mean 2.6e-3 at Sk = 100-128)
        assert (lse - l_t).abs().mean().item() < 5e-3
    r, rl = ref32(q, k, v)
    assert cos(out, r) >= 0.999
    err = (lse - rl).abs()
    assert err.mean().item() <= 0.02 and err.max().item() <= 0.1
    assert cos(out, G.attention_gluon(q8, qs, kv, config="plain_s2")) >= 0.9995
    # per-block scales are detected by shape: the default config runs its KBLOCK variant (same code)
    o2 = G.attention_gluon(q8, qs, kvb)
    if config == "plain_s2_kblock":
        assert torch.equal(o2, out)
    else:
        assert cos(o2, out) >= (0.9999 if lmma else 0.99999)
    kvp = A.QuantKV(G.permute_key_rows(kvb.k8), kvb.k_scale, kvb.vt, kvb.v_scale, kvb.km, k_perm=True)
    outp = torch.full_like(o_t, float("nan"))
    lsep = torch.full_like(l_t, float("nan"))
    G.attention_gluon(q8, qs, kvp, out=outp, return_lse=True, lse=lsep, config=config)
    assert not outp.isnan().any() and not lsep.isnan().any()
    assert ((outp.float() - out.float()).abs() <= out.float().abs() * 2.0 ** -7 + 1e-6).all()
    assert (lsep - lse).abs().max().item() <= 1e-5 and cos(outp, out) >= 0.999999
    # the row sums on the tensor cores (LMMA) against the fp32 row sums of the same kernel without them
    if lmma:
        o3, l3 = G.attention_gluon(q8, qs, kvp, return_lse=True, config="plain_s2_kblock_3cta")
        assert cos(out, o3) >= 0.9999 and (lse - l3).abs().max().item() < 3e-2


@pytest.mark.gpu
def test_gluon_accumulate_is_the_bf16_sum():
    """accumulate=True (cross-attention: text + image contexts) = the bf16 sum of the two outputs, exactly."""
    if not G.available():
        pytest.skip("needs an sm90 GPU")
    q, k1, v1 = dit_like(1, 200, 512, 2, DEV, seed=11)
    _, k2, v2 = dit_like(1, 200, 257, 2, DEV, seed=12)
    q8, qs = A.quantize_q(q)
    kvs = [G.requantize_kv_per_block(A.quantize_kv(k, v)) for k, v in ((k1, v1), (k2, v2))]
    o1, o2 = (G.attention_gluon(q8, qs, kv, config="plain_s2_kblock_3cta") for kv in kvs)
    out = torch.full_like(o1, float("nan"))
    G.attention_gluon(q8, qs, kvs[0], out=out, config="plain_s2_kblock_3cta")
    res = G.attention_gluon(q8, qs, kvs[1], out=out, accumulate=True, config="plain_s2_kblock_3cta")
    assert res is out and torch.equal(out, o1 + o2)
    with pytest.raises(ValueError, match="accumulate"):
        G.attention_gluon(q8, qs, kvs[1], accumulate=True, config="plain_s2_kblock_3cta")
    # both contexts in one launch (kv2): the same bits as the two launches
    fused = torch.full_like(o1, float("nan"))
    res = G.attention_gluon(q8, qs, kvs[0], kv2=kvs[1], out=fused, config="plain_s2_kblock_3cta")
    assert res is fused and torch.equal(fused, o1 + o2)
    with pytest.raises(ValueError, match="kv2"):
        G.attention_gluon(q8, qs, kvs[0], kv2=kvs[1], return_lse=True, config="plain_s2_kblock_3cta")


@pytest.mark.gpu
def test_gluon_two_contexts_one_launch_batches():
    """kv2 with B = 2, a query tail (Sq = 130), contexts of 100 and 300 keys (ring slots continue across the
    contexts: 1 + 3 blocks with 2 stages), per-key (plain_s2) and per-block scales: equal to two launches."""
    if not G.available():
        pytest.skip("needs an sm90 GPU")
    q, k1, v1 = dit_like(2, 130, 100, 3, DEV, seed=13)
    _, k2, v2 = dit_like(2, 130, 300, 3, DEV, seed=14)
    q8, qs = A.quantize_q(q)
    def perm(kv):
        kvb = G.requantize_kv_per_block(kv)
        return A.QuantKV(G.permute_key_rows(kvb.k8), kvb.k_scale, kvb.vt, kvb.v_scale, kvb.km, k_perm=True)
    for config, conv in (("plain_s2", lambda kv: kv), ("plain_s2_kblock_3cta", G.requantize_kv_per_block),
                         ("plain_s2_kblock_3cta", perm), ("plain_s2_kblock_3cta_lmma", perm)):
        kvs = [conv(A.quantize_kv(k, v)) for k, v in ((k1, v1), (k2, v2))]
        o1, o2 = (G.attention_gluon(q8, qs, kv, config=config) for kv in kvs)
        fused = torch.full_like(o1, float("nan"))
        G.attention_gluon(q8, qs, kvs[0], kv2=kvs[1], out=fused, config=config)
        assert torch.equal(fused, o1 + o2), config


@pytest.mark.gpu
def test_gluon_kblock_bad_scales():
    if not G.available():
        pytest.skip("needs an sm90 GPU")
    q, k, v = dit_like(1, 64, 300, 2, DEV)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    with pytest.raises(ValueError, match="requantize_k_per_block"):      # per-key scales, KBLOCK config
        G.attention_gluon(q8, qs, kv, config="plain_s2_kblock")
    bad = A.QuantKV(kv.k8, kv.k_scale[..., :5].contiguous(), kv.vt, kv.v_scale, kv.km)
    with pytest.raises(ValueError, match="k_scale"):
        G.attention_gluon(q8, qs, bad)
    with pytest.raises(ValueError, match="unknown config"):
        G.attention_gluon(q8, qs, kv, config="nope")
    with pytest.raises(ValueError, match="plain_s2_kblock"):             # per-block scales, untested schedule
        G.attention_gluon(q8, qs, G.requantize_kv_per_block(kv), config="ws_pp")
    kvb = G.requantize_kv_per_block(kv)
    kvp = A.QuantKV(G.permute_key_rows(kvb.k8), kvb.k_scale, kvb.vt, kvb.v_scale, kvb.km, k_perm=True)
    with pytest.raises(ValueError, match="k_perm"):                      # permuted keys need per-block scales
        G.attention_gluon(q8, qs, A.QuantKV(kvp.k8, kv.k_scale, kv.vt, kv.v_scale, kv.km, k_perm=True))
    with pytest.raises(ValueError, match="k_perm"):                      # and the same order in both contexts
        G.attention_gluon(q8, qs, kvp, kv2=kvb, config="plain_s2_kblock_3cta")


@pytest.mark.gpu
@pytest.mark.parametrize("b,sq,sk,h", [(1, 200, 1000, 3), (2, 300, 1000, 2), (1, 64, 1, 1), (1, 130, 128, 2)])
@pytest.mark.parametrize("config", PER_KEY_CONFIGS)
def test_gluon_matches_triton_and_fp32(b, sq, sk, h, config):
    if not G.available():
        pytest.skip("needs an sm90 GPU")
    q, k, v = dit_like(b, sq, sk, h, DEV, seed=sk + b)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    o_t, l_t = A.attention_quant_prepared(q8, qs, kv, return_lse=True, autotune=False)
    out = torch.full_like(o_t, float("nan"))
    lse = torch.full_like(l_t, float("nan"))
    res = G.attention_gluon(q8, qs, kv, out=out, return_lse=True, lse=lse, config=config)
    assert res[0] is out and res[1] is lse
    assert not out.isnan().any() and not lse.isnan().any()
    assert cos(out, o_t) >= 0.9999
    # ex2.approx.f16x2 (EXP=1): the f16 argument near the row max is rounded to 2^-7 and the f16 ex2 has up to
    # 2^-9.9 relative error, so the top term of l is off by up to ~0.3% (measured 2.2e-3 in the LSE at Sk = 1)
    lse_tol = 5e-3 if G.CONFIGS[config].get("EXP", 0) == 1 else 1e-3
    assert (lse - l_t).abs().max().item() < lse_tol
    r, rl = ref32(q, k, v)
    assert cos(out, r) >= 0.999
    err = (lse - rl).abs()                     # int8 Q.K error ~1e-2 in the scores (as tests/test_attention.py)
    assert err.mean().item() <= 0.02 and err.max().item() <= 0.1
    o2 = G.attention_gluon(q8, qs, kv, config=config)          # allocating path, no lse
    assert torch.equal(o2, out)


@pytest.mark.gpu
@pytest.mark.parametrize("per_block", [False, True, "perm"])
def test_gluon_real_shape_few_heads(per_block):
    """The real key length (16380 = 127 full 128-key blocks + a 124-key tail) and query count with 4 heads:
    per-key scales (default config) against the Triton kernel, and per-block keys (plain_s2_kblock; "perm": the
    keys in key_row_order16 through the production config) against the Triton kernel on the same keys with the
    block scales repeated per key."""
    if not G.available():
        pytest.skip("needs an sm90 GPU")
    q, k, v = dit_like(1, 9360, 16380, 4, DEV, seed=8 if per_block else 7)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    kvg, kvt, extra = kv, kv, {}
    if per_block:
        kvg = G.requantize_kv_per_block(kv)
        kvt = A.QuantKV(kvg.k8, G.per_key_scales(kvg.k_scale, 16380), kv.vt, kv.v_scale, kv.km)
        extra = {"config": "plain_s2_kblock"}
        if per_block == "perm":
            kvg = A.QuantKV(*A.requantize_k_blocks(kv.k8, kv.k_scale, perm16=True), kv.vt, kv.v_scale, kv.km,
                            k_perm=True)
            extra = {"config": "plain_s2_kblock_3cta_lmma"}
    o_t, l_t = A.attention_quant_prepared(q8, qs, kvt, return_lse=True, autotune=False)
    out = torch.full_like(o_t, float("nan"))
    lse = torch.full_like(l_t, float("nan"))
    G.attention_gluon(q8, qs, kvg, out=out, return_lse=True, lse=lse, **extra)
    assert not out.isnan().any() and not lse.isnan().any()
    assert cos(out, o_t) >= 0.9999
    assert (lse - l_t).abs().max().item() < (3e-2 if per_block == "perm" else 1e-3)   # perm: LMMA (e4m3 P sums)
    r, rl = ref32(q[:, :, :2], k[:, :, :2], v[:, :, :2])
    assert cos(out[:, :, :2], r) >= 0.999
    if not per_block:
        err = (lse[:, :2] - rl).abs()
        assert err.mean().item() <= 0.02 and err.max().item() <= 0.1


@pytest.mark.gpu
def test_gluon_bad_inputs():
    if not G.available():
        pytest.skip("needs an sm90 GPU")
    q, k, v = dit_like(1, 64, 64, 2, DEV)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    with pytest.raises(ValueError, match="contiguous"):
        G.attention_gluon(q8.transpose(1, 2).contiguous().transpose(1, 2), qs, kv)
    with pytest.raises(ValueError, match="128"):
        G.attention_gluon(q8[..., :64], qs, kv)
