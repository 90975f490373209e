"""Audio conditioning: loading, the published preprocessing, wav2vec2 features and per-chunk windows.

shared/SPEC-ENCODERS.md 4 and shared/SPEC.md 5.3, 5.5, 5.9.  The chain, per input clip:

    wave [C, N] @ sr   (soundfile: wav/flac/ogg..., any rate, mono or stereo, float in [-1, 1])
      -> tempo(25/fps)  WSOLA time stretch, pitch kept (`sox_tempo`; a no-op at fps 25)
      -> resample to 16 kHz (`resample`: torchaudio's band-limited sinc, hann window, width 6, rolloff 0.99)
      -> x 3.0 gain -> channel 0 only (no down-mix)
      -> Wav2Vec2FeatureExtractor (per-clip zero-mean / unit-variance when do_normalize, cancels the gain)
      -> bf16 -> wav2vec2 CNN [1, 512, L ~ 50 Hz]
      -> linear interpolation (align_corners=True) to S = int(N16 / 16000 * 25) frames  (BEFORE the projection)
      -> feature projection -> encoder; stack the 12 layer outputs (hidden_states[1:]) -> [S, 12, 768]

`audio_window(emb, a0)` gathers the [1, 53, 5, layers, channels] window of a chunk with clamped indices.
`AudioEncoder.encode_stream_window` is the `--steam_audio` variant (one fresh embedding per chunk from the
original samples [sr*a0/fps, sr*(a0+55)/fps)).  `AudioEncoder.chunk_windows(path, fps, stream)` gives the number
of chunks N = floor(seconds*fps/32) + 1 and an iterator over every chunk's window, in either mode.

Differences from the reference, on purpose:
- sox is not a dependency: `sox_tempo` re-implements sox 14.4's `tempo` effect (default profile: segment 82 ms,
  search 82/5.587 ms, overlap 82/6.833 ms rounded down to a multiple of 8 samples, linear (exhaustive) search,
  linear cross-fade, the same segment / skip arithmetic, output length round(N / factor)).  The arithmetic is float64
  instead of sox's float32 with int32 I/O, so a near-tie in the overlap search can pick a different offset; the
  output is the same algorithm, not bit-identical.  Samples are clipped to [-1, 1] as sox's int32 round trip does.
- torchaudio is not a dependency: `resample` re-implements `torchaudio.functional.resample`'s default
  sinc_interp_hann kernel (kernel computed in float64 then cast, as `torchaudio.transforms.Resample` does).
- Silent audio is accepted (the reference runs it too: the normalisation maps silence to zeros); a warning is
  issued, and a separate warning when channel 0 is silent but another channel is not (only channel 0 is used).
- Audio shorter than `min_audio_seconds(fps)` (one video frame: less would give zero wav2vec frames after the
  tempo change; 50 ms at 20 fps) is an error naming the minimum.  Anything longer works, including clips shorter
  than one chunk: the first chunk (21 frames) is generated and the mp4 is trimmed to the audio.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import key_mismatch_lines
from .clip import EncoderLoadError

AUDIO_FPS = 25                 # wav2vec frames per second of tempo-adjusted audio (get_embedding's default fps)
WAV2VEC_SR = 16000
GAIN = 3.0
WINDOW_FRAMES = 53             # video frames per chunk window (14 latent frames)
WINDOW_TAPS = 5                # audio frames per video frame: offsets -2..2
CHUNK_STRIDE = 32              # new video frames per chunk (8 latent frames x 4)
STREAM_EXTRA_FRAMES = 2        # --steam_audio: window + 2 frames of right context
MIN_CNN_SAMPLES = 400          # receptive field of the wav2vec2 CNN at 16 kHz
MIN_AUDIO_SECONDS = 0.04       # one 25 Hz wav2vec frame


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file, the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------
# schedule helpers (SPEC.md 5.5)

def num_chunks(seconds: float, fps: int) -> int:
    """N = floor(audio_seconds / (32 / fps)) + 1, from the original (pre-tempo) duration."""
    if seconds < 0 or fps <= 0:
        raise ValueError(f"num_chunks: need seconds >= 0 and fps > 0, got {seconds}, {fps}")
    return int(math.floor(seconds * fps / CHUNK_STRIDE + 1e-9)) + 1


def window_start(chunk: int) -> int:
    """First video frame a0 of chunk n's 53-frame audio window: 0 for chunks 0 and 1, 32*(n-1) after."""
    return 0 if chunk <= 1 else CHUNK_STRIDE * (chunk - 1)


def total_frames(n_chunks: int) -> int:
    """Frames the chunks produce before the -shortest trim: 21 + 32 (N - 1)."""
    return 21 + CHUNK_STRIDE * (n_chunks - 1)


def window_indices(a0: int, num_frames: int, frames: int = WINDOW_FRAMES, taps: int = WINDOW_TAPS) -> torch.Tensor:
    """[frames, taps] int64: clamp(a0 + v + w - taps//2, 0, num_frames - 1)."""
    v = torch.arange(frames).view(-1, 1)
    w = torch.arange(taps).view(1, -1) - taps // 2
    return (a0 + v + w).clamp_(0, num_frames - 1)


def audio_window(emb: torch.Tensor, a0: int, frames: int = WINDOW_FRAMES, taps: int = WINDOW_TAPS) -> torch.Tensor:
    """emb [S, layers, channels] -> [1, frames, taps, layers, channels] (get_audio_emb with clamped indices)."""
    if emb.dim() != 3 or emb.shape[0] < 1:
        raise ValueError(f"audio_window: emb must be [S >= 1, layers, channels], got {tuple(emb.shape)}")
    idx = window_indices(a0, emb.shape[0], frames, taps).to(emb.device)
    return emb[idx].unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------
# loading

def read_audio(path) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile -> (float32 [channels, samples] in [-1, 1], sample rate)."""
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: audio file not found; pass an existing .wav/.flac/.ogg file as cond_audio")
    try:
        import soundfile as sf
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{p}: cannot decode audio ({type(e).__name__}: {e}). Convert it to WAV/FLAC "
                         "(e.g. `ffmpeg -i in.mp3 out.wav`).") from None
    if data.size == 0:
        raise AudioError(f"{p}: the audio file has no samples")
    return np.ascontiguousarray(data.T), int(sr)


def min_audio_seconds(fps: int | None = None) -> float:
    """Shortest usable clip: one video frame at fps (= one 25 Hz wav2vec frame after the 25/fps tempo change)
    and at least the 400 samples at 16 kHz that the wav2vec2 CNN needs."""
    tempo = AUDIO_FPS / fps if fps else 1.0
    return max(MIN_AUDIO_SECONDS * tempo, MIN_CNN_SAMPLES / WAV2VEC_SR * tempo)


def check_audio(wave: np.ndarray, sr: int, where: str = "audio", fps: int | None = None) -> None:
    """Raise AudioError for audio that cannot be encoded; warn for silent audio (see the module docstring)."""
    seconds = wave.shape[-1] / sr
    need = min_audio_seconds(fps)
    if seconds < need:
        raise AudioError(f"{where}: audio is {seconds * 1000:.1f} ms long; at least {need * 1000:.0f} ms are needed "
                         f"(one video frame{f' at {fps} fps' if fps else ''}). Use a longer clip.")
    if not np.isfinite(wave).all():
        raise AudioError(f"{where}: audio contains NaN/inf samples; re-export the file")
    peak = np.abs(wave).max(axis=-1)
    if peak[0] == 0:
        if (peak > 0).any():
            warnings.warn(f"{where}: channel 0 is silent but channel {int(np.argmax(peak))} is not; LiveAct uses "
                          "channel 0 only (as the reference does), so the video will not follow this audio. "
                          "Swap or down-mix the channels.", stacklevel=3)
        else:
            warnings.warn(f"{where}: the audio is completely silent; the video will show no speech.",
                          stacklevel=3)


# ---------------------------------------------------------------------------------------------------------
# tempo (sox 14.4 `tempo` effect, WSOLA)

def sox_tempo_params(sr: float, factor: float, segment_ms: float = 82.0):
    """(segment, search, overlap) in samples, as sox's default profile and tempo_setup compute them."""
    seg_ms = max(10.0, segment_ms / max(factor ** 0, 1))
    overlap_ms = min(seg_ms / 6.833, seg_ms / 2)
    search_ms = seg_ms / 5.587
    segment = int(sr * seg_ms / 1000 + 0.5)
    search = int(sr * search_ms / 1000 + 0.5)
    overlap = int(max(sr * overlap_ms / 1000 + 4.5, 16)) & ~7
    if overlap * 2 > segment:
        overlap -= 8
    return segment, search, overlap


def sox_tempo(wave: np.ndarray, sr: int, factor: float) -> np.ndarray:
    """Change tempo by `factor` (> 1 = faster/shorter) keeping pitch: [C, N] -> [C, round(N / factor)]."""
    wave = np.asarray(wave, dtype=np.float32)
    if factor == 1:
        return wave  # sox returns SOX_EFF_NULL: exact no-op
    if not 0.1 <= factor <= 100:
        raise ValueError(f"tempo factor must be in [0.1, 100] (sox's range), got {factor}")
    c, n = wave.shape
    segment, search, overlap = sox_tempo_params(sr, factor)
    hop = segment - overlap
    out_len = int(n / factor + 0.5)
    max_skip = math.ceil(factor * hop)
    process_size = max(max_skip + overlap, segment) + search
    n_seg = out_len // hop + 2
    # input fifo: search/2 zeros, the clip, then the zeros sox's flush feeds (clipped like sox's int32 I/O)
    pad_right = int(factor * n_seg * hop) + process_size + 2 * segment
    x = np.zeros((c, search // 2 + n + pad_right), np.float64)
    x[:, search // 2:search // 2 + n] = np.clip(wave, -1.0, 1.0)
    fade_in = np.arange(overlap, dtype=np.float32) * np.float32(1.0 / overlap)
    fade_in = fade_in.astype(np.float64)
    out = np.zeros((c, n_seg * hop + overlap), np.float64)
    pos, skip_total, written, k = 0, 0, 0, 0
    buf = None
    while written < out_len:
        win = x[:, pos:pos + process_size]
        if k == 0:
            offset = search // 2
            out[:, :overlap] = win[:, offset:offset + overlap]
        else:
            # least-squares match of the held overlap tail against every candidate offset in [0, search)
            cand = win[:, :search + overlap - 1]
            energy = np.cumsum(np.concatenate([np.zeros((c, 1)), cand ** 2], axis=1), axis=1)
            e = (energy[:, overlap:overlap + search] - energy[:, :search]).sum(0)
            corr = sum(np.correlate(cand[ch], buf[ch], mode="valid")[:search] for ch in range(c))
            diff = e - 2 * corr + (buf ** 2).sum()
            offset = int(np.argmin(diff))
            out[:, written:written + overlap] = buf * (1.0 - fade_in) + win[:, offset:offset + overlap] * fade_in
        mid = segment - 2 * overlap
        if mid > 0:
            out[:, written + overlap:written + overlap + mid] = win[:, offset + overlap:offset + overlap + mid]
        written += overlap + max(mid, 0)
        buf = win[:, offset + segment - overlap:offset + segment].copy()
        k += 1
        skip = int(factor * (k * hop) + 0.5)
        pos += skip - skip_total
        skip_total = skip
    return np.clip(out[:, :out_len], -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# resampling (torchaudio.functional.resample, sinc_interp_hann)

def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99):
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base).clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * window * (base / orig)
    return kernel, width  # [new, 1, 2*width + orig]


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int = WAV2VEC_SR, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited sinc resampling [..., N] -> [..., ceil(N * new / orig)], identity if the rates match."""
    if orig_sr <= 0 or new_sr <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, rolloff)
    shape = wave.shape
    x = wave.reshape(-1, shape[-1])
    n = x.shape[-1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x[:, None], kernel.to(wave.dtype), stride=orig)  # [B, new, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(new * n / orig)
    return y[:, :target].reshape(*shape[:-1], -1)


# ---------------------------------------------------------------------------------------------------------
# wav2vec2

def _map_wav2vec_key(k: str) -> str | None:
    """A key of the published pytorch_model.bin (Wav2Vec2ForPreTraining dump) -> Wav2Vec2Model name, or None."""
    if k.startswith("wav2vec2."):
        k = k[len("wav2vec2."):]
    if k.startswith(("quantizer.", "project_hid.", "project_q.", "lm_head.", "dropout_features")):
        return None
    k = k.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
    return k.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")


def _read_weights(d: Path) -> dict:
    st, bin_ = d / "model.safetensors", d / "pytorch_model.bin"
    if st.exists():
        from safetensors.torch import load_file
        try:
            return load_file(str(st))
        except Exception as e:
            raise EncoderLoadError(f"{st}: cannot read ({e}); re-download it") from None
    if bin_.exists():
        try:
            return torch.load(str(bin_), map_location="cpu", weights_only=True)
        except Exception as e:
            raise EncoderLoadError(f"{bin_}: cannot read ({type(e).__name__}: {e}); re-download it") from None
    raise EncoderLoadError(f"{d}: neither model.safetensors nor pytorch_model.bin found; --wav2vec-dir must be a "
                           "chinese-wav2vec2-base style directory (config.json, pytorch_model.bin, "
                           "preprocessor_config.json)")


def load_wav2vec(wav2vec_dir, device="cpu", dtype=torch.bfloat16):
    """(transformers Wav2Vec2Model, Wav2Vec2FeatureExtractor) from a chinese-wav2vec2-base-layout directory."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
    d = Path(wav2vec_dir)
    if not d.is_dir():
        raise EncoderLoadError(f"{d}: wav2vec2 directory not found. Download TencentGameMate/chinese-wav2vec2-base "
                               "and pass it as --wav2vec-dir (or write random assets with tools/random_assets.py).")
    for name in ("config.json", "preprocessor_config.json"):
        if not (d / name).exists():
            raise EncoderLoadError(f"{d}: {name} is missing; this is not a complete wav2vec2 directory")
    try:
        cfg = Wav2Vec2Config.from_dict(json.loads((d / "config.json").read_text()))
        fe = Wav2Vec2FeatureExtractor.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise EncoderLoadError(f"{d}: cannot read config.json / preprocessor_config.json ({e})") from None
    sd = {}
    for k, v in _read_weights(d).items():
        m = _map_wav2vec_key(k)
        if m is not None:
            sd[m] = v
    with torch.random.fork_rng():
        model = Wav2Vec2Model(cfg)
    want = model.state_dict()
    lines = key_mismatch_lines({k: v.shape for k, v in want.items()}, {k: v.shape for k, v in sd.items()},
                               ignore_missing={"masked_spec_embed"})
    if lines:
        raise EncoderLoadError("\n".join([f"{d}: the wav2vec2 weights do not match its config.json:", *lines]))
    model.load_state_dict(sd, strict=False)
    model.config._attn_implementation = "sdpa"
    return model.to(device=device, dtype=dtype).eval(), fe


class AudioEncoder:
    """wav2vec2 + the published preprocessing.  `encode_file(path, fps) -> [S, layers, channels]`."""

    def __init__(self, model, feature_extractor, device="cpu", dtype=torch.bfloat16):
        self.model, self.fe = model, feature_extractor
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def load(cls, wav2vec_dir, device="cpu", dtype=torch.bfloat16) -> "AudioEncoder":
        model, fe = load_wav2vec(wav2vec_dir, device, dtype)
        return cls(model, fe, device, dtype)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def channels(self) -> int:
        return self.model.config.hidden_size

    # ---- preprocessing (steps 2-5)
    def preprocess(self, wave: np.ndarray, sr: int, fps: int) -> np.ndarray:
        """[C, N] at sr -> float32 [N16] wav2vec input (tempo 25/fps, 16 kHz, x3, channel 0, normalisation)."""
        factor = AUDIO_FPS / fps  # the reference passes str(25 / fps) to sox: the same double
        x = sox_tempo(wave, sr, factor)
        x = resample(torch.from_numpy(np.ascontiguousarray(x)), sr, WAV2VEC_SR) * GAIN
        speech = x[0].numpy()
        return np.asarray(self.fe(speech, sampling_rate=WAV2VEC_SR).input_values, dtype=np.float32).reshape(-1)

    # ---- wav2vec2 forward (the LiveAct wrapper, steps 6-7)
    @torch.no_grad()
    def embed(self, speech: np.ndarray) -> torch.Tensor:
        """float32 [N16] -> [S, layers, channels] in the model dtype, S = int(N16 / 16000 * 25)."""
        n = speech.shape[-1]
        if n < MIN_CNN_SAMPLES:
            raise AudioError(f"audio is {n} samples at 16 kHz after preprocessing; wav2vec2 needs >= {MIN_CNN_SAMPLES}")
        seq_len = int(n / WAV2VEC_SR * AUDIO_FPS)
        if seq_len < 1:
            raise AudioError(f"audio is {n / WAV2VEC_SR * 1000:.1f} ms after the tempo change: shorter than one "
                             "25 Hz frame; use a longer clip")
        m = self.model
        x = torch.from_numpy(np.ascontiguousarray(speech)).view(1, -1).to(self.device, self.dtype)
        feats = m.feature_extractor(x)                                      # [1, 512, L]
        feats = F.interpolate(feats, size=seq_len, mode="linear", align_corners=True).transpose(1, 2)
        h, _ = m.feature_projection(feats)                                  # [1, S, hidden]
        enc = m.encoder
        h = enc.layer_norm(h + enc.pos_conv_embed(h))
        outs = []
        for layer in enc.layers:
            h = layer(h, attention_mask=None)
            if isinstance(h, tuple):
                h = h[0]
            outs.append(h)
        return torch.stack(outs, dim=0)[:, 0].transpose(0, 1).contiguous()  # [S, layers, hidden]

    def encode(self, wave: np.ndarray, sr: int, fps: int, where: str = "audio") -> torch.Tensor:
        check_audio(wave, sr, where, fps)
        return self.embed(self.preprocess(wave, sr, fps))

    def encode_file(self, path, fps: int) -> torch.Tensor:
        """Offline mode: the whole clip at once -> [S, layers, channels], S = int(duration_after_tempo * 25)."""
        wave, sr = read_audio(path)
        return self.encode(wave, sr, fps, str(path))

    def chunk_windows(self, path, fps: int, stream: bool = False):
        """(number of chunks, iterator over the chunks' windows [1, 53, 5, layers, channels]).

        stream=False: one embedding of the whole clip, sliced per chunk (the default reference mode);
        stream=True: `--steam_audio`, a fresh embedding of each chunk's slice, computed when the chunk asks."""
        wave, sr = read_audio(path)
        check_audio(wave, sr, str(path), fps)
        n = num_chunks(wave.shape[-1] / sr, fps)
        if stream:
            return n, (self.encode_stream_window(wave, sr, window_start(c), fps) for c in range(n))
        emb = self.embed(self.preprocess(wave, sr, fps))
        return n, (audio_window(emb, window_start(c)) for c in range(n))

    def stream_slice(self, wave: np.ndarray, sr: int, a0: int, fps: int) -> np.ndarray:
        """Original samples [floor(sr*a0/fps), floor(sr*(a0+55)/fps)) of channel 0 (SPEC.md 5.9)."""
        lo = (sr * a0) // fps
        hi = (sr * (a0 + WINDOW_FRAMES + STREAM_EXTRA_FRAMES)) // fps
        return wave[:1, lo:hi]

    def encode_stream_window(self, wave: np.ndarray, sr: int, a0: int, fps: int) -> torch.Tensor:
        """--steam_audio: a fresh embedding of this chunk's slice alone -> window [1, 53, 5, layers, channels].

        If the slice is too short to encode (the last chunk of a clip may start at its very end) it is padded
        with silence to 2 frames (the reference would fail there)."""
        seg = self.stream_slice(wave, sr, a0, fps)
        min_n = max(math.ceil(2 * sr / fps) + 1, math.ceil(MIN_CNN_SAMPLES * sr / WAV2VEC_SR) + 1)
        if seg.shape[-1] < min_n:
            seg = np.pad(seg, ((0, 0), (0, min_n - seg.shape[-1])))
        emb = self.embed(self.preprocess(seg, sr, fps))
        return audio_window(emb, 0)


# ---------------------------------------------------------------------------------------------------------
# random wav2vec2 directory (chinese-wav2vec2-base layout)

PUBLISHED_W2V = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     conv_dim=[512] * 7)


def wav2vec_config_dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        conv_dim=512) -> dict:
    from transformers import Wav2Vec2Config
    cfg = Wav2Vec2Config(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                         conv_dim=[conv_dim] * 7, conv_bias=False, feat_extract_norm="group",
                         do_stable_layer_norm=False, hidden_act="gelu", feat_extract_activation="gelu",
                         num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
                         architectures=["Wav2Vec2ForPreTraining"])
    d = cfg.to_dict()
    d.pop("transformers_version", None)
    return d


PREPROCESSOR_CONFIG = {"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                       "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
                       "return_attention_mask": False, "sampling_rate": 16000}


def write_random_wav2vec(out_dir, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, conv_dim=512, seed=0) -> Path:
    """config.json + pytorch_model.bin (Wav2Vec2ForPreTraining-style keys: `wav2vec2.` prefix, weight_g/weight_v,
    plus small unused quantizer/project tensors) + preprocessor_config.json, random weights (HF init, seeded)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = wav2vec_config_dict(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, conv_dim)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Wav2Vec2Model(Wav2Vec2Config.from_dict(d))
        sd = {}
        for k, v in model.state_dict().items():
            k = k.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v")
            if v.dim() == 1 and ("layer_norm" in k or "norm" in k) and k.endswith("weight"):
                v = v + 0.1 * torch.randn_like(v)
            elif v.dim() == 1 and k.endswith("bias"):
                v = v + 0.02 * torch.randn_like(v)
            sd["wav2vec2." + k] = v.contiguous()
        sd["quantizer.codevectors"] = torch.randn(1, 8, 4)
        sd["project_hid.weight"] = torch.randn(4, hidden_size) * 0.02
        sd["project_q.weight"] = torch.randn(4, 4) * 0.02
    torch.save(sd, str(out / "pytorch_model.bin"))
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    return out
