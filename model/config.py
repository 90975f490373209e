"""LiveAct DiT configuration: the published config.json keys, presets, and derived sizes.

The published checkpoint is a diffusers directory whose config.json registers the keys in
``REGISTERED_KEYS`` (shared/SPEC.md section 1.2).  diffusers drops the ``IGNORED_KEYS`` (patch_size,
cross_attn_norm, qk_norm, text_dim, window_size) when loading, so those always take the class defaults.
Our ``tiny`` preset needs smaller encoder widths than the published defaults (text_dim 4096, CLIP 1280,
wav2vec 12 x 768); they live in an engine-only ``_liveact`` block that published configs never carry.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

REGISTERED_KEYS = (
    "model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads", "num_layers",
    "eps", "audio_window", "intermediate_dim", "output_dim", "context_tokens", "vae_scale",
    "norm_input_visual", "norm_output_audio", "weight_init",
)
IGNORED_KEYS = ("patch_size", "cross_attn_norm", "qk_norm", "text_dim", "window_size")
# Engine-only widths of the conditioning encoders (defaults = the published networks).
EXTENSION_KEYS = ("text_dim", "clip_dim", "audio_layers", "audio_channels")


class ConfigError(ValueError):
    """A config.json that is not a LiveAct DiT config, or has values this engine cannot run."""


@dataclass(frozen=True)
class LiveActConfig:
    # registered keys (published values for liveact-18b)
    model_type: str = "i2v"
    text_len: int = 512
    in_dim: int = 36
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    audio_window: int = 5
    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32
    vae_scale: int = 4
    norm_input_visual: bool = True
    norm_output_audio: bool = True
    weight_init: bool = True
    # engine-only extension (published defaults)
    text_dim: int = 4096
    clip_dim: int = 1280
    audio_layers: int = 12
    audio_channels: int = 768
    # fixed by the architecture (ignore_for_config)
    patch_size: tuple = field(default=(1, 2, 2), init=False)
    clip_tokens: int = field(default=257, init=False)

    def __post_init__(self):
        if self.model_type != "i2v":
            raise ConfigError(f"model_type must be 'i2v' (LiveAct is the Wan2.1 i2v model), got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim != 128:
            raise ConfigError(f"head_dim must be 128 (3-D RoPE split 44/42/42), got {self.head_dim}")
        if self.in_dim != 2 * self.out_dim + 4:
            raise ConfigError(f"in_dim must be 2*out_dim+4 (latent + mask + reference latent), got {self.in_dim}")

    # ---- derived sizes
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_window_vf(self) -> int:  # seq_len_vf: wav2vec frames per later latent frame
        return self.audio_window + self.vae_scale - 1

    @property
    def audio_in_first(self) -> int:
        return self.audio_window * self.audio_layers * self.audio_channels

    @property
    def audio_in_later(self) -> int:
        return self.audio_window_vf * self.audio_layers * self.audio_channels

    # ---- serialisation
    def to_json_dict(self) -> dict:
        d = {k: getattr(self, k) for k in REGISTERED_KEYS}
        d["_class_name"] = "WanModel"
        d["_diffusers_version"] = "0.33.1"
        ext = {k: getattr(self, k) for k in EXTENSION_KEYS
               if getattr(self, k) != getattr(LiveActConfig, k)}
        if ext:
            d["_liveact"] = ext
        return d

    @classmethod
    def from_json_dict(cls, d: dict, source: str = "config.json") -> "LiveActConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        cls_name = d.get("_class_name")
        if cls_name is not None and cls_name != "WanModel":
            raise ConfigError(f"{source}: _class_name is {cls_name!r}, not 'WanModel': this is not a LiveAct DiT "
                              "config. Point --ckpt-dir at the LiveAct checkpoint directory.")
        missing = [k for k in ("dim", "num_layers", "num_heads", "in_dim") if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing {missing}; a LiveAct config.json must set them (the class "
                              "defaults match no released model). Is this the right directory?")
        kw = {k: d[k] for k in REGISTERED_KEYS if k in d}
        ext = d.get("_liveact", {}) or {}
        unknown_ext = set(ext) - set(EXTENSION_KEYS)
        if unknown_ext:
            raise ConfigError(f"{source}: unknown keys in _liveact: {sorted(unknown_ext)}")
        kw.update(ext)
        try:
            return cls(**kw)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "LiveActConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found. A LiveAct checkpoint directory holds config.json and "
                              "diffusion_pytorch_model*.safetensors; write a random one with "
                              "`liveact checkpoint random --preset tiny --out DIR`.")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json_dict(d, str(path))

    def replace(self, **kw) -> "LiveActConfig":
        return dataclasses.replace(self, **kw)


PRESETS = {
    # The published SoulX-LiveAct DiT: Wan2.1-I2V-14B + audio cross-attention, 18.9B parameters.
    "liveact-18b": LiveActConfig(),
    # Same structure, small widths, 2 layers: fast on a CPU.
    "tiny": LiveActConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, freq_dim=256,
                          intermediate_dim=32, output_dim=32, context_tokens=4,
                          text_dim=64, clip_dim=64, audio_layers=2, audio_channels=32),
}


def get_preset(name: str) -> LiveActConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class VideoGeometry:
    """Sizes that follow from `--size W*H` (shared/SPEC.md notation)."""
    width: int
    height: int

    @classmethod
    def parse(cls, size: str) -> "VideoGeometry":
        s = str(size).lower().replace("x", "*")
        try:
            w, h = (int(v) for v in s.split("*"))
        except ValueError:
            raise ValueError(f"--size must be W*H, for example 416*720 (width 416, height 720); got {size!r}") from None
        if w <= 0 or h <= 0 or w % 16 or h % 16:
            raise ValueError(f"--size {w}*{h}: width and height must be positive multiples of 16 "
                             "(VAE stride 8 x patch 2); for example 416*720, 512*512 or 480*832")
        return cls(w, h)

    @property
    def lat_h(self) -> int:
        return self.height // 8

    @property
    def lat_w(self) -> int:
        return self.width // 8

    @property
    def grid_h(self) -> int:
        return self.height // 16

    @property
    def grid_w(self) -> int:
        return self.width // 16

    @property
    def tokens_per_frame(self) -> int:  # Fl
        return self.grid_h * self.grid_w

    def __str__(self):
        return f"{self.width}*{self.height}"


# Streaming constants (shared/SPEC.md 5.2)
FIRST_CHUNK_FRAMES = 6
CHUNK_FRAMES = 8
CACHE_FRAMES = FIRST_CHUNK_FRAMES + CHUNK_FRAMES  # 14 slots
TIMESTEPS = (1000.0, 937.5, 833.33333333, 0.0)
WINDOW_VIDEO_FRAMES = (CACHE_FRAMES - 1) * 4 + 1  # 53
