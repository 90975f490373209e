"""Audio path: loading, tempo, resampling, wav2vec2 features [S, layers, channels], windows, errors."""
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from liveact.model.audio import (AudioEncoder, AudioError, EncoderLoadError, audio_window, load_wav2vec,
                                 num_chunks, read_audio, resample, sox_tempo, sox_tempo_params, total_frames,
                                 window_indices, window_start, write_random_wav2vec)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=32)


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory):
    return write_random_wav2vec(tmp_path_factory.mktemp("w2v") / "chinese-wav2vec2-base", seed=1, **TINY)


@pytest.fixture(scope="module")
def enc(w2v_dir):
    return AudioEncoder.load(w2v_dir)


def _speechy(sr, seconds, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * (150 + 30 * np.sin(2 * np.pi * 3 * t)) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    x = x + 0.01 * rng.standard_normal(len(t))
    out = np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------- schedule and windows

def test_num_chunks_and_frames():
    assert num_chunks(10.0, 20) == 7 and total_frames(7) == 213  # SPEC.md 5.8 example
    assert num_chunks(0.5, 24) == 1 and num_chunks(32 / 20, 20) == 2
    assert [window_start(n) for n in range(4)] == [0, 0, 32, 64]


def test_audio_window_clamped_indices():
    S, L, C = 70, 2, 3
    emb = torch.arange(S, dtype=torch.float32).view(S, 1, 1).expand(S, L, C).clone()
    for a0 in (0, 32, 64):
        w = audio_window(emb, a0)
        assert w.shape == (1, 53, 5, L, C)
        want = (a0 + torch.arange(53).view(-1, 1) + torch.arange(5).view(1, -1) - 2).clamp(0, S - 1)
        assert torch.equal(w[0, :, :, 0, 0], want.float())
    assert window_indices(0, S)[0].tolist() == [0, 0, 0, 1, 2]
    assert window_indices(64, S)[-1].tolist() == [69] * 5  # frames past the end repeat frame S-1


# ---------------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("sr_in,sr_out,f", [(44100, 16000, 1000.0), (22050, 16000, 3000.0), (8000, 16000, 440.0),
                                            (48000, 16000, 3000.0)])
def test_resample_sine(sr_in, sr_out, f):
    n = sr_in // 2
    x = torch.from_numpy(np.sin(2 * np.pi * f * np.arange(n) / sr_in)).float()
    y = resample(x, sr_in, sr_out)
    assert y.shape == (math.ceil(sr_out * n / sr_in),)  # torchaudio's output length
    ref = np.sin(2 * np.pi * f * np.arange(len(y)) / sr_out)
    err = np.abs(y.numpy() - ref)[100:-100].max()  # interior: the edges see the zero padding
    assert err < 2e-3, err


def test_resample_rejects_above_nyquist_and_identity():
    sr = 44100
    x = torch.from_numpy(np.sin(2 * np.pi * 10000 * np.arange(sr) / sr)).float()
    assert resample(x, sr, 16000)[100:-100].abs().max() < 1e-2  # 10 kHz > 8 kHz: filtered out
    assert resample(x, 16000, 16000) is x
    stereo = torch.randn(2, 1000)
    assert resample(stereo, 32000, 16000).shape == (2, 500)


# ---------------------------------------------------------------------------------- tempo

def test_tempo_keeps_pitch_and_scales_time():
    sr = 22050
    n = 2 * sr
    t = np.arange(n) / sr
    x = np.where(t >= 1.0, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)[None]  # tone from 1.0 s
    y = sox_tempo(x, sr, 1.25)
    assert y.shape == (1, round(n / 1.25))
    onset = np.argmax(np.abs(y[0]) > 0.05) / sr
    assert abs(onset - 1.0 / 1.25) < 0.05, onset  # the time axis shrinks by 1.25
    seg = y[0, int(0.9 * sr):int(1.5 * sr)]
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    assert abs(np.argmax(spec) * sr / len(seg) - 440) < 3  # pitch is kept
    assert abs(np.sqrt((seg ** 2).mean()) - 0.5 / math.sqrt(2)) < 0.02  # amplitude is kept
    assert sox_tempo(x, sr, 1.0) is not None and np.array_equal(sox_tempo(x, sr, 1.0), x)  # exact no-op
    slow = sox_tempo(x, sr, 0.8)
    assert slow.shape == (1, round(n / 0.8))


def test_tempo_params_match_sox_defaults():
    # sox 14.4 default profile: segment 82 ms, search 82/5.587 ms, overlap 82/6.833 ms rounded to 8 samples
    assert sox_tempo_params(16000, 1.25) == (1312, 235, 192)
    assert sox_tempo_params(44100, 25 / 24) == (3616, 647, 528)


# ---------------------------------------------------------------------------------- wav2vec2

def test_published_key_spelling(w2v_dir):
    sd = torch.load(w2v_dir / "pytorch_model.bin", weights_only=True)
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in sd
    assert "wav2vec2.feature_extractor.conv_layers.0.layer_norm.weight" in sd
    assert any(k.startswith("quantizer.") for k in sd)
    assert (w2v_dir / "preprocessor_config.json").exists()


@pytest.mark.parametrize("fps,sr,channels", [(20, 22050, 2), (24, 16000, 1), (25, 44100, 1)])
def test_features_shape(enc, tmp_path, fps, sr, channels):
    seconds = 2.3
    path = tmp_path / "a.wav"
    sf.write(str(path), _speechy(sr, seconds, channels), sr)
    emb = enc.encode_file(path, fps)
    n = int(sr * seconds)
    n_tempo = n if fps == 25 else int(n / (25 / fps) + 0.5)
    n16 = math.ceil(n_tempo * 16000 / sr)
    S = int(n16 / 16000 * 25)
    assert abs(S - int(seconds * fps)) <= 1  # one feature per output video frame
    assert emb.shape == (S, 2, 32) and emb.dtype == torch.bfloat16
    assert torch.isfinite(emb.float()).all() and emb.float().std() > 0.1


def test_channel0_only_and_normalisation(enc):
    sr = 16000
    mono = _speechy(sr, 1.5, 1)[:, 0]
    other = _speechy(sr, 1.5, 1, seed=7)[:, 0] * 0.1
    a = enc.preprocess(np.stack([mono, other]), sr, 25)
    b = enc.preprocess(mono[None] * 4.0, sr, 25)  # gain cancels under do_normalize
    assert a.dtype == np.float32 and abs(a.mean()) < 1e-5 and abs(a.std() - 1) < 1e-3
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_matches_hf_forward_with_interpolated_features(enc):
    """Our wrapper == HF Wav2Vec2Model.forward whose CNN output is interpolated (the reference's subclass)."""
    model = enc.model.float()
    enc32 = AudioEncoder(model, enc.fe, dtype=torch.float32)
    speech = enc32.preprocess(_speechy(16000, 1.2, 1).T, 16000, 25)
    ours = enc32.embed(speech)
    S = ours.shape[0]
    fx = model.feature_extractor

    class Interp(torch.nn.Module):
        def forward(self, x):
            return F.interpolate(fx(x), size=S, mode="linear", align_corners=True)

    model.feature_extractor = Interp()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(speech)[None], output_hidden_states=True)
    finally:
        model.feature_extractor = fx
        model.to(torch.bfloat16)
    ref = torch.stack(out.hidden_states[1:], 0)[:, 0].transpose(0, 1)
    assert ref.shape == ours.shape
    assert (ours - ref).norm() / ref.norm() < 1e-5


def test_stream_window(enc):
    sr, fps = 16000, 20
    wave = _speechy(sr, 4.0, 1).T
    a0 = window_start(2)  # frames 32..86 end at 4.35 s > 4 s: the slice is cut at the clip's end
    seg = enc.stream_slice(wave, sr, a0, fps)
    assert seg.shape == (1, min(wave.shape[1], (sr * (a0 + 55)) // fps) - (sr * a0) // fps)
    assert np.array_equal(enc.stream_slice(wave, sr, 0, fps), wave[:1, :(sr * 55) // fps])
    w = enc.encode_stream_window(wave, sr, a0, fps)
    assert w.shape == (1, 53, 5, 2, 32)
    # the last chunk may start at the very end of the clip: still a valid window
    last = window_start(num_chunks(4.0, fps) - 1)
    assert enc.encode_stream_window(wave, sr, last, fps).shape == (1, 53, 5, 2, 32)


# ---------------------------------------------------------------------------------- errors

def test_bad_audio_errors(enc, tmp_path):
    with pytest.raises(AudioError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF0000WAVEjunk" * 10)
    with pytest.raises(AudioError, match="cannot decode"):
        enc.encode_file(junk, 20)
    short = tmp_path / "short.wav"
    sf.write(str(short), np.zeros(160, np.float32) + 0.1, 16000)  # 10 ms
    with pytest.raises(AudioError, match="at least"):
        enc.encode_file(short, 20)
    ok = tmp_path / "ok.wav"
    sf.write(str(ok), _speechy(16000, 0.06, 1), 16000)  # > one frame at 20 fps: accepted
    assert enc.encode_file(ok, 20).shape == (1, 2, 32)
    sf.write(str(ok), _speechy(16000, 0.045, 1), 16000)
    with pytest.raises(AudioError, match="at least 50 ms.*at 20 fps"):
        enc.encode_file(ok, 20)
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(16000, np.float32), 16000)
    with pytest.warns(UserWarning, match="completely silent"):
        emb = enc.encode_file(silent, 20)
    assert emb.shape[0] == 20 and torch.isfinite(emb.float()).all()
    swapped = tmp_path / "swapped.wav"
    st = _speechy(16000, 1.0, 2)
    st[:, 0] = 0
    sf.write(str(swapped), st, 16000)
    with pytest.warns(UserWarning, match="channel 0 is silent but channel 1"):
        enc.encode_file(swapped, 20)


def test_bad_wav2vec_dir(tmp_path, w2v_dir):
    with pytest.raises(EncoderLoadError, match="not found"):
        load_wav2vec(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match="config.json is missing"):
        load_wav2vec(tmp_path / "empty")
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(w2v_dir, bad)
    sd = torch.load(bad / "pytorch_model.bin", weights_only=True)
    del sd["wav2vec2.encoder.layers.1.final_layer_norm.bias"]
    torch.save(sd, bad / "pytorch_model.bin")
    with pytest.raises(EncoderLoadError, match="1 missing: encoder.layers.1.final_layer_norm.bias"):
        load_wav2vec(bad)


def test_published_size():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from liveact.model.audio import wav2vec_config_dict
    from liveact.tools.random_assets import encoder_sizes
    cfg = wav2vec_config_dict(**encoder_sizes("liveact-18b")["wav2vec"])
    assert cfg["conv_bias"] is False and cfg["architectures"] == ["Wav2Vec2ForPreTraining"]
    with torch.device("meta"):
        m = Wav2Vec2Model(Wav2Vec2Config.from_dict(cfg))
    assert abs(sum(p.numel() for p in m.parameters()) - 94.4e6) < 0.05e6


@pytest.mark.parametrize("stream", [False, True])
def test_chunk_windows(enc, tmp_path, stream):
    path = tmp_path / "c.wav"
    sf.write(str(path), _speechy(16000, 2.0, 1), 16000)
    n, it = enc.chunk_windows(path, 20, stream=stream)
    wins = list(it)
    assert n == num_chunks(2.0, 20) == 2 and len(wins) == 2
    assert all(w.shape == (1, 53, 5, 2, 32) for w in wins)
    assert torch.equal(wins[0], wins[1])  # chunks 0 and 1 share the window at a0 = 0
