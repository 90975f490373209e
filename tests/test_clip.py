"""CLIP visual tower: published key layout, shapes, numerics vs Hugging Face CLIPVisionModel, clear errors."""
import pytest
import torch
import torch.nn.functional as F

from liveact.model.clip import (CLIP_FILE, CLIP_MEAN, CLIP_STD, EncoderLoadError, load_clip,
                                random_clip_state_dict, write_random_clip)

TINY = dict(width=64, num_layers=4, embed_dim=32)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return write_random_clip(tmp_path_factory.mktemp("clip") / CLIP_FILE, **TINY, seed=3)


def _img(seed=0, h=96, w=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 1, h, w, generator=g) * 2 - 1


def test_published_key_set_counts():
    # full-depth key structure at a small width: 392 visual + 391 textual + log_scale (SPEC-ENCODERS 2.3)
    sd = random_clip_state_dict(width=32, num_layers=32, embed_dim=16,
                                text=dict(vocab=10, width=16, layers=24, max_pos=8))
    assert sum(k.startswith("visual.") for k in sd) == 392
    assert sum(k.startswith("textual.") for k in sd) == 391
    assert "log_scale" in sd and len(sd) == 784


def test_shapes_and_used_blocks(clip_file):
    m = load_clip(clip_file.parent, dtype=torch.float32)  # a directory works too
    assert len(m.transformer) == 3  # 4 published blocks, the last is not used
    out = m(_img())
    assert out.shape == (1, 257, 64)
    assert torch.isfinite(out).all() and out.std() > 0.1
    # bf16 default
    mb = load_clip(clip_file)
    assert mb.dtype == torch.bfloat16 and mb(_img()).shape == (1, 257, 64)


def test_matches_hf_clip_vision(clip_file):
    """Independent reference: HF CLIPVisionModel with the key mapping of SPEC-ENCODERS 2.4, fp32."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    sd = torch.load(clip_file, weights_only=True)
    sd = {k: v.float() for k, v in sd.items()}
    w, used = 64, 3
    cfg = CLIPVisionConfig(hidden_size=w, intermediate_size=4 * w, num_attention_heads=2, num_hidden_layers=used,
                           image_size=224, patch_size=14, layer_norm_eps=1e-5, hidden_act="gelu",
                           projection_dim=32)
    hf = CLIPVisionModel(cfg).eval()
    m = {"embeddings.patch_embedding.weight": sd["visual.patch_embedding.weight"],
         "embeddings.class_embedding": sd["visual.cls_embedding"].reshape(w),
         "embeddings.position_embedding.weight": sd["visual.pos_embedding"].reshape(257, w),
         "pre_layrnorm.weight": sd["visual.pre_norm.weight"], "pre_layrnorm.bias": sd["visual.pre_norm.bias"],
         "post_layernorm.weight": sd["visual.post_norm.weight"], "post_layernorm.bias": sd["visual.post_norm.bias"]}
    for i in range(used):
        p, q = f"visual.transformer.{i}.", f"encoder.layers.{i}."
        qkv_w, qkv_b = sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"]
        for j, n in enumerate("qkv"):
            m[q + f"self_attn.{n}_proj.weight"] = qkv_w[j * w:(j + 1) * w]
            m[q + f"self_attn.{n}_proj.bias"] = qkv_b[j * w:(j + 1) * w]
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                     ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
            m[q + b + ".weight"], m[q + b + ".bias"] = sd[p + a + ".weight"], sd[p + a + ".bias"]
    tower = getattr(hf, "vision_model", hf)  # transformers 4.x nests it, 5.x does not
    hf_sd = tower.state_dict()
    missing = set(hf_sd) - set(m) - {k for k in hf_sd if "position_ids" in k}
    assert not missing, missing
    tower.load_state_dict(m, strict=False)
    img = _img(1)
    x = F.interpolate(img[:, :, 0], size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
    ours = load_clip(clip_file, dtype=torch.float32)(img)
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


def test_preprocess_squashes_whole_frame(clip_file):
    m = load_clip(clip_file, dtype=torch.float32)
    img = _img(2, h=720 // 8, w=416 // 8)
    x = m.preprocess(img)
    assert x.shape == (1, 3, 224, 224)
    ref = F.interpolate(img[:, :, 0], size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    ref = (ref - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref)


def test_errors(tmp_path, clip_file):
    with pytest.raises(EncoderLoadError, match="not found"):
        load_clip(tmp_path / "nope.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(EncoderLoadError, match="cannot read"):
        load_clip(bad)
    sd = torch.load(clip_file, weights_only=True)
    only_text = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    torch.save(only_text, tmp_path / "text_only.pth")
    with pytest.raises(EncoderLoadError, match="no CLIP visual tower"):
        load_clip(tmp_path / "text_only.pth")
    broken = dict(sd)
    del broken["visual.transformer.1.mlp.2.bias"]
    broken["visual.transformer.0.attn.proj.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(EncoderLoadError, match=r"1 missing.*\n.*1 shape mismatch"):
        load_clip(tmp_path / "broken.pth")
    m = load_clip(clip_file)
    with pytest.raises(ValueError, match="CLIP input must be"):
        m(torch.zeros(1, 4, 8, 8))


def test_published_size_used_parameters():
    from liveact.model.clip import CLIPVisual
    with torch.device("meta"):
        m = CLIPVisual(width=1280, num_layers=32)
    assert m.num_heads == 16 and len(m.transformer) == 31
    assert sum(p.numel() for p in m.parameters()) == 611_086_080  # SPEC-ENCODERS 2.2 (used part)
