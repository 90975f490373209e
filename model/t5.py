"""umT5-XXL text encoder of `models_t5_umt5-xxl-enc-bf16.pth` (shared/SPEC-ENCODERS.md 3).

Wan's own T5Encoder, eval mode:

    x = token_embedding(ids)                                         # [L, 4096]
    for blk in blocks:                                               # 24 pre-norm blocks
        x += o( softmax_fp32( q k^T + bias_i(k_pos - q_pos) + mask ) v )   # NO 1/sqrt(d) scaling, 64 heads
        x += fc2( fc1(x') * GELU_tanh(gate.0(x')) ),  x' = norm2(x)   # gated-GELU FFN, no biases
    x = norm(x)                                                      # T5 RMSNorm (fp32 variance, eps 1e-6)

Each block owns its relative-position table (umT5: 32 buckets x heads, bidirectional, max distance 128).

Tokenizer: `AutoTokenizer.from_pretrained(<ckpt>/google/umt5-xxl)`; text cleaned as published (ftfy repair when
ftfy is installed -- it is not a dependency, see `clean_text` -- then HTML-unescape twice, collapse whitespace),
special tokens on (appends `</s>`), padding to text_len = 512 with truncation.  The encoder runs on the real tokens
only (identical outputs at those positions: pad keys are masked and the bias depends only on offsets) and returns
[L_txt, dim] cut to the true token count (EOS included).  `device="cpu"` runs it on the CPU (`--t5-cpu`).

Widths, depth, heads and bucket count are read from the tensor shapes, so a tiny random encoder
(`write_random_t5`, with `write_tiny_tokenizer`) loads through the same code.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import key_mismatch_lines

from .clip import EncoderLoadError, _materialize, _torch_load

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
TEXT_LEN = 512


class T5RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5RelativeEmbedding(nn.Module):
    def __init__(self, num_buckets, num_heads, bidirectional=True, max_dist=128):
        super().__init__()
        self.num_buckets, self.num_heads = num_buckets, num_heads
        self.bidirectional, self.max_dist = bidirectional, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq, lk):
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device).unsqueeze(0) - torch.arange(lq, device=device).unsqueeze(1)
        bias = self.embedding(self._bucket(rel))  # [lq, lk, heads]
        return bias.permute(2, 0, 1).unsqueeze(0)  # [1, heads, lq, lk]

    def _bucket(self, rel):
        if self.bidirectional:
            nb = self.num_buckets // 2
            buckets = (rel > 0).long() * nb
            rel = rel.abs()
        else:
            nb = self.num_buckets
            buckets = 0
            rel = -torch.min(rel, torch.zeros_like(rel))
        max_exact = nb // 2
        large = max_exact + (torch.log(rel.float() / max_exact) / math.log(self.max_dist / max_exact)
                             * (nb - max_exact)).long()
        large = torch.min(large, torch.full_like(large, nb - 1))
        return buckets + torch.where(rel < max_exact, rel, large)


class T5Attention(nn.Module):
    def __init__(self, dim, dim_attn, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x, mask=None, pos_bias=None):
        b, s, _ = x.shape
        n, c = self.num_heads, self.head_dim
        q, k, v = (f(x).view(b, s, n, c).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn_bias = x.new_zeros(b, n, s, s)
        if pos_bias is not None:
            attn_bias = attn_bias + pos_bias
        if mask is not None:  # [b, s] key mask
            attn_bias = attn_bias.masked_fill(mask.view(b, 1, 1, s) == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("bnic,bnjc->bnij", q, k) + attn_bias  # no 1/sqrt(d) scaling
        attn = F.softmax(attn.float(), dim=-1).type_as(attn)
        out = torch.einsum("bnij,bnjc->bnic", attn, v).transpose(1, 2).reshape(b, s, n * c)
        return self.o(out)


class T5FeedForward(nn.Module):
    def __init__(self, dim, dim_ffn):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, dim, dim_attn, dim_ffn, num_heads, num_buckets):
        super().__init__()
        self.norm1 = T5RMSNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5RMSNorm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads, bidirectional=True)

    def forward(self, x, mask=None):
        e = self.pos_embedding(x.size(1), x.size(1))
        x = x + self.attn(self.norm1(x), mask=mask, pos_bias=e)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    def __init__(self, vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                 num_buckets=32):
        super().__init__()
        self.dim = dim
        self.token_embedding = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([T5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets)
                                     for _ in range(num_layers)])
        self.norm = T5RMSNorm(dim)

    def forward(self, ids, mask=None):
        x = self.token_embedding(ids)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------
# text cleaning and tokenizer

def clean_text(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy.fix_text (only if ftfy is installed; it repairs mojibake and is a no-op
    on clean UTF-8 text), html.unescape twice, strip, collapse whitespace runs to one space, strip."""
    try:
        import ftfy  # optional, not a dependency
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(tokenizer_dir):
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise EncoderLoadError(f"{d}: tokenizer directory not found. The LiveAct checkpoint directory holds it as "
                               f"{TOKENIZER_DIR}/ (tokenizer.json, tokenizer_config.json, ...).")
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise EncoderLoadError(f"{d}: transformers cannot load a tokenizer from it ({type(e).__name__}: {e}). "
                               f"Use the published {TOKENIZER_DIR} directory.") from None


class TextEncoder:
    """Tokenizer + umT5 encoder.  `encode(prompt) -> [L_txt, dim]` on `device` (bf16)."""

    def __init__(self, model: T5Encoder, tokenizer, text_len: int = TEXT_LEN, device="cpu"):
        self.model, self.tokenizer, self.text_len, self.device = model, tokenizer, text_len, torch.device(device)
        vocab = model.token_embedding.num_embeddings
        if len(tokenizer) > vocab:
            raise EncoderLoadError(f"tokenizer has {len(tokenizer)} tokens but the T5 embedding only {vocab} rows: "
                                   "the tokenizer directory does not belong to this T5 file")

    def tokenize(self, texts):
        texts = [clean_text(t) for t in texts]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        ids, mask = self.tokenize([prompt])
        n = int(mask[0].sum())
        # running on the real tokens only gives the same outputs at those positions (SPEC-ENCODERS 3.1)
        return self.model(ids[:, :n].to(self.device))[0]

    def encode_many(self, prompts):
        return [self.encode(p) for p in prompts]


def t5_config_from_state_dict(sd: dict, where: str = T5_FILE) -> dict:
    need = ("token_embedding.weight", "norm.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
            "blocks.0.pos_embedding.embedding.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        hint = " (this looks like a Hugging Face T5 checkpoint; Wan's key layout is needed)" \
            if any(k.startswith(("encoder.", "shared.")) for k in sd) else ""
        raise EncoderLoadError(f"{where}: not a Wan umT5 encoder state dict, missing {missing}{hint}. Use the "
                               f"published {T5_FILE}.")
    vocab, dim = sd["token_embedding.weight"].shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    nb, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    return dict(vocab=vocab, dim=dim, dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
                dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=heads, num_layers=len(layers),
                num_buckets=nb)


def load_t5(ckpt_dir_or_file, device="cpu", dtype=torch.bfloat16) -> T5Encoder:
    path = Path(ckpt_dir_or_file)
    if path.is_dir():
        path = path / T5_FILE
    sd = _torch_load(path)
    cfg = t5_config_from_state_dict(sd, str(path))
    with torch.device("meta"):  # no memory until the target device/dtype is known (fp32 XXL would be 23 GB)
        model = T5Encoder(**cfg)
    want = model.state_dict()
    lines = key_mismatch_lines({k: v.shape for k, v in want.items()}, {k: v.shape for k, v in sd.items()})
    if lines:
        raise EncoderLoadError("\n".join([f"{path}: the T5 weights do not match the umT5 layout inferred from "
                                           f"their shapes {cfg}:", *lines,
                                           f"  Fix: use the published {T5_FILE} (or one written by write_random_t5)."]))
    return _materialize(model, sd, device, dtype)


def load_text_encoder(ckpt_dir, device="cpu", dtype=torch.bfloat16, text_len=TEXT_LEN) -> TextEncoder:
    """<ckpt_dir>/models_t5_umt5-xxl-enc-bf16.pth + <ckpt_dir>/google/umt5-xxl/ -> TextEncoder."""
    ckpt_dir = Path(ckpt_dir)
    tok = load_tokenizer(ckpt_dir / TOKENIZER_DIR)
    return TextEncoder(load_t5(ckpt_dir, device, dtype), tok, text_len, device)


# ---------------------------------------------------------------------------------------------------------
# random weights and a tiny offline tokenizer

def random_t5_state_dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                         num_buckets=32, seed=0, dtype=torch.bfloat16) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def put(k, v):  # convert tensor by tensor: the fp32 copy of the 18b encoder would need 23 GB at once
        sd[k] = v.to(dtype).contiguous()

    def lin(o, i):
        return (torch.rand(o, i, generator=gen) * 2 - 1) / math.sqrt(i)

    put("token_embedding.weight", torch.randn(vocab, dim, generator=gen))
    for i in range(num_layers):
        p = f"blocks.{i}."
        put(p + "norm1.weight", 1.0 + 0.1 * torch.randn(dim, generator=gen))
        for n in "qkv":
            put(p + f"attn.{n}.weight", lin(dim_attn, dim))
        put(p + "attn.o.weight", lin(dim, dim_attn))
        put(p + "norm2.weight", 1.0 + 0.1 * torch.randn(dim, generator=gen))
        put(p + "ffn.gate.0.weight", lin(dim_ffn, dim))
        put(p + "ffn.fc1.weight", lin(dim_ffn, dim))
        put(p + "ffn.fc2.weight", lin(dim, dim_ffn))
        put(p + "pos_embedding.embedding.weight", torch.randn(num_buckets, num_heads, generator=gen))
    put("norm.weight", 1.0 + 0.1 * torch.randn(dim, generator=gen))
    return sd


def write_random_t5(path, seed=0, dtype=torch.bfloat16, **cfg) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_t5_state_dict(seed=seed, dtype=dtype, **cfg), str(path))
    return path


_CORPUS = """A person is talking to the camera. A woman sings in a recording studio while playing the guitar.
A man performs stand-up comedy and makes a strange face. Bow forward, open the eyes wide, a wry smile, a puzzled
look, the hand waves in front of the face. The quick brown fox jumps over the lazy dog. Hello world.
一个人在说话。在录音室中的弹吉他，并深情演唱！陶醉的跟着音乐点头！一个人在表演脱口秀，做出奇怪的表情！
向前鞠个躬！睁大眼睛！苦笑！疑惑表情！手在面前挥动！她微笑着看着镜头，轻轻点头。他在舞台上唱歌。
0123456789 , . ! ? : ; ' " ( ) - """


def write_tiny_tokenizer(out_dir, vocab_size: int = 400, text_len: int = TEXT_LEN) -> Path:
    """Train a tiny SentencePiece-style Unigram tokenizer offline (`tokenizers` library) with T5 conventions
    (pad 0, eos `</s>` 1, unk 2, `</s>` appended, no BOS) and save it as a PreTrainedTokenizerFast directory
    that `AutoTokenizer.from_pretrained` loads offline.  Nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()] * 4
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=text_len)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out
