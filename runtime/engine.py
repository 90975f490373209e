"""The streaming engine: chunk after chunk, 3 flow steps each, one KV cache per step.

shared/SPEC.md section 4-5, single-GPU layout:
- chunk 0 has 6 latent frames and attends only to itself (cache slots 0-5); every later chunk has 8
  frames at slots 6-13 and attends to 14 slots = 16380 keys at 416x720;
- step i of chunk n attends to the K/V that chunk n-1 wrote *at the same step i* (Neighbor Forcing),
  so there are 3 independent caches (and 3 more for the null-audio CFG branch when audio_cfg > 1;
  only steps 1 and 2 use them);
- before chunks n >= 2, each step cache is compressed once (ConvKV memory, `model.memory_update`):
  slot 2 <- C(2..6), slot 3 <- C(7..11), slots 4,5 <- 12,13; memory is constant for any length;
- sampler: x0 = x - sigma_i v;  x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps  (sigma = t / 1000,
  t = 1000, 937.5, 833.33, 0), one randn per chunk plus one per step (the last one times 0);
  step 0 skips the audio branch; audio CFG v = v_null + cfg (v - v_null) at steps 1, 2.

Everything is allocated once per (size, chunk kind): caches, static graph inputs, outputs.  With
CUDA graphs on, each (chunk kind, step, branch) forward is captured on its second use (the first
runs eagerly and doubles as warm-up / autotune) and replayed from then on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..model.config import CACHE_FRAMES, TIMESTEPS, VideoGeometry
from ..model.dit import ChunkLayout, Context, LiveActDiT
from ..model.rope import Rope3D


@dataclass
class EngineOptions:
    fp8_kv_cache: bool = False
    mean_memory: bool = False
    audio_cfg: float = 1.0
    cuda_graphs: bool = True
    seed: int = 42


def chunk_kind(n: int) -> int:
    return 0 if n == 0 else 1


def video_frames_of_chunk(n: int, vae_scale: int = 4) -> int:
    """New video frames a chunk yields: 21 for chunk 0 (1 + 4*5), 32 afterwards."""
    lay = ChunkLayout.for_chunk(n)
    return 1 + vae_scale * (lay.frames - 1) if n == 0 else vae_scale * lay.frames


class EditPrompts:
    """Chunk-range prompt switches (shared/SPEC.md 5.7): chunk n uses the first (a, b, name) with
    a <= n <= b (inclusive), else the main prompt."""

    def __init__(self, ranges=()):
        self.ranges = []
        for a, b, name in ranges:
            a, b = int(a), int(b)
            if a > b or a < 0:
                raise ValueError(f"edit prompt range [{a}, {b}] is empty or negative; use [first_chunk, last_chunk]")
            self.ranges.append((a, b, name))

    def select(self, n: int, default="main"):
        for a, b, name in self.ranges:
            if a <= n <= b:
                return name
        return default


class _StepGraphs:
    """Eager call on first use, CUDA-graph capture on the second, replay afterwards."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and torch.cuda.is_available()
        self.graphs: dict = {}
        self.calls: dict = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def run(self, key, fn: Callable[[], None]):
        if not self.enabled:
            return fn()
        g = self.graphs.get(key)
        if g is not None:
            g.replay()
            return
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] == 1:
            return fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            fn()
        self.graphs[key] = g
        g.replay()


class StreamingEngine:
    """Generates latent chunks for one input at a time, in constant memory.

    Usage:
        eng = StreamingEngine(model, VideoGeometry.parse("416*720"), EngineOptions(...))
        eng.start(y, contexts={"main": ctx, ...}, edit_prompts=EditPrompts(...))
        for n in range(num_chunks):
            latent = eng.generate_chunk(n, audio_window)     # [16, F, h, w] clean latent (x0)
    """

    def __init__(self, model: LiveActDiT, geometry: VideoGeometry, options: EngineOptions | None = None,
                 sp=None):
        """sp: a runtime.ring.SequenceParallel to spread every chunk over its ranks (ring attention;
        each rank holds 1/N of the tokens and of every cache).  None = one device."""
        self.model, self.geo = model, geometry
        self.opt = options or EngineOptions()
        self.sp = sp
        self.fwd = model
        if sp is not None:
            from .sequence_parallel import check_sequence_parallel, install_sequence_parallel
            check_sequence_parallel(geometry, sp.world)
            self.fwd = install_sequence_parallel(model, sp)  # before the caches: they are sharded
        self.dtype, self.device = model.dtype, model.device
        fl = geometry.tokens_per_frame
        self.fl = fl
        self.rope = Rope3D(geometry.grid_h, geometry.grid_w, CACHE_FRAMES, model.cfg.head_dim, device=self.device)
        fp8 = self.opt.fp8_kv_cache
        self.caches = [model.alloc_caches(fl, fp8=fp8) for _ in range(3)]
        self.use_cfg = self.opt.audio_cfg > 1.0
        self.null_caches = {i: model.alloc_caches(fl, fp8=fp8) for i in (1, 2)} if self.use_cfg else {}
        ts = torch.tensor(TIMESTEPS, dtype=torch.float32, device=self.device)
        self.sigmas = [ts[i] / 1000 for i in range(4)]  # 0-dim fp32 scalars, as published
        self.time_emb = [model.embed_time(torch.tensor([t], device=self.device)) for t in TIMESTEPS[:3]]
        # collectives inside captured graphs are not validated yet: eager steps under sequence parallelism
        self.graphs = _StepGraphs(self.opt.cuda_graphs and self.device.type == "cuda" and sp is None)
        self._static = {}
        self._null_audio_tokens = None
        self.contexts: dict[str, Context] = {}
        self.edit_prompts = EditPrompts()
        self.gen: Optional[torch.Generator] = None

    # ------------------------------------------------------------------ static buffers
    def _buffers(self, kind: int):
        """Static per-chunk-kind inputs/outputs: noisy latent, y slice, context K/V, audio K/V, velocity."""
        if kind in self._static:
            return self._static[kind]
        lay = ChunkLayout.for_chunk(kind)
        cfg, g = self.model.cfg, self.geo
        shape = (cfg.out_dim, lay.frames, g.lat_h, g.lat_w)
        z = lambda *s, dt=self.dtype: torch.zeros(*s, dtype=dt, device=self.device)
        hd = (cfg.num_heads, cfg.head_dim)
        buf = dict(
            layout=lay,
            latent=z(*shape), y=z(cfg.in_dim - cfg.out_dim, *shape[1:]),
            v=z(*shape), v_null=z(*shape),
            audio=[(z(lay.frames, cfg.context_tokens, *hd), z(lay.frames, cfg.context_tokens, *hd))
                   for _ in range(cfg.num_layers)],
            null_audio=[(z(lay.frames, cfg.context_tokens, *hd), z(lay.frames, cfg.context_tokens, *hd))
                        for _ in range(cfg.num_layers)] if self.use_cfg else None,
        )
        self._static[kind] = buf
        return buf

    def _context_buffers(self):
        if "ctx" not in self._static:
            any_ctx = next(iter(self.contexts.values()))
            self._static["ctx"] = Context([tuple(tuple(t.clone() for t in pair) for pair in blk)
                                           for blk in any_ctx.per_block])
            self._static["ctx_name"] = None
        return self._static["ctx"]

    def _use_context(self, name: str):
        buf = self._context_buffers()
        if self._static["ctx_name"] == name:
            return buf
        src = self.contexts[name]
        for dst_blk, src_blk in zip(buf.per_block, src.per_block):
            for dst_pair, src_pair in zip(dst_blk, src_blk):      # (k, v) + what the ops prepared from them
                for dt, st in zip(dst_pair, src_pair, strict=True):
                    dt.copy_(st)
        self._static["ctx_name"] = name
        return buf

    # ------------------------------------------------------------------ API
    def start(self, y: torch.Tensor, contexts: dict, edit_prompts: EditPrompts | None = None, seed: int | None = None):
        """Begin a new input: y [20, 14, h, w] (mask + reference latent), contexts {name: model.embed_context(...)}
        ('main' required), edit prompts, and the RNG seed (torch.manual_seed equivalent, once per input)."""
        if "main" not in contexts:
            raise ValueError("contexts must contain the main prompt under the name 'main'")
        self.contexts = dict(contexts)
        self.edit_prompts = edit_prompts or EditPrompts()
        for name in {n for _, _, n in self.edit_prompts.ranges}:
            if name not in self.contexts:
                raise ValueError(f"edit prompt {name!r} has no context; embed it with model.embed_context")
        self._static.pop("ctx", None)
        self._static.pop("ctx_name", None)
        for kind in (0, 1):
            buf = self._buffers(kind)
            lay = buf["layout"]
            buf["y"].copy_(y[:, :lay.frames] if kind == 0 else y[:, 6:14])
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(self.opt.seed if seed is None else seed)

    def _forward(self, kind: int, step: int, null: bool):
        buf, m = self._buffers(kind), self.fwd
        e, e0 = self.time_emb[step]
        audio = None if step == 0 else (buf["null_audio"] if null else buf["audio"])
        caches = self.null_caches[step] if null else self.caches[step]
        out = buf["v_null"] if null else buf["v"]

        def fn():
            out.copy_(m(buf["latent"], buf["y"], e, e0, self._static["ctx"], audio, caches, self.rope, buf["layout"]))
        self.graphs.run((kind, step, null), fn)
        return out

    @torch.no_grad()
    def generate_chunk(self, n: int, audio_window: torch.Tensor,
                       on_step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Chunk n from its audio window [1, 53, window, layers, channels]; returns the clean latent
        [16, F, h, w] (a new tensor)."""
        if self.gen is None:
            raise RuntimeError("call start(...) before generate_chunk")
        m, kind = self.model, chunk_kind(n)
        buf = self._buffers(kind)
        lay: ChunkLayout = buf["layout"]
        self._use_context(self.edit_prompts.select(n))
        tokens = m.embed_audio(audio_window.to(self.device))
        for (dk, dv), (sk, sv) in zip(buf["audio"], m.chunk_audio_kv(tokens, lay)):
            dk.copy_(sk)
            dv.copy_(sv)
        if self.use_cfg:
            if self._null_audio_tokens is None:
                self._null_audio_tokens = m.embed_audio(torch.zeros_like(audio_window, device=self.device))
            for (dk, dv), (sk, sv) in zip(buf["null_audio"], m.chunk_audio_kv(self._null_audio_tokens, lay)):
                dk.copy_(sk)
                dv.copy_(sv)
        x = torch.randn(buf["latent"].shape, generator=self.gen, device=self.device, dtype=self.dtype)
        for i in range(3):
            if n >= 2:  # ConvKV memory update of this step's cache(s), before the chunk is written
                m.memory_update(self.caches[i], self.fl, self.opt.mean_memory)
                if self.use_cfg and i in self.null_caches:
                    m.memory_update(self.null_caches[i], self.fl, self.opt.mean_memory)
            buf["latent"].copy_(x)
            v = self._forward(kind, i, null=False)
            if self.use_cfg and i > 0:
                v_null = self._forward(kind, i, null=True)
                v = v_null + self.opt.audio_cfg * (v - v_null)
            sig, sig_next = self.sigmas[i], self.sigmas[i + 1]
            x0 = x - sig * v
            eps = torch.randn(x.shape, generator=self.gen, device=self.device, dtype=self.dtype)
            x = (1 - sig_next) * x0 + sig_next * eps
            if on_step:
                on_step(i)
        return x

    def cache_tensors(self):
        """Every cache tensor (for memory/storage checks)."""
        out = []
        for caches in list(self.caches) + list(self.null_caches.values()):
            for kv in caches:
                out.extend(kv.tensors())
        return out

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache_tensors())
