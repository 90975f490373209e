"""Hopper (sm90) W8A8 FP8 GEMM in Gluon with precise accumulation that keeps the tensor cores busy.

Same contract and math as `kernels.fp8_gemm.fp8_gemm` (its docstring; reference `fp8_gemm_ref`):
    acc[m, n] = sum_k A[m, k] * W[n, k]            A e4m3 [M, K], W e4m3 [N, K] (nn.Linear layout)
    y = acc * s_a[m] * s_w[n] (+ bias[n]), then the epilogue (none | gelu | gated_residual | residual), bf16 out.

Why a second kernel: Hopper's FP8 wgmma adds its products in ~FP22 (shared/KERNELS.md 1.1), so the precise mode
adds the tensor core's partial sum into an fp32 accumulator every 128 of K ("promotion").  In the Triton kernel
each warpgroup waits for its chain of wgmmas, promotes, then issues the next chain: the tensor pipe was idle
~44 % of the time (Nsight Compute, bench/NOTES.md session 4) and the kernel ran at 0.90-0.98x cuBLAS's
row-wise FP8 (`torch._scaled_mm`), which is itself ~17 % slower than its fast-accumulation mode.

Schedule (persistent, one CTA per SM, BM x BN = 128 x 128 per tile, BK = 128, warp-specialized):
  producer  1 warp: TMA loads of A (two 64-row halves) and W tiles into a STAGES-deep ring (ready / empty
            mbarriers), running ahead across tiles.
  consumers 2 warpgroups, 64 rows of the tile each (the W tile is shared), with TWO partial accumulators:
                chain k   -> partial[k % 2]      (4 wgmma k32 steps, fresh: use_acc=False, async)
                wait(1)   -> chain k-1 is done while chain k runs on the tensor cores
                acc += partial[(k-1) % 2]; release ring slot k-1
            so the promotion adds of one chain overlap the tensor-core work of the next (the loop is unrolled
            by two so the two partials are distinct registers).  FAST (fast accumulation): one chain
            accumulating into acc, no promotion.
  epilogue  per warpgroup in registers (scales, bias, GELU by tanh.approx / gated residual / residual with
            skipped rows, rounded to bf16 exactly where the PyTorch reference rounds), then st.shared + TMA
            store of its 64 x 128 half; the next tile's loads are already in flight.
Registers: acc 64 + two partials 128 per thread (+ epilogue) -> 240 per consumer thread (maxnreg 168 over
12 warps, redistributed: consumers 240, producer 24).  Shared memory: STAGES x 32 KB ring + 2 x 16 KB C tiles.

Needs: CUDA sm90, K % 256 == 0 (chains in pairs), N % 8 == 0, bf16 output; `available()` and `supported()`
say so, and kernels.fp8_gemm falls back to its Triton kernel otherwise.  Gluon does not run in the CPU
interpreter: its tests are GPU tests (tests/test_fp8_gemm.py, marked gpu) against fp8_gemm_ref and the Triton
kernel.  FLOPs = 2 M N K; bytes as the Triton kernel (compute bound at the DiT's shapes).
Measured (H100 SXM, `liveact bench kernels --only gemm`, 3 interleaved do_bench rounds, baselines in the same run;
TFLOP/s, precise accumulation, bias epilogue; results/h100-2026-11-25-s4/gemm_bench4_final.txt):
    shape (M=9360)        this kernel  Triton kernel*  torch._scaled_mm  cuBLAS bf16   vs _scaled_mm  vs bf16
    O-proj 5120->5120     1133-1144    1003            1029              687           1.11x          1.66x
    FFN-up 5120->13824    1118-1122    1015            1007              678           1.11x          1.65x
    FFN-down 13824->5120  1074-1090    1007            999               695           1.08x          1.56x
    QKV 5120->15360       1103-1134    1019            1002              688           1.10x          1.60x
  (* the Triton kernel in the previous run of the same session.)  Epilogues: O-proj + gated residual 1021-1028
  (1.43x torch's _scaled_mm + bf16 ops), FFN-up + GELU 1059-1068, FFN-down + gated residual 973-980: the epilogue
  is not overlapped with the next tile (both warpgroups run it while the producer prefetches), ~0.05-0.13 ms per
  call.  Outputs are bit-identical to the Triton kernel's (GPU test at the real shapes).  Fast accumulation here:
  1166-1209 TFLOP/s, below the Triton kernel's 128x256 tiles (1215-1264), so fp8_gemm keeps Triton for it.
  Tried: 4 chains per loop iteration (spills at 240 registers), all chains of a tile in one loop with a partial
  in flight across the back edge (ptxas C7514: wgmma serialized).  Found: LLVM contracts bf16(y * gate) + residual
  into one fma.rn.bf16x2 (one rounding less than PyTorch); an opaque inline-asm copy keeps the rounding.
"""
from __future__ import annotations

import torch

from .fp8_gemm import EPILOGUES

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _GLUON_OK = True
except Exception:  # pragma: no cover - depends on the installed triton
    _GLUON_OK = False

BM, BN, BK = 128, 128, 128
STAGES = 5
GROUP_M = 8
CHAINS = 2   # chains per loop iteration (4 spills at 240 registers: ptxas, sm_90a)


def available() -> bool:
    """True on a CUDA device of compute capability 9.0 with gluon importable."""
    try:
        return bool(_GLUON_OK and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0))
    except Exception:
        return False


def supported(m: int, n: int, k: int, out_dtype) -> bool:
    """Shapes and dtypes this kernel takes (the rest go to the Triton kernel)."""
    return k % (CHAINS * BK) == 0 and n % 8 == 0 and out_dtype == torch.bfloat16 and m >= 1


if _GLUON_OK:
    @gluon.jit
    def _tile(tile_id, num_pid_m, num_pid_n, GROUP: gl.constexpr):
        """Grouped order (GROUP row tiles share each sweep over N), as kernels.fp8_gemm._tile_coords."""
        per_group = GROUP * num_pid_n
        first_m = (tile_id // per_group) * GROUP
        group_m = gl.minimum(num_pid_m - first_m, GROUP)
        pid_m = first_m + (tile_id % per_group) % group_m
        pid_n = (tile_id % per_group) // group_m
        return pid_m, pid_n

    @gluon.jit
    def _producer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, M, N, K, NPROG,
                  BM_: gl.constexpr, BN_: gl.constexpr, BK_: gl.constexpr, NSTAGE: gl.constexpr,
                  GROUP: gl.constexpr):
        num_pid_m = gl.cdiv(M, BM_)
        num_pid_n = gl.cdiv(N, BN_)
        k_tiles = K // BK_
        it = 0
        for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, NPROG):
            pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP)
            for kk in range(k_tiles):
                s = it % NSTAGE
                mbarrier.wait(empty.index(s), ((it // NSTAGE) & 1) ^ 1)
                mbarrier.expect(ready.index(s), 2 * a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM_, kk * BK_], ready.index(s),
                                                a_bufs.index(2 * s))
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM_ + BM_ // 2, kk * BK_], ready.index(s),
                                                a_bufs.index(2 * s + 1))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BN_, kk * BK_], ready.index(s), w_bufs.index(s))
                it += 1

    @gluon.jit
    def _chain(a_bufs, w_bufs, ready, it, WG: gl.constexpr, part, NSTAGE: gl.constexpr, USE_ACC: gl.constexpr):
        """Issue the wgmma chain of ring slot it (64 rows of this warpgroup x BN x BK) into part, async."""
        s = it % NSTAGE
        mbarrier.wait(ready.index(s), (it // NSTAGE) & 1)
        return warpgroup_mma(a_bufs.index(2 * s + WG), w_bufs.index(s).permute((1, 0)), part, use_acc=USE_ACC,
                             is_async=True)

    @gluon.jit
    def _epilogue(acc, c_smem, c_desc, off_m, off_n, M, N, SA, SW, BIAS, GATE, R, stride_r, skip_rows,
                  rows_per_batch, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, L: gl.constexpr,
                  BN_: gl.constexpr):
        rm = off_m + gl.arange(0, 64, layout=gl.SliceLayout(1, L))
        rn = off_n + gl.arange(0, BN_, layout=gl.SliceLayout(0, L))
        mm = rm < M
        mn = rn < N
        sa = gl.load(SA + rm, mask=mm, other=0.0)
        sw = gl.load(SW + rn, mask=mn, other=0.0)
        y = acc * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            y = y + gl.load(BIAS + rn, mask=mn, other=0.0).to(gl.float32)[None, :]
        if EPILOGUE == 1:   # GELU(tanh) of the rounded linear output, tanh.approx (one MUFU op)
            y = y.to(gl.bfloat16).to(gl.float32)
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=gl.float32, is_pure=True,
                                          pack=1)
            y = 0.5 * y + 0.5 * y * t
        elif EPILOGUE >= 2:
            y = y.to(gl.bfloat16).to(gl.float32)
            if EPILOGUE == 2:
                g = gl.load(GATE + rn, mask=mn, other=0.0).to(gl.float32)
                y = (y * g[None, :]).to(gl.bfloat16).to(gl.float32)
                # keep that rounding: without this opaque copy LLVM turns bf16(y * g) + r into one
                # fma.rn.bf16x2 (measured: 23 % of the outputs 1 ulp off torch's bf16 chain)
                y = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [y], dtype=gl.float32, is_pure=True,
                                              pack=1)
            else:
                y = gl.where(((rm % rows_per_batch) < skip_rows)[:, None], 0.0, y)
            r = gl.load(R + (rm[:, None] * stride_r + rn[None, :]), mask=mm[:, None] & mn[None, :], other=0.0)
            y = r.to(gl.float32) + y
        tma.store_wait(0)            # the previous tile's store has left c_smem
        c_smem.store(y.to(gl.bfloat16))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)

    @gluon.jit
    def _consumer(WG: gl.constexpr, a_bufs, w_bufs, ready, empty, c_bufs, c_desc, M, N, K, NPROG,
                  SA, SW, BIAS, GATE, R, stride_r, skip_rows, rows_per_batch,
                  EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, FAST: gl.constexpr,
                  BM_: gl.constexpr, BN_: gl.constexpr, BK_: gl.constexpr, NSTAGE: gl.constexpr,
                  GROUP: gl.constexpr, CHAINS: gl.constexpr):
        L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN_, 32])
        num_pid_m = gl.cdiv(M, BM_)
        num_pid_n = gl.cdiv(N, BN_)
        k_tiles = K // BK_
        c_smem = c_bufs.index(WG)
        it = 0
        for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, NPROG):
            pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP)
            acc = gl.zeros([64, BN_], gl.float32, L)
            pa = gl.zeros([64, BN_], gl.float32, L)     # (ignored inputs of the use_acc=False chains)
            pb = gl.zeros([64, BN_], gl.float32, L)
            if FAST:
                for kk in range(k_tiles):
                    acc = _chain(a_bufs, w_bufs, ready, it + kk, WG, acc, NSTAGE, True)
                    acc = warpgroup_mma_wait(1, deps=(acc, ))
                    if kk > 0:
                        mbarrier.arrive(empty.index((it + kk - 1) % NSTAGE), count=1)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                mbarrier.arrive(empty.index((it + k_tiles - 1) % NSTAGE), count=1)
            else:
                # CHAINS chains per iteration, alternating between the partials pa / pb; each chain's promotion
                # runs while the next one is on the tensor cores; the iteration ends with nothing in flight
                # (a wgmma accumulator in flight across the loop's back edge makes ptxas serialize, C7514)
                for kk in range(0, k_tiles, CHAINS):
                    pa = _chain(a_bufs, w_bufs, ready, it + kk, WG, pa, NSTAGE, False)
                    for c in gl.static_range(1, CHAINS):
                        if c % 2 == 1:
                            pb = _chain(a_bufs, w_bufs, ready, it + kk + c, WG, pb, NSTAGE, False)
                            pa = warpgroup_mma_wait(1, deps=(pa, ))      # chain c-1 done, chain c running
                            acc = acc + pa
                        else:
                            pa = _chain(a_bufs, w_bufs, ready, it + kk + c, WG, pa, NSTAGE, False)
                            pb = warpgroup_mma_wait(1, deps=(pb, ))
                            acc = acc + pb
                        mbarrier.arrive(empty.index((it + kk + c - 1) % NSTAGE), count=1)
                    if CHAINS % 2 == 0:
                        pb = warpgroup_mma_wait(0, deps=(pb, ))
                        acc = acc + pb
                    else:
                        pa = warpgroup_mma_wait(0, deps=(pa, ))
                        acc = acc + pa
                    mbarrier.arrive(empty.index((it + kk + CHAINS - 1) % NSTAGE), count=1)
            it += k_tiles
            _epilogue(acc, c_smem, c_desc, pid_m * BM_ + WG * 64, pid_n * BN_, M, N, SA, SW, BIAS, GATE, R, stride_r,
                      skip_rows, rows_per_batch, EPILOGUE, HAS_BIAS, L, BN_)
        tma.store_wait(0)

    @gluon.jit
    def _fp8_gemm_gluon_kernel(a_desc, w_desc, c_desc, SA, SW, BIAS, GATE, R, M, N, K, stride_r, skip_rows,
                               rows_per_batch, NPROG, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr,
                               FAST: gl.constexpr, NSTAGE: gl.constexpr, GROUP: gl.constexpr,
                               CHAINS: gl.constexpr):
        BK_: gl.constexpr = a_desc.block_type.shape[1]
        BM_: gl.constexpr = 2 * a_desc.block_type.shape[0]
        BN_: gl.constexpr = w_desc.block_type.shape[0]
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * NSTAGE] + a_desc.block_type.shape, a_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NSTAGE] + w_desc.block_type.shape, w_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NSTAGE):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        gl.warp_specialize([
            (_consumer, (WG0, a_bufs, w_bufs, ready, empty, c_bufs, c_desc, M, N, K, NPROG, SA, SW, BIAS, GATE, R,
                         stride_r, skip_rows, rows_per_batch, EPILOGUE, HAS_BIAS, FAST, BM_, BN_, BK_, NSTAGE,
                         GROUP, CHAINS)),
            (_consumer, (WG1, a_bufs, w_bufs, ready, empty, c_bufs, c_desc, M, N, K, NPROG, SA, SW, BIAS, GATE, R,
                         stride_r, skip_rows, rows_per_batch, EPILOGUE, HAS_BIAS, FAST, BM_, BN_, BK_, NSTAGE,
                         GROUP, CHAINS)),
            (_producer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, M, N, K, NPROG, BM_, BN_, BK_, NSTAGE, GROUP)),
        ], [4, 1], [240, 24])


_num_sms = {}


def fp8_gemm_gluon(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   bias=None, epilogue: str = "none", residual=None, gate=None, skip_rows: int = 0,
                   rows_per_batch=None, out=None, fast_accum: bool = False, stages: int = STAGES,
                   chains: int = CHAINS) -> torch.Tensor:
    """out [M, N] bf16 = epilogue(A W^T * s_a * s_w + bias) on sm90 (see the module docstring).  Inputs as
    validated by kernels.fp8_gemm.fp8_gemm, which calls this; a (e4m3 [M, K] row-major), w (e4m3 [N, K]),
    a_scale fp32 [M], w_scale fp32 [N], residual bf16 [M, N] row-major (may alias out), gate [N]."""
    if not _GLUON_OK:
        raise ValueError("fp8_gemm_gluon needs triton.experimental.gluon (triton >= 3.5); use kernels.fp8_gemm")
    if not (a.is_cuda and available()):
        raise ValueError("fp8_gemm_gluon runs on CUDA sm90 (H100/H200) only; use kernels.fp8_gemm.fp8_gemm, which "
                         "picks this kernel where it applies")
    m, k = a.shape
    n = w.shape[0]
    if not supported(m, n, k, torch.bfloat16) or epilogue not in EPILOGUES or k % (chains * BK):
        raise ValueError(f"fp8_gemm_gluon: needs K % {chains * BK} == 0, N % 8 == 0 and a known epilogue; got M={m} "
                         f"N={n} K={k} epilogue={epilogue!r}: use kernels.fp8_gemm.fp8_gemm")
    if out is None:
        out = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    if residual is not None and m * residual.stride(0) >= 2 ** 31:
        raise ValueError("fp8_gemm_gluon: residual too large for 32-bit offsets; use kernels.fp8_gemm.fp8_gemm")
    idx = a.device.index or 0
    if idx not in _num_sms:
        _num_sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    a_l = gl.NVMMASharedLayout.get_default_for([BM // 2, BK], gl.float8e4nv)
    w_l = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.float8e4nv)
    c_l = gl.NVMMASharedLayout.get_default_for([BM // 2, BN], gl.bfloat16)
    a_d = TensorDescriptor(a, [m, k], [a.stride(0), 1], [BM // 2, BK], a_l)
    w_d = TensorDescriptor(w, [n, k], [w.stride(0), 1], [BN, BK], w_l)
    c_d = TensorDescriptor(out, [m, n], [n, 1], [BM // 2, BN], c_l)
    tiles = triton.cdiv(m, BM) * triton.cdiv(n, BN)
    nprog = min(_num_sms[idx], tiles)
    r = residual if residual is not None else out
    _fp8_gemm_gluon_kernel[(nprog,)](
        a_d, w_d, c_d, a_scale, w_scale, bias if bias is not None else w_scale, gate if gate is not None else w_scale,
        r, m, n, k, r.stride(0), int(skip_rows), int(rows_per_batch or m), nprog,
        EPILOGUE=EPILOGUES[epilogue], HAS_BIAS=bias is not None, FAST=bool(fast_accum), NSTAGE=stages, GROUP=GROUP_M,
        CHAINS=chains, num_warps=4, maxnreg=168)
    return out
