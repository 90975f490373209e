"""The streaming runtime against a plain loop over the reference model, the ConvKV recurrence,
static cache storage, FP8 cache round trip, edit prompts and audio CFG."""
import pytest
import torch

from liveact.model import ChunkLayout, Rope3D, VideoGeometry
from liveact.model.config import TIMESTEPS
from liveact.model.ops import ReferenceOps, convkv_compress_reference, fp8_dequantize_per_head, fp8_quantize_per_head
from liveact.runtime.engine import EditPrompts, EngineOptions, StreamingEngine, video_frames_of_chunk

from helpers import audio_window, conditioning, rel_err, tiny_model

GEO = VideoGeometry.parse("80*64")  # Fl = 20


def plain_loop(m, geo, y, ctxs, n_chunks, seed, cfg_scale=1.0, select=lambda n: "main", mean_memory=False):
    """shared/SPEC.md 5.5-5.6 written out directly: separate caches per step, x0 + fresh-noise sampler."""
    fl = geo.tokens_per_frame
    rope = Rope3D(geo.grid_h, geo.grid_w)
    caches = [m.alloc_caches(fl) for _ in range(3)]
    null_caches = [m.alloc_caches(fl) for _ in range(3)]
    gen = torch.Generator().manual_seed(seed)
    ts = torch.tensor(TIMESTEPS, dtype=torch.float32)
    out = []
    for n in range(n_chunks):
        lay = ChunkLayout.for_chunk(n)
        yc = y[:, 0:6] if n == 0 else y[:, 6:14]
        a = audio_window(m.cfg, n)
        akv = m.chunk_audio_kv(m.embed_audio(a), lay)
        akv_null = m.chunk_audio_kv(m.embed_audio(torch.zeros_like(a)), lay)
        x = torch.randn(16, lay.frames, geo.lat_h, geo.lat_w, generator=gen, dtype=m.dtype)
        for i in range(3):
            e, e0 = m.embed_time(ts[i:i + 1])
            if n > 1:
                m.memory_update(caches[i], fl, mean_memory)
                if cfg_scale > 1 and i > 0:
                    m.memory_update(null_caches[i], fl, mean_memory)
            v = m(x, yc, e, e0, ctxs[select(n)], None if i == 0 else akv, caches[i], rope, lay)
            if cfg_scale > 1 and i > 0:
                v_null = m(x, yc, e, e0, ctxs[select(n)], akv_null, null_caches[i], rope, lay)
                v = v_null + cfg_scale * (v - v_null)
            s, s_next = ts[i] / 1000, ts[i + 1] / 1000
            x0 = x - s * v
            x = (1 - s_next) * x0 + s_next * torch.randn(x.shape, generator=gen, dtype=m.dtype)
        out.append(x)
    return out


def engine_run(m, geo, y, ctxs, n_chunks, seed, edit=None, **opt):
    eng = StreamingEngine(m, geo, EngineOptions(seed=seed, **opt))
    eng.start(y, ctxs, edit)
    return eng, [eng.generate_chunk(n, audio_window(m.cfg, n)) for n in range(n_chunks)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_equals_plain_reference_loop(dtype):
    m = tiny_model(dtype)
    ctx, y = conditioning(m, GEO)
    ref = plain_loop(m, GEO, y, {"main": ctx}, 5, seed=7)
    _, got = engine_run(m, GEO, y, {"main": ctx}, 5, seed=7)
    for n, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == (16, 6 if n == 0 else 8, GEO.lat_h, GEO.lat_w)
        assert rel_err(a, b) < (1e-6 if dtype == torch.float32 else 1e-2), n
        assert torch.isfinite(a).all()


def test_engine_audio_cfg_and_mean_memory_equal_plain_loop():
    m = tiny_model()
    ctx, y = conditioning(m, GEO)
    ref = plain_loop(m, GEO, y, {"main": ctx}, 4, seed=1, cfg_scale=2.5, mean_memory=True)
    eng, got = engine_run(m, GEO, y, {"main": ctx}, 4, seed=1, audio_cfg=2.5, mean_memory=True)
    assert sorted(eng.null_caches) == [1, 2]  # only steps 1, 2 have a null-audio branch
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-6


def test_seed_repeatable_and_distinct():
    m = tiny_model()
    ctx, y = conditioning(m, GEO)
    _, a = engine_run(m, GEO, y, {"main": ctx}, 3, seed=5)
    _, b = engine_run(m, GEO, y, {"main": ctx}, 3, seed=5)
    _, c = engine_run(m, GEO, y, {"main": ctx}, 3, seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a[2], c[2])


def test_edit_prompts_switch_on_exact_chunk_ranges():
    m = tiny_model()
    ctx, y = conditioning(m, GEO, seed=0)
    ctx_b, _ = conditioning(m, GEO, seed=1)
    ctxs = {"main": ctx, "wave": ctx_b}
    edit = EditPrompts([(2, 3, "wave")])
    assert [edit.select(n) for n in range(6)] == ["main", "main", "wave", "wave", "main", "main"]
    sel = lambda n: edit.select(n)
    ref = plain_loop(m, GEO, y, ctxs, 5, seed=3, select=sel)
    _, got = engine_run(m, GEO, y, ctxs, 5, seed=3, edit=edit)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-6
    plain = plain_loop(m, GEO, y, ctxs, 5, seed=3)
    assert torch.equal(ref[1], plain[1]) and not torch.allclose(ref[2], plain[2])
    with pytest.raises(ValueError, match="empty"):
        EditPrompts([(3, 2, "x")])
    eng = StreamingEngine(m, GEO)
    with pytest.raises(ValueError, match="no context"):
        eng.start(y, {"main": ctx}, EditPrompts([(0, 1, "missing")]))


def test_cache_storage_is_static_across_chunks():
    m = tiny_model()
    ctx, y = conditioning(m, GEO)
    eng = StreamingEngine(m, GEO, EngineOptions(seed=0))
    eng.start(y, {"main": ctx})
    ptrs = [t.data_ptr() for t in eng.cache_tensors()]
    nbytes = eng.cache_bytes()
    for n in range(5):
        eng.generate_chunk(n, audio_window(m.cfg, n))
        assert [t.data_ptr() for t in eng.cache_tensors()] == ptrs
    assert eng.cache_bytes() == nbytes == 3 * m.cfg.num_layers * 2 * 14 * GEO.tokens_per_frame * m.cfg.dim * 4


def test_memory_recurrence_after_n_chunks():
    """Slots after chunk n >= 3 (shared/SPEC.md 4.3): 0,1 = c0[0..1]; 2 = C(M2, M3, c_{n-2}[6], c_{n-2}[7],
    c_{n-1}[0]); 3 = C(c_{n-1}[1..5]); 4,5 = c_{n-1}[6..7]; 6..13 = c_n."""
    ops = ReferenceOps()
    fl, h, d = 20, 2, 4
    w = torch.randn(h * d, 1, 5, dtype=torch.float64)
    kv = ops.alloc_kv(1, 14 * fl, h, d, torch.float64, "cpu")
    C = lambda frames: convkv_compress_reference(torch.cat(frames, dim=1), w)
    frame = lambda c, j: c[:, j * fl:(j + 1) * fl]
    chunks, M2, M3 = [], None, None
    for n in range(7):
        F = 6 if n == 0 else 8
        c = torch.randn(1, F * fl, h, d, dtype=torch.float64)
        if n >= 2:
            ops.kv_memory_update(kv, w, fl, dtype=torch.float64)
        ops.kv_write(kv, 0 if n == 0 else 6 * fl, c, -c)
        chunks.append(c)
        if n == 2:
            M2 = C([frame(chunks[0], j) for j in (2, 3, 4, 5)] + [frame(chunks[1], 0)])
            M3 = C([frame(chunks[1], j) for j in range(1, 6)])
        elif n >= 3:
            M2 = C([M2, M3, frame(chunks[n - 2], 6), frame(chunks[n - 2], 7), frame(chunks[n - 1], 0)])
            M3 = C([frame(chunks[n - 1], j) for j in range(1, 6)])
        if n >= 2:
            k = kv.k
            assert torch.equal(k[:, :2 * fl], chunks[0][:, :2 * fl])
            assert torch.allclose(k[:, 2 * fl:3 * fl], M2, atol=1e-9), n
            assert torch.allclose(k[:, 3 * fl:4 * fl], M3, atol=1e-9), n
            assert torch.equal(k[:, 4 * fl:6 * fl], chunks[n - 1][:, 6 * fl:8 * fl])
            assert torch.equal(k[:, 6 * fl:], c)


def test_fp8_cache_roundtrip_within_e4m3_tolerance():
    x = torch.randn(1, 64, 4, 128) * torch.logspace(-2, 2, 64).view(1, 64, 1, 1)
    x[0, 5, 1, 7] = 300.0  # an outlier sets its (token, head) scale only
    q, s = fp8_quantize_per_head(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (1, 64, 4, 1)
    back = fp8_dequantize_per_head(q, s, torch.float32)
    rel = ((back - x).abs() / x.abs().amax(-1, keepdim=True)).amax()
    assert rel < 2 ** -4 + 1e-2  # e4m3: 3 mantissa bits, relative to the (token, head) max, plus bf16 scale rounding
    per_row = (back - x).norm(dim=-1) / x.norm(dim=-1)
    assert per_row.max() < 0.06


def test_fp8_kv_cache_engine_close_to_bf16_cache():
    m = tiny_model()
    ctx, y = conditioning(m, GEO)
    _, a = engine_run(m, GEO, y, {"main": ctx}, 4, seed=2)
    eng, b = engine_run(m, GEO, y, {"main": ctx}, 4, seed=2, fp8_kv_cache=True)
    assert eng.caches[0][0].k.dtype == torch.float8_e4m3fn
    for u, v in zip(a, b):
        cos = torch.nn.functional.cosine_similarity(u.flatten(), v.flatten(), dim=0)
        assert cos > 0.99


def test_video_frame_accounting():
    assert [video_frames_of_chunk(n) for n in range(3)] == [21, 32, 32]
