"""Sequence parallelism of the DiT (runtime/sequence_parallel.py) against the single-process model.

The tiny preset in fp32 at 96*64 (a 4x6 patch grid: Fl = 24 tokens per frame, divisible by 2 and 3)
runs chunks 0..3 (chunk 0 = 6 frames, then 8; ConvKV memory updates before chunks 2 and 3, so the
recursive memory is exercised) on one step cache, with the audio branch on for chunks 0, 2, 3
(chunk 0 zeroes frame 0's audio) and off for chunk 1 (like step 0).
2 and 3 gloo processes must reproduce model.forward's velocities and, after gathering the shards,
its caches.  Rel. errors ||sp - ref|| / ||ref||, measured ~2.4e-7 in fp32:  fp32 cache: < 1e-5 for
both;  FP8 cache: velocity < 1e-3, cache < 5e-3 (the local GEMMs run over fewer rows, so a K value
may differ in its last bit and flip one FP8 rounding; measured ~2e-4 on the cache).
Mutations checked by hand: RoPE rows of the wrong rank -> velocity error 1.7e-3; memory update
without the row exchange -> 2.3e-4 (and the cache check fails by far).
"""
import functools
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from liveact.model import ChunkLayout, ReferenceOps, Rope3D, VideoGeometry, get_preset
from liveact.model.checkpoint import build_empty, init_random_
from liveact.model.ops import convkv_compress_reference
from liveact.runtime.ring import SequenceParallel, launch_info
from liveact.runtime.sequence_parallel import (MEMORY_SLOTS, MemoryPlan, ShardRope, SPOps, check_sequence_parallel,
                                               gather_kv, gather_tokens, local_tokens_per_frame, shard_tokens,
                                               sp_forward)

SIZE = "96*64"
CHUNKS = 4
AUDIO = (True, False, True, True)  # chunk 0 with audio: its frame-0 audio zeroing is on the test path
TOL_V = {False: 1e-5, True: 1e-3}   # velocity rel. error, fp32 / FP8 cache
TOL_KV = {False: 1e-5, True: 5e-3}  # gathered cache rel. error


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------ the case
@functools.lru_cache(maxsize=1)
def make_case(seed=0):
    """Model, rope and per-(chunk, step) inputs; identical in every process (seeded).  Built once
    per process (the random init dominates the test time); callers that change the model's ops
    restore ReferenceOps afterwards."""
    cfg = get_preset("tiny")
    model = init_random_(build_empty(cfg, "cpu", torch.float32), seed=seed)
    g = VideoGeometry.parse(SIZE)
    gen = torch.Generator().manual_seed(seed + 1)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    ctx = model.embed_context(rnd(20, cfg.text_dim), rnd(1, 257, cfg.clip_dim))
    audio = model.embed_audio(rnd(1, 53, 5, cfg.audio_layers, cfg.audio_channels))
    steps = []  # one step per chunk: (chunk, with audio, latent, y, t)
    for n, with_audio, t in zip(range(CHUNKS), AUDIO, (1000.0, 937.5, 833.33333333, 937.5)):
        ch = ChunkLayout.for_chunk(n)
        steps.append((n, with_audio, rnd(16, ch.frames, g.lat_h, g.lat_w), rnd(20, ch.frames, g.lat_h, g.lat_w), t))
    return model, g, ctx, audio, steps


def run_chunks(model, g, ctx, audio, steps, caches, forward):
    """The runtime's order: memory update of the step cache before chunks n >= 2, then the forward."""
    outs = []
    for n, with_audio, lat, y, t in steps:
        ch = ChunkLayout.for_chunk(n)
        if n >= 2:
            model.memory_update(caches, g.tokens_per_frame)
        e, e0 = model.embed_time(torch.tensor([t]))
        akv = model.chunk_audio_kv(audio, ch) if with_audio else None  # None = step 0: no audio branch
        outs.append(forward(lat, y, e, e0, ctx, akv, caches, Rope3D(g.grid_h, g.grid_w), ch))
    return outs


def reference_run(fp8):
    model, g, ctx, audio, steps = make_case()
    caches = model.alloc_caches(g.tokens_per_frame, fp8=fp8)
    outs = run_chunks(model, g, ctx, audio, steps, caches, model)
    ops = ReferenceOps()
    kv = [ops.kv_read(c, 0, c.k.shape[1], torch.float32) for c in caches]
    return outs, kv


# ------------------------------------------------------------------------------------------ worker
def _sp_worker(rank, world, store_file, out_dir):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if os.path.exists("/sys/class/net/lo"):  # single-host test: gloo over loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    info = launch_info(init_method=f"file://{store_file}")
    try:
        assert (info.rank, info.world_size, info.backend, info.device.type) == (rank, world, "gloo", "cpu")
        assert os.environ["NCCL_NVLS_ENABLE"] == "0"
        sp = info.sequence_parallel()
        result = {}
        model, g, ctx, audio, steps = make_case()
        model.set_ops(SPOps(ReferenceOps(), sp))
        for fp8 in (False, True):
            caches = model.alloc_caches(g.tokens_per_frame, fp8=fp8)
            fwd = lambda *a: sp_forward(model, *a, sp)
            outs = run_chunks(model, g, ctx, audio, steps, caches, fwd)
            kv = [gather_kv(c, g.tokens_per_frame, sp) for c in caches]
            result[fp8] = dict(outs=outs, kv=kv, local_rows=caches[0].k.shape[1], local_dtype=caches[0].k.dtype)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    return {fp8: reference_run(fp8) for fp8 in (False, True)}


@pytest.mark.parametrize("world", [2, 3])
def test_sp_chunks_match_single_process(world, tmp_path, reference):
    mp.spawn(_sp_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    fl = VideoGeometry.parse(SIZE).tokens_per_frame
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for fp8 in (False, True):
            ref_outs, ref_kv = reference[fp8]
            r = res[fp8]
            # no rank holds the whole cache: 14 slots x Fl / N rows, in the requested format
            assert r["local_rows"] == 14 * fl // world
            assert r["local_dtype"] == (torch.float8_e4m3fn if fp8 else torch.float32)
            errs = []
            for j, (o, ref) in enumerate(zip(r["outs"], ref_outs)):
                assert o.shape == ref.shape and torch.isfinite(o).all()
                errs.append(rel(o, ref))
            assert max(errs) < TOL_V[fp8], (world, rank, fp8, "velocity rel. errors", errs)
            kv_errs = [max(rel(k, rk), rel(v, rv)) for (k, v), (rk, rv) in zip(r["kv"], ref_kv)]
            assert max(kv_errs) < TOL_KV[fp8], (world, rank, fp8, "cache rel. errors", kv_errs)
            print(f"N={world} rank {rank} fp8={fp8}: max rel. error velocity {max(errs):.2e}, cache {max(kv_errs):.2e}")


# ------------------------------------------------------------------------------------------ in-process checks
def test_sp_world1_equals_model_forward(reference):
    """N = 1 runs the same code without a process group: identical to model.forward."""
    model, g, ctx, audio, steps = make_case()
    sp = SequenceParallel(None, 0, 1)
    model.set_ops(SPOps(ReferenceOps(), sp))
    try:
        caches = model.alloc_caches(g.tokens_per_frame)
        outs = run_chunks(model, g, ctx, audio, steps, caches, lambda *a: sp_forward(model, *a, sp))
    finally:
        model.set_ops(ReferenceOps())
    for o, ref in zip(outs, reference[False][0]):
        assert rel(o, ref) < 1e-6


def test_split_rule_error_names_valid_counts():
    assert local_tokens_per_frame(1170, 3) == 390
    with pytest.raises(ValueError, match=r"valid rank counts are 1, 2, 4, 5, 10, 20"):
        local_tokens_per_frame(20, 3, grid=(4, 5))
    rope = Rope3D(4, 5)  # 80*64: Fl = 20
    with pytest.raises(ValueError, match="must divide 20"):
        ShardRope(rope, 0, 3)
    with pytest.raises(ValueError, match=r"\(a 4x5 patch grid\).*valid rank counts are 1, 2, 4, 5, 10, 20"):
        check_sequence_parallel(VideoGeometry.parse("80*64"), 3)
    assert check_sequence_parallel(VideoGeometry.parse("416*720"), 2) == 585
    ops = SPOps(ReferenceOps(), types.SimpleNamespace(rank=0, world=3))
    with pytest.raises(ValueError, match="valid rank counts are 1, 2, 4, 5, 10, 20"):
        ops.alloc_kv(1, 14 * 20, 2, 128, torch.float32, "cpu")
    assert ops.alloc_kv(1, 14 * 24, 2, 128, torch.float32, "cpu").k.shape == (1, 14 * 8, 2, 128)


def test_shard_rope_and_tokens_are_the_global_rows():
    """Each rank's tokens / RoPE rows are m rows of every frame; together they are the whole chunk,
    and rotation uses the global (time, row, column) positions."""
    rope, world = Rope3D(4, 6), 3
    fl, m = 24, 8
    x = torch.randn(1, 8 * fl, 5)
    parts = []
    for r in range(world):
        sp = types.SimpleNamespace(rank=r, world=world)
        sr = ShardRope(rope, r, world)
        assert sr.tokens_per_frame == m
        xs = shard_tokens(x, fl, sp)
        assert xs.shape == (1, 8 * m, 5)
        for f in (0, 5, 13):  # local row f*m + j  <->  global row f*Fl + r*m + j
            assert torch.equal(sr.table(f, 1), rope.table(f, 1)[r * m:(r + 1) * m])
        assert torch.equal(xs.reshape(8, m, 5), x.reshape(8, fl, 5)[:, r * m:(r + 1) * m])
        parts.append(xs)
    fake = types.SimpleNamespace(world=world, all_gather=lambda t: torch.stack(parts))
    assert torch.equal(gather_tokens(parts[0], 8, fake), x)


def _simulated_exchange(plans, windows, r):
    """Rank r's buffer after the exchange, built in one process: own rows + what each owner sends."""
    p = plans[r]
    buf = torch.full((2 * 5 * p.m,) + windows[r].shape[1:], float("nan"))
    buf[p.self_dst] = windows[r][p.self_src]
    for o, pos in p.recv.items():
        buf[pos] = windows[o][plans[o].send[r]]  # what owner o sends to r, in the agreed order
    return buf


@pytest.mark.parametrize("fl,world", [(24, 2), (24, 3), (24, 4), (1170, 3), (20, 2)])
def test_memory_plan_gathers_exactly_the_conv_inputs(fl, world):
    """Every rank's buffer must hold exactly the span tokens its share of slots 2 and 3 compresses
    (5 consecutive tokens of the 5 concatenated source slots per output token)."""
    m = local_tokens_per_frame(fl, world)
    cache = torch.randn(14 * fl, 3)  # one value per (global row, channel)
    windows = [cache.reshape(14, fl, 3)[2:12, r * m:(r + 1) * m].reshape(10 * m, 3) for r in range(world)]
    plans = [MemoryPlan(fl, r, world, "cpu") for r in range(world)]
    bufs = [_simulated_exchange(plans, windows, r) for r in range(world)]
    for r, buf in enumerate(bufs):
        assert torch.isfinite(buf).all()
        for i, a in enumerate(MEMORY_SLOTS):
            span = cache[a * fl:(a + 5) * fl]
            assert torch.equal(buf[i * 5 * m:(i + 1) * 5 * m], span[5 * r * m:5 * (r + 1) * m])
    # compressing the buffers gives the single-process compressed slots (conv and mean memory)
    for w in (torch.randn(3, 1, 5), None):
        for i, a in enumerate(MEMORY_SLOTS):
            full = convkv_compress_reference(cache[a * fl:(a + 5) * fl].reshape(1, 5 * fl, 1, 3), w)
            got = [convkv_compress_reference(b[i * 5 * m:(i + 1) * 5 * m].reshape(1, 5 * m, 1, 3), w) for b in bufs]
            assert torch.allclose(torch.cat(got, dim=1), full, atol=1e-6)


def test_sp_forward_needs_spops():
    model, g, ctx, audio, steps = make_case()
    sp = SequenceParallel(None, 0, 1)
    n, _, lat, y, t = steps[0]
    e, e0 = model.embed_time(torch.tensor([t]))
    with pytest.raises(ValueError, match="SPOps"):
        sp_forward(model, lat, y, e, e0, ctx, None, model.alloc_caches(g.tokens_per_frame),
                   Rope3D(g.grid_h, g.grid_w), ChunkLayout.for_chunk(0), sp)
