"""Wan2.1 VAE: published key layout, shapes / frame accounting, batched == published recurrence, streaming with a
carried state == one whole decode, the overlap (published runtime) mode, the fused Triton norm, bad checkpoints.

CPU tests use a tiny width (dim=8), tiny grids and fp32 so comparisons are tight (rel. error ||a-b||/||b||)."""
import math

import pytest
import torch

from liveact.model.vae import (VAECheckpointError, WanVAE, build_model, expected_shapes, random_vae_state_dict,
                               write_random_vae)

H, W = 2, 3  # latent grid of the CPU tests (16x24 pixels)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def vae():
    return WanVAE.random(dim=8, seed=3, device="cpu", dtype=torch.float32)


def lat(t, seed=0, h=H, w=W):
    return torch.randn(16, t, h, w, generator=torch.Generator().manual_seed(seed))


# ---- checkpoint layout --------------------------------------------------------------------------------------

def test_published_key_layout():
    shapes = expected_shapes(96)
    assert len(shapes) == 194
    assert sum(k.startswith("encoder.") for k in shapes) == 84
    assert sum(k.startswith("decoder.") for k in shapes) == 106
    assert sum(math.prod(s) for s in shapes.values()) == 126_892_531
    spot = {"conv1.weight": (32, 32, 1, 1, 1), "conv2.bias": (16,), "encoder.conv1.weight": (96, 3, 3, 3, 3),
            "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
            "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
            "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
            "encoder.middle.1.norm.gamma": (384, 1, 1), "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
            "encoder.head.2.weight": (32, 384, 3, 3, 3), "decoder.conv1.weight": (384, 16, 3, 3, 3),
            "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
            "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
            "decoder.upsamples.4.residual.0.gamma": (192, 1, 1, 1),
            "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
            "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
            "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3), "decoder.head.2.weight": (3, 96, 3, 3, 3)}
    for k, s in spot.items():
        assert shapes[k] == s, k
    assert "decoder.upsamples.11.time_conv.weight" not in shapes
    assert "decoder.upsamples.8.shortcut.weight" not in shapes


def test_load_random_checkpoint_strict(tmp_path):
    p = write_random_vae(tmp_path / "Wan2.1_VAE.pth", dim=8, seed=5)
    sd = torch.load(p, map_location="cpu", weights_only=True)
    assert len(sd) == 194
    build_model(8).load_state_dict(sd, strict=True)  # the published loading recipe works
    v = WanVAE.load(p, device="cpu", dtype=torch.float32)  # dim read from the file
    assert v.dim == 8
    got = v.model.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    v16 = WanVAE.load(p, device="cpu", dtype=torch.bfloat16, dim=8)
    assert next(v16.model.parameters()).dtype == torch.bfloat16 and v16.inv_std.dtype == torch.bfloat16


def test_bad_checkpoints(tmp_path):
    missing = tmp_path / "nope" / "Wan2.1_VAE.pth"
    with pytest.raises(ValueError, match="no such file.*write_random_vae"):
        WanVAE.load(missing, device="cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(VAECheckpointError, match="junk.pth: not a readable torch checkpoint"):
        WanVAE.load(junk, device="cpu")
    sd = random_vae_state_dict(8, seed=1)
    sd.pop("decoder.head.2.bias")
    sd["decoder.extra.weight"] = torch.zeros(2)
    sd["conv2.weight"] = torch.zeros(16, 16, 3, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(VAECheckpointError) as ei:
        WanVAE.load(bad, device="cpu", dtype=torch.float32)
    msg = str(ei.value)
    for needle in ("bad.pth", "1 missing: decoder.head.2.bias", "1 unexpected: decoder.extra.weight",
                   "conv2.weight: file (16, 16, 3, 1, 1), model (16, 16, 1, 1, 1)", "Wan2.1_VAE.pth",
                   "Nothing was loaded"):
        assert needle in msg, (needle, msg)
    good = write_random_vae(tmp_path / "d8.pth", dim=8)
    with pytest.raises(VAECheckpointError, match="dim=8 .*dim=16 was asked"):
        WanVAE.load(good, device="cpu", dim=16)


# ---- shapes and frame accounting ----------------------------------------------------------------------------

def test_published_shapes(vae):
    video = torch.rand(1, 3, 53, 8 * H, 8 * W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    video[:, :, 1:] = 0
    z = vae.encode(video)
    assert z.shape == (16, 14, H, W)
    assert vae.decode(lat(6)).shape == (1, 3, 21, 8 * H, 8 * W)
    out8 = vae.decode(lat(8))
    assert out8.shape == (1, 3, 29, 8 * H, 8 * W) and out8.abs().max() <= 1
    sd = vae.streaming_decoder()
    assert sd.decode_chunk(lat(6)).shape[2] == 21
    assert sd.decode_chunk(lat(8, 1)).shape[2] == 32
    assert sd.frames == 53
    with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
        vae.encode(video[:, :, :52])
    with pytest.raises(ValueError, match="latents \\[16, T, h, w\\]"):
        vae.decode(torch.randn(4, 3, H, W))
    with pytest.raises(ValueError, match="reset\\(\\)"):
        sd.decode_chunk(lat(8, 2, h=H + 1))
    with pytest.raises(ValueError, match="mode must be"):
        vae.streaming_decoder("bogus")


def test_batched_matches_published_recurrence(vae):
    z = lat(4, 7)
    ref = vae.decode(z, reference=True, clamp=False)
    assert ref.shape[2] == 13 and ref.std() > 0.05
    assert rel(vae.decode(z, clamp=False), ref) < 1e-5
    one = vae.decode(z[:, :1], clamp=False)  # latent 0 alone: one frame, the prefix of the longer decode
    assert one.shape[2] == 1 and rel(one, ref[:, :, :1]) < 1e-5
    video = torch.rand(1, 3, 9, 8 * H, 8 * W, generator=torch.Generator().manual_seed(2)) * 2 - 1
    e_ref = vae.encode(video, reference=True)
    assert e_ref.shape == (16, 3, H, W)
    assert rel(vae.encode(video), e_ref) < 1e-5
    assert rel(vae.encode(video, frames_per_call=4), e_ref) < 1e-5  # carried encoder state: 1+4, 4


def test_streaming_equals_whole_decode(vae):
    z = lat(22, 11)
    whole = vae.decode(z, clamp=False)
    assert whole.shape[2] == 85
    sd = vae.streaming_decoder("carry", clamp=False)
    outs = [sd.decode_chunk(z[:, a:b]) for a, b in ((0, 6), (6, 14), (14, 22))]
    assert [o.shape[2] for o in outs] == [21, 32, 32]
    assert rel(torch.cat(outs, 2), whole) < 1e-5
    sd.reset()  # irregular chunks, including a first chunk of latent 0 alone
    outs = [sd.decode_chunk(z[:, a:b]) for a, b in ((0, 1), (1, 2), (2, 5), (5, 22))]
    assert [o.shape[2] for o in outs] == [1, 4, 12, 68]
    assert rel(torch.cat(outs, 2), whole) < 1e-5


def test_overlap_mode_published_accounting(vae):
    z = lat(22, 12)
    ov = vae.streaming_decoder("overlap", clamp=False)
    outs = [ov.decode_chunk(z[:, a:b]) for a, b in ((0, 6), (6, 14), (14, 22))]
    assert [o.shape[2] for o in outs] == [21, 32, 32] and ov.frames == 21 + 32 * 2
    assert rel(outs[0], vae.decode(z[:, :6], clamp=False)) < 1e-6
    assert rel(outs[2], vae.decode(z[:, 11:22], clamp=False)[:, :, 9:]) < 1e-6  # fresh [3 old ; 8 new], drop 9
    carry = vae.streaming_decoder("carry", clamp=False)
    c = [carry.decode_chunk(z[:, a:b]) for a, b in ((0, 6), (6, 14))]
    assert rel(outs[1], c[1]) > 1e-3  # the overlap approximation really differs from the continuous decode
    # the published recurrence in the same mode (small chunks keep the CPU time down)
    a = vae.streaming_decoder("overlap", clamp=False)
    b = vae.streaming_decoder("overlap", clamp=False, reference=True)
    for lo, hi in ((0, 2), (2, 4)):
        oa, ob = a.decode_chunk(z[:, lo:hi]), b.decode_chunk(z[:, lo:hi])
        assert oa.shape == ob.shape and rel(oa, ob) < 1e-5
    assert a.frames == 5 + 8  # 1+4 then [2 old ; 2 new] -> 13 frames, drop 1+4*1


# ---- the fused GPU path, run on CPU through the Triton interpreter -------------------------------------------

@pytest.mark.parametrize("conv_mode", ["conv3d", "stack2d", "hybrid"])
def test_fused_path_matches(vae, conv_mode):
    fused = WanVAE(vae.model, fused=True, conv_mode=conv_mode, subpixel=True)
    assert fused.batched.fused
    z = lat(3, 21)
    whole = vae.decode(z, clamp=False)
    sd = fused.streaming_decoder(clamp=False)
    got = torch.cat([sd.decode_chunk(z[:, :2]), sd.decode_chunk(z[:, 2:3])], 2)
    assert rel(got, whole) < 1e-5


def test_subpixel_upconv_exact(vae):
    sub = WanVAE(vae.model, fused=False, subpixel=True)
    z = lat(2, 22)
    assert rel(sub.decode(z, clamp=False), vae.decode(z, clamp=False)) < 1e-5


def _poisoned(n, dtype=torch.float32):
    return torch.full((n,), float("nan"), dtype=dtype)


@pytest.mark.parametrize("c", [24, 16])
def test_rms_act_kernel_mappings(c):
    from liveact.kernels.vae_fused import rms_act_reference, rms_act_rows
    g = torch.Generator().manual_seed(c)
    t, hw = 3, 37  # V = 111 rows, not a multiple of BLOCK_V
    x = torch.randn(t, hw, c, generator=g) * 3
    gamma = 1 + 0.1 * torch.randn(c, generator=g)
    ref = rms_act_reference(x, gamma, silu=True)
    # plain mapping, with and without SiLU
    for silu in (True, False):
        out = _poisoned(x.numel()).view_as(x)
        rms_act_rows(x, gamma, out, silu=silu)
        assert rel(out, rms_act_reference(x, gamma, silu=silu)) < 1e-6
    # conv3d buffer: [2 cache frames ; T frames]; cache frames untouched
    buf = _poisoned((t + 2) * hw * c).view(t + 2, hw, c)
    rms_act_rows(x, gamma, buf, hw=hw, ntaps=1, shift=2, t_dst=t + 2)
    assert torch.isnan(buf[:2]).all() and rel(buf[2:], ref) < 1e-6
    # taps folded into channels: stacked frame j = [s[j], s[j+1], s[j+2]], s = [cache0, cache1, x0, x1, x2]
    st = _poisoned(t * hw * 3 * c).view(t, hw, 3, c)
    rms_act_rows(x, gamma, st, hw=hw, ntaps=3, shift=2, t_dst=t)
    nan = torch.full_like(ref[0], float("nan"))
    s = [nan, nan] + list(ref)
    want = torch.stack([torch.stack([s[j], s[j + 1], s[j + 2]], 1) for j in range(t)])
    assert torch.allclose(st, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_rms_act_kernel_bias_and_bias_residual():
    from liveact.kernels.vae_fused import bias_residual_, bias_residual_reference, rms_act_reference, rms_act_rows
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 13, 40, generator=g)
    gamma, b = 1 + 0.1 * torch.randn(40, generator=g), torch.randn(40, generator=g)
    out = _poisoned(x.numel()).view_as(x)
    rms_act_rows(x, gamma, out, bias=b)
    assert rel(out, rms_act_reference(x, gamma, bias=b)) < 1e-6
    assert rel(out, rms_act_reference(x, gamma)) > 1e-2  # the bias matters
    h, r = torch.randn(7, 11, 40, generator=g), torch.randn(7, 11, 40, generator=g)
    want = bias_residual_reference(h, b, r)
    got = bias_residual_(h, b, r)
    assert got.data_ptr() == h.data_ptr() and rel(got, want) < 1e-6
    with pytest.raises(ValueError, match="bias_residual_"):
        bias_residual_(h, b, r[:, :5])


def test_rms_act_kernel_rejects_bad_out():
    from liveact.kernels.vae_fused import rms_act_rows
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="out must be contiguous"):
        rms_act_rows(x, torch.ones(8), torch.empty(11, 8))


# ---- GPU (device machine) ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_rms_act_kernel_gpu_bf16():
    from liveact.kernels.vae_fused import rms_act_reference, rms_act_rows
    x = torch.randn(8, 180 * 104, 192, device="cuda", dtype=torch.bfloat16) * 2
    gamma = (1 + 0.1 * torch.randn(192, device="cuda")).to(torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    rms_act_rows(x, gamma, out)
    assert rel(out, rms_act_reference(x, gamma)) < 5e-3
    b = torch.randn(192, device="cuda", dtype=torch.bfloat16)
    out.fill_(float("nan"))
    rms_act_rows(x, gamma, out, bias=b)
    assert rel(out, rms_act_reference(x, gamma, bias=b)) < 5e-3
    from liveact.kernels.vae_fused import bias_residual_, bias_residual_reference
    h, r = torch.randn_like(x), torch.randn_like(x)
    want = bias_residual_reference(h, b, r)
    assert rel(bias_residual_(h, b, r), want) < 5e-3


@pytest.mark.gpu
def test_fast_decode_gpu_bf16_matches_plain():
    vae = WanVAE.random(dim=96, seed=0, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(16, 5, 12, 10, device="cuda").to(torch.bfloat16)
    ref = vae.decode(z, reference=True, clamp=False)
    got = vae.decode(z, clamp=False)
    assert got.shape == ref.shape == (1, 3, 17, 96, 80)
    assert rel(got, ref) < 3e-2
    sd = vae.streaming_decoder(clamp=False)
    s = torch.cat([sd.decode_chunk(z[:, :2]), sd.decode_chunk(z[:, 2:])], 2)
    assert rel(s, got) < 3e-2
