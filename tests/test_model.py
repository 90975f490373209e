"""The reference DiT against shared/SPEC.md: patchify, unpatchify, timestep sinusoid, RoPE positions,
audio windows, ConvKV update ranges, chunk layouts and the audio/attention quirks."""
import math

import pytest
import torch
import torch.nn.functional as F

from liveact.model import ChunkLayout, Rope3D, VideoGeometry
from liveact.model.dit import sinusoidal_embedding
from liveact.model.ops import ReferenceOps, convkv_compress_reference
from liveact.model.rope import rope_apply_reference, rope_frequencies

from helpers import audio_window, conditioning, rel_err, tiny_model

GEO = VideoGeometry.parse("80*64")  # grid 4 x 5, Fl = 20 (a multiple of 5)


def test_geometry():
    g = VideoGeometry.parse("416*720")
    assert (g.lat_h, g.lat_w, g.grid_h, g.grid_w, g.tokens_per_frame) == (90, 52, 45, 26, 1170)
    assert VideoGeometry.parse("512*512").tokens_per_frame == 1024
    assert VideoGeometry.parse("480*832").tokens_per_frame == 1560
    for bad in ("416", "416*721", "a*b", "0*16"):
        with pytest.raises(ValueError, match="size"):
            VideoGeometry.parse(bad)


def test_patchify_is_the_conv3d():
    m = tiny_model()
    lat, y = torch.randn(16, 3, 8, 10), torch.randn(20, 3, 8, 10)
    ours = m.patchify(lat, y)
    ref = F.conv3d(torch.cat([lat, y])[None], m.patch_embedding.weight, m.patch_embedding.bias, stride=(1, 2, 2))
    ref = ref.flatten(2).transpose(1, 2)  # token = f*gh*gw + h*gw + w
    assert rel_err(ours, ref) < 1e-5


def test_unpatchify_follows_spec_index_formula():
    m = tiny_model()
    f, gh, gw = 2, 3, 4
    out = torch.randn(1, f * gh * gw, 64)
    u = m.unpatchify(out, f, gh, gw)
    for (ff, hh, ww, q, r, c) in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 1, 0, 5), (1, 1, 2, 0, 1, 15), (0, 2, 1, 1, 1, 7)]:
        tok = ff * gh * gw + hh * gw + ww
        assert u[c, ff, 2 * hh + q, 2 * ww + r] == out[0, tok, (q * 2 + r) * 16 + c]


def test_sinusoid_cos_first_float64():
    t = torch.tensor([937.5])
    e = sinusoidal_embedding(t, 256)
    k = 5
    freq = 10000 ** (-k / 128)
    assert e.dtype == torch.float32
    assert abs(e[0, k].item() - math.cos(937.5 * freq)) < 1e-6
    assert abs(e[0, 128 + k].item() - math.sin(937.5 * freq)) < 1e-6


def test_rope_positions_and_interleaved_split():
    rope = Rope3D(GEO.grid_h, GEO.grid_w, num_frames=14)
    f = rope_frequencies()
    # queries of a later chunk sit at time positions 6..13, keys at slot index
    fl = GEO.tokens_per_frame
    tab = rope.table(6, 8)
    tok = 3 * fl + 2 * GEO.grid_w + 4          # frame 3 of the chunk -> P_t = 9, row 2, col 4
    want = torch.cat([f[9, :22], f[2, 22:43], f[4, 43:64]])
    assert torch.equal(tab[tok], want)
    # the angles themselves: w_t[k] = 10000^(-2k/44), w_h[k] = 10000^(-2k/42)
    assert abs(torch.angle(f[9, 3]).item() - math.remainder(9 * 10000 ** (-6 / 44), 2 * math.pi)) < 1e-9
    assert abs(torch.angle(f[2, 22 + 5]).item() - math.remainder(2 * 10000 ** (-10 / 42), 2 * math.pi)) < 1e-9
    # interleaved pairs: (x[2m], x[2m+1]) rotate together
    x = torch.randn(1, 14 * fl, 1, 128, dtype=torch.float64)
    r = rope_apply_reference(x, rope.table(0, 14))
    m, t = 30, 5 * fl + 7
    z = complex(x[0, t, 0, 2 * m], x[0, t, 0, 2 * m + 1]) * complex(rope.full[t, m])
    assert abs(r[0, t, 0, 2 * m].item() - z.real) < 1e-6 and abs(r[0, t, 0, 2 * m + 1].item() - z.imag) < 1e-6


def test_convkv_update_moves_and_compresses_exact_ranges():
    ops = ReferenceOps()
    fl, h, d = 20, 2, 4
    kv = ops.alloc_kv(1, 14 * fl, h, d, torch.float64, "cpu")
    tok = torch.arange(14 * fl, dtype=torch.float64)
    kv.k.copy_(tok[None, :, None, None] + 0.001 * torch.arange(h * d, dtype=torch.float64).view(1, 1, h, d))
    kv.v.copy_(-kv.k)
    before_k, before_v = kv.k.clone(), kv.v.clone()
    w = torch.randn(h * d, 1, 5, dtype=torch.float64)
    ops.kv_memory_update(kv, w, fl, dtype=torch.float64)
    s = lambda t, a, b: t[:, a * fl:b * fl]
    assert torch.equal(s(kv.k, 0, 2), s(before_k, 0, 2))                       # anchors untouched
    # slot 2: out[t] = sum_j W[c, j] * x[5t + j] over the 5*Fl rows of slots 2..6 (token axis, not frames)
    t, c = 7, 5
    hh, ee = divmod(c, d)
    src = before_k[0, 2 * fl + 5 * t: 2 * fl + 5 * t + 5, hh, ee]
    assert abs(kv.k[0, 2 * fl + t, hh, ee].item() - (w[c, 0] * src).sum().item()) < 1e-9
    assert torch.allclose(s(kv.k, 2, 3), convkv_compress_reference(s(before_k, 2, 7), w))
    assert torch.allclose(s(kv.k, 3, 4), convkv_compress_reference(s(before_k, 7, 12), w))
    # V is compressed with the same (memory_proj_k) weight
    assert torch.allclose(s(kv.v, 2, 3), convkv_compress_reference(s(before_v, 2, 7), w))
    assert torch.equal(s(kv.k, 4, 6), s(before_k, 12, 14)) and torch.equal(s(kv.v, 4, 6), s(before_v, 12, 14))
    assert torch.equal(s(kv.k, 6, 14), s(before_k, 6, 14))                      # current-chunk slots left for the write
    # mean memory: plain mean of the same groups of 5 consecutive tokens
    kv2 = ops.alloc_kv(1, 14 * fl, h, d, torch.float64, "cpu")
    kv2.k.copy_(before_k)
    kv2.v.copy_(before_v)
    ops.kv_memory_update(kv2, None, fl, dtype=torch.float64)
    assert torch.allclose(kv2.k[0, 2 * fl + 3], before_k[0, 2 * fl + 15: 2 * fl + 20].mean(0))


def test_first_chunk_attends_only_to_itself_later_chunks_to_all_14_slots():
    m = tiny_model()
    ctx, y = conditioning(m, GEO)
    rope = Rope3D(GEO.grid_h, GEO.grid_w)
    fl = GEO.tokens_per_frame
    e, e0 = m.embed_time(torch.tensor([1000.0]))

    def run(n, caches, lat):
        lay = ChunkLayout.for_chunk(n)
        return m(lat, y[:, :6] if n == 0 else y[:, 6:14], e, e0, ctx, None, caches, rope, lay)

    lat0, lat1 = torch.randn(16, 6, GEO.lat_h, GEO.lat_w), torch.randn(16, 8, GEO.lat_h, GEO.lat_w)
    c1, c2 = m.alloc_caches(fl), m.alloc_caches(fl)
    for kv in c2:  # garbage in the slots chunk 0 must not read
        kv.k[:, 6 * fl:].normal_()
        kv.v[:, 6 * fl:].normal_()
    v0a, v0b = run(0, c1, lat0), run(0, c2, lat0)
    assert v0a.shape == (16, 6, GEO.lat_h, GEO.lat_w)
    assert torch.equal(v0a, v0b)
    for kv in c1:  # chunk 0 wrote slots 0-5 with RMS-normalised keys (rows of unit RMS times the norm weight)
        assert kv.k[:, :6 * fl].abs().sum() > 0 and kv.k[:, 6 * fl:].abs().sum() == 0
    v1 = run(1, c1, lat1)
    assert v1.shape == (16, 8, GEO.lat_h, GEO.lat_w) and torch.isfinite(v1).all()
    for kv in c2:  # now slots 0-5 matter
        kv.k[:, :fl].mul_(-1)
    assert not torch.allclose(run(1, c2, lat1), v1)


class SpyOps(ReferenceOps):
    def __init__(self):
        self.calls = []

    def linear_residual(self, x, lin, residual, skip_rows=0):
        self.calls.append(("linear_residual", skip_rows))
        return super().linear_residual(x, lin, residual, skip_rows)

    def linear(self, x, lin):
        self.calls.append(("linear", lin, x))
        return super().linear(x, lin)


def test_audio_branch_zeroes_frame0_only_in_chunk0_and_windows_follow_spec():
    spy = SpyOps()
    m = tiny_model(ops=spy)
    cfg = m.cfg
    ctx, y = conditioning(m, GEO)
    rope = Rope3D(GEO.grid_h, GEO.grid_w)
    fl = GEO.tokens_per_frame
    a = audio_window(cfg, 0)
    spy.calls.clear()
    tokens = m.embed_audio(a)
    assert tokens.shape == (14, cfg.context_tokens, cfg.output_dim)
    vf_in = next(c[2] for c in spy.calls if c[0] == "linear" and c[1] is m.audio_proj.proj1_vf)
    first_in = next(c[2] for c in spy.calls if c[0] == "linear" and c[1] is m.audio_proj.proj1)
    assert torch.equal(first_in[0], a[0, 0].reshape(-1))            # frame 0: a[0, w=0..4]
    j = 3                                                           # latent frame j -> rows (n=0,w=0..2),(1,2),(2,2),(3,2..4)
    v = [4 * j - 3 + n for n in range(4)]
    rows = [a[0, v[0], 0], a[0, v[0], 1], a[0, v[0], 2], a[0, v[1], 2], a[0, v[2], 2], a[0, v[3], 2], a[0, v[3], 3], a[0, v[3], 4]]
    assert torch.equal(vf_in[j - 1], torch.stack(rows).reshape(-1))
    e, e0 = m.embed_time(torch.tensor([937.5]))
    caches = m.alloc_caches(fl)
    for n in (0, 1):
        lay = ChunkLayout.for_chunk(n)
        spy.calls.clear()
        m(torch.randn(16, lay.frames, GEO.lat_h, GEO.lat_w), y[:, :lay.frames], e, e0, ctx,
          m.chunk_audio_kv(tokens, lay), caches, rope, lay)
        skips = [c[1] for c in spy.calls if c[0] == "linear_residual"]
        # per block: cross-attn o (no skip) then audio proj (skip frame 0 only in chunk 0)
        assert skips == [0, fl if n == 0 else 0] * cfg.num_layers


def test_null_audio_tokens_are_bias_derived_not_zero():
    m = tiny_model()
    t = m.embed_audio(torch.zeros(1, 53, 5, m.cfg.audio_layers, m.cfg.audio_channels))
    assert t.abs().sum() > 0


def test_bf16_reference_close_to_fp32():
    m32 = tiny_model(torch.float32)
    m16 = tiny_model(torch.bfloat16)
    ctx32, y = conditioning(m32, GEO)
    ctx16, _ = conditioning(m16, GEO)
    rope = Rope3D(GEO.grid_h, GEO.grid_w)
    lay = ChunkLayout.for_chunk(0)
    lat = torch.randn(16, 6, GEO.lat_h, GEO.lat_w)
    outs = []
    for m, ctx in ((m32, ctx32), (m16, ctx16)):
        e, e0 = m.embed_time(torch.tensor([1000.0]))
        outs.append(m(lat, y[:, :6], e, e0, ctx, None, m.alloc_caches(GEO.tokens_per_frame), rope, lay).float())
    assert rel_err(outs[1], outs[0]) < 3e-2
