"""Sequence parallelism of the LiveAct DiT over N ranks (ring attention), exact w.r.t. one GPU.

The split: every latent frame's Fl tokens are divided into N contiguous parts of m = Fl / N
tokens (raster order h*grid_w + w), and rank r owns part r of EVERY frame:

    chunk token  f*Fl + r*m + j     (f = 0..F-1, j = 0..m-1)   <->  rank r, local row f*m + j
    cache row    s*Fl + r*m + j     (slot s = 0..13)           <->  rank r, local row s*m + j

So a rank holds m tokens of each of the chunk's F frames (6 or 8: any N dividing Fl works for both
chunk kinds) and the same m rows of each of the 14 cache slots: 14*m rows per layer, 1/N of the
cache, FP8 scales included.  No rank ever holds the whole cache.  The rule: **N must divide
Fl = grid_h * grid_w** (416x720: Fl = 1170 -> N in 1, 2, 3, 5, 6, 9, 10, ...); otherwise a
ValueError names the valid N.

Why this split keeps the single-GPU model unchanged:
- the published model's local work is per token (GEMMs, norms, cross-attention) or per frame
  (audio attention: a frame's tokens attend to that frame's 32 audio tokens).  With m tokens of
  every frame per rank, the rank's tokens reshape to [F, m] exactly like the full chunk reshapes
  to [F, Fl]; global frame 0 (the chunk-0 audio zeroing) is each rank's first m rows.
  `Block.forward` therefore runs unchanged with `ShardRope` (a `Rope3D` whose tokens_per_frame
  is m and whose table holds the rank's rows at their GLOBAL (time, row, column) positions).
- self-attention: each rank writes its own rows into its cache shard, rotates its queries and its
  keys at global positions, and the ring (runtime/ring.py) merges the attention over all shards.
- ConvKV memory (shared/SPEC.md 4.2/4.3, same layout as one GPU): slots 4,5 <- 12,13 is a local
  copy (same rows of each slot).  slot 2 <- C(slots 2..6) and slot 3 <- C(slots 7..11): output
  token t of a slot reads span tokens 5t..5t+4 of the 5 concatenated source slots, so rank r (out
  tokens r*m..r*m+m-1) needs span tokens [5rm, 5rm+5m).  The ranks exchange exactly those rows
  (one batched point-to-point round per layer-cache), then each compresses locally.
- the velocity: each rank runs the head on its tokens; one all_gather rebuilds [16, F, h, w].

Usage (every rank runs the same program; see `launch_info()` in runtime/ring.py):

    info = launch_info(); sp = info.sequence_parallel()
    forward = install_sequence_parallel(model, sp)   # model.ops <- SPOps(model.ops, sp)
    caches = model.alloc_caches(Fl)                   # 1/N of the rows on each rank
    model.memory_update(caches, Fl)                   # before chunks n >= 2 (exchanges rows)
    v = forward(latent, y, e, e0, context, audio_kv, caches, rope, chunk)   # = sp_forward(..., sp)

Check on GPUs (NCCL):  torchrun --nproc-per-node 2 -m liveact.runtime.sequence_parallel
(the tiny model, SP against the single-process forward on every rank; rank 0 prints the errors).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.dit import ChunkLayout, Context, LiveActDiT
from ..model.ops import LayerKV
from ..model.rope import Rope3D
from .ring import SequenceParallel, ring_attention_prepared

MEMORY_SLOTS = (2, 7)  # first source slot of the two compressed memory slots (2 <- 2..6, 3 <- 7..11)
SPAN = 5               # ConvKV kernel = stride = 5 source slots per compressed slot


# ---------------------------------------------------------------------------------------- the split rule
def valid_world_sizes(tokens_per_frame: int, limit: int = 64):
    return [n for n in range(1, min(limit, tokens_per_frame) + 1) if tokens_per_frame % n == 0]


def local_tokens_per_frame(tokens_per_frame: int, world: int, grid=None) -> int:
    """m = Fl / N, or a ValueError naming the valid N (and, given grid=(h, w), the patch grid)."""
    if world < 1:
        raise ValueError(f"the number of sequence-parallel ranks must be >= 1, got {world}")
    if tokens_per_frame % world:
        g = f" (a {grid[0]}x{grid[1]} patch grid)" if grid else ""
        raise ValueError(
            f"sequence parallelism over {world} ranks splits each latent frame's Fl = {tokens_per_frame} "
            f"tokens{g} evenly among the ranks, so the number of ranks must divide {tokens_per_frame}: "
            f"valid rank counts are {', '.join(map(str, valid_world_sizes(tokens_per_frame)))}; "
            f"or pick a --size whose (height/16)*(width/16) is divisible by {world}")
    return tokens_per_frame // world


def check_sequence_parallel(geometry, world: int) -> int:
    """Call early (inside ring.rank0_errors): m = Fl / N for a VideoGeometry, or the ValueError."""
    return local_tokens_per_frame(geometry.tokens_per_frame, world, (geometry.grid_h, geometry.grid_w))


class ShardRope(Rope3D):
    """The RoPE table rows of one rank's tokens: rows r*m..r*m+m-1 of every frame, at their global
    (time, row, column) positions.  tokens_per_frame = m, so `table(frame0, frames)` returns the
    factors of the rank's local rows of frames frame0.. (local row f*m + j)."""

    def __init__(self, rope: Rope3D, rank: int, world: int):
        fl = rope.tokens_per_frame
        m = local_tokens_per_frame(fl, world, (rope.grid_h, rope.grid_w))
        self.grid_h, self.grid_w, self.num_frames, self.head_dim = rope.grid_h, rope.grid_w, rope.num_frames, rope.head_dim
        self.global_tokens_per_frame, self.rank, self.world = fl, rank, world
        self.tokens_per_frame = m
        full = rope.full.reshape(rope.num_frames, fl, -1)
        self.full = full[:, rank * m:(rank + 1) * m].reshape(rope.num_frames * m, -1).contiguous()


def shard_rope(rope: Rope3D, sp: SequenceParallel) -> ShardRope:
    """The rank's ShardRope for a global Rope3D (built once per table and kept on `sp`)."""
    if isinstance(rope, ShardRope):
        if (rope.rank, rope.world) != (sp.rank, sp.world):
            raise ValueError(f"ShardRope of rank {rope.rank}/{rope.world} used on rank {sp.rank}/{sp.world}")
        return rope
    key = (id(rope), rope.full.device)
    cached = sp._shard_ropes.get(key)
    if cached is None or cached[0] is not rope:
        if len(sp._shard_ropes) >= 8:  # a few geometries at most; drop stale tables
            sp._shard_ropes.clear()
        cached = (rope, ShardRope(rope, sp.rank, sp.world))
        sp._shard_ropes[key] = cached
    return cached[1]


def shard_tokens(x: torch.Tensor, tokens_per_frame: int, sp: SequenceParallel) -> torch.Tensor:
    """Full-chunk rows [B, F*Fl, ...] -> this rank's rows [B, F*m, ...] (m of every frame)."""
    m = local_tokens_per_frame(tokens_per_frame, sp.world)
    b, l = x.shape[:2]
    f = l // tokens_per_frame
    x = x.reshape(b, f, sp.world, m, *x.shape[2:])[:, :, sp.rank]
    return x.reshape(b, f * m, *x.shape[3:]).contiguous()


def gather_tokens(x: torch.Tensor, frames: int, sp: SequenceParallel) -> torch.Tensor:
    """Inverse of shard_tokens on every rank: local [B, F*m, ...] -> full [B, F*Fl, ...] (all_gather)."""
    g = sp.all_gather(x)                                    # [N, B, F*m, ...]
    n, b, l = g.shape[:3]
    m = l // frames
    g = g.reshape(n, b, frames, m, *g.shape[3:]).movedim(0, 2)  # [B, F, N, m, ...]
    return g.reshape(b, frames * n * m, *g.shape[4:])


def gather_kv(kv: LayerKV, tokens_per_frame: int, sp: SequenceParallel, dtype=torch.float32, read=None) -> tuple:
    """Test / debug helper: the FULL K, V [B, slots*Fl, H, D] of a sharded cache, dequantized to
    `dtype`, on every rank (`read` = the base ops' kv_read; default ReferenceOps's format)."""
    if read is None:
        from ..model.ops import ReferenceOps
        read = ReferenceOps().kv_read
    m = local_tokens_per_frame(tokens_per_frame, sp.world)
    k, v = read(kv, 0, kv.k.shape[1], dtype)
    return tuple(gather_tokens(t, t.shape[1] // m, sp) for t in (k, v))


# ---------------------------------------------------------------------------------------- memory exchange plan
class MemoryPlan:
    """Which local cache rows each rank sends to which, for the ConvKV memory update.

    Rows are counted in a local window of the 10 source slots 2..11 (local rows 2m..12m).
    The destination buffer of a rank is [10m] rows: the 5m span tokens that its part of slot 2
    reads (span 2..6, positions 5rm..5rm+5m-1, in order), then the 5m tokens for slot 3 (span 7..11).
    """

    def __init__(self, tokens_per_frame: int, rank: int, world: int, device):
        fl, m = tokens_per_frame, local_tokens_per_frame(tokens_per_frame, world)
        # who owns which span token, and where it goes:  (dest, owner) -> [(owner_row, dest_pos)]
        pairs: dict = {}
        for dest in range(world):
            for i, a in enumerate(MEMORY_SLOTS):
                for p in range(SPAN * dest * m, SPAN * (dest + 1) * m):
                    slot, q = a + p // fl, p % fl
                    owner = q // m
                    owner_row = (slot - MEMORY_SLOTS[0]) * m + q % m
                    dest_pos = i * SPAN * m + (p - SPAN * dest * m)
                    pairs.setdefault((dest, owner), []).append((owner_row, dest_pos))
        idx = lambda lst, j: torch.tensor([t[j] for t in lst], dtype=torch.long, device=device)
        me = pairs.get((rank, rank), [])
        self.self_src, self.self_dst = idx(me, 0), idx(me, 1)
        self.send = {d: idx(lst, 0) for (d, o), lst in pairs.items() if o == rank and d != rank}
        self.recv = {o: idx(lst, 1) for (d, o), lst in pairs.items() if d == rank and o != rank}
        self.m = m


def exchange_memory_rows(window: torch.Tensor, plan: MemoryPlan, sp: SequenceParallel) -> torch.Tensor:
    """window [2 (K, V), B, 10m, H, D]: this rank's rows of slots 2..11 -> [2, B, 10m, H, D]:
    the span tokens this rank's parts of slots 2 and 3 compress (MemoryPlan order)."""
    out = torch.full_like(window, float("nan"))  # every row is written exactly once
    out[:, :, plan.self_dst] = window[:, :, plan.self_src]
    sends = {d: window.index_select(2, rows) for d, rows in plan.send.items()}
    recvs = {o: window.new_empty(window.shape[:2] + (len(pos),) + window.shape[3:]) for o, pos in plan.recv.items()}
    sp.exchange(sends, recvs)
    for o, pos in plan.recv.items():
        out[:, :, pos] = recvs[o]
    return out


# ---------------------------------------------------------------------------------------- the ops wrapper
class SPOps:
    """Ops for sequence parallelism: everything is delegated to `base` except

    - alloc_kv: 1/N of the rows (this rank's m rows of every slot), in the base's cache format;
    - self_attention: local q/k norm, cache write and RoPE at global positions, ring attention;
    - kv_memory_update: the exact single-GPU ConvKV update with the row exchange.

    Install with `install_sequence_parallel(model, sp)` (or `model.set_ops(SPOps(base, sp))` for
    fresh, unprepared base ops) before allocating the caches, and run chunks with `sp_forward`.
    """

    def __init__(self, base, sp: SequenceParallel):
        self.base, self.sp = base, sp
        self.name = f"sp{sp.world}+{getattr(base, 'name', type(base).__name__)}"
        self._plans: dict = {}

    def __getattr__(self, item):  # only called for attributes not found on SPOps
        base = self.__dict__.get("base")
        if base is None:
            raise AttributeError(item)
        return getattr(base, item)

    def prepare(self, model) -> None:
        self.base.prepare(model)

    # ------------------------------------------------------------------ sharded cache
    def alloc_kv(self, batch: int, tokens: int, heads: int, head_dim: int, dtype, device, fp8: bool = False) -> LayerKV:
        """`tokens` = the full cache rows (slots * Fl); this rank allocates tokens / N of them."""
        if tokens % 14 == 0:  # the 14-slot step cache: name the valid N for its Fl
            local_tokens_per_frame(tokens // 14, self.sp.world)
        if tokens % self.sp.world:
            raise ValueError(f"a cache of {tokens} rows cannot be split over {self.sp.world} ranks; "
                             "the number of ranks must divide the tokens per frame")
        return self.base.alloc_kv(batch, tokens // self.sp.world, heads, head_dim, dtype, device, fp8=fp8)

    def kv_memory_update(self, kv: LayerKV, weight: Optional[torch.Tensor], tokens_per_frame: int,
                         dtype=torch.bfloat16) -> None:
        """shared/SPEC.md 4.2 step 3 on the sharded cache; `tokens_per_frame` is the GLOBAL Fl.
        slot 2 <- C(2..6), slot 3 <- C(7..11), slots 4,5 <- 12,13; sources read before writing."""
        base, sp = self.base, self.sp
        if sp.world == 1:  # nothing to exchange: the base's own (fused) update is the same computation
            return base.kv_memory_update(kv, weight, tokens_per_frame, dtype)
        m = local_tokens_per_frame(tokens_per_frame, sp.world)
        if kv.k.shape[1] < 14 * m:
            raise ValueError(f"kv_memory_update: this rank's cache has {kv.k.shape[1]} rows, expected 14*Fl/N = "
                             f"{14 * m} (Fl = {tokens_per_frame}, N = {sp.world}); pass the global Fl")
        key = (tokens_per_frame, kv.k.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = MemoryPlan(tokens_per_frame, sp.rank, sp.world, kv.k.device)
        k_w, v_w = base.kv_read(kv, 2 * m, 12 * m, dtype)            # local rows of slots 2..11
        src = exchange_memory_rows(torch.stack([k_w, v_w]), plan, sp)  # [2, B, 10m, H, D]
        half = SPAN * m
        new = [(base.convkv_compress(src[0][:, i * half:(i + 1) * half].contiguous(), weight),
                base.convkv_compress(src[1][:, i * half:(i + 1) * half].contiguous(), weight)) for i in range(2)]
        for t in kv.tensors():  # raw local copy of slots 12, 13 -> 4, 5 (values and fp8 scales)
            t[:, 4 * m:6 * m] = t[:, 12 * m:14 * m].clone()
        for i, (kc, vc) in enumerate(new):
            base.kv_write(kv, (2 + i) * m, kc, vc)

    # ------------------------------------------------------------------ ring self-attention
    def self_attention(self, q, k, v, norm_q, norm_k, eps: float, kv: LayerKV, rope: Rope3D,
                       q_frame0: int, write_start: int) -> torch.Tensor:
        """The base ops' self_attention on this rank's rows (rope must be the rank's ShardRope, so
        write_start = q_frame0 * m is the local cache row), with the attention run as a ring over
        the key shards of all ranks.  Returns [B, L_local, H*D]."""
        if not isinstance(rope, ShardRope):
            raise ValueError("SPOps.self_attention needs the rank's ShardRope: run the chunk with "
                             "sp_forward(...) (or pass shard_rope(rope, sp) to the blocks)")
        b, l, h, d = q.shape
        # the base ops' own (fused) preparation on this rank's rows: norms, cache write, RoPE at the
        # ShardRope's global positions, quantization; then the ring over the prepared key shards
        qp, kvp = self.base.prepare_self_attention(q, k, v, norm_q, norm_k, eps, kv, rope, q_frame0, write_start)
        return ring_attention_prepared(qp, kvp, self.sp, self.base.attend_prepared,
                                       out_dtype=q.dtype).reshape(b, l, h * d)


# ---------------------------------------------------------------------------------------- the step
@torch.no_grad()
def sp_forward(model: LiveActDiT, latent, y, e, e0, context: Context, audio_kv, caches, rope: Rope3D,
               chunk: ChunkLayout, sp: SequenceParallel) -> torch.Tensor:
    """LiveActDiT.forward with this rank's tokens: same arguments (caches = this rank's shards
    from model.alloc_caches under SPOps, rope = the global Rope3D), same result on every rank:
    the full velocity [16, F, h, w]."""
    ops = model.ops
    if not isinstance(ops, SPOps) or ops.sp is not sp:
        raise ValueError("sp_forward needs the model's ops to be SPOps(base, sp) for this group: "
                         "call model.set_ops(SPOps(base_ops, sp)) before allocating the caches")
    _, f, h, w = latent.shape
    srope = shard_rope(rope, sp)
    x = shard_tokens(model.patchify(latent, y), rope.tokens_per_frame, sp)  # [1, F*m, D]
    for i, blk in enumerate(model.blocks):
        x = blk(ops, x, e0, context.per_block[i], None if audio_kv is None else audio_kv[i], caches[i], srope, chunk)
    out = model.head_out(x, e)                                              # [1, F*m, 64]
    return model.unpatchify(gather_tokens(out, f, sp), f, h // 2, w // 2)


def install_sequence_parallel(model: LiveActDiT, sp: SequenceParallel):
    """Wrap the model's (already prepared) ops in SPOps, unless done already, and return a callable
    with LiveActDiT.forward's signature that runs `sp_forward`.  Allocate the caches afterwards."""
    if not (isinstance(model.ops, SPOps) and model.ops.sp is sp):
        model.ops = SPOps(model.ops, sp)  # not set_ops: the base ops' prepare() has run already

    def forward(latent, y, e, e0, context, audio_kv, caches, rope, chunk):
        return sp_forward(model, latent, y, e, e0, context, audio_kv, caches, rope, chunk, sp)
    return forward


# ---------------------------------------------------------------------------------------- self-check
def _selfcheck(size: str = "96*64", chunks: int = 4, fp8: bool = False) -> float:
    """Tiny model, `chunks` chunks: SP on this group vs the single-process forward (computed on
    every rank with a second, unsharded cache).  Returns the largest velocity rel. error."""
    from ..model import VideoGeometry, get_preset
    from ..model.checkpoint import build_empty, init_random_
    from .ring import launch_info, rank0_errors

    info = launch_info()
    with rank0_errors(info.rank):
        g = VideoGeometry.parse(size)
        check_sequence_parallel(g, info.world_size)
    sp = info.sequence_parallel()
    cfg = get_preset("tiny")
    ref = init_random_(build_empty(cfg, info.device, torch.float32))
    model = init_random_(build_empty(cfg, info.device, torch.float32))
    forward = install_sequence_parallel(model, sp)
    gen = torch.Generator(device=info.device).manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=info.device)
    txt, clip = rnd(20, cfg.text_dim), rnd(1, 257, cfg.clip_dim)
    ctx, ctx_ref = model.embed_context(txt, clip), ref.embed_context(txt, clip)
    audio = ref.embed_audio(rnd(1, 53, 5, cfg.audio_layers, cfg.audio_channels))
    rope = Rope3D(g.grid_h, g.grid_w, device=info.device)
    caches, caches_ref = model.alloc_caches(g.tokens_per_frame, fp8), ref.alloc_caches(g.tokens_per_frame, fp8)
    worst = 0.0
    for n in range(chunks):
        ch = ChunkLayout.for_chunk(n)
        lat, y = rnd(16, ch.frames, g.lat_h, g.lat_w), rnd(20, ch.frames, g.lat_h, g.lat_w)
        e, e0 = ref.embed_time(torch.tensor([937.5], device=info.device))
        if n >= 2:
            model.memory_update(caches, g.tokens_per_frame)
            ref.memory_update(caches_ref, g.tokens_per_frame)
        v = forward(lat, y, e, e0, ctx, model.chunk_audio_kv(audio, ch), caches, rope, ch)
        v_ref = ref(lat, y, e, e0, ctx_ref, ref.chunk_audio_kv(audio, ch), caches_ref, rope, ch)
        err = ((v - v_ref).norm() / v_ref.norm()).item()
        worst = max(worst, err)
        if info.is_main:
            print(f"chunk {n} ({ch.frames} frames): velocity rel. error {err:.2e}", flush=True)
    if info.is_main:
        print(f"sequence parallel over {sp.world} ranks ({sp.backend}, {info.device.type}), size {size}, "
              f"fp8 cache {fp8}: max rel. error {worst:.2e}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return worst


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="sequence-parallel self-check on the tiny model (run under torchrun)")
    ap.add_argument("--size", default="96*64")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--fp8-kv-cache", action="store_true")
    a = ap.parse_args()
    worst = _selfcheck(a.size, a.chunks, a.fp8_kv_cache)
    raise SystemExit(0 if worst < (5e-3 if a.fp8_kv_cache else 1e-4) else 1)
