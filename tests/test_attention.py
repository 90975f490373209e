"""kernels/attention.py against fp64 / ReferenceOps attention (CPU: Triton interpreter, tiny shapes;
GPU tests at the real LiveAct shapes).  Keys carry per-channel offsets and outlier channels like a
real DiT's; outputs (and LSE) are poisoned with NaN before every kernel run."""
import math

import pytest
import torch

from liveact.kernels import attention as A
from liveact.model.ops import ReferenceOps

from helpers import dit_like


def ref64(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double()), torch.logsumexp(s, -1)


def metrics(o, r):
    o, r = o.double().flatten(), r.double().flatten()
    return torch.nn.functional.cosine_similarity(o, r, dim=0).item(), ((o - r).abs().sum() / r.abs().sum()).item()


def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# (Sq, Sk): Sq not a multiple of the 64-row tile; Sk with a masked tail, exactly one block, a single key
SHAPES = [(40, 77), (64, 64), (17, 1)]


@pytest.mark.parametrize("sq,sk", SHAPES)
def test_bf16_attention_and_lse(sq, sk, device):
    q, k, v = dit_like(2, sq, sk, 2, device, seed=sq + sk)
    out, lse = nan_like(q.shape, torch.bfloat16, device), nan_like((2, 2, sq), torch.float32, device)
    A.attention_bf16(q, k, v, out=out, return_lse=True, lse=lse)
    r, rl = ref64(q, k, v)
    cos, rel = metrics(out, r)
    assert cos >= 0.99999 and rel <= 6e-3, (cos, rel)
    assert (lse.double() - rl).abs().max().item() <= 1e-3


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("sq,sk", SHAPES)
def test_quantized_attention_and_lse(sq, sk, lazy, device):
    q, k, v = dit_like(2, sq, sk, 2, device, seed=sq + sk)
    q8, qs = A.quantize_q(q)
    kv = A.quantize_kv(k, v)
    out, lse = nan_like(q.shape, torch.bfloat16, device), nan_like((2, 2, sq), torch.float32, device)
    A.attention_quant_prepared(q8, qs, kv, out=out, return_lse=True, lse=lse, lazy=lazy)
    r, rl = ref64(q, k, v)
    cos, rel = metrics(out, r)
    assert cos >= 0.999 and rel <= 0.05, (cos, rel)
    # LSE: natural log, with the K-smoothing term added back; int8 Q.K error ~1e-2 in the scores
    err = (lse.double() - rl).abs()
    assert err.mean().item() <= 0.02 and err.max().item() <= 0.1, (err.mean().item(), err.max().item())


def test_single_key_never_counts_padding(device):
    """One key: softmax weight 1, out == v exactly up to rounding.  A kernel that let the 15+ padded
    keys of the block into the normalizer (sageattention 1.0.6) would return ~v/16."""
    q, k, v = dit_like(1, 16, 1, 2, device, seed=3)
    for quant in (False, True):
        o = A.attention(q, k, v, quantized=quant)
        rel = ((o.float() - v.float()).norm() / v.float().norm()).item()
        assert rel <= 0.04, (quant, rel)


def test_accumulate_sums_two_softmaxes(device):
    q, k1, v1 = dit_like(1, 30, 33, 2, device, seed=5)
    _, k2, v2 = dit_like(1, 30, 70, 2, device, seed=6)
    ref = ReferenceOps().cross_attention(q.cpu().float(), [(k1.cpu().float(), v1.cpu().float()),
                                                           (k2.cpu().float(), v2.cpu().float())])
    out = nan_like(q.shape, torch.bfloat16, device)
    A.attention_bf16(q, k1, v1, out=out)
    A.attention_bf16(q, k2, v2, out=out, accumulate=True)
    cos, rel = metrics(out.cpu(), ref)
    assert cos >= 0.99999 and rel <= 6e-3, (cos, rel)


@pytest.mark.parametrize("split", [70, 0, None])
def test_quantize_v_sources(split, device):
    """V from an FP8 cache slice (rows [0, split): e4m3 + per-(token, head) scales) plus fresh bf16
    rows (split=70: a 64-key tile straddles the sources; 0: no cache rows; None: one bf16 tensor).
    vs must equal torch's amax / 448 bit for bit; the e4m3 codes equal e4m3(v / vs) but for rare
    one-code differences (GPU division), and the padding columns are 0."""
    from liveact.model.ops import fp8_dequantize_per_head, fp8_quantize_per_head
    sk = 150
    _, _, v = dit_like(1, 1, sk, 2, device, seed=9)
    v[:, 5, :, 3] = 9.0                                                  # an outlier key
    if split is None:
        vt, vs = A.quantize_v(v)
        full = v.float()
    else:
        c8, cs = fp8_quantize_per_head(v[:, :split])
        vt, vs = A.quantize_v([A.VSource(c8, cs), A.VSource(v[:, split:])])
        full = torch.cat([fp8_dequantize_per_head(c8, cs), v[:, split:]], dim=1).float()
    assert vt.shape == (1, 2, 128, 160)
    assert torch.equal(vs, (full.abs().amax(1) / 448.0).clamp_min(1e-12))
    ref = (full.permute(0, 2, 3, 1) / vs[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    got = vt[..., :sk].float()
    assert not got.isnan().any()
    diff = got != ref
    assert diff.float().mean().item() <= 1e-3
    assert bool(((got - ref).abs() <= ref.abs() * 2.0 ** -3)[diff].all())
    assert torch.equal(vt[..., sk:].float(), torch.zeros_like(vt[..., sk:].float()))
    deq = got * vs[..., None]                                            # [B, H, D, Sk]
    rel = ((deq - full.permute(0, 2, 3, 1)).norm() / full.norm()).item()
    assert rel <= 0.04, rel


def test_bad_input_errors(device):
    q = torch.randn(1, 8, 2, 64, device=device).bfloat16()
    with pytest.raises(ValueError, match="head_dim"):
        A.attention(q, q, q)
    q, k, v = dit_like(1, 8, 8, 2, device)
    with pytest.raises(ValueError, match="shape mismatch"):
        A.attention(q, k, v[:, :4])


@pytest.mark.gpu
@pytest.mark.parametrize("quant,lazy,min_cos", [(False, False, 0.99999), (True, False, 0.999), (True, True, 0.999)])
def test_self_attention_real_shape_gpu(quant, lazy, min_cos):
    q, k, v = dit_like(1, 9360, 16380, 40, "cuda", seed=1)
    out = nan_like(q.shape, torch.bfloat16, "cuda")
    if quant:
        q8, qs = A.quantize_q(q)
        A.attention_quant_prepared(q8, qs, A.quantize_kv(k, v), out=out, lazy=lazy)
    else:
        A.attention_bf16(q, k, v, out=out)
    r, _ = ref64(q[:, :, :2].float(), k[:, :, :2].float(), v[:, :, :2].float())
    cos, rel = metrics(out[:, :, :2], r)
    print(f"self-attn quant={quant}: cos {cos:.6f} rel_l1 {rel:.3e}")
    assert not out.isnan().any()
    assert cos >= min_cos, (cos, rel)


@pytest.mark.gpu
def test_short_kv_real_shapes_gpu():
    q, k, v = dit_like(1, 9360, 257, 40, "cuda", seed=2)
    for quant in (False, True):
        o = A.attention(q, k, v, quantized=quant)
        r = ReferenceOps().attention(q.float(), k.float(), v.float())
        cos, _ = metrics(o, r)
        assert cos >= (0.99999 if not quant else 0.999), (quant, cos)
    qa, ka, va = dit_like(8, 1170, 32, 40, "cuda", seed=4)
    cos, _ = metrics(A.attention_bf16(qa, ka, va), ReferenceOps().attention(qa.float(), ka.float(), va.float()))
    assert cos >= 0.99999, cos


@pytest.mark.parametrize("quant", [False, True])
def test_fused_cross_attention2(quant, device):
    """Two softmaxes (64 'text' + 33 'image' keys: one exact block, one masked tail) in one kernel."""
    q, k1, v1 = dit_like(1, 70, 64, 2, device, seed=11)
    _, k2, v2 = dit_like(1, 70, 33, 2, device, seed=12)
    ref = ReferenceOps().cross_attention(q.cpu().float(), [(k1.cpu().float(), v1.cpu().float()),
                                                           (k2.cpu().float(), v2.cpu().float())])
    out = nan_like(q.shape, torch.bfloat16, device)
    if quant:
        A.cross_attention2(q, A.quantize_kv(k1, v1), A.quantize_kv(k2, v2), quantized=True, out=out)
    else:
        A.cross_attention2(q, (k1, v1), (k2, v2), quantized=False, out=out)
    cos, rel = metrics(out.cpu(), ref)
    assert cos >= (0.999 if quant else 0.99999) and rel <= (0.05 if quant else 6e-3), (cos, rel)


@pytest.mark.gpu
def test_quantize_v_real_shape_gpu():
    """16380 values (7020 e4m3 cache rows + 9360 fresh bf16), 40 heads, default tiles."""
    from liveact.model.ops import fp8_dequantize_per_head, fp8_quantize_per_head
    g = torch.Generator(device="cuda").manual_seed(0)
    sk, ws = 16380, 7020
    v = torch.randn(1, sk, 40, 128, device="cuda", generator=g).bfloat16()
    c8, cs = fp8_quantize_per_head(v[:, :ws])
    vt, vs = A.quantize_v([A.VSource(c8, cs), A.VSource(v[:, ws:])])
    full = torch.cat([fp8_dequantize_per_head(c8, cs), v[:, ws:]], dim=1).float()
    assert torch.equal(vs, (full.abs().amax(1).double() / 448.0).float().clamp_min(1e-12))
    ref = (full.permute(0, 2, 3, 1) / vs[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert (vt[..., :sk].view(torch.uint8) != ref.view(torch.uint8)).float().mean().item() <= 1e-3
    assert bool((vt[..., sk:].view(torch.uint8) == 0).all())


@pytest.mark.parametrize("sk", [300, 256])
def test_requantize_k_blocks(sk, device):
    """Per-key int8 keys -> per-128-key-block scales: equal to the torch reference (attention_gluon), every
    output written (int8 poisoned with -128, which the clamp to +-127 never produces; scales with NaN)."""
    from liveact.kernels.attention_gluon import requantize_k_per_block
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, sk, 3, 128, generator=g)
    k[..., 5] += 4.0          # a DiT-like channel offset and an outlier key
    k[0, 7] *= 20.0
    k8, ks = A.quantize_int8(k.bfloat16().to(device))
    nb = (sk + 127) // 128
    out = torch.full_like(k8, -128)
    osc = torch.full((2, 3, nb), float("nan"), device=device)
    a8, asc = A.requantize_k_blocks(k8, ks, out=out, out_scale=osc)
    r8, rsc = requantize_k_per_block(k8, ks)
    assert not (a8 == -128).any() and torch.isfinite(asc).all()
    assert torch.allclose(asc, rsc, rtol=1e-6, atol=0)
    if device == "cpu":
        assert torch.equal(asc, rsc) and torch.equal(a8, r8)
    assert (a8 != r8).float().mean().item() <= 1e-3      # GPU: torch's scalar division may differ by 1 ulp
    deq = a8.float() * asc.repeat_interleave(128, dim=2)[:, :, :sk].transpose(1, 2)[..., None]
    x = k8.float() * ks.transpose(1, 2)[..., None]
    bound = asc.repeat_interleave(128, dim=2)[:, :, :sk].transpose(1, 2)[..., None] / 2
    assert ((deq - x).abs() <= bound * (1 + 1e-5)).all()
    with pytest.raises(ValueError, match="k_scale must be fp32"):
        A.requantize_k_blocks(k8, ks[:, :, :5])
    # perm16: the same rows, stored in key_row_order16 (every block but the last permuted within 16-row groups)
    p8, psc = A.requantize_k_blocks(k8, ks, out=torch.full_like(k8, -128), perm16=True)
    src = A.key_row_order16(sk).to(device)
    assert torch.equal(psc, asc) and torch.equal(p8, a8[:, src])
    assert not torch.equal(p8, a8)


def test_key_row_order16():
    """A permutation inside each 128-key block, identity on the last block, and the rows a thread's accumulator
    columns {2i, 2i+1, 8+2i, 9+2i} (i = lane % 4) of each 16-column group hold the keys 4i..4i+3 of that group."""
    for sk, nfull in ((1000, 896), (512, 384), (128, 0), (1, 0), (16380, 16256)):
        src = A.key_row_order16(sk)
        assert sorted(src.tolist()) == list(range(sk))
        assert torch.equal(src[nfull:], torch.arange(nfull, sk))
        blk = torch.arange(sk) // 128
        assert torch.equal(src // 128, blk)
        for g0 in range(0, nfull, 16):
            for i in range(4):
                rows = [g0 + 2 * i, g0 + 2 * i + 1, g0 + 8 + 2 * i, g0 + 9 + 2 * i]
                assert src[rows].tolist() == [g0 + 4 * i + n for n in range(4)]


def test_requantize_k_blocks_ties(device):
    """x / s on and within a few fp32 ulps of half-integers (both signs): the kernel's x / s is an
    FMA-corrected product with 1/s and must round like the IEEE quotient there, and exact ties must go
    away from zero (without the corrections, or with a rounding offset a hair under 1/2, it fails).
    Block 0: key 0 (k = 127, scale 0.3) sets the block scale s; every other key t has one |k_t| on all
    channels (random signs) and a scale that puts k_t * ks_t / s at n_t + 1/2, nudged by -2..2 ulps.
    Block 1: s = 0.375 (key 128: 127 * 0.375), the other keys' scale 0.1875: x / s = k / 2 exactly.
    Compared with the reference on the CPU (torch on CUDA divides by 127 as a product with 1/127)."""
    from liveact.kernels.attention_gluon import requantize_k_per_block
    g = torch.Generator().manual_seed(1)
    sk, h = 256, 2
    s = torch.tensor(127 * 0.3, dtype=torch.float32) / 127                 # the block scale the kernel computes
    kt = torch.randint(1, 128, (sk,), generator=g)
    nt = (torch.rand(sk, generator=g) * (kt - 1).clamp_max(125)).floor()
    ks = ((nt + 0.5) * s.double() / kt).float()
    for step in range(2):                                                  # nudge by (t % 5 - 2) ulps
        ks = torch.where(torch.arange(sk) % 5 > 2 + step, torch.nextafter(ks, torch.tensor(1.0)), ks)
        ks = torch.where(torch.arange(sk) % 5 < 2 - step, torch.nextafter(ks, torch.tensor(0.0)), ks)
    sign = torch.randint(0, 2, (1, sk, h, 128), generator=g) * 2 - 1
    k8 = (kt[None, :, None, None] * sign).to(torch.int8)
    k8[0, 128:] = torch.randint(-127, 128, (128, h, 128), generator=g).to(torch.int8)
    ks[128:] = 0.1875
    k8[0, ::128], ks[0], ks[128] = 127, 0.3, 0.375
    ks = ks.expand(1, h, sk).contiguous()
    k8, ks = k8.to(device), ks.to(device)
    a8, asc = A.requantize_k_blocks(k8, ks, out=torch.full_like(k8, -128))
    r8, rsc = requantize_k_per_block(k8.cpu(), ks.cpu())
    assert rsc[0, 0, 1] == 0.375
    q = (k8.cpu().float() * ks.cpu().transpose(1, 2)[..., None]).double() / s.double()
    assert ((q[:, :128].abs() - q[:, :128].abs().floor() - 0.5).abs() < 1e-5).float().mean() > 0.9  # near ties
    assert (k8[0, 129:].cpu() % 2 == 1).float().mean() > 0.4                                      # exact ties
    assert torch.equal(asc.cpu(), rsc) and torch.equal(a8.cpu(), r8)
