"""kernels/qk_prep.py against the reference chain (ReferenceOps.rms_norm -> rope_apply_reference,
fp8_quantize_per_head).  The kernels reproduce the reference rounding (fp32 RMSNorm -> bf16 -> x bf16
weight; float64 RoPE -> fp32 -> bf16): CPU bit-identical; GPU see assert_bf16_close.
Outputs are poisoned with NaN before each run."""
import pytest
import torch

from liveact.kernels import qk_prep as P
from liveact.kernels.attention import LOG2E
from liveact.model.ops import ReferenceOps, fp8_dequantize_per_head, fp8_quantize_per_head
from liveact.model.rope import Rope3D, rope_apply_reference

H, D = 2, 128


def inputs(device, l, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = 2 * torch.randn(1, l, H, D, generator=g)
    k = torch.randn(1, l, H, D, generator=g) + 2 * torch.randn(H, D, generator=g)
    k[..., :4] += 8 * torch.randn(H, 4, generator=g)
    v = torch.randn(1, l, H, D, generator=g)
    wq, wk = (1 + 0.1 * torch.randn(H * D, generator=g) for _ in range(2))
    return [t.bfloat16().to(device) for t in (q, k, v, wq, wk)]


def assert_bf16_close(out, ref):
    """CPU (interpreter): bit-identical.  GPU: the fp32 sum of squares runs in another order than
    torch's, so a 1-ulp change of the RMS scale can flip bf16 roundings, and RoPE mixes two such
    values: <= 2 % of elements may differ, ||out - ref|| / ||ref|| <= 2e-3 (bf16 half-ulp is 2e-3)."""
    o, r = out.float(), ref.float()
    assert not o.isnan().any()
    if not o.is_cuda:
        assert torch.equal(o, r)
        return
    assert (o != r).float().mean().item() <= 0.02
    assert ((o - r).norm() / r.norm()).item() <= 2e-3


@pytest.fixture
def rope(device):
    return Rope3D(2, 5, num_frames=4, device=device)   # Fl = 10 tokens per frame


@pytest.mark.parametrize("fp8_cache", [False, True])
def test_qk_prep_matches_reference(fp8_cache, rope, device):
    fl, l, frame0 = 10, 20, 1
    q, k, v, wq, wk = inputs(device, l)
    cos, sin = rope.cos_sin()
    ops = ReferenceOps()
    q_ref = rope_apply_reference(ops.rms_norm(q.reshape(1, l, -1), wq, 1e-6).reshape(q.shape),
                                 rope.table(frame0, l // fl))
    kn_ref = ops.rms_norm(k.reshape(1, l, -1), wk, 1e-6).reshape(k.shape)
    kn = torch.full_like(k, float("nan"))
    # bf16 q output (bf16 attention variant)
    if fp8_cache:
        kc = torch.full_like(k, float("nan")).to(torch.float8_e4m3fn)
        vc = kc.clone()
        kcs, vcs = (torch.full((1, l, H, 1), float("nan"), device=device) for _ in range(2))
        qo, _ = P.qk_prep(q, k, v, wq, wk, 1e-6, cos, sin, frame0 * fl, kn, None, (kc, kcs), (vc, vcs),
                          quantize_q=False)
        for (c8, cs), x in (((kc, kcs), kn_ref), ((vc, vcs), v)):
            r8, rs = fp8_quantize_per_head(x)
            assert torch.equal(cs, rs)
            # e4m3 codes equal (CPU exact); on GPU allow a rare one-code difference at a rounding tie
            mism = (c8.float() != r8.float()).float().mean().item()
            assert mism <= 1e-3, mism
    else:
        vo = torch.full_like(v, float("nan"))
        qo, _ = P.qk_prep(q, k, v, wq, wk, 1e-6, cos, sin, frame0 * fl, kn, vo, quantize_q=False)
        assert torch.equal(vo, v)
    assert_bf16_close(qo, q_ref)
    assert_bf16_close(kn, kn_ref)
    # int8 q with sm_scale * log2e folded into the per-(token, head) scale
    q8, qs = P.qk_prep(q, k, v, wq, wk, 1e-6, cos, sin, frame0 * fl, kn, torch.empty_like(v))
    deq = q8.float() * qs.transpose(1, 2)[..., None] / (LOG2E / D ** 0.5)
    rel = ((deq - q_ref.float()).norm() / q_ref.float().norm()).item()
    assert rel <= 0.01, rel


def _check_int8_keys(k8, ks, km, ref):
    """Dequantized keys vs the rotated reference: <= 1 % overall and <= 2 % for every (token, head),
    so a row left unwritten (whatever the memory held) fails."""
    deq = k8.float() * ks.transpose(1, 2)[..., None] + km[:, None]
    r = ref.float()
    assert not deq.isnan().any()
    rel = ((deq - r).norm() / r.norm()).item()
    assert rel <= 0.01, rel
    rows = ((deq - r).norm(dim=-1) / r.norm(dim=-1)).max().item()
    assert rows <= 0.02, rows


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty returns NaN (floats) / 77 (ints) so an output element the kernels leave unwritten
    fails the checks (rope_keys allocates its outputs itself)."""
    empty = torch.empty

    def poisoned_empty(*shape, dtype=None, device=None, **kw):
        t = empty(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else 77)

    monkeypatch.setattr(torch, "empty", poisoned_empty)


@pytest.mark.parametrize("split,config", [(10, None), (0, None), (10, (8, 1, 1, 4)), (10, (8, 1, 2, 4)),
                                          (10, (4, 2, 1, 4))])
def test_rope_keys(split, config, rope, device, poisoned):
    """Keys from an FP8 cache slice (rows [0, split)) + a fresh bf16 chunk, rotated at their row
    positions (split=10: a tile straddles the two sources; 0: no cache rows yet).  Configs (TB, HG,
    GL, warps): default, one head per tile (2 head groups on the grid), 2 head groups in one program
    (the next group prefetched), the GPU default's shape (4 rows x all heads).  Tolerances: bf16 keys
    bit-identical on the CPU (assert_bf16_close), km 1e-4, int8 keys _check_int8_keys."""
    _, k, _, _, _ = inputs(device, 40, seed=1)
    c8, cs = fp8_quantize_per_head(k[:, :split])
    full = torch.cat([fp8_dequantize_per_head(c8, cs), k[:, split:]], dim=1)
    ref = rope_apply_reference(full, rope.table(0, 4))
    src = [P.KSource(c8, cs), P.KSource(k[:, split:])]
    kr, _, _ = P.rope_keys(src, *rope.cos_sin(), quantize=False, config=config)
    assert_bf16_close(kr, ref)
    # km over all keys (km_stride=1) = the reference mean
    k8, ks, km = P.rope_keys(src, *rope.cos_sin(), quantize=True, km_stride=1, config=config)
    assert torch.allclose(km, ref.float().mean(1), rtol=1e-4, atol=1e-4)
    _check_int8_keys(k8, ks, km, ref)
    # km from every 3rd key: the mean over exactly those rows, and the same keys
    k8, ks, km = P.rope_keys(src, *rope.cos_sin(), quantize=True, km_stride=3, config=config)
    rows = P.km_sample_rows(40, 3).to(device)
    assert len(rows) < 40
    assert torch.allclose(km, ref.float()[:, rows].mean(1), rtol=1e-4, atol=1e-4)
    _check_int8_keys(k8, ks, km, ref)


@pytest.mark.parametrize("km_stride,km_cfg", [(1, (4, 8, 4, 1)), (3, (4, 4, 4, 2)), (1, (2, 16, 4, 1))])
def test_rope_keys_km_phase(km_stride, km_cfg, rope, device, poisoned):
    """Phase 0 with several programs per head group and several TB0-row steps per program (the GPU
    shape of the work: fixed-point atomics, last-program reduction, prefetched steps): km equals the
    fp32 mean of the sampled rotated keys (rel/abs 1e-4; fixed point 2^-32), is bit-identical between
    calls, and the reused workspace is left zeroed; the keys are checked as in test_rope_keys."""
    _, k, _, _, _ = inputs(device, 40, seed=2)
    c8, cs = fp8_quantize_per_head(k[:, :17])
    full = torch.cat([fp8_dequantize_per_head(c8, cs), k[:, 17:]], dim=1)
    ref = rope_apply_reference(full, rope.table(0, 4))
    src = [P.KSource(c8, cs), P.KSource(k[:, 17:])]
    k8, ks, km = P.rope_keys(src, *rope.cos_sin(), quantize=True, km_stride=km_stride, km_cfg=km_cfg)
    rows = P.km_sample_rows(40, km_stride).to(device)
    assert torch.allclose(km, ref.float()[:, rows].mean(1), rtol=1e-4, atol=1e-4)
    _check_int8_keys(k8, ks, km, ref)
    acc, cnt = P._WORKSPACE[k.device]
    assert not acc.any() and not cnt.any()
    _, _, km2 = P.rope_keys(src, *rope.cos_sin(), quantize=True, km_stride=km_stride, km_cfg=km_cfg)
    assert torch.equal(km, km2)


def test_rope_keys_bad_tables(rope, device):
    _, k, _, _, _ = inputs(device, 20)
    cos, sin = rope.cos_sin()
    with pytest.raises(ValueError, match="float64"):
        P.rope_keys([P.KSource(k)], cos.float(), sin.float())
    with pytest.raises(ValueError, match="positions"):
        P.rope_keys([P.KSource(k)], cos[:10], sin[:10])


def test_rope_keys_bad_sources(rope, device):
    _, k, _, _, _ = inputs(device, 20)
    c8, cs = fp8_quantize_per_head(k)
    with pytest.raises(ValueError, match="first"):
        P.rope_keys([P.KSource(k), P.KSource(c8, cs)], *rope.cos_sin())


def test_qk_prep_bad_table(rope, device):
    q, k, v, wq, wk = inputs(device, 20)
    cos, sin = rope.cos_sin()
    with pytest.raises(ValueError, match="float64"):
        P.qk_prep(q, k, v, wq, wk, 1e-6, cos.float(), sin.float(), 0, torch.empty_like(k), torch.empty_like(v))
    with pytest.raises(ValueError, match="positions"):
        P.qk_prep(q, k, v, wq, wk, 1e-6, cos, sin, 30, torch.empty_like(k), torch.empty_like(v))


@pytest.mark.gpu
def test_qk_prep_real_shape_gpu():
    rope = Rope3D(45, 26, device="cuda")
    l, fl = 9360, 1170
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, l, 40, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    w = (1 + 0.1 * torch.randn(5120, device="cuda", generator=g)).bfloat16()
    cos, sin = rope.cos_sin()
    kn, vo = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    qo, _ = P.qk_prep(q, k, v, w, w, 1e-6, cos, sin, 6 * fl, kn, vo, quantize_q=False)
    ops = ReferenceOps()
    assert_bf16_close(qo, rope_apply_reference(ops.rms_norm(q.reshape(1, l, -1), w, 1e-6).reshape(q.shape),
                                               rope.table(6, 8)))
    assert_bf16_close(kn, ops.rms_norm(k.reshape(1, l, -1), w, 1e-6).reshape(k.shape))


@pytest.mark.gpu
def test_rope_keys_real_shape_gpu():
    """16380 keys (7020 e4m3 cache rows + 9360 fresh bf16), 40 heads: default config, km from 1/8."""
    rope = Rope3D(45, 26, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    sk, ws = 16380, 7020
    k = torch.randn(1, sk, 40, 128, device="cuda", generator=g) + torch.randn(40, 128, device="cuda", generator=g)
    k = k.bfloat16()
    c8, cs = fp8_quantize_per_head(k[:, :ws])
    full = torch.cat([fp8_dequantize_per_head(c8, cs), k[:, ws:]], dim=1)
    ref = rope_apply_reference(full, rope.table(0, 14))
    src = [P.KSource(c8, cs), P.KSource(k[:, ws:])]
    kr, _, _ = P.rope_keys(src, *rope.cos_sin(), quantize=False)
    assert_bf16_close(kr, ref)
    k8, ks, km = P.rope_keys(src, *rope.cos_sin(), quantize=True)
    rows = P.km_sample_rows(sk, P.KM_STRIDE).cuda()
    assert torch.allclose(km, ref.float()[:, rows].mean(1), rtol=1e-4, atol=1e-4)
    _check_int8_keys(k8, ks, km, ref)
