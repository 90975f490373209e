"""Row kernels that produce GEMM inputs: LayerNorm (+ adaLN modulation) (+ per-token FP8 quantization).

One program handles ROWS rows of K channels, entirely in registers (one read of x, one write):

    quantize_rows            q = e4m3(x * (1/s)),  s = max(amax_row|x| / 448, 1e-12)
    norm_modulate_quant      u = bf16(LN(x) in fp32);  y = bf16(u * bf16(1 + scale) + shift);  then quantize y
    layer_norm_quant         y = bf16(LN(x) * w + b in fp32);                                  then quantize y
    rms_norm                 y = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w)   (WanRMSNorm; bf16 out only)

Rounding chain = ReferenceOps.norm_modulate / layer_norm (shared model/ops.py): LN in fp32, round to the
model dtype, modulate in fp32, round to the model dtype, and only then quantize, so the bf16-output variant
(`quant=False`) equals the reference up to fp32 summation order in mean/var (rare 1-ulp bf16 flips).
LN: mean = sum(x)/K, var = sum((x-mean)^2)/K (biased), rstd = 1/sqrt_rn(var + eps) (IEEE division).

FP8 rounding: values are clamped to +-448 and cast with round-to-nearest-even.  On the GPU the cast is the
hardware cvt.rn.satfinite.e4m3x2 (HW_CVT), whose saturation is the clamp (no min/max instructions); in the
CPU interpreter, whose fp8 cast is wrong near powers of two (KERNELS.md 5.4), the value is clamped and
rounded to the e4m3 grid by hand on the fp32 bits (_round_e4m3), so the cast is exact.  Both equal torch's
`clamp(-448, 448).to(float8_e4m3fn)` (bit-identical on the H100; the hand rounding cost 25 % of the
bandwidth there: 1.86 vs 2.46 TB/s).

Bytes per row (bf16 in, fp8 out): 2K read + K + 4 written (+ 2*2K for shift/scale or weight/bias, L2-resident);
bf16 out: 2K + 2K.  FLOPs ~ 10 per element; the floor is the bytes: at M=9360, K=5120, 143.8 MB -> 52 us at
the 2.78 TB/s a same-size copy reaches (48 us at 3 TB/s); bf16 out 191.7 MB -> 69 us.

Configs (no autotune): one row per program; the row is one or two unpadded power-of-two parts (K = 5120 =
4096 + 1024: no masked lanes; other K: one part padded to next_power_of_2(K)); warps: see _settings (2 for
the LayerNorm variants at 5120, 4 for rms_norm and quantize_rows, 8 above K = 8192).  The LayerNorm
variants are issue bound, not DRAM bound (time follows instructions, warps and barriers, not bytes), so:
per-channel vectors (LN weight/bias, RMS weight) are loaded as [ROWS, B] tiles with x's shape and mask, which
gives them x's register layout (a 1D load got its own layout and a shared-memory convert_layout per vector:
37 barriers per row instead of 17); the 4096-part is folded onto the 1024-part in registers before each row
reduction (_fold: one cross-warp reduction per statistic instead of two, 17 -> 8 barriers); no clamp
before the saturating cvt; constant-true masks when M is a multiple of ROWS (no predicated loads / zero fills).
SASS per row (sm_90, ptxas 12.8 bundled with triton 3.6), before -> after: layer_norm_quant 1832 -> 1464
instructions per thread, 167 -> 128 registers; norm_modulate_quant 1960 -> 1696; rms_norm (4 warps) 712 -> 424.
H100, 9360 x 5120, medians of 5 interleaved rounds next to a 2.78 TB/s same-size copy (2026-11-25):
layer_norm_quant 0.0688 -> 0.0576 ms (75 % -> 90 % of copy), norm_modulate_quant 0.0622 -> 0.0581 (83 -> 89 %),
quantize_rows 0.0540 -> 0.0538 (96 %), rms_norm 0.0717 -> 0.0710 (96 -> 97 %), bf16-out LN / modulate 96-98 %.
Timings of these kernels move with the SM clock (power throttling after GEMM-heavy work, and single do_bench
calls moved up to 30 %): compare within a run, in interleaved rounds.
Modulation vectors may be per channel [K] (row stride 0) or per token [M, K].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
SCALE_MIN = 1e-12
FP8_DTYPE = torch.float8_e4m3fn


@dataclass
class QuantAct:
    """A per-token FP8 activation: data e4m3 [..., K], scale fp32 [...] with x ~= data * scale[..., None].

    dtype: the dtype the activation had (the output dtype of the consumer GEMM).  bf16: optionally the same
    activation unquantized (set when a producer serves both FP8 and bf16 consumers)."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype = torch.bfloat16
    bf16: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return self.data.shape

    def dequantize(self) -> torch.Tensor:
        if self.bf16 is not None:
            return self.bf16
        return (self.data.float() * self.scale.unsqueeze(-1)).to(self.dtype)


# --------------------------------------------------------------------------------------------- kernel
@triton.jit
def _round_e4m3(y):
    """Clamp to +-448 and round fp32 y to the nearest e4m3 value (ties to even); result is exact in e4m3."""
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    ybits = y.to(tl.int32, bitcast=True)
    bits = (ybits + 0x7FFFF + ((ybits >> 20) & 1)) & -1048576  # keep 3 mantissa bits (normals), 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    a = tl.abs(y)
    sub = (a + 16384.0) - 16384.0  # fp32 ulp at 2^14 is 2^-9 = the e4m3 subnormal step
    sub = (sub.to(tl.int32, bitcast=True) | (ybits & -2147483648)).to(tl.float32, bitcast=True)  # sign, -0 kept
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def _round_to(y, dt: tl.constexpr, MANUAL: tl.constexpr):
    """fp32 y rounded to dtype dt (nearest even), returned as fp32.  MANUAL does the bf16 rounding on the
    bits: the CPU interpreter's fp32->bf16 cast truncates (GPU: identical result either way)."""
    if MANUAL and dt == tl.bfloat16:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return y.to(dt).to(tl.float32)


@triton.jit
def _load_part(X, rows, rmask, stride_x, C0: tl.constexpr, B: tl.constexpr, K, PADDED: tl.constexpr):
    cols = C0 + tl.arange(0, B)
    if PADDED:
        mask = rmask[:, None] & (cols < K)[None, :]
    else:
        mask = rmask[:, None] & (cols < C0 + B)[None, :]   # row mask only (folded by the compiler)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    return x, cols, mask


@triton.jit
def _load_vec(V, rows, cols, mask):
    """A per-channel vector [K] as a [ROWS, B] fp32 tile in the layout of x: the 2D pointer tile of the same
    shape and mask as x's load shares its layout.  (A 1D `tl.load(V + cols)` got its own 8-per-thread layout
    and a shared-memory convert_layout per vector: 37 barriers per row instead of 17, and layer_norm_quant ran
    at 75 % of copy bandwidth while norm_modulate_quant, whose shift/scale load was 2D, reached 83 %.)"""
    return tl.load(V + (rows[:, None] * 0 + cols[None, :]), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _finish_part(d, rstd, cols, mask, rows, W, B, SHIFT, SCALE, stride_mod,
                 rdt: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr,
                 MANUAL: tl.constexpr, RMS: tl.constexpr):
    """Normalised (or raw) part -> the model-dtype rounded y (fp32 values) of the reference chain."""
    y = d
    if RMS:    # WanRMSNorm: bf16(x * rstd), then bf16(. * w)
        y = _round_to(d * rstd[:, None], rdt, MANUAL)
        if AFFINE:
            w = _load_vec(W, rows, cols, mask)
            y = _round_to(y * w, rdt, MANUAL)
    elif NORM:
        y = d * rstd[:, None]
        if AFFINE:
            y = y * _load_vec(W, rows, cols, mask) + _load_vec(B, rows, cols, mask)
        y = _round_to(y, rdt, MANUAL)
    if MODULATE:
        mod = rows[:, None] * stride_mod + cols[None, :]
        sc = tl.load(SCALE + mod, mask=mask, other=0.0)
        sh = tl.load(SHIFT + mod, mask=mask, other=0.0).to(tl.float32)
        one_plus = _round_to(sc.to(tl.float32) + 1.0, sc.dtype, MANUAL)  # (1 + scale) in the modulation dtype
        y = _round_to(y * one_plus + sh, rdt, MANUAL)
    return y


@triton.jit
def _store_part(y, inv, cols, mask, rows, Y, YB, stride_y, stride_yb,
                QUANT: tl.constexpr, STORE_BF16: tl.constexpr, HW_CVT: tl.constexpr):
    if STORE_BF16:
        tl.store(YB + rows[:, None] * stride_yb + cols[None, :], y.to(YB.dtype.element_ty), mask=mask)
    if QUANT:
        if HW_CVT:  # GPU cvt.rn.satfinite.e4m3x2: nearest even, saturating at +-448 (= the clamp), in hardware
            q = y * inv[:, None]
        else:
            q = _round_e4m3(y * inv[:, None])
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], q.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fold(a1, a2, ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr, MAX: tl.constexpr):
    """The two parts of a row folded into one [ROWS, BLOCK2] tile (a1's BLOCK // BLOCK2 column chunks
    combined in-thread, then with a2): one cross-warp row reduction instead of two."""
    if MAX:
        return tl.maximum(tl.max(tl.reshape(a1, (ROWS, BLOCK // BLOCK2, BLOCK2)), axis=1), a2)
    else:
        return tl.sum(tl.reshape(a1, (ROWS, BLOCK // BLOCK2, BLOCK2)), axis=1) + a2


@triton.jit
def _row_kernel(X, W, B, SHIFT, SCALE, Y, YB, S,
                M, K, stride_x, stride_mod, stride_y, stride_yb, eps,
                NORM: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr,
                QUANT: tl.constexpr, STORE_BF16: tl.constexpr, MANUAL: tl.constexpr,
                ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr = 0, PADDED: tl.constexpr = True,
                HW_CVT: tl.constexpr = False, RMS: tl.constexpr = False, EVEN_M: tl.constexpr = False):
    """A row as one or two power-of-two parts [ROWS, BLOCK] (+ [ROWS, BLOCK2]); PADDED: the parts cover
    more than K channels (masked), else exactly K (no column masks, no padded lanes)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if EVEN_M:  # every row of the last program exists: constant-true masks (no predicated loads / zero fills)
        rmask = tl.full((ROWS,), 1, tl.int1)
    else:
        rmask = rows < M
    x1, c1, m1 = _load_part(X, rows, rmask, stride_x, 0, BLOCK, K, PADDED)
    rdt = x1.dtype  # the model dtype: every reference rounding step goes through it
    d1 = x1.to(tl.float32)
    if BLOCK2 > 0:
        x2, c2, m2 = _load_part(X, rows, rmask, stride_x, BLOCK, BLOCK2, K, PADDED)
        d2 = x2.to(tl.float32)
    rstd = tl.zeros((ROWS,), tl.float32)
    if RMS:
        if BLOCK2 > 0:
            ss = tl.sum(_fold(d1 * d1, d2 * d2, ROWS, BLOCK, BLOCK2, False), axis=1)
        else:
            ss = tl.sum(d1 * d1, axis=1)
        rstd = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.math.sqrt_rn(ss / K + eps))
    elif NORM:
        if BLOCK2 > 0:
            mean = tl.sum(_fold(d1, d2, ROWS, BLOCK, BLOCK2, False), axis=1) / K
            d1 = d1 - mean[:, None]
            d2 = d2 - mean[:, None]
            ss = tl.sum(_fold(d1 * d1, d2 * d2, ROWS, BLOCK, BLOCK2, False), axis=1)
        else:
            mean = tl.sum(d1, axis=1) / K
            d1 = d1 - mean[:, None]
            if PADDED:
                d1 = tl.where(m1, d1, 0.0)
            ss = tl.sum(d1 * d1, axis=1)
        rstd = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.math.sqrt_rn(ss / K + eps))
    y1 = _finish_part(d1, rstd, c1, m1, rows, W, B, SHIFT, SCALE, stride_mod, rdt, NORM, AFFINE, MODULATE,
                      MANUAL, RMS)
    if BLOCK2 > 0:
        y2 = _finish_part(d2, rstd, c2, m2, rows, W, B, SHIFT, SCALE, stride_mod, rdt, NORM, AFFINE,
                          MODULATE, MANUAL, RMS)
    inv = rstd
    if QUANT:
        if BLOCK2 > 0:   # unpadded parts
            amax = tl.max(_fold(tl.abs(y1), tl.abs(y2), ROWS, BLOCK, BLOCK2, True), axis=1)
        elif PADDED:
            amax = tl.max(tl.where(m1, tl.abs(y1), 0.0), axis=1)
        else:
            amax = tl.max(tl.abs(y1), axis=1)
        s = tl.maximum(amax / 448.0, 1e-12)
        inv = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), s)
        tl.store(S + rows, s, mask=rmask)
    _store_part(y1, inv, c1, m1, rows, Y, YB, stride_y, stride_yb, QUANT, STORE_BF16, HW_CVT)
    if BLOCK2 > 0:
        _store_part(y2, inv, c2, m2, rows, Y, YB, stride_y, stride_yb, QUANT, STORE_BF16, HW_CVT)


# --------------------------------------------------------------------------------------------- host
def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests patch it to hand out NaN-poisoned memory)."""
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    """True when Triton runs through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


SETTINGS_OVERRIDE = None  # (ROWS, num_warps, hw_cvt, split) for benchmark sweeps


def _split(k: int):
    """K as two power-of-two parts (5120 = 4096 + 1024: no padded lanes), else one padded part."""
    b1 = 1 << (k.bit_length() - 1)
    r = k - b1
    if r and r & (r - 1) == 0:
        return b1, r
    return (b1, 0) if r == 0 else (triton.next_power_of_2(k), 0)


def _settings(k: int, norm: bool, vec: int = 16):
    """(BLOCK, BLOCK2, ROWS per program, num_warps, hardware e4m3 cast): one row per program on the GPU, 16K
    elements per program in the interpreter (its cost is per program, not per element).

    Warps of the normalising variants split in two parts: as many as the smaller part fills with 16-byte
    vectors of vec elements per thread (FP8 store: 16): 5120 = 4096 + 1024 -> 2 warps.  More warps replicate
    the small part and the compiler converts layouts through shared memory (4 warps: 0.38 ms instead of 0.058).
    rms_norm (bf16 out only) passes vec = 8 -> 4 warps (1 % faster than 2); the LayerNorm variants keep vec = 16
    for their bf16 outputs too, so quant=False and keep_bf16 give the same bits (same reduction order)."""
    rows = 1 if not interpreting() else max(1, min(64, 16384 // triton.next_power_of_2(k)))
    hw, split = not interpreting(), norm   # quantize_rows is DRAM bound already: one padded part measured best
    block, block2 = _split(k) if split else (triton.next_power_of_2(k), 0)
    if norm and block2:
        warps = max(1, min(8, block2 // (32 * vec)))
    else:   # one (padded) part: 2 warps for the LayerNorm variants up to 8192 lanes, 4 for quantize_rows
        warps = (2 if norm else 4) if k <= 8192 else 8
    if SETTINGS_OVERRIDE is not None:
        rows, warps, hw, split = SETTINGS_OVERRIDE
        block, block2 = _split(k) if split else (triton.next_power_of_2(k), 0)
    return block, block2, rows, warps, hw


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{name} must be a tensor [..., K]; got {type(x).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name} must be bf16/fp16/fp32, got {x.dtype}; cast it first")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _mod_rows(v: torch.Tensor, m: int, k: int, name: str):
    """A modulation tensor broadcastable to [M, K] -> (tensor, row stride): per channel or per token."""
    if v.numel() == k:
        return v.reshape(k).contiguous(), 0
    if v.numel() == m * k:
        return v.reshape(m, k).contiguous(), k
    raise ValueError(f"{name} has shape {tuple(v.shape)}: expected {k} channels per token "
                     f"(shape [.., 1, {k}]) or one row per token ([{m}, {k}] after flattening)")


def _launch(x, w=None, b=None, shift=None, scale=None, eps=1e-6, norm=True, quant=True, store_bf16=False,
            rms=False):
    x2 = _rows(x, "x")
    m, k = x2.shape
    dev = x2.device
    lead = x.shape[:-1]
    q = _alloc((m, k), FP8_DTYPE, dev) if quant else None
    s = _alloc((m,), torch.float32, dev) if quant else None
    yb = _alloc((m, k), x2.dtype, dev) if store_bf16 else None
    mod = shift is not None
    if mod:
        shift, stride_mod = _mod_rows(shift, m, k, "shift")
        scale, stride_mod2 = _mod_rows(scale, m, k, "scale")
        if stride_mod != stride_mod2:
            raise ValueError("shift and scale must both be per channel or both per token")
    else:
        stride_mod = 0
    affine = w is not None
    if affine:
        if w.numel() != k:
            raise ValueError(f"norm weight has {w.numel()} elements, expected {k}")
        if b is None:
            b = torch.zeros_like(w)
        w, b = w.contiguous(), b.contiguous()
    if m:
        block, block2, rows, warps, hw = _settings(k, norm, 16 // x2.element_size() if rms else 16)
        dummy = x2
        _row_kernel[(triton.cdiv(m, rows),)](x2, w if affine else dummy, b if affine else dummy, shift if mod else dummy,
                          scale if mod else dummy, q if quant else dummy, yb if store_bf16 else dummy,
                          s if quant else dummy, m, k, x2.stride(0), stride_mod, k, k, float(eps),
                          NORM=norm, AFFINE=affine, MODULATE=mod, QUANT=quant, STORE_BF16=store_bf16,
                          MANUAL=interpreting(), ROWS=rows, BLOCK=block, BLOCK2=block2,
                          PADDED=block + block2 != k, HW_CVT=hw, RMS=rms, EVEN_M=m % rows == 0, num_warps=warps)
    if quant:
        return QuantAct(q.view(*lead, k), s.view(lead), x.dtype, yb.view(*lead, k) if store_bf16 else None)
    return yb.view(*lead, k)


def quantize_rows(x: torch.Tensor) -> QuantAct:
    """Per-token FP8 quantization of x [..., K] -> QuantAct(e4m3 [..., K], fp32 scale [...])."""
    return _launch(x, norm=False, quant=True)


def norm_modulate_quant(x, shift, scale, eps: float, quant: bool = True, keep_bf16: bool = False):
    """LN_noaffine(x) -> modulate -> (FP8 QuantAct | bf16 tensor) in one pass.  keep_bf16 with quant also
    returns the unquantized activation in QuantAct.bf16 (for mixed FP8/bf16 consumers)."""
    return _launch(x, shift=shift, scale=scale, eps=eps, quant=quant, store_bf16=(not quant) or keep_bf16)


def rms_norm(x, weight, eps: float) -> torch.Tensor:
    """WanRMSNorm in one pass: bf16(bf16(x * rsqrt(mean(x^2) + eps)) * weight) (= ReferenceOps.rms_norm)."""
    return _launch(x, w=weight, eps=eps, quant=False, store_bf16=True, rms=True)


def layer_norm_quant(x, weight, bias, eps: float, quant: bool = True, keep_bf16: bool = False):
    """LayerNorm (affine when weight is given) -> (FP8 QuantAct | tensor in x.dtype) in one pass."""
    return _launch(x, w=weight, b=bias, eps=eps, quant=quant, store_bf16=(not quant) or keep_bf16)


# --------------------------------------------------------------------------------------------- references
def quantize_e4m3_ref(y: torch.Tensor) -> torch.Tensor:
    """fp32 values -> e4m3 with clamp to +-448 (torch's cast sends |y| >= 480 to NaN otherwise)."""
    return y.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows_ref(x: torch.Tensor):
    """(e4m3 [..., K], fp32 scale [...]) of the same math as quantize_rows."""
    y = x.float()
    s = torch.clamp(y.abs().amax(dim=-1) / FP8_MAX, min=SCALE_MIN)
    inv = 1.0 / s
    return quantize_e4m3_ref(y * inv.unsqueeze(-1)), s


def norm_modulate_ref(x, shift, scale, eps: float, quant: bool = True):
    """ReferenceOps.norm_modulate, then (optionally) quantize_rows_ref."""
    u = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    y = (u.float() * (1 + scale) + shift).to(x.dtype)
    return quantize_rows_ref(y) if quant else y


def layer_norm_ref(x, weight, bias, eps: float, quant: bool = True):
    """ReferenceOps.layer_norm, then (optionally) quantize_rows_ref."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)
    return quantize_rows_ref(y) if quant else y
