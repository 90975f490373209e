"""kernels/norm_quant.py: per-token FP8 quantization and the fused LN(+affine)(+adaLN)(+quant) producer.

CPU: Triton interpreter at small odd shapes (M not a multiple of the rows per program, K not a power of two: one padded part, or two unpadded power-of-two parts),
fresh random data with outlier channels (a few columns x50), outputs poisoned with NaN before each run.
Tolerances: quantized codes and scales equal to the PyTorch reference (<= 0.1 % codes one step off allowed);
bf16 LN/modulation outputs equal the ReferenceOps rounding chain except rare 1-ulp flips (< 1 % of elements,
rel. error < 2e-3).  GPU (marked gpu): the same at M = 9360, K = 5120.
"""

import pytest
import torch

from liveact.kernels import norm_quant as nq
from liveact.model.ops import ReferenceOps

from helpers import poison_fp8_allocations, rel_err as _rel

FP8 = torch.float8_e4m3fn




poison = pytest.fixture(autouse=True)(poison_fp8_allocations)


def _data(m, k, dtype, device, seed=0, outliers=(3, 50)):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 1.5 + 0.3
    x[:, list(outliers)] *= 50.0
    return x.to(device=device, dtype=dtype)




def _check_quant(qa, q_ref, s_ref, tol_codes=1e-3, tol_scale=1e-6):
    assert qa.data.dtype == FP8 and qa.scale.dtype == torch.float32
    assert torch.isfinite(qa.scale).all() and not torch.isnan(qa.data.float()).any()
    assert _rel(qa.scale, s_ref) <= tol_scale
    differ = (qa.data.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
    assert differ <= tol_codes, f"{differ:.2%} of fp8 codes differ from the reference"
    deq = qa.data.float() * qa.scale[..., None]
    assert _rel(deq, q_ref.float() * s_ref[..., None]) < 5e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows(dtype, device):
    x = _data(37, 200, dtype, device)
    qa = nq.quantize_rows(x)
    q_ref, s_ref = nq.quantize_rows_ref(x)
    _check_quant(qa, q_ref, s_ref)
    assert qa.dtype == dtype and qa.data.shape == x.shape
    # quantization is meaningful: every row uses the top of the e4m3 range, error ~ 2^-4 of the row amax
    assert (qa.data.float().abs().amax(dim=1) == 448).all()
    assert _rel(qa.dequantize(), x) < 0.03


def test_quantize_rows_3d_and_tiny_values(device):
    x = _data(2 * 19, 64, torch.bfloat16, device, seed=1).view(2, 19, 64)
    x[0, 3] = 0  # an all-zero row: scale floor 1e-12, codes 0
    x[1, 4] *= 1e-30
    qa = nq.quantize_rows(x)
    q_ref, s_ref = nq.quantize_rows_ref(x)
    assert qa.data.shape == (2, 19, 64) and qa.scale.shape == (2, 19)
    _check_quant(qa, q_ref, s_ref)
    assert qa.scale[0, 3].item() == pytest.approx(1e-12) and (qa.data[0, 3].float() == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("k", [96, 200])  # 64 + 32 (two unpadded parts) / one part padded to 256
def test_norm_modulate(dtype, per_token, k, device):
    m = 45
    x = _data(m, k, dtype, device, seed=2).view(1, m, k)
    g = torch.Generator().manual_seed(3)
    mshape = (1, m, k) if per_token else (1, 1, k)
    shift = (0.2 * torch.randn(mshape, generator=g)).to(device=device, dtype=dtype)
    scale = (0.3 * torch.randn(mshape, generator=g)).to(device=device, dtype=dtype)
    ref = ReferenceOps().norm_modulate(x, shift, scale, 1e-6)
    y = nq.norm_modulate_quant(x, shift, scale, 1e-6, quant=False)
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    if dtype == torch.bfloat16:  # same rounding chain: equal except rare 1-ulp flips
        assert (y != ref).float().mean().item() < 0.01
    assert _rel(y, ref) < (2e-3 if dtype == torch.bfloat16 else 1e-5)
    qa = nq.norm_modulate_quant(x, shift, scale, 1e-6)
    q_ref, s_ref = nq.quantize_rows_ref(ref)
    _check_quant(qa, q_ref, s_ref, tol_codes=0.01, tol_scale=5e-3)
    both = nq.norm_modulate_quant(x, shift, scale, 1e-6, keep_bf16=True)
    assert torch.equal(both.bf16, y) and torch.equal(both.data.view(torch.uint8), qa.data.view(torch.uint8))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("k", [160, 200])  # 128 + 32 / padded
def test_layer_norm(affine, k, device):
    m = 33
    x = _data(m, k, torch.bfloat16, device, seed=4)
    g = torch.Generator().manual_seed(5)
    w = (1 + 0.1 * torch.randn(k, generator=g)).to(device, torch.bfloat16) if affine else None
    b = (0.05 * torch.randn(k, generator=g)).to(device, torch.bfloat16) if affine else None
    ref = ReferenceOps().layer_norm(x, w, b, 1e-6)
    y = nq.layer_norm_quant(x, w, b, 1e-6, quant=False)
    assert (y != ref).float().mean().item() < 0.01 and _rel(y, ref) < 2e-3
    qa = nq.layer_norm_quant(x, w, b, 1e-6)
    q_ref, s_ref = nq.layer_norm_ref(x, w, b, 1e-6)
    _check_quant(qa, q_ref, s_ref, tol_codes=0.01, tol_scale=5e-3)


@pytest.mark.parametrize("k", [160, 200])
def test_rms_norm(k, device):
    x = _data(29, k, torch.bfloat16, device, seed=11).view(1, 29, k)
    w = (1 + 0.1 * torch.randn(k, generator=torch.Generator().manual_seed(12))).to(device, torch.bfloat16)
    ref = ReferenceOps().rms_norm(x, w, 1e-6)
    y = nq.rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert (y != ref).float().mean().item() < 0.01 and _rel(y, ref) < 2e-3
    with pytest.raises(ValueError, match="expected 200"):
        nq.rms_norm(torch.randn(3, 200), torch.ones(100), 1e-6)


@pytest.mark.parametrize("variant", ["nm", "ln", "rms", "q"])
def test_even_rows_four_to_one_split(variant, device):
    """M a multiple of the rows per program (constant-true row masks) and a 4:1 split like 5120 = 4096 + 1024
    (here 320 = 256 + 64; the 256-part folds onto the 64-part before each row reduction)."""
    m, k = 64, 320
    x = _data(m, k, torch.bfloat16, device, seed=13).view(2, 32, k)
    g = torch.Generator().manual_seed(14)
    w = (1 + 0.1 * torch.randn(k, generator=g)).to(device, torch.bfloat16)
    b = (0.05 * torch.randn(k, generator=g)).to(device, torch.bfloat16)
    shift = (0.2 * torch.randn(1, 1, k, generator=g)).to(device, torch.bfloat16)
    scale = (0.3 * torch.randn(1, 1, k, generator=g)).to(device, torch.bfloat16)
    ops = ReferenceOps()
    if variant == "q":
        _check_quant(nq.quantize_rows(x), *nq.quantize_rows_ref(x))
        return
    if variant == "rms":
        y, ref = nq.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6)
    elif variant == "nm":
        y, ref = nq.norm_modulate_quant(x, shift, scale, 1e-6, quant=False), ops.norm_modulate(x, shift, scale, 1e-6)
        _check_quant(nq.norm_modulate_quant(x, shift, scale, 1e-6), *nq.quantize_rows_ref(ref), tol_codes=0.01,
                     tol_scale=5e-3)
    else:
        y, ref = nq.layer_norm_quant(x, w, b, 1e-6, quant=False), ops.layer_norm(x, w, b, 1e-6)
        _check_quant(nq.layer_norm_quant(x, w, b, 1e-6), *nq.layer_norm_ref(x, w, b, 1e-6), tol_codes=0.01,
                     tol_scale=5e-3)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y != ref).float().mean().item() < 0.01 and _rel(y, ref) < 2e-3


def test_quantize_scale_overshoot(device):
    """Row maxima whose amax * (1 / (amax / 448)) lands just above 448 in fp32 (1.0234375, 1.078125, ...):
    the code must still be 448 (the GPU relies on cvt.rn.satfinite for this, without a clamp)."""
    amax = torch.tensor([1.0234375, 1.078125, 1.1328125, 1.1875, -1.2109375, 1.2421875, 1.296875, -1.3203125])
    x = _data(8, 96, torch.float32, "cpu", seed=15, outliers=()) * 0.1  # |x| < 1: column 7 holds the row max
    x[:, 7] = amax
    x = x.to(device=device, dtype=torch.bfloat16)
    qa = nq.quantize_rows(x)
    q_ref, s_ref = nq.quantize_rows_ref(x)
    assert torch.equal(qa.data.view(torch.uint8), q_ref.view(torch.uint8))
    assert (qa.data[:, 7].float().abs() == 448).all()


def test_round_e4m3_matches_torch(device):
    """The in-kernel e4m3 rounding (used because the interpreter's cast is wrong) equals torch's cast,
    including values just below powers of two, subnormals, ties and the clamp at 448."""
    vals = torch.tensor([1.9375, 1.96, 7.9, 3.9, 15.9, 500.0, -1000.0, 447.0, 440.5, 0.001, -0.0009, 2 ** -10,
                         3 * 2 ** -10, 1.0625, 1.1875, -2.9, 0.0, 2 ** -7 * 1.0625])
    x = vals.repeat(4, 1).to(device)
    x[:, 0] = 448.0  # amax 448 -> scale 1: the codes are the values themselves
    x[:, 5] = 448.0
    x[:, 6] = -448.0
    qa = nq.quantize_rows(x)
    assert (qa.scale == 1).all()
    assert torch.equal(qa.data.view(torch.uint8), x.clamp(-448, 448).to(FP8).view(torch.uint8))


def test_bad_input():
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        nq.quantize_rows(torch.zeros(4, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="channels per token"):
        nq.norm_modulate_quant(torch.randn(4, 16), torch.zeros(3, 16), torch.zeros(3, 16), 1e-6)


@pytest.mark.gpu
def test_producer_real_shape():
    m, k = 9360, 5120
    x = _data(m, k, torch.bfloat16, "cuda", seed=7).view(1, m, k)
    g = torch.Generator().manual_seed(8)
    shift = (0.2 * torch.randn(1, 1, k, generator=g)).cuda().bfloat16()
    scale = (0.3 * torch.randn(1, 1, k, generator=g)).cuda().bfloat16()
    ref = ReferenceOps().norm_modulate(x, shift, scale, 1e-6)
    y = nq.norm_modulate_quant(x, shift, scale, 1e-6, quant=False)
    assert (y != ref).float().mean().item() < 0.01 and _rel(y, ref) < 2e-3
    qa = nq.norm_modulate_quant(x, shift, scale, 1e-6)
    q_ref, s_ref = nq.quantize_rows_ref(ref)
    _check_quant(qa, q_ref, s_ref, tol_codes=0.01, tol_scale=5e-3)
    qa = nq.quantize_rows(x)
    _check_quant(qa, *nq.quantize_rows_ref(x))
    w = (1 + 0.1 * torch.randn(k, generator=g)).cuda().bfloat16()
    b = (0.05 * torch.randn(k, generator=g)).cuda().bfloat16()
    qa = nq.layer_norm_quant(x, w, b, 1e-6)
    _check_quant(qa, *nq.layer_norm_ref(x, w, b, 1e-6), tol_codes=0.01, tol_scale=5e-3)
    ref = ReferenceOps().rms_norm(x, w, 1e-6)
    y = nq.rms_norm(x, w, 1e-6)
    assert (y != ref).float().mean().item() < 0.01 and _rel(y, ref) < 2e-3
