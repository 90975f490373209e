"""Media I/O: reference image crop/normalisation, streaming mp4 writer with audio mux, recovery, errors."""
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from liveact.runtime.media import (MediaError, Mp4Writer, concat_parts, free_path, load_image, probe_mp4,
                                   to_uint8_frames)


def _wav(path, seconds, sr=22050, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t)
    sf.write(str(path), np.stack([x] * channels, 1).astype(np.float32), sr)
    return path


def _frames(t, h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------- image

def test_load_image_center_crop_exact(tmp_path):
    arr = np.zeros((100, 200, 3), np.uint8)  # h 100, w 200: left half red, right half blue
    arr[:, :100, 0] = 255
    arr[:, 100:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 50, 100)  # scale 1, crop columns 75..124
    assert x.shape == (1, 3, 1, 100, 50) and x.dtype == torch.float32
    assert torch.all(x[0, 0, 0, :, :25] == 1) and torch.all(x[0, 2, 0, :, :25] == -1)
    assert torch.all(x[0, 2, 0, :, 25:] == 1) and torch.all(x[0, 0, 0, :, 25:] == -1)


@pytest.mark.parametrize("size,mode", [((37, 300), "L"), ((640, 40), "RGBA"), ((64, 96), "P"), ((1, 1), "RGB")])
def test_load_image_any_size_and_mode(tmp_path, size, mode):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    img.save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png", 64, 96)
    assert x.shape == (1, 3, 1, 96, 64)
    assert x.min() >= -1 and x.max() <= 1


def test_load_image_matches_pil_reference(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (300, 170, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    W, H = 64, 96
    img = Image.open(tmp_path / "p.png").convert("RGB")
    s = max(W / 170, H / 300)
    nw, nh = round(170 * s), round(300 * s)
    ref = img.resize((nw, nh), Image.BICUBIC)
    lft, top = (nw - W) // 2, (nh - H) // 2
    ref = np.asarray(ref.crop((lft, top, lft + W, top + H)), np.float32) / 255 * 2 - 1
    x = load_image(tmp_path / "p.png", W, H)[0, :, 0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(x, ref, atol=1e-6)


def test_load_image_errors(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "none.png", 64, 64)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(MediaError, match="cannot read the image"):
        load_image(tmp_path / "bad.png", 64, 64)


# ---------------------------------------------------------------------------------- frames

def test_to_uint8_layouts_truncate():
    x = torch.tensor([-1.0, 0.0, 0.999, 1.0]).view(1, 1, 4, 1).expand(1, 1, 4, 3).clone()  # [T,H,W,3]
    u = to_uint8_frames(x)
    assert u.dtype == np.uint8 and u[0, 0, :, 0].tolist() == [0, 127, 254, 255]  # truncation, not rounding
    f = _frames(3)
    a, b = to_uint8_frames(f), to_uint8_frames(f[0].permute(1, 2, 3, 0))
    assert a.shape == (3, 48, 64, 3) and np.array_equal(a, b)
    with pytest.raises(MediaError, match="frames must be"):
        to_uint8_frames(torch.zeros(2, 2))


# ---------------------------------------------------------------------------------- mp4

def test_writer_chunks_fps_and_audio_trim(tmp_path):
    wav = _wav(tmp_path / "a.wav", 2.3)
    fps = 20
    with Mp4Writer(tmp_path / "out.mp4", fps, 64, 48, audio_path=wav) as w:
        assert w.write(_frames(21)) == 21
        assert len(w.parts) == 1 and probe_mp4(w.parts[0])["frames"] == 21  # on disk right away
        for n in range(1, 4):
            w.write(_frames(32, seed=n))  # 21 + 96 = 117 frames, audio allows ceil(2.3 * 20) = 46
    info = probe_mp4(w.path)
    assert not w.parts_dir.exists()
    assert info["frames"] == 46 and info["fps"] == 20.0
    assert (info["width"], info["height"], info["codec"], info["pix_fmt"]) == (64, 48, "h264", "yuv420p")
    assert info["audio_codec"] == "aac"
    assert abs(info["audio_seconds"] - 2.3) < 1024 / 22050 + 0.01  # AAC pads its last 1024-sample frame


def test_writer_video_shorter_than_audio_cuts_audio(tmp_path):
    wav = _wav(tmp_path / "a.wav", 3.0, sr=48000, channels=2)
    w = Mp4Writer(tmp_path / "short.mp4", 25, 64, 48, audio_path=wav)
    w.write(to_uint8_frames(_frames(30)))  # uint8 [T,H,W,3] input; 1.2 s of video
    info = probe_mp4(w.close())
    assert info["frames"] == 30 and info["fps"] == 25.0
    assert abs(info["audio_seconds"] - 1.2) < 1024 / 48000 + 0.01


def test_never_overwrites(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"precious")
    w = Mp4Writer(tmp_path / "v.mp4", 10, 32, 32)
    w.write(np.zeros((4, 32, 32, 3), np.uint8))
    assert w.close() == tmp_path / "v_1.mp4"
    assert (tmp_path / "v.mp4").read_bytes() == b"precious"
    assert free_path(tmp_path / "v.mp4") == tmp_path / "v_2.mp4"
    w = Mp4Writer(tmp_path / "v.mp4", 10, 32, 32, overwrite=True)
    w.write(np.zeros((4, 32, 32, 3), np.uint8))
    assert w.close() == tmp_path / "v.mp4" and probe_mp4(tmp_path / "v.mp4")["frames"] == 4


def test_interrupted_run_is_recoverable(tmp_path):
    wav = _wav(tmp_path / "a.wav", 5.0)
    w = Mp4Writer(tmp_path / "run.mp4", 20, 64, 48, audio_path=wav)
    w.write(_frames(21))
    w.write(_frames(32, seed=1))
    # the process dies here (no close); a half-written part must not spoil the rest
    (w.parts_dir / "part_000002.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    out = concat_parts(w.parts_dir, tmp_path / "run.mp4", 20, wav)
    info = probe_mp4(out)
    assert info["frames"] == 53 and abs(info["audio_seconds"] - 53 / 20) < 1024 / 22050 + 0.01


def test_writer_errors(tmp_path):
    with pytest.raises(MediaError, match="audio file not found"):
        Mp4Writer(tmp_path / "x.mp4", 20, 64, 48, audio_path=tmp_path / "none.wav")
    with pytest.raises(MediaError, match="even"):
        Mp4Writer(tmp_path / "x.mp4", 20, 63, 48)
    w = Mp4Writer(tmp_path / "x.mp4", 20, 64, 48)
    with pytest.raises(MediaError, match="opened for 64x48"):
        w.write(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(MediaError, match="no frames"):
        w.close()
    with pytest.raises(MediaError, match="after close"):
        w.write(np.zeros((2, 48, 64, 3), np.uint8))


# ---------------------------------------------------------------------------------- random assets + examples

def test_random_assets_tiny_end_to_end(tmp_path, monkeypatch):
    """Every non-DiT file of the published layout for the tiny preset loads and gives the published shapes."""
    import json

    from liveact.model.audio import AudioEncoder, audio_window, num_chunks, window_start
    from liveact.model.clip import load_clip
    from liveact.model.config import get_preset
    from liveact.model.t5 import load_text_encoder
    from liveact.tools.random_assets import make_example_inputs, write_random_assets
    cfg = get_preset("tiny")
    paths = write_random_assets("tiny", tmp_path / "ckpt", log=None)
    assert {"clip", "t5", "tokenizer", "wav2vec"} <= set(paths)
    monkeypatch.chdir(tmp_path)
    item = json.loads(make_example_inputs("examples").read_text(encoding="utf-8"))[1]
    assert set(item) == {"prompt", "cond_image", "cond_audio", "edit_prompt"}
    ckpt = tmp_path / "ckpt"
    img = load_image(item["cond_image"], 64, 96)
    assert load_clip(ckpt)(img).shape == (1, 257, cfg.clip_dim)
    te = load_text_encoder(ckpt)
    assert te.encode(item["prompt"]).shape[1] == cfg.text_dim
    for text in item["edit_prompt"].values():
        assert te.encode(text).shape[1] == cfg.text_dim
    enc = AudioEncoder.load(ckpt / "chinese-wav2vec2-base")
    emb = enc.encode_file(item["cond_audio"], 20)
    seconds = sf.info(item["cond_audio"]).duration
    assert emb.shape == (int(seconds * 20), cfg.audio_layers, cfg.audio_channels)
    n = num_chunks(seconds, 20)
    assert audio_window(emb, window_start(n - 1)).shape == (1, 53, 5, cfg.audio_layers, cfg.audio_channels)
    if "vae" in paths:
        assert paths["vae"].exists()


def test_shipped_examples_are_small_and_valid():
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    ex = root / "examples"
    total = sum(p.stat().st_size for p in ex.rglob("*") if p.is_file())
    assert total < 300_000, total
    for item in json.loads((ex / "example.json").read_text(encoding="utf-8")):
        assert (root / item["cond_image"]).exists() and (root / item["cond_audio"]).exists()
        for key in item.get("edit_prompt", {}):
            a, b = json.loads(key)
            assert 0 <= a <= b
