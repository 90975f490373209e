"""Checkpoint I/O: random checkpoint -> load -> identical outputs; every bad input is one clear error."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveact.model import ChunkLayout, Rope3D, VideoGeometry, get_preset
from liveact.model.checkpoint import (INDEX_NAME, WEIGHTS_NAME, CheckpointError, build_empty, init_random_,
                                      load_model, write_random_checkpoint)

from helpers import audio_window, conditioning


def one_step(model, geo, n_chunks=2):
    ctx, y = conditioning(model, geo)
    rope = Rope3D(geo.grid_h, geo.grid_w)
    caches = model.alloc_caches(geo.tokens_per_frame)
    outs = []
    for n in range(n_chunks):
        lay = ChunkLayout.for_chunk(n)
        g = torch.Generator().manual_seed(n)
        lat = torch.randn(16, lay.frames, geo.lat_h, geo.lat_w, generator=g)
        e, e0 = model.embed_time(torch.tensor([937.5]))
        akv = model.chunk_audio_kv(model.embed_audio(audio_window(model.cfg, n)), lay)
        yc = y[:, :6] if n == 0 else y[:, 6:14]
        outs.append(model(lat, yc, e, e0, ctx, akv, caches, rope, lay))
    return outs


@pytest.mark.parametrize("sharded", [False, True])
def test_random_checkpoint_roundtrip_identical_outputs(tmp_path, sharded):
    cfg = get_preset("tiny")
    out = write_random_checkpoint(cfg, tmp_path / "ck", seed=3, dtype=torch.float32,
                                  max_shard_bytes=2_000_000 if sharded else 2**40)
    assert (out / INDEX_NAME).exists() == sharded
    assert (out / WEIGHTS_NAME).exists() == (not sharded)
    if sharded:
        idx = json.loads((out / INDEX_NAME).read_text())
        files = set(idx["weight_map"].values())
        assert len(files) > 1 and all(f.startswith("diffusion_pytorch_model-") for f in files)
    loaded = load_model(out, device="cpu", dtype=torch.float32)
    direct = init_random_(build_empty(cfg, "cpu", torch.float32), seed=3)
    for (k1, a), (k2, b) in zip(sorted(loaded.state_dict().items()), sorted(direct.state_dict().items())):
        assert k1 == k2 and torch.equal(a, b), k1
    geo = VideoGeometry.parse("64*64")
    for a, b in zip(one_step(loaded, geo), one_step(direct, geo)):
        assert torch.equal(a, b)
    assert all(torch.isfinite(a).all() for a in one_step(loaded, geo))


@pytest.fixture
def ckpt(tmp_path):
    return write_random_checkpoint(get_preset("tiny"), tmp_path / "ck", dtype=torch.float32)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory.*checkpoint random"):
        load_model(tmp_path / "nope")


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="found neither"):
        load_model(tmp_path)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_model(ckpt)


def test_config_of_wrong_kind(ckpt):
    (ckpt / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "dim": 8}))
    with pytest.raises(CheckpointError, match="not a LiveAct DiT config"):
        load_model(ckpt)
    d = get_preset("tiny").to_json_dict()
    d["model_type"] = "t2v"
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="model_type must be 'i2v'"):
        load_model(ckpt)


def test_missing_unexpected_and_misshaped_keys(ckpt):
    path = ckpt / WEIGHTS_NAME
    sd = load_file(str(path))
    del sd["blocks.1.ffn.0.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["head.head.weight"] = torch.zeros(7, 7)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as ei:
        load_model(ckpt)
    msg = str(ei.value)
    assert "1 missing: blocks.1.ffn.0.weight" in msg
    assert "1 unexpected: blocks.0.extra.weight" in msg
    assert "shape mismatch: head.head.weight: file (7, 7)" in msg
    assert "nothing was loaded" in msg


def test_wrong_config_for_weights(ckpt):
    d = get_preset("tiny").to_json_dict()
    d["num_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="missing: blocks.2"):
        load_model(ckpt)


def test_missing_shard(tmp_path):
    out = write_random_checkpoint(get_preset("tiny"), tmp_path / "ck", dtype=torch.float32, max_shard_bytes=2_000_000)
    next(out.glob("diffusion_pytorch_model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shards that are missing"):
        load_model(out)


def test_corrupt_file(ckpt):
    (ckpt / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(ckpt)


def test_published_config_ignores_ignore_for_config_keys(ckpt):
    d = get_preset("tiny").to_json_dict()
    d.update(patch_size=[1, 4, 4], qk_norm=False, window_size=[3, 3])  # diffusers drops these silently
    (ckpt / "config.json").write_text(json.dumps(d))
    m = load_model(ckpt, dtype=torch.float32)
    assert m.cfg.patch_size == (1, 2, 2)
