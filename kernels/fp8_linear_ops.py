"""FP8LinearOps: the ops seam with W8A8 FP8 linear layers (kernels/fp8_gemm.py) and fused producers
(kernels/norm_quant.py), chosen per layer by a precision policy.

Data flow inside a block (all on the GPU, FP8 layers):
    norm_modulate / layer_norm  -> QuantAct (e4m3 + per-token scales, one pass)   [bf16 if the consumer is bf16]
    qkv_linear                  -> one GEMM against the fused [3D, D] weight, q/k/v are column views
    linear (cross q, audio q)   -> GEMM (+ bias)
    linear_gelu                 -> GEMM + bias + GELU(tanh) epilogue (bf16 out; the FFN-down input is
                                   re-quantized by a row pass: its amax spans all 13824 columns)
    linear_gated_residual       -> quantize pass + GEMM + bias + gate + residual epilogue
    linear_residual             -> quantize pass + GEMM + bias + residual epilogue (skip_rows)
    rms_norm (cross-attn q)     -> one row pass, bf16 out (the torch chain cost ~31 ms per 416x720 step)
Everything else (attention, KV cache) is inherited from ReferenceOps.

Weights are quantized once in prepare(): per-output-channel scale = amax_row / 448, attached to the
Linear modules as `lin.w_fp8` (e4m3 [N, K]) and `lin.w_scale` (fp32 [N]); the self-attention q/k/v
weights are concatenated into `q.qkv_fp8` [3D, D] (+ `q.qkv_scale`, `q.qkv_bias`) and q/k/v's own
`w_fp8` are row views of it.  save_fp8_weights / load_fp8_weights keep that state in a safetensors file.

Precision policy: JSON {"default": "fp8" | "bf16", "bf16": [names or globs], "fp8": [names or globs]}, names
are module names such as "blocks.3.self_attn.q" (`tools/calibrate.py` writes one).  DEFAULT_POLICY keeps
the small per-prompt/per-step layers outside the blocks in bf16 and runs every block linear in FP8.

Fallback: without FP8 hardware (capability < 8.9, or CPU) every method is ReferenceOps' own, unless
`force_triton=True` (CPU tests run the Triton kernels through the interpreter that way).
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..model.ops import ReferenceOps
from .fp8_gemm import fp8_gemm, quantize_weight
from .norm_quant import FP8_DTYPE, QuantAct, interpreting, layer_norm_quant, norm_modulate_quant, quantize_rows
from .norm_quant import rms_norm as norm_rms

DEFAULT_POLICY = {
    "default": "fp8",
    "bf16": ["text_embedding.*", "time_embedding.*", "time_projection.*", "head.*", "img_emb.*", "audio_proj.*"],
}


class PrecisionPolicy:
    """Chooses FP8 or bf16 per Linear module name."""

    def __init__(self, spec: Optional[Union[dict, str, Path]] = None):
        if spec is None:
            spec = DEFAULT_POLICY
        elif isinstance(spec, (str, Path)):
            path = Path(spec)
            try:
                spec = json.loads(path.read_text())
            except FileNotFoundError:
                raise ValueError(f"precision policy {path}: not found; write one with `liveact calibrate` "
                                 "or pass none for the default policy") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"precision policy {path}: not valid JSON ({e})") from None
        if not isinstance(spec, dict) or spec.get("default", "fp8") not in ("fp8", "bf16"):
            raise ValueError('precision policy must be a JSON object like {"default": "fp8", "bf16": ["blocks.0.ffn.2"]}')
        unknown = set(spec) - {"default", "bf16", "fp8", "threshold", "errors", "note"}
        if unknown:
            raise ValueError(f"precision policy: unknown keys {sorted(unknown)}; allowed: default, bf16, fp8")
        self.default = spec.get("default", "fp8")
        self.bf16 = list(spec.get("bf16", []))
        self.fp8 = list(spec.get("fp8", []))
        self.spec = spec

    @staticmethod
    def _match(name, patterns):
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)

    def is_fp8(self, name: str) -> bool:
        if self._match(name, self.bf16):
            return False
        if self._match(name, self.fp8):
            return True
        return self.default == "fp8"

    def to_json(self) -> dict:
        return {"default": self.default, "bf16": self.bf16, **({"fp8": self.fp8} if self.fp8 else {})}


def fp8_supported(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _linear_modules(model):
    from ..model.dit import Linear
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Linear)]


def _eligible(lin) -> bool:
    n, k = lin.weight.shape
    return k % 16 == 0 and n % 8 == 0


def _clear(lin):
    for a in ("w_fp8", "w_scale", "qkv_fp8", "qkv_scale", "qkv_bias", "qkv_owner"):
        if hasattr(lin, a):
            delattr(lin, a)


def _attach_qkv(q, k, v, w, s):
    d = q.weight.shape[0]
    q.qkv_fp8, q.qkv_scale = w, s
    biases = [m.bias if m.bias is not None else torch.zeros(d, dtype=q.weight.dtype, device=w.device) for m in (q, k, v)]
    q.qkv_bias = torch.cat([b.detach() for b in biases])
    for i, m in enumerate((q, k, v)):
        m.w_fp8, m.w_scale = w[i * d:(i + 1) * d], s[i * d:(i + 1) * d]
        m.qkv_owner = (q,)  # a tuple: not registered as a submodule


def _in_fused(m) -> bool:
    owner = getattr(m, "qkv_owner", None)
    return owner is not None and getattr(owner[0], "qkv_fp8", None) is not None


class FP8LinearOps(ReferenceOps):
    """ReferenceOps with FP8 GEMMs and fused norm->quant producers for the layers the policy marks FP8."""

    name = "fp8"

    def __init__(self, policy=None, force_triton: bool = False, fast_accum: bool = False,
                 fp8_weights: Optional[Union[str, Path]] = None, free_bf16_weights: bool = False):
        """policy: dict / JSON path / PrecisionPolicy (None: DEFAULT_POLICY).  force_triton: run the Triton
        kernels even without FP8 hardware (CPU tests, interpreter).  fast_accum: accumulate all of K in the
        tensor core (faster, less precise).  fp8_weights: safetensors file to load the quantized weights from
        (written there after quantizing when it does not exist).  free_bf16_weights: after quantizing, replace
        the bf16 weights of FP8 layers by a 1-element NaN tensor expanded to their shape (saves 2 bytes per
        parameter, e.g. ~37 GB on liveact-18b; the model can then only run with these ops)."""
        self.policy = policy if isinstance(policy, PrecisionPolicy) else PrecisionPolicy(policy)
        self.force_triton = force_triton
        self.fast_accum = fast_accum
        self.fp8_weights = fp8_weights
        self.free_bf16_weights = free_bf16_weights
        self.enabled = False
        self._names = {}
        self._nm_mode = "bf16"
        self._ln_consumer = {}

    # ------------------------------------------------------------------ setup
    def prepare(self, model) -> None:
        dev = model.device
        if self.force_triton and dev.type == "cpu" and not interpreting():
            raise ValueError("force_triton on a CPU model needs the Triton interpreter: set TRITON_INTERPRET=1 "
                             "before importing triton")
        self.enabled = self.force_triton or fp8_supported(dev)
        if not self.enabled:
            return
        path = Path(self.fp8_weights) if self.fp8_weights else None
        if path is not None and path.exists():
            load_fp8_weights(model, path)
        mods = _linear_modules(model)
        self._names = {id(m): n for n, m in mods}
        want = {n: self.policy.is_fp8(n) and _eligible(m) for n, m in mods}
        with torch.no_grad():
            for i, blk in enumerate(getattr(model, "blocks", [])):
                sa, pre = blk.self_attn, f"blocks.{i}.self_attn"
                if all(want[f"{pre}.{x}"] for x in "qkv") and getattr(sa.q, "qkv_fp8", None) is None:
                    for m in (sa.q, sa.k, sa.v):
                        _clear(m)
                    w = torch.cat([sa.q.weight, sa.k.weight, sa.v.weight])
                    _attach_qkv(sa.q, sa.k, sa.v, *quantize_weight(w))
            for n, m in mods:
                if not want[n]:
                    _clear(m)
                elif getattr(m, "w_fp8", None) is None or m.w_fp8.shape != m.weight.shape:
                    m.w_fp8, m.w_scale = quantize_weight(m.weight)
        # which producers feed FP8 consumers
        nm = []
        self._ln_consumer = {}
        for blk in getattr(model, "blocks", []):
            sa = blk.self_attn
            nm += [self._is_fp8(sa.q) and self._is_fp8(sa.k) and self._is_fp8(sa.v), self._is_fp8(blk.ffn[0])]
            self._ln_consumer[id(blk.norm3.weight)] = blk.cross_attn.q
            self._ln_consumer[id(blk.norm_x.weight)] = blk.audio_cross_attn.q_linear
        self._nm_mode = "fp8" if nm and all(nm) else ("bf16" if not any(nm) else "both")
        if path is not None and not path.exists():
            save_fp8_weights(model, path)
        if self.free_bf16_weights:
            for _, m in mods:
                if self._is_fp8(m) and m.weight.untyped_storage().nbytes() > m.weight.element_size():
                    m.weight.data = torch.full((1, 1), float("nan"), dtype=m.weight.dtype,
                                               device=m.weight.device).expand(m.weight.shape)

    @staticmethod
    def _is_fp8(lin) -> bool:
        return getattr(lin, "w_fp8", None) is not None

    def fp8_layers(self, model) -> list:
        return [n for n, m in _linear_modules(model) if self._is_fp8(m)]

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _plain(x):
        return x.dequantize() if isinstance(x, QuantAct) else x

    def _use_fp8(self, x, lin) -> bool:
        return self.enabled and self._is_fp8(lin)

    @staticmethod
    def _quant(x) -> QuantAct:
        return x if isinstance(x, QuantAct) else quantize_rows(x)

    def _gemm(self, x, w, s, bias, n, **kw):
        qa = self._quant(x)
        lead = qa.data.shape[:-1]
        out = fp8_gemm(qa, None, w, s, bias=bias, fast_accum=self.fast_accum,
                       out_dtype=kw.pop("out_dtype", qa.dtype), **kw)
        return out.view(*lead, n)

    # ------------------------------------------------------------------ linear layers
    def linear(self, x, lin) -> torch.Tensor:
        if not self._use_fp8(x, lin):
            return super().linear(self._plain(x), lin)
        return self._gemm(x, lin.w_fp8, lin.w_scale, lin.bias, lin.w_fp8.shape[0])

    def qkv_linear(self, x, q, k, v):
        if self.enabled and getattr(q, "qkv_fp8", None) is not None:
            d = q.weight.shape[0]
            y = self._gemm(x, q.qkv_fp8, q.qkv_scale, q.qkv_bias, 3 * d)
            return y[..., :d], y[..., d:2 * d], y[..., 2 * d:]
        if self.enabled and any(self._is_fp8(m) for m in (q, k, v)) and not isinstance(x, QuantAct):
            qa = quantize_rows(x)  # quantize once for the FP8 ones
            return tuple(self.linear(qa if self._is_fp8(m) else x, m) for m in (q, k, v))
        return tuple(self.linear(x, m) for m in (q, k, v))

    def linear_gelu(self, x, lin) -> torch.Tensor:
        if not self._use_fp8(x, lin):
            return super().linear_gelu(self._plain(x), lin)
        return self._gemm(x, lin.w_fp8, lin.w_scale, lin.bias, lin.w_fp8.shape[0], epilogue="gelu")

    def linear_gated_residual(self, x, lin, residual, gate) -> torch.Tensor:
        n = lin.weight.shape[0]
        if not self._use_fp8(x, lin) or gate.numel() != n or residual.shape[-1] != n:
            if self._use_fp8(x, lin):  # per-token gate: FP8 GEMM, torch epilogue
                return residual + self.linear(x, lin) * gate
            return super().linear_gated_residual(self._plain(x), lin, residual, gate)
        out = self._gemm(x, lin.w_fp8, lin.w_scale, lin.bias, n, epilogue="gated_residual",
                         residual=residual, gate=gate, out_dtype=residual.dtype)
        return out.view(residual.shape)

    def linear_residual(self, x, lin, residual, skip_rows: int = 0) -> torch.Tensor:
        n = lin.weight.shape[0]
        if not self._use_fp8(x, lin) or residual.shape[-1] != n:
            return super().linear_residual(self._plain(x), lin, residual, skip_rows)
        rows = residual.shape[1] if residual.dim() == 3 else residual.numel() // n
        out = self._gemm(x, lin.w_fp8, lin.w_scale, lin.bias, n, epilogue="residual", residual=residual,
                         skip_rows=skip_rows, rows_per_batch=rows, out_dtype=residual.dtype)
        return out.view(residual.shape)

    # ------------------------------------------------------------------ norms (producers)
    def norm_modulate(self, x, shift, scale, eps: float):
        if not self.enabled:
            return super().norm_modulate(x, shift, scale, eps)
        d, m = x.shape[-1], x.numel() // x.shape[-1]
        if shift.numel() not in (d, m * d) or scale.numel() != shift.numel():
            y = super().norm_modulate(x, shift, scale, eps)
            return quantize_rows(y) if self._nm_mode == "fp8" else y
        mode = self._nm_mode
        return norm_modulate_quant(x, shift, scale, eps, quant=mode != "bf16", keep_bf16=mode == "both")

    def rms_norm(self, x, weight, eps: float):
        """WanRMSNorm of the cross-attention q (and context k) in one Triton pass (bf16 out)."""
        if not self.enabled or weight is None or weight.numel() != x.shape[-1] or weight.dtype != x.dtype:
            return super().rms_norm(self._plain(x), weight, eps)
        return norm_rms(self._plain(x), weight, eps)

    def layer_norm(self, x, weight, bias, eps: float):
        if not self.enabled:
            return super().layer_norm(x, weight, bias, eps)
        consumer = self._ln_consumer.get(id(weight))
        quant = consumer is not None and self._is_fp8(consumer)
        return layer_norm_quant(x, weight, bias, eps, quant=quant)


# --------------------------------------------------------------------------------------------- FP8 state I/O
_META = {"format": "liveact-fp8-weights", "version": "1"}


def save_fp8_weights(model, path) -> Path:
    """Write the prepared FP8 weights (e4m3 + fp32 scales) of `model` to a safetensors file.

    Keys: "<linear>.w_fp8" / "<linear>.w_scale"; fused self-attention QKV as "<block>.self_attn.qkv.w_fp8"."""
    from safetensors.torch import save_file
    tensors = {}
    for name, m in _linear_modules(model):
        if getattr(m, "qkv_fp8", None) is not None:
            pre = name.rsplit(".", 1)[0]
            tensors[f"{pre}.qkv.w_fp8"] = m.qkv_fp8.contiguous()
            tensors[f"{pre}.qkv.w_scale"] = m.qkv_scale.contiguous()
        elif getattr(m, "w_fp8", None) is not None and not _in_fused(m):
            tensors[f"{name}.w_fp8"] = m.w_fp8.contiguous()
            tensors[f"{name}.w_scale"] = m.w_scale.contiguous()
    if not tensors:
        raise ValueError("the model has no FP8 weights to save: call model.set_ops(FP8LinearOps(...)) first "
                         "(on an FP8-capable GPU, or with force_triton=True)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(path), metadata=dict(_META))
    return path


def load_fp8_weights(model, path) -> list:
    """Attach the FP8 weights saved by save_fp8_weights to `model`'s Linear modules; returns the names loaded.
    FP8LinearOps.prepare then skips quantizing them (layers its policy keeps bf16 are dropped again)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: FP8 weight file not found; write it with save_fp8_weights(model, path)")
    dev = model.device
    loaded = []
    with safe_open(str(path), framework="pt", device="cpu") as f:
        if (f.metadata() or {}).get("format") != _META["format"]:
            raise ValueError(f"{path} is not a liveact FP8 weight file (save it with save_fp8_weights)")
        keys = set(f.keys())
        for key in sorted(k for k in keys if k.endswith(".w_fp8")):
            name = key[:-len(".w_fp8")]
            w, s = f.get_tensor(key).to(dev), f.get_tensor(name + ".w_scale").to(dev)
            try:
                if name.endswith(".qkv"):
                    sa = model.get_submodule(name[:-len(".qkv")])
                    if w.shape != (3 * sa.q.weight.shape[0], sa.q.weight.shape[1]):
                        raise ValueError
                    _attach_qkv(sa.q, sa.k, sa.v, w, s)
                else:
                    m = model.get_submodule(name)
                    if w.shape != m.weight.shape:
                        raise ValueError
                    m.w_fp8, m.w_scale = w, s
            except (AttributeError, ValueError):
                raise ValueError(f"{path}: {key} {tuple(w.shape)} does not fit this model; the file was saved "
                                 "for another checkpoint or config: delete it to re-quantize") from None
            if w.dtype != FP8_DTYPE:
                raise ValueError(f"{path}: {key} is {w.dtype}, expected float8_e4m3fn")
            loaded.append(name)
    return loaded
