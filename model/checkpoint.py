"""Checkpoint I/O in the published diffusers layout (shared/SPEC.md 1.2).

A LiveAct DiT directory holds `config.json` and either `diffusion_pytorch_model.safetensors` or
shards `diffusion_pytorch_model-0000i-of-0000n.safetensors` listed by
`diffusion_pytorch_model.safetensors.index.json`.  Loading checks every file, key and shape
*before* allocating anything, then streams tensors one at a time from the memory-mapped files
straight into the parameters on the target device and dtype (no second full copy in host memory).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LiveActConfig
from .dit import LiveActDiT

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message names the file, the key and the fix."""


def build_empty(cfg: LiveActConfig, device="meta", dtype=torch.bfloat16) -> LiveActDiT:
    """The model with uninitialised parameters of `dtype` on `device` (meta: no memory at all)."""
    with torch.device("meta"):
        model = LiveActDiT(cfg)
    model.to(dtype)
    if str(device) != "meta":
        model.to_empty(device=device)
    return model


def expected_shapes(cfg: LiveActConfig) -> dict:
    return {k: tuple(v.shape) for k, v in build_empty(cfg).state_dict().items()}


def count_parameters(cfg: LiveActConfig) -> int:
    return sum(math.prod(s) for s in expected_shapes(cfg).values())


def weight_files(ckpt_dir: str | Path) -> dict:
    """{file path: None} for a single file, or {key: file path} from the shard index."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such directory. Pass the LiveAct checkpoint directory (the one with "
                              f"config.json and {WEIGHTS_NAME}), or write a random one with "
                              "`liveact checkpoint random --preset tiny --out DIR`.")
    index, single = d / INDEX_NAME, d / WEIGHTS_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e}); re-download or re-write the checkpoint") from None
        missing_files = sorted({f for f in weight_map.values() if not (d / f).exists()})
        if missing_files:
            raise CheckpointError(f"{index} lists shards that are missing from {d}: {missing_files[:5]}"
                                  f"{' ...' if len(missing_files) > 5 else ''}; the download is incomplete")
        return {k: d / f for k, f in weight_map.items()}
    if single.exists():
        return {None: single}
    raise CheckpointError(f"{d}: found neither {WEIGHTS_NAME} nor {INDEX_NAME}. Is this the DiT checkpoint "
                          "directory of LiveAct (the one holding config.json)?")


def _read_headers(files: dict) -> dict:
    """{key: (shape, dtype string, path)} from the safetensors headers (no tensor data read)."""
    out = {}
    for path in sorted({p for p in files.values()}):
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype(), path)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors header ({e}); the file is corrupt or "
                                  "truncated, re-download it") from None
    return out


def key_mismatch_lines(want: dict, got: dict, source=None, ignore_missing=()) -> list:
    """Compare {key: shape} of a model (want) and a file (got): one line per kind of difference,
    '  N missing: ...', '  N unexpected: ...', '  N shape mismatch: ...' (8 keys each at most, with
    their shapes; source(k) names the file a key came from).  Empty when they agree."""
    at = (lambda k: f" in {source(k)}") if source else (lambda k: "")
    missing = sorted(set(want) - set(got) - set(ignore_missing))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if tuple(got[k]) != tuple(want[k]))
    lines = []
    for title, keys, fmt in (("missing", missing, lambda k: f"{k} {tuple(want[k])}"),
                             ("unexpected", unexpected, lambda k: f"{k} {tuple(got[k])}{at(k)}"),
                             ("shape mismatch", wrong, lambda k: f"{k}: file {tuple(got[k])}{at(k)}, model {tuple(want[k])}")):
        if keys:
            lines.append(f"  {len(keys)} {title}: " + "; ".join(fmt(k) for k in keys[:8]) + (" ..." if len(keys) > 8 else ""))
    return lines


def check_keys(cfg: LiveActConfig, headers: dict, where: str) -> None:
    """Raise one CheckpointError listing every missing / unexpected key and shape mismatch."""
    lines = key_mismatch_lines(expected_shapes(cfg), {k: h[0] for k, h in headers.items()},
                               source=lambda k: Path(headers[k][2]).name)
    if not lines:
        return
    raise CheckpointError("\n".join(
        [f"{where}: the weights do not match config.json (dim={cfg.dim}, num_layers={cfg.num_layers}, "
         f"num_heads={cfg.num_heads}, ffn_dim={cfg.ffn_dim}):", *lines,
         "  Fix: point --ckpt-dir at a LiveAct (Wan2.1-I2V-14B + audio) checkpoint whose config.json "
         "matches its weights; nothing was loaded."]))


def load_model(ckpt_dir: str | Path, device="cpu", dtype=torch.bfloat16, ops=None,
               progress: Optional[Callable[[int, int], None]] = None) -> LiveActDiT:
    """Load a LiveAct DiT checkpoint directory onto `device` in `dtype`, strictly."""
    ckpt_dir = Path(ckpt_dir)
    files = weight_files(ckpt_dir)
    from .config import ConfigError
    try:
        cfg = LiveActConfig.load(ckpt_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    headers = _read_headers(files)
    check_keys(cfg, headers, str(ckpt_dir))
    model = build_empty(cfg, device=device, dtype=dtype)
    params = dict(model.named_parameters())
    total, done = len(params), 0
    dev = torch.device(device)
    by_file = {}
    for k, (_, _, path) in headers.items():
        by_file.setdefault(path, []).append(k)
    with torch.no_grad():
        for path, keys in by_file.items():
            # safetensors memory-maps the file; device="cuda:i" copies each tensor straight to the GPU
            load_dev = str(dev) if dev.type == "cuda" else "cpu"
            with safe_open(str(path), framework="pt", device=load_dev) as f:
                for k in keys:
                    params[k].copy_(f.get_tensor(k))
                    done += 1
                    if progress:
                        progress(done, total)
    if ops is not None:
        model.set_ops(ops)
    return model


# ---------------------------------------------------------------------------------------------------
# random checkpoints in the published layout

def random_tensor(name: str, shape, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """A deterministic random value for parameter `name`, scaled so the random model's forward stays
    finite and non-trivial in bf16 over 40 blocks: Linear weights ~ U(+-1/sqrt(fan_in)) (nn.Linear's
    default), small random biases, norm weights near 1, modulation ~ N(0, 1/D), ConvKV near the mean."""
    leaf = name.rsplit(".", 1)[-1]
    if "memory_proj" in name:
        return 0.2 + 0.05 * torch.randn(shape, generator=gen, device=device)
    if leaf == "modulation":
        return torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[-1])
    if len(shape) == 1 and ("norm" in name or name.startswith("img_emb.proj.0") or name.startswith("img_emb.proj.4")):
        if leaf == "weight":
            return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        return 0.02 * torch.randn(shape, generator=gen, device=device)
    if leaf == "bias":
        return 0.02 * torch.randn(shape, generator=gen, device=device)
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen, device=device) * 2 - 1) * bound


def random_state_dict(cfg: LiveActConfig, seed: int = 0, dtype=torch.bfloat16, device="cpu"):
    """Yields (name, tensor) for every parameter, deterministic in `seed` and the name order."""
    shapes = expected_shapes(cfg)
    gen = torch.Generator(device=device)
    for i, (name, shape) in enumerate(shapes.items()):
        gen.manual_seed(seed * 1000003 + i)
        yield name, random_tensor(name, shape, gen, device).to(dtype)


def init_random_(model: LiveActDiT, seed: int = 0) -> LiveActDiT:
    """Fill a model's parameters in place with the same values `write_random_checkpoint` writes."""
    params = dict(model.named_parameters())
    dev = model.device
    with torch.no_grad():
        for name, t in random_state_dict(model.cfg, seed, dtype=model.dtype, device=dev):
            params[name].copy_(t)
    return model


def write_random_checkpoint(cfg: LiveActConfig, out_dir: str | Path, seed: int = 0, dtype=torch.bfloat16,
                            max_shard_bytes: int = 5 * 2**30, device="cpu",
                            progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_bytes) with random weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(cfg)
    elt = torch.tensor([], dtype=dtype).element_size()
    total_bytes = sum(math.prod(s) for s in shapes.values()) * elt
    n_shards = max(1, math.ceil(total_bytes / max_shard_bytes))
    (out / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
    for stale in list(out.glob("diffusion_pytorch_model*.safetensors")) + [out / INDEX_NAME]:
        if stale.exists():
            stale.unlink()
    names = list(shapes)
    if n_shards == 1:
        sd = {k: v.cpu().contiguous() for k, v in random_state_dict(cfg, seed, dtype, device)}
        save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        if progress:
            progress(len(names), len(names))
        return out
    # greedy shards of about max_shard_bytes, written one at a time
    weight_map, shard, shard_bytes = {}, {}, 0
    tmp_names = []

    def flush():
        nonlocal shard, shard_bytes
        tmp = out / f"_shard{len(tmp_names):05d}.safetensors"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        tmp_names.append((tmp, list(shard)))
        shard, shard_bytes = {}, 0

    done = 0
    for name, t in random_state_dict(cfg, seed, dtype, device):
        nb = t.numel() * elt
        if shard and shard_bytes + nb > max_shard_bytes:
            flush()
        shard[name] = t.cpu().contiguous()
        shard_bytes += nb
        done += 1
        if progress:
            progress(done, len(names))
    if shard:
        flush()
    n = len(tmp_names)
    for i, (tmp, keys) in enumerate(tmp_names):
        final = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, out / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out
