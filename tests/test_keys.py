"""The state-dict key set and shapes, derived from shared/SPEC.md section 2 independently of the model code."""
import math

import pytest

from liveact.model.checkpoint import expected_shapes
from liveact.model.config import get_preset


def spec_keys(c):
    """SPEC.md 2.1 / 2.2 written out as formulas of the config."""
    D, F, T, C, A = c.dim, c.ffn_dim, c.text_dim, c.clip_dim, c.output_dim
    top = {
        "patch_embedding.weight": (D, c.in_dim, 1, 2, 2), "patch_embedding.bias": (D,),
        "text_embedding.0.weight": (D, T), "text_embedding.0.bias": (D,),
        "text_embedding.2.weight": (D, D), "text_embedding.2.bias": (D,),
        "time_embedding.0.weight": (D, c.freq_dim), "time_embedding.0.bias": (D,),
        "time_embedding.2.weight": (D, D), "time_embedding.2.bias": (D,),
        "time_projection.1.weight": (6 * D, D), "time_projection.1.bias": (6 * D,),
        "head.modulation": (1, 2, D), "head.head.weight": (4 * c.out_dim, D), "head.head.bias": (4 * c.out_dim,),
        "img_emb.proj.0.weight": (C,), "img_emb.proj.0.bias": (C,),
        "img_emb.proj.1.weight": (C, C), "img_emb.proj.1.bias": (C,),
        "img_emb.proj.3.weight": (D, C), "img_emb.proj.3.bias": (D,),
        "img_emb.proj.4.weight": (D,), "img_emb.proj.4.bias": (D,),
        "audio_proj.proj1.weight": (c.intermediate_dim, 5 * c.audio_layers * c.audio_channels),
        "audio_proj.proj1.bias": (c.intermediate_dim,),
        "audio_proj.proj1_vf.weight": (c.intermediate_dim, 8 * c.audio_layers * c.audio_channels),
        "audio_proj.proj1_vf.bias": (c.intermediate_dim,),
        "audio_proj.proj2.weight": (c.intermediate_dim, c.intermediate_dim), "audio_proj.proj2.bias": (c.intermediate_dim,),
        "audio_proj.proj3.weight": (c.context_tokens * A, c.intermediate_dim), "audio_proj.proj3.bias": (c.context_tokens * A,),
        "audio_proj.norm.weight": (A,), "audio_proj.norm.bias": (A,),
    }
    blk = {"modulation": (1, 6, D), "norm3.weight": (D,), "norm3.bias": (D,), "norm_x.weight": (D,), "norm_x.bias": (D,),
           "self_attn.norm_q.weight": (D,), "self_attn.norm_k.weight": (D,),
           "self_attn.memory_proj_k.weight": (D, 1, 5), "self_attn.memory_proj_v.weight": (D, 1, 5),
           "cross_attn.norm_q.weight": (D,), "cross_attn.norm_k.weight": (D,), "cross_attn.norm_k_img.weight": (D,),
           "ffn.0.weight": (F, D), "ffn.0.bias": (F,), "ffn.2.weight": (D, F), "ffn.2.bias": (D,),
           "audio_cross_attn.q_linear.weight": (D, D), "audio_cross_attn.q_linear.bias": (D,),
           "audio_cross_attn.kv_linear.weight": (2 * D, A), "audio_cross_attn.kv_linear.bias": (2 * D,),
           "audio_cross_attn.proj.weight": (D, D), "audio_cross_attn.proj.bias": (D,)}
    for m in ("q", "k", "v", "o"):
        blk[f"self_attn.{m}.weight"], blk[f"self_attn.{m}.bias"] = (D, D), (D,)
    for m in ("q", "k", "v", "o", "k_img", "v_img"):
        blk[f"cross_attn.{m}.weight"], blk[f"cross_attn.{m}.bias"] = (D, D), (D,)
    keys = dict(top)
    for i in range(c.num_layers):
        keys.update({f"blocks.{i}.{k}": v for k, v in blk.items()})
    return keys


@pytest.mark.parametrize("preset", ["tiny", "liveact-18b"])
def test_keys_and_shapes_follow_published_layout(preset):
    cfg = get_preset(preset)
    want = spec_keys(cfg)
    got = expected_shapes(cfg)
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    for k in want:
        assert tuple(got[k]) == tuple(want[k]), k
    assert len([k for k in want if k.startswith("blocks.0.")]) == 42
    assert len(want) == 33 + 42 * cfg.num_layers


def test_18b_parameter_count_on_meta():
    shapes = expected_shapes(get_preset("liveact-18b"))
    assert len(shapes) == 1713
    assert sum(math.prod(s) for s in shapes.values()) == 18_884_094_784  # SPEC.md 1.3
