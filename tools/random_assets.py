"""Random-weight encoder files in the published layout, and small procedurally made example inputs.

`write_random_assets(preset, out_dir, seed=0)` writes every non-DiT file a LiveAct run reads, named and laid out as
published (the DiT itself comes from `liveact.model.checkpoint.write_random_checkpoint`):

    out_dir/Wan2.1_VAE.pth                                          (liveact.model.vae.write_random_vae)
    out_dir/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (visual + textual + log_scale keys)
    out_dir/models_t5_umt5-xxl-enc-bf16.pth                         (Wan's T5 key layout, bf16)
    out_dir/google/umt5-xxl/                                        (a tiny Unigram tokenizer trained offline)
    out_dir/chinese-wav2vec2-base/                                  (config.json, pytorch_model.bin,
                                                                     preprocessor_config.json)

The `xlm-roberta-large/` tokenizer of the CLIP text tower is not written: LiveAct never runs that tower.
Encoder widths follow the preset (`text_dim`, `clip_dim`, `audio_layers`, `audio_channels` of
model/config.py): `tiny` gets tiny encoders that run in well under a second on a CPU; `liveact-18b` the published
sizes (~1.2 B CLIP, 5.7 B T5 = 11 GB on disk, 94 M wav2vec2).  The umT5 tokenizer is always the tiny trained one
(the real SentencePiece model cannot be made offline); its ids fit any embedding table.

`make_example_inputs(out_dir)` draws a portrait PNG (PIL), synthesizes ~3 s of speech-like audio (pure numpy:
a glottal pulse train with a moving pitch, shaped by formant resonators per syllable, a syllable envelope and
noise bursts for consonants) and writes an input JSON in the seed's format (prompt, cond_image, cond_audio,
edit_prompt {"[a, b]": text}).  Small copies are shipped in examples/.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..model.audio import write_random_wav2vec
from ..model.clip import CLIP_FILE, write_random_clip
from ..model.config import get_preset
from ..model.t5 import T5_FILE, TOKENIZER_DIR, write_random_t5, write_tiny_tokenizer

VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "chinese-wav2vec2-base"


def encoder_sizes(preset_name: str) -> dict:
    """Widths of the four auxiliary networks for a preset (published sizes when the preset uses them)."""
    cfg = get_preset(preset_name)
    published_text = cfg.text_dim == 4096
    published_clip = cfg.clip_dim == 1280
    published_audio = (cfg.audio_layers, cfg.audio_channels) == (12, 768)
    d = cfg.text_dim
    ac = cfg.audio_channels
    return dict(
        vae=dict(dim=96 if published_clip else 8),
        clip=dict(width=cfg.clip_dim, num_layers=32 if published_clip else 4, patch_size=14, image_size=224,
                  embed_dim=1024 if published_clip else 32),
        t5=dict(dim=d, dim_attn=d, dim_ffn=10240 if published_text else 2 * d, num_heads=64 if published_text
                else max(1, d // 16), num_layers=24 if published_text else 2, num_buckets=32,
                vocab=256384 if published_text else None),
        wav2vec=dict(hidden_size=ac, num_hidden_layers=cfg.audio_layers,
                     num_attention_heads=12 if published_audio else max(1, ac // 16),
                     intermediate_size=3072 if published_audio else 2 * ac, conv_dim=512 if published_audio else ac),
    )


def write_random_assets(preset_name: str, out_dir, seed: int = 0, log=print) -> dict:
    """Write the VAE, CLIP, T5 (+ tokenizer) and wav2vec2 files for `preset_name` into out_dir.
    Returns {name: path}.  Existing files of the same names are replaced."""
    sizes = encoder_sizes(preset_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    try:
        from ..model.vae import write_random_vae
    except ImportError:  # pragma: no cover - the VAE module is another helper's file
        write_random_vae = None
        if log:
            log("note: liveact.model.vae.write_random_vae is not available; Wan2.1_VAE.pth was not written")
    if write_random_vae is not None:
        paths["vae"] = write_random_vae(out / VAE_FILE, dim=sizes["vae"]["dim"], seed=seed)
    c = sizes["clip"]
    paths["clip"] = write_random_clip(out / CLIP_FILE, width=c["width"], num_layers=c["num_layers"],
                                      patch_size=c["patch_size"], image_size=c["image_size"],
                                      embed_dim=c["embed_dim"], text=True, seed=seed + 1)
    tok_dir = write_tiny_tokenizer(out / TOKENIZER_DIR)
    paths["tokenizer"] = tok_dir
    t = dict(sizes["t5"])
    if t["vocab"] is None:
        from transformers import AutoTokenizer
        n = len(AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True))
        t["vocab"] = 64 * math.ceil(n / 64)
    paths["t5"] = write_random_t5(out / T5_FILE, seed=seed + 2, **t)
    paths["wav2vec"] = write_random_wav2vec(out / WAV2VEC_DIR, seed=seed + 3, **sizes["wav2vec"])
    return paths


# ---------------------------------------------------------------------------------------------------------
# example inputs

def draw_portrait(width: int = 208, height: int = 360, seed: int = 0):
    """A simple cartoon head-and-shoulders portrait (PIL image), flat colours so the PNG stays small."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (70, 90, 120))
    d = ImageDraw.Draw(img)
    for y in range(0, height, 4):  # soft vertical background gradient, in bands
        g = int(40 + 60 * y / height)
        d.rectangle([0, y, width, y + 4], fill=(g, g + 25, g + 60))
    cx, w, h = width / 2, width, height
    skin, hair, shirt = (232, 190, 160), (60, 40, 30), tuple(int(v) for v in rng.integers(40, 200, 3))
    d.ellipse([cx - 0.55 * w, 0.72 * h, cx + 0.55 * w, 1.25 * h], fill=shirt)               # shoulders
    d.rectangle([cx - 0.09 * w, 0.56 * h, cx + 0.09 * w, 0.76 * h], fill=(215, 172, 142))  # neck
    d.ellipse([cx - 0.33 * w, 0.12 * h, cx + 0.33 * w, 0.52 * h], fill=hair)                # hair back
    d.ellipse([cx - 0.27 * w, 0.18 * h, cx + 0.27 * w, 0.62 * h], fill=skin)                # face
    d.chord([cx - 0.30 * w, 0.11 * h, cx + 0.30 * w, 0.36 * h], 180, 360, fill=hair)        # fringe
    for sx in (-1, 1):
        ex = cx + sx * 0.11 * w
        d.ellipse([ex - 0.06 * w, 0.355 * h, ex + 0.06 * w, 0.395 * h], fill=(250, 250, 250))  # eye white
        d.ellipse([ex - 0.025 * w, 0.36 * h, ex + 0.025 * w, 0.39 * h], fill=(50, 80, 60))     # iris
        d.line([ex - 0.07 * w, 0.33 * h, ex + 0.06 * w, 0.325 * h], fill=hair, width=3)        # brow
        d.ellipse([cx + sx * 0.27 * w - 0.03 * w, 0.37 * h, cx + sx * 0.27 * w + 0.03 * w, 0.44 * h],
                  fill=skin)                                                                     # ear
    d.line([cx, 0.40 * h, cx - 0.02 * w, 0.47 * h, cx + 0.02 * w, 0.475 * h], fill=(200, 150, 125), width=2)
    d.chord([cx - 0.09 * w, 0.50 * h, cx + 0.09 * w, 0.56 * h], 0, 180, fill=(170, 70, 80))  # mouth
    return img


def _resonator(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    """Two-pole resonance (formant) filter, unit gain at the peak."""
    r = math.exp(-math.pi * bw / sr)
    a1, a2 = -2 * r * math.cos(2 * math.pi * freq / sr), r * r
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    g = 1 - r
    for i, v in enumerate(x):
        y0 = g * v - a1 * y1 - a2 * y2
        y[i] = y0
        y2, y1 = y1, y0
    return y


VOWELS = {"a": (800, 1200, 2500), "i": (300, 2300, 3000), "u": (330, 900, 2300), "e": (500, 1900, 2600),
          "o": (500, 850, 2500)}


def synth_speech(seconds: float = 3.0, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Speech-like mono float32 audio: syllables (consonant noise burst + voiced vowel) at ~4 per second."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n, np.float64)
    t0 = int(0.15 * sr)
    phase = 0.0
    while t0 < n - int(0.2 * sr):
        syl = int(rng.uniform(0.18, 0.30) * sr)
        syl = min(syl, n - t0)
        cons = int(0.04 * sr)
        # consonant: band-limited noise burst
        noise = rng.standard_normal(cons) * np.hanning(cons) * 0.15
        out[t0:t0 + cons] += _resonator(noise, rng.uniform(2500, 4500), 1500, sr) * 3
        # vowel: glottal pulse train with a falling-rising pitch, through three formants
        m = syl - cons
        f0 = rng.uniform(110, 170) * (1 + 0.15 * np.sin(np.linspace(0, np.pi, m)))
        ph = phase + np.cumsum(2 * np.pi * f0 / sr)
        phase = float(ph[-1])
        src = np.maximum(np.sin(ph), 0) ** 8 - 0.1  # peaky glottal-like pulses
        f1, f2, f3 = VOWELS["aiueo"[rng.integers(5)]]
        v = _resonator(src, f1, 90, sr) + 0.6 * _resonator(src, f2, 120, sr) + 0.3 * _resonator(src, f3, 180, sr)
        env = np.sin(np.linspace(0, np.pi, m)) ** 0.7
        out[t0 + cons:t0 + syl] += v * env
        t0 += syl + int(rng.uniform(0.02, 0.12) * sr)
    out = out / (np.abs(out).max() + 1e-9) * 0.6
    return out.astype(np.float32)


def make_example_inputs(out_dir, seconds: float = 3.0, sr: int = 16000, width: int = 208, height: int = 360,
                        seed: int = 0) -> Path:
    """Write out_dir/image/portrait.png, out_dir/audio/speech.wav (16-bit PCM) and out_dir/example.json.
    JSON paths are relative to the current directory when out_dir is inside it (as in the seed's examples),
    else absolute.  Returns the JSON path."""
    import soundfile as sf
    out = Path(out_dir)
    (out / "image").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    img_path, wav_path = out / "image" / "portrait.png", out / "audio" / "speech.wav"
    draw_portrait(width, height, seed).save(img_path, optimize=True)
    sf.write(str(wav_path), synth_speech(seconds, sr, seed), sr, subtype="PCM_16")

    def rel(p: Path) -> str:
        try:
            return Path(os.path.relpath(p.resolve(), Path.cwd())).as_posix() if \
                p.resolve().is_relative_to(Path.cwd().resolve()) else str(p.resolve())
        except ValueError:
            return str(p.resolve())

    items = [{"prompt": "一个人在说话", "cond_image": rel(img_path), "cond_audio": rel(wav_path)},
             {"prompt": "A person is talking to the camera.",
              "edit_prompt": {"[1, 1]": "She smiles and nods."},
              "cond_image": rel(img_path), "cond_audio": rel(wav_path)}]
    js = out / "example.json"
    js.write_text(json.dumps(items, ensure_ascii=False, indent=4) + "\n", encoding="utf-8")
    return js


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="write random encoder assets / example inputs")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", action="store_true", help="write example inputs to --out instead")
    a = ap.parse_args(argv)
    if a.examples:
        print(make_example_inputs(a.out, seed=a.seed))
    else:
        for k, v in write_random_assets(a.preset, a.out, a.seed).items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
