"""Shared test helpers: a tiny random model, random conditioning, DiT-like attention inputs, error metrics,
a poisoned-output check."""
import torch

from liveact.model import VideoGeometry, get_preset
from liveact.model.checkpoint import build_empty, init_random_


def tiny_model(dtype=torch.float32, seed=0, ops=None):
    m = init_random_(build_empty(get_preset("tiny"), "cpu", dtype), seed=seed)
    if ops is not None:
        m.set_ops(ops)
    return m


def conditioning(model, geo: VideoGeometry, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ctx = model.embed_context(torch.randn(20, cfg.text_dim, generator=g), torch.randn(1, 257, cfg.clip_dim, generator=g))
    y = torch.randn(cfg.in_dim - cfg.out_dim, 14, geo.lat_h, geo.lat_w, generator=g)
    return ctx, y


def audio_window(cfg, n, seed=0):
    g = torch.Generator().manual_seed(1000 + 17 * n + seed)
    return torch.randn(1, 53, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g)


def dit_like(b, sq, sk, h, device, seed=0, offset=2.0, outlier=8.0):
    """Attention inputs q, k, v [B, S, H, 128] (bf16) whose keys carry per-channel offsets and outlier
    channels like a real DiT's."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, sq, h, 128, generator=g)
    k = torch.randn(b, sk, h, 128, generator=g) + offset * torch.randn(h, 128, generator=g)
    k[..., :4] += outlier * torch.randn(h, 4, generator=g)
    v = torch.randn(b, sk, h, 128, generator=g)
    return [t.bfloat16().to(device) for t in (q, k, v)]


def cos(a, b):
    """Cosine similarity of two tensors, flattened, in float64."""
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def poison_fp8_allocations(monkeypatch):
    """Make kernels/norm_quant's allocator (used by the FP8 kernels for their outputs) hand out poisoned
    tensors: NaN, or the e4m3 NaN code 0x7F, so an element a kernel fails to write cannot pass."""
    from liveact.kernels import norm_quant as nq

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).fill_(0x7F)
        else:
            t.fill_(float("nan"))
        return t
    monkeypatch.setattr(nq, "_alloc", alloc)
