"""kernels/convkv.py against ReferenceOps.kv_memory_update / convkv_compress_reference: bf16 and FP8
caches, trained-weight and mean-memory variants.  CPU (interpreter): bit-exact; asserted at <= 1 bf16
ulp on <= 0.1 % of elements (the GPU conv may round differently at ties)."""
import pytest
import torch

from liveact.kernels import convkv as C
from liveact.model.ops import LayerKV, ReferenceOps, convkv_compress_reference

H, D = 2, 128


def filled_cache(device, fl, fp8, seed=0, b=1, h=H):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ops = ReferenceOps()
    kv = ops.alloc_kv(b, 14 * fl, h, D, torch.bfloat16, device, fp8=fp8)
    k = torch.randn(b, 14 * fl, h, D, generator=g) + 2 * torch.randn(h, D, generator=g)
    k[..., :4] += 8 * torch.randn(h, 4, generator=g)                     # outlier channels
    v = torch.randn(b, 14 * fl, h, D, generator=g)
    ops.kv_write(kv, 0, k.bfloat16().to(device), v.bfloat16().to(device))
    return kv


def weight(device, seed=1, h=H):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (0.2 + 0.05 * torch.randn(h * D, 1, 5, generator=g)).bfloat16().to(device)


def close(a, b, max_frac=1e-3):
    """Equal but for <= max_frac of elements, off by <= 1 ulp (bf16: 2^-7 relative, e4m3 codes: 2^-3)."""
    ulp = 2.0 ** -3 if a.dtype == torch.float8_e4m3fn else 2.0 ** -7
    a, b = a.float(), b.float()
    diff = a != b
    return (not a.isnan().any()) and diff.float().mean().item() <= max_frac and \
        bool(((a - b).abs() <= b.abs() * ulp + 1e-30)[diff].all())


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("mean,b", [(False, 1), (True, 1), (False, 2)])
def test_kv_memory_update_matches_reference(fp8, mean, b, device):
    """All launches (K and V together, batch rows interleaved on grid axis 2) against the reference;
    every slot is compared, so a row left unwritten (or written twice) fails."""
    fl = 10      # Fl % 5 == 0 (416x720 has 1170); test_fl_not_multiple_of_5 covers straddling groups
    kv = filled_cache(device, fl, fp8, b=b)
    mine = LayerKV(*[t.clone() for t in kv.tensors()])
    w = None if mean else weight(device)
    ReferenceOps().kv_memory_update(kv, w, fl)
    C.kv_memory_update(mine.k, mine.v, mine.k_scale, mine.v_scale, w, fl)
    for a, b in zip(mine.tensors(), kv.tensors()):
        assert close(a, b), (a.float() - b.float()).abs().max()


def run_update(device, fl, fp8, mean, b=1, h=H, **cfg):
    """Reference and kernel on the same cache; the kernel's cache starts as a copy, so every row it
    should write but does not, or writes wrongly (e.g. from an already overwritten source), differs."""
    kv = filled_cache(device, fl, fp8, b=b, h=h, seed=fl)
    mine = LayerKV(*[t.clone() for t in kv.tensors()])
    w = None if mean else weight(device, h=h)
    ReferenceOps().kv_memory_update(kv, w, fl)
    C.kv_memory_update(mine.k, mine.v, mine.k_scale, mine.v_scale, w, fl, **cfg)
    for a, r in zip(mine.tensors(), kv.tensors()):
        assert close(a, r), (a.float() - r.float()).abs().max()


@pytest.mark.parametrize("fl,fp8,mean,b", [(12, False, False, 1), (7, True, False, 2), (11, False, True, 2),
                                           (1, True, False, 1), (4, False, False, 1), (6, True, True, 1)])
def test_kv_memory_update_fl_not_multiple_of_5(fl, fp8, mean, b, device):
    """Fl % 5 != 0: the last output of C(slots 2..6) that reads slot 2 (t = ceil(Fl/5) - 1) straddles slots
    2 and 3, so it must be computed before slot 2 rows [ceil(Fl/5), Fl) are overwritten (launch 1) and before
    slot 3 is (launch 2); Fl < 5 leaves launch 1's second role empty."""
    run_update(device, fl, fp8, mean, b)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("h,bt,warps", [(3, 4, 4), (2, 8, 8), (2, 1, 4)])
def test_kv_memory_update_tiles(fp8, h, bt, warps, device):
    """Tiles (bt tokens or rows per program) smaller than Fl / 5: several programs per role, partial last
    tiles, compressing and copying programs of one launch side by side; 3 heads."""
    run_update(device, 22, fp8, False, h=h, bt=bt, num_warps=warps)


def test_slot2_split_is_hazard_free():
    """The launch split the kernel uses (the interpreter runs programs in order, so a race inside a launch
    cannot show in the CPU tests): launch 1 overwrites slot 2 rows [T1, Fl) with outputs t >= T1, which
    must read no slot-2 row (5 T1 >= Fl), and every output t < T1 (launch 0, into scratch) must read
    one (5 (T1 - 1) < Fl); T1 <= Fl so the written rows exist."""
    for fl in range(1, 200):
        t1 = C._slot2_readers(fl)
        assert 5 * t1 >= fl and 5 * (t1 - 1) < fl and t1 <= fl, fl


def test_fl_not_multiple_of_5_and_poisoned_output(device):
    fl = 12
    kv = filled_cache(device, fl, False, seed=2)
    w = weight(device)
    out = torch.full((1, 2 * fl, H, D), float("nan"), dtype=torch.bfloat16, device=device)
    C.convkv_compress(kv.k, None, w, out, None, 2 * fl, 0, 2 * fl)      # groups straddle slots
    ref = convkv_compress_reference(kv.k[:, 2 * fl:12 * fl], w)
    assert close(out, ref)


def test_in_place_overlap_is_refused(device):
    kv = filled_cache(device, 10, False)
    with pytest.raises(ValueError, match="overlap"):
        C.convkv_compress(kv.k, None, weight(device), kv.k, None, 20, 20, 10)
    with pytest.raises(ValueError, match="same shape"):
        C.kv_memory_update(kv.k, kv.v[:, :-1], None, None, weight(device), 9)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fl", [1170, 1024])
def test_kv_memory_update_real_shape_gpu(fp8, fl):
    """416x720 (Fl = 1170) and 512x512 (Fl = 1024, groups straddle slots)."""
    kv = filled_cache("cuda", fl, fp8)
    mine = LayerKV(*[t.clone() for t in kv.tensors()])
    w = weight("cuda")
    ReferenceOps().kv_memory_update(kv, w, fl)
    C.kv_memory_update(mine.k, mine.v, mine.k_scale, mine.v_scale, w, fl)
    for a, b in zip(mine.tensors(), kv.tensors()):
        assert close(a, b, max_frac=1e-3)


@pytest.mark.parametrize("big_scale", [False, True])
def test_fast_dequant_is_bit_identical(big_scale, device):
    """The fp8 dequantization by bit moves + one bf16 multiply (_dequant_fast) against the fp32 path
    (bf16(q) * bf16(s), rounded to bf16): torch.equal on values and scales, per launch config.  The cache
    holds e4m3 subnormal codes and -0 (small randn values); big_scale puts one scale >= 255 into a tile of
    every launch, where bf16(s) * 2^120 would overflow: that tile must take the fp32 path."""
    fl = 10
    kv = filled_cache(device, fl, True, seed=3)
    kv.k[0, :, 0, :] = (torch.randn(14 * fl, D) * 0.01).to(kv.k.dtype)       # subnormal e4m3 codes, -0
    if big_scale:
        for r in (2 * fl + 1, 4 * fl, 7 * fl + 3):                           # launches 0, 1, 2
            kv.k_scale[0, r, 1, 0] = 300.0
    w = weight(device)
    outs = []
    for fast in (False, True):
        mine = LayerKV(*[t.clone() for t in kv.tensors()])
        C.kv_memory_update(mine.k, mine.v, mine.k_scale, mine.v_scale, w, fl, config=((4, 4, fast),) * 3)
        outs.append([t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in mine.tensors()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
