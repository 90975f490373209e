"""CLIP image tower of `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (shared/SPEC-ENCODERS.md 2).

ViT-H/14, open_clip style, in Wan's key layout (`visual.*`):

    x  = Conv2d(3 -> D, k=p, s=p, no bias)(img)            # 224/14 = 16x16 = 256 patches, row-major
    x  = [cls ; x] + pos_embedding                          # 257 tokens
    x  = pre_norm(x)                                        # LayerNorm, eps 1e-5, fp32 math
    for blk in transformer[:-1]:                           # the first 31 of 32 blocks ("use_31_block")
        x += proj(MHA(norm1(x)))                            # fused to_qkv rows = [q | k | v], scale 1/sqrt(d)
        x += mlp.2(GELU_erf(mlp.0(norm2(x))))
    return x                                                # [B, 257, D], no post_norm / pooling / head

Preprocessing (`preprocess`): PyTorch bicubic (A = -0.75, align_corners False, no antialias) of the whole
[-1, 1] frame to 224x224 (aspect ratio distorted, no crop), then x*0.5+0.5 and the OpenAI mean/std.  Done in
the model dtype (bf16 in the reference).

Checkpoint: the published file is a full XLM-R CLIP state dict (392 `visual.*` + 391 `textual.*` + `log_scale`).
Only `visual.*` is read; `textual.*` / `log_scale` are ignored (LiveAct never runs the text tower, so its
xlm-roberta-large tokenizer is not needed either).  Of the visual keys, the last block, `post_norm` and `head`
are checked for presence but not loaded (they are unused).  Widths and depth are read from the tensor shapes,
so a tiny random tower (`write_random_clip`) loads through the same code.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import key_mismatch_lines

CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PUBLISHED_HEAD_DIM = 80  # ViT-H/14: 1280 = 16 heads x 80


class EncoderLoadError(ValueError):
    """An encoder file that cannot be loaded; the message names the file, the problem and the fix."""


def default_heads(width: int) -> int:
    """Head count for a width: 80-dim heads as published (1280 -> 16); otherwise 32-dim heads (tiny towers)."""
    if width % PUBLISHED_HEAD_DIM == 0:
        return width // PUBLISHED_HEAD_DIM
    return max(1, width // 32) if width % 32 == 0 else 1


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (as in Wan's clip.py)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), non-causal
        return self.proj(o.transpose(1, 2).reshape(b, s, d))


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = LayerNormFP32(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = LayerNormFP32(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))  # exact GELU

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisual(nn.Module):
    """The used part of the visual tower: `num_layers` blocks are *published*, the first num_layers-1 run."""

    def __init__(self, width: int = 1280, num_layers: int = 32, mlp_dim: int | None = None,
                 num_heads: int | None = None, patch_size: int = 14, image_size: int = 224):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.width, self.num_layers = width, num_layers
        self.num_heads = num_heads or default_heads(width)
        if width % self.num_heads:
            raise ValueError(f"CLIP width {width} is not divisible by num_heads {self.num_heads}")
        self.mlp_dim = mlp_dim or 4 * width
        self.patch_size, self.image_size = patch_size, image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embedding = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, width))
        self.pre_norm = LayerNormFP32(width, eps=1e-5)
        # only the blocks that run are built (block num_layers-1, post_norm and head are unused)
        self.transformer = nn.Sequential(*[AttentionBlock(width, self.mlp_dim, self.num_heads)
                                           for _ in range(num_layers - 1)])

    @property
    def dtype(self):
        return self.pos_embedding.dtype

    @property
    def device(self):
        return self.pos_embedding.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] or [B, 3, H, W] in [-1, 1] -> [B*F, 3, 224, 224] normalised, in the model dtype."""
        if images.dim() == 5:
            b, c, f, h, w = images.shape
            images = images.transpose(1, 2).reshape(b * f, c, h, w)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP input must be [B, 3, F, H, W] or [B, 3, H, W] in [-1, 1]; got {tuple(images.shape)}")
        x = images.to(self.device, self.dtype)
        s = self.image_size
        x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub(mean).div(std)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N, 3, 224, 224] -> [N, 257, width] (output of the second-to-last block)."""
        b = x.shape[0]
        x = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(b, -1, -1), x], dim=1) + self.pos_embedding
        x = self.pre_norm(x)
        return self.transformer(x)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """cond_image [1, 3, 1, H, W] in [-1, 1] -> CLIP context [1, 257, width] (LiveAct's clip.visual call)."""
        return self.forward_features(self.preprocess(images))


# ---------------------------------------------------------------------------------------------------------
# checkpoint I/O

def _materialize(model: nn.Module, sd: dict, device, dtype, prefix: str = "") -> nn.Module:
    """A meta-device model (keys already checked against sd) -> on `device` in `dtype`, filled from sd[prefix + key]."""
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(sd[prefix + k])
    return model.eval()


def _torch_load(path: Path) -> dict:
    if not path.exists():
        raise EncoderLoadError(f"{path}: not found. Point --ckpt-dir at the LiveAct checkpoint directory (it holds "
                               f"{path.name}), or write random assets with tools/random_assets.py.")
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:  # legacy (non-zip) torch.save format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except EncoderLoadError:
        raise
    except Exception as e:
        raise EncoderLoadError(f"{path}: cannot read it as a PyTorch state dict ({type(e).__name__}: {e}); the "
                               "file is corrupt or truncated, re-download it") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise EncoderLoadError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def clip_config_from_state_dict(sd: dict, where: str = CLIP_FILE) -> dict:
    """Widths and depth of the visual tower, read from the tensor shapes of `visual.*` keys."""
    need = ("visual.patch_embedding.weight", "visual.pos_embedding", "visual.cls_embedding")
    missing = [k for k in need if k not in sd]
    if missing:
        raise EncoderLoadError(f"{where}: no CLIP visual tower in this file (missing {missing}). It must be the "
                               f"open-clip XLM-RoBERTa-large ViT-H/14 file {CLIP_FILE}.")
    pe = sd["visual.patch_embedding.weight"]
    width, patch = pe.shape[0], pe.shape[-1]
    n_pos = sd["visual.pos_embedding"].shape[1]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise EncoderLoadError(f"{where}: visual.pos_embedding has {n_pos} rows, not 1 + a square number of patches")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"visual\.transformer\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise EncoderLoadError(f"{where}: visual.transformer.* blocks are missing or not numbered 0..n-1")
    if len(blocks) < 2:
        raise EncoderLoadError(f"{where}: the tower needs at least 2 blocks (LiveAct drops the last one)")
    mlp = sd["visual.transformer.0.mlp.0.weight"].shape[0] if "visual.transformer.0.mlp.0.weight" in sd else 4 * width
    return dict(width=width, num_layers=len(blocks), mlp_dim=mlp, patch_size=patch, image_size=grid * patch)


def load_clip(ckpt_dir_or_file, device="cpu", dtype=torch.bfloat16, num_heads: int | None = None) -> CLIPVisual:
    """Load the visual tower from the published .pth (or a directory holding it), strictly for the used keys."""
    path = Path(ckpt_dir_or_file)
    if path.is_dir():
        path = path / CLIP_FILE
    sd = _torch_load(path)
    cfg = clip_config_from_state_dict(sd, str(path))
    with torch.device("meta"):
        model = CLIPVisual(**cfg, num_heads=num_heads)
    want = {f"visual.{k}": v for k, v in model.state_dict().items()}
    last = cfg["num_layers"] - 1
    unused = [k for k in sd if k.startswith(f"visual.transformer.{last}.")] + \
             [k for k in ("visual.post_norm.weight", "visual.post_norm.bias", "visual.head") if k in sd]
    visual = {k: v.shape for k, v in sd.items() if k.startswith("visual.") and k not in set(unused)}
    lines = key_mismatch_lines({k: v.shape for k, v in want.items()}, visual)
    if lines:
        raise EncoderLoadError("\n".join([f"{path}: the CLIP visual tower does not match the ViT layout inferred "
                                           f"from its shapes (width {cfg['width']}, {cfg['num_layers']} blocks):", *lines,
                                           f"  Fix: use the published {CLIP_FILE} (or one written by write_random_clip)."]))
    return _materialize(model, sd, device, dtype, prefix="visual.")


def _rand(shape, gen, kind):
    if kind == "norm_w":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if kind in ("bias", "norm_b"):
        return 0.02 * torch.randn(shape, generator=gen)
    if kind == "emb":
        return 0.5 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)


def random_clip_state_dict(width=1280, num_layers=32, mlp_dim=None, patch_size=14, image_size=224,
                           embed_dim=1024, text: dict | None = None, seed=0, dtype=torch.float16) -> dict:
    """A full open-clip XLM-R CLIP state dict in Wan's key layout with random values.

    `text` = dict(vocab=..., width=..., layers=..., max_pos=...) adds the `textual.*` XLM-RoBERTa tower in Wan's
    layout (never used by LiveAct; written so the file has the published key set) plus `log_scale`.
    """
    gen = torch.Generator().manual_seed(seed)
    mlp_dim = mlp_dim or 4 * width
    n = (image_size // patch_size) ** 2 + 1
    sd = {"visual.patch_embedding.weight": _rand((width, 3, patch_size, patch_size), gen, "w"),
          "visual.cls_embedding": _rand((1, 1, width), gen, "emb"),
          "visual.pos_embedding": _rand((1, n, width), gen, "emb"),
          "visual.pre_norm.weight": _rand((width,), gen, "norm_w"),
          "visual.pre_norm.bias": _rand((width,), gen, "norm_b")}
    for i in range(num_layers):
        p = f"visual.transformer.{i}."
        sd.update({p + "norm1.weight": _rand((width,), gen, "norm_w"), p + "norm1.bias": _rand((width,), gen, "norm_b"),
                   p + "attn.to_qkv.weight": _rand((3 * width, width), gen, "w"),
                   p + "attn.to_qkv.bias": _rand((3 * width,), gen, "bias"),
                   p + "attn.proj.weight": _rand((width, width), gen, "w"),
                   p + "attn.proj.bias": _rand((width,), gen, "bias"),
                   p + "norm2.weight": _rand((width,), gen, "norm_w"), p + "norm2.bias": _rand((width,), gen, "norm_b"),
                   p + "mlp.0.weight": _rand((mlp_dim, width), gen, "w"), p + "mlp.0.bias": _rand((mlp_dim,), gen, "bias"),
                   p + "mlp.2.weight": _rand((width, mlp_dim), gen, "w"), p + "mlp.2.bias": _rand((width,), gen, "bias")})
    sd["visual.post_norm.weight"] = _rand((width,), gen, "norm_w")
    sd["visual.post_norm.bias"] = _rand((width,), gen, "norm_b")
    sd["visual.head"] = _rand((width, embed_dim), gen, "emb") / math.sqrt(width)
    if text:
        tw, tl = text["width"], text["layers"]
        mid = (tw + embed_dim) // 2
        t = "textual."
        sd.update({t + "model.token_embedding.weight": _rand((text["vocab"], tw), gen, "emb"),
                   t + "model.type_embedding.weight": _rand((1, tw), gen, "emb"),
                   t + "model.pos_embedding.weight": _rand((text["max_pos"], tw), gen, "emb"),
                   t + "model.norm.weight": _rand((tw,), gen, "norm_w"), t + "model.norm.bias": _rand((tw,), gen, "norm_b")})
        for i in range(tl):
            p = f"{t}model.blocks.{i}."
            for nm in "qkvo":
                sd[p + f"attn.{nm}.weight"] = _rand((tw, tw), gen, "w")
                sd[p + f"attn.{nm}.bias"] = _rand((tw,), gen, "bias")
            sd.update({p + "norm1.weight": _rand((tw,), gen, "norm_w"), p + "norm1.bias": _rand((tw,), gen, "norm_b"),
                       p + "ffn.0.weight": _rand((4 * tw, tw), gen, "w"), p + "ffn.0.bias": _rand((4 * tw,), gen, "bias"),
                       p + "ffn.2.weight": _rand((tw, 4 * tw), gen, "w"), p + "ffn.2.bias": _rand((tw,), gen, "bias"),
                       p + "norm2.weight": _rand((tw,), gen, "norm_w"), p + "norm2.bias": _rand((tw,), gen, "norm_b")})
        sd[t + "head.0.weight"] = _rand((mid, tw), gen, "w")
        sd[t + "head.2.weight"] = _rand((embed_dim, mid), gen, "w")
        sd["log_scale"] = torch.tensor(math.log(1 / 0.07))
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


PUBLISHED_TEXT = dict(vocab=250002, width=1024, layers=24, max_pos=514)


def write_random_clip(path, width=1280, num_layers=32, mlp_dim=None, patch_size=14, image_size=224,
                      embed_dim=1024, text: dict | None | bool = True, seed=0, dtype=torch.float16) -> Path:
    """Write a random CLIP file in the published layout.  text=True: the published XLM-R text-tower sizes when
    width is 1280, else a tiny one; text=False: visual keys only."""
    if text is True:
        text = PUBLISHED_TEXT if width == 1280 else dict(vocab=64, width=32, layers=2, max_pos=16)
    sd = random_clip_state_dict(width, num_layers, mlp_dim, patch_size, image_size, embed_dim,
                                text or None, seed, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))
    return path
