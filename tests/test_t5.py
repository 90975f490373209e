"""umT5 encoder: Wan key layout, shapes cut to the true token count, numerics vs HF UMT5EncoderModel, errors."""
import pytest
import torch

from liveact.model.t5 import (T5_FILE, TOKENIZER_DIR, EncoderLoadError, T5Encoder, clean_text, load_t5,
                              load_text_encoder, load_tokenizer, random_t5_state_dict, write_random_t5,
                              write_tiny_tokenizer)

TINY = dict(vocab=256, dim=64, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=2, num_buckets=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    write_tiny_tokenizer(d / TOKENIZER_DIR)
    write_random_t5(d / T5_FILE, seed=5, **TINY)
    return d


def test_published_key_count():
    sd = random_t5_state_dict(vocab=8, dim=8, dim_attn=8, dim_ffn=8, num_heads=2, num_layers=24)
    assert len(sd) == 242  # SPEC-ENCODERS 3.3
    assert all(v.dtype == torch.bfloat16 for v in sd.values())


def test_tokenizer_conventions(ckpt):
    tok = load_tokenizer(ckpt / TOKENIZER_DIR)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("一个人在说话")["input_ids"]
    assert ids[-1] == 1 and 0 not in ids  # </s> appended, no BOS/pad


def test_clean_text():
    assert clean_text("  a &amp;amp; b\n\t c  ") == "a & b c"


def test_encode_shape_is_true_token_count(ckpt):
    te = load_text_encoder(ckpt, device="cpu")
    ids, mask = te.tokenize(["一个人在说话！"])
    assert ids.shape == (1, 512) and mask.shape == (1, 512)
    n = int(mask.sum())
    out = te.encode("一个人在说话！")
    assert out.shape == (n, 64) and out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all() and out.float().std() > 0.1
    # very long prompts are truncated to text_len (511 tokens + </s>)
    assert te.encode("hello world " * 400).shape == (512, 64)
    with pytest.raises(ValueError, match="prompt must be a string"):
        te.encode(None)


def test_real_tokens_equal_padded_run(ckpt):
    """The encoder on the real tokens equals the padded 512-token masked run at those positions (fp32)."""
    te = load_text_encoder(ckpt, dtype=torch.float32)
    ids, mask = te.tokenize(["A person is talking, 一个人在说话"])
    n = int(mask.sum())
    with torch.no_grad():
        full = te.model(ids, mask)[0, :n]
    short = te.encode("A person is talking, 一个人在说话")
    assert (short - full).abs().max() < 1e-5


def test_matches_hf_umt5(ckpt):
    """Independent reference: HF UMT5EncoderModel with the key mapping of SPEC-ENCODERS 3.4, fp32."""
    from transformers import UMT5Config, UMT5EncoderModel
    sd = {k: v.float() for k, v in torch.load(ckpt / T5_FILE, weights_only=True).items()}
    cfg = UMT5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    hf = UMT5EncoderModel(cfg).eval()
    m = {"shared.weight": sd["token_embedding.weight"], "encoder.embed_tokens.weight": sd["token_embedding.weight"],
         "encoder.final_layer_norm.weight": sd["norm.weight"]}
    for i in range(2):
        p, q = f"blocks.{i}.", f"encoder.block.{i}.layer."
        for n in "qkvo":
            m[q + f"0.SelfAttention.{n}.weight"] = sd[p + f"attn.{n}.weight"]
        m[q + "0.SelfAttention.relative_attention_bias.weight"] = sd[p + "pos_embedding.embedding.weight"]
        m[q + "0.layer_norm.weight"] = sd[p + "norm1.weight"]
        m[q + "1.DenseReluDense.wi_0.weight"] = sd[p + "ffn.gate.0.weight"]
        m[q + "1.DenseReluDense.wi_1.weight"] = sd[p + "ffn.fc1.weight"]
        m[q + "1.DenseReluDense.wo.weight"] = sd[p + "ffn.fc2.weight"]
        m[q + "1.layer_norm.weight"] = sd[p + "norm2.weight"]
    missing, unexpected = hf.load_state_dict(m, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (1, 40), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state[0]
        ours = load_t5(ckpt, dtype=torch.float32)(ids)[0]
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


def test_bucket_formula():
    from liveact.model.t5 import T5RelativeEmbedding
    e = T5RelativeEmbedding(32, 1)
    rel = torch.tensor([-200, -9, -8, -1, 0, 1, 7, 8, 20, 127, 128, 1000])

    def g(n):
        import math
        return n if n < 8 else min(15, 8 + int(math.log(n / 8) / math.log(16) * 8))
    want = [16 * (r > 0) + g(abs(r)) for r in rel.tolist()]
    assert e._bucket(rel).tolist() == want


def test_errors(tmp_path, ckpt):
    with pytest.raises(EncoderLoadError, match="not found"):
        load_t5(tmp_path)
    with pytest.raises(EncoderLoadError, match="tokenizer directory not found"):
        load_text_encoder(tmp_path)
    torch.save({"shared.weight": torch.zeros(4, 4), "encoder.final_layer_norm.weight": torch.zeros(4)},
               tmp_path / "hf.pth")
    with pytest.raises(EncoderLoadError, match="Hugging Face T5"):
        load_t5(tmp_path / "hf.pth")
    sd = torch.load(ckpt / T5_FILE, weights_only=True)
    del sd["blocks.1.ffn.fc2.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(EncoderLoadError, match="1 missing: blocks.1.ffn.fc2.weight"):
        load_t5(tmp_path / "broken.pth")
    # an embedding table smaller than the tokenizer: wrong pairing
    small = tmp_path / "small"
    write_tiny_tokenizer(small / TOKENIZER_DIR)
    write_random_t5(small / T5_FILE, **dict(TINY, vocab=16))
    with pytest.raises(EncoderLoadError, match="does not belong"):
        load_text_encoder(small)


def test_published_size():
    from liveact.tools.random_assets import encoder_sizes
    with torch.device("meta"):
        m = T5Encoder(**encoder_sizes("liveact-18b")["t5"])
    assert sum(p.numel() for p in m.parameters()) == 5_680_910_336  # 5.68 B incl. the embedding
