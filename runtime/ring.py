"""Ring attention over a sequence-parallel process group, and the process-group set-up.

Each of the N ranks holds the queries of its own tokens and one shard of the keys/values.
Attention over the union of the shards runs as a ring (KERNELS.md 6):

    step s = 0 .. N-1:  post  send(current K/V shard -> rank+1), recv(next shard <- rank-1)
                        compute (o_s, lse_s) = attention_lse(q, current shard)
                        merge   (o, lse) <- merge_lse(o, lse, o_s, lse_s)        (fp32)
                        wait for the transfer; the received buffer becomes the current one

After N steps every rank has seen every shard once, so o = softmax(q K^T / sqrt(D)) V over all keys.
Two K/V buffers alternate (double buffering): the buffer being computed on is never received into.
With NCCL the transfer runs on NCCL's own stream and overlaps the local attention.

Merging two partial results (natural-log LSE of the scaled scores, per query and head):

    lse = log(e^lse1 + e^lse2) = logaddexp(lse1, lse2)          (max-shifted, stable)
    o   = e^(lse1 - lse) * o1 + e^(lse2 - lse) * o2               (both weights in [0, 1])

Traffic per ring step and rank: 2 * Sk * H * D elements (one K and one V shard).

The process group comes from `launch_info()` (torchrun environment: RANK, WORLD_SIZE,
LOCAL_RANK; NCCL on a GPU with NVLink multicast disabled, gloo on a CPU) and is wrapped in a
`SequenceParallel` handle that the model-level code (runtime/sequence_parallel.py) uses.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) stays off on the shared GPU hosts (device KINDS.md): set before NCCL starts.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


# ---------------------------------------------------------------------------------------- group handle
class SequenceParallel:
    """A sequence-parallel group: `world` ranks, this process is group rank `rank`.

    group=None means the default (world) process group; world=1 needs no process group at all
    (everything then runs locally, so the same code serves one GPU).
    """

    def __init__(self, group=None, rank: Optional[int] = None, world: Optional[int] = None):
        initialized = dist.is_available() and dist.is_initialized()
        if world is None:
            world = dist.get_world_size(group) if initialized else 1
        if rank is None:
            rank = dist.get_rank(group) if initialized else 0
        if world > 1 and not initialized:
            raise ValueError(f"sequence parallelism over {world} ranks needs an initialized process group; "
                             "call launch_info() (under torchrun) or torch.distributed.init_process_group first")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the group of {world} ranks")
        self.group, self.rank, self.world = group, rank, world
        self._shard_ropes: dict = {}

    def __repr__(self):
        return f"SequenceParallel(rank={self.rank}, world={self.world})"

    @property
    def backend(self) -> str:
        return dist.get_backend(self.group) if self.world > 1 else "none"

    def peer(self, group_rank: int) -> int:
        """Global rank of a group rank (P2P ops address global ranks)."""
        group_rank %= self.world
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    @property
    def next_peer(self) -> int:
        return self.peer(self.rank + 1)

    @property
    def prev_peer(self) -> int:
        return self.peer(self.rank - 1)

    def exchange(self, sends: dict, recvs: dict) -> None:
        """Batched point-to-point: sends {group_rank: tensor}, recvs {group_rank: tensor to fill}.
        Returns when every transfer has completed."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.peer(r), self.group) for r, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, t, self.peer(r), self.group) for r, t in recvs.items()]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[...] on every rank -> [world, ...] (rank order) on every rank."""
        x = x.contiguous()
        if self.world == 1:
            return x[None]
        out = torch.empty((self.world,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        if self.backend == "nccl":
            dist.all_gather_into_tensor(out, x, group=self.group)
        else:
            dist.all_gather(list(out.unbind(0)), x, group=self.group)
        return out


# ---------------------------------------------------------------------------------------- LSE merge
def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Merge two partial attentions of the same queries over disjoint key sets.

    o1, o2: [B, S, H, D] (each normalised over its own keys, any float dtype);
    lse1, lse2: [B, H, S] natural-log log-sum-exp of the scaled scores.
    Returns (o fp32 [B, S, H, D], lse fp32 [B, H, S]) = the attention over the union of the keys.
    """
    lse1, lse2 = lse1.float(), lse2.float()
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    w2 = torch.exp(lse2 - lse).transpose(1, 2).unsqueeze(-1)
    return w1 * o1.float() + w2 * o2.float(), lse


def _reference_attention_lse(q, k, v):
    d = q.shape[-1]
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / d ** 0.5
    o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.float())
    return o.to(q.dtype), torch.logsumexp(s, dim=-1)


# ---------------------------------------------------------------------------------------- the ring
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel,
                   attention_lse: Optional[Callable] = None, return_lse: bool = False):
    """Non-causal attention of this rank's queries over the keys/values of ALL ranks.

    q [B, Sq, H, D]: this rank's queries (RoPE already applied).
    k, v [B, Sk, H, D]: this rank's shard of the keys (rotated at their global positions) and
    values.  Every rank must pass the same Sk (the shards travel through fixed-size buffers).
    attention_lse(q, k, v) -> (o [B, Sq, H, D], lse [B, H, Sq] fp32): the local attention
    (an ops' `attention_lse`; default: a plain fp32 reference).
    Returns o in q.dtype (merged in fp32), and lse when return_lse.
    """
    attn = attention_lse or _reference_attention_lse
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"ring_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be [B, S, H, D] with the same B, H, D (and k, v the same shape)")
    return ring_attention_prepared(("q", q), (k, v), sp, lambda qp, kvp, return_lse: attn(qp[1], *kvp),
                                   return_lse=return_lse, out_dtype=q.dtype)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """1-byte dtypes travel as uint8 (no backend needs to know float8)."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def ring_attention_prepared(qp, kvp, sp: SequenceParallel, attend: Callable, return_lse: bool = False,
                            out_dtype=torch.bfloat16):
    """The ring over an ops' prepared key/value tensors (`prepare_self_attention`): at step s every
    rank attends to the shard it holds (`attend(qp, kvp, return_lse=True)`) while sending it to the
    next rank and receiving the previous rank's (double buffers, batched isend/irecv), and merges
    the partial outputs with their log-sum-exp.  kvp is a tuple of tensors whose shapes are the
    same on every rank (any dtypes: quantized keys, scales, transposed values...)."""
    bufs = [tuple(t.contiguous() for t in kvp), None]
    out = lse = None
    for step in range(sp.world):
        cur = bufs[step % 2]
        reqs = []
        if step < sp.world - 1:
            if bufs[(step + 1) % 2] is None:
                bufs[(step + 1) % 2] = tuple(torch.empty_like(t) for t in cur)
            nxt = bufs[(step + 1) % 2]
            ops = [dist.P2POp(dist.isend, _wire(t), sp.next_peer, sp.group) for t in cur]
            ops += [dist.P2POp(dist.irecv, _wire(t), sp.prev_peer, sp.group) for t in nxt]
            reqs = dist.batch_isend_irecv(ops)
        o_s, lse_s = attend(qp, cur, return_lse=True)
        if sp.world == 1:
            out, lse = o_s, lse_s
        else:
            out, lse = (o_s.float(), lse_s.float()) if out is None else merge_lse(out, lse, o_s, lse_s)
        for req in reqs:  # after this, `cur` may be received into and `nxt` is complete
            req.wait()
    out = out.to(out_dtype)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------- launching
@dataclass
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl", "gloo" or "none" (a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sequence_parallel(self) -> SequenceParallel:
        return SequenceParallel(None, self.rank, self.world_size)


def _env_int(name: str, default: int) -> int:
    val = os.environ.get(name)
    if val is None or val == "":
        return default
    try:
        return int(val)
    except ValueError:
        raise ValueError(f"environment variable {name}={val!r} is not an integer; "
                         "launch with torchrun (it sets RANK, WORLD_SIZE and LOCAL_RANK)") from None


def launch_info(init_method: Optional[str] = None, backend: Optional[str] = None, timeout_s: float = 600.0
                ) -> LaunchInfo:
    """Read the torchrun environment and start the process group.

    RANK / WORLD_SIZE / LOCAL_RANK (defaults 0 / 1 / RANK).  WORLD_SIZE 1: no process group.
    With CUDA: device cuda:LOCAL_RANK and NCCL, with NVLink multicast disabled (NCCL_NVLS_ENABLE=0,
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set before NCCL starts).
    Without CUDA: CPU and gloo.  init_method defaults to env:// (MASTER_ADDR / MASTER_PORT, set by
    torchrun); a file:// or tcp:// address works too.  Safe to call twice (reuses the group).
    """
    os.environ.update(NO_MULTICAST_ENV)
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE; launch with "
                         "`torchrun --nproc-per-node N ...`")
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this host has {torch.cuda.device_count()} GPU(s); "
                             "use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world == 1:
        return LaunchInfo(0, 1, local_rank, device, "none")
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        from datetime import timedelta
        kw = dict(backend=backend, init_method=init_method or "env://", rank=rank, world_size=world,
                  timeout=timedelta(seconds=timeout_s))
        if backend == "nccl":
            kw["device_id"] = device
        dist.init_process_group(**kw)
    return LaunchInfo(rank, world, local_rank, device, dist.get_backend())


@contextmanager
def rank0_errors(rank: int, exit_code: int = 2, grace_s: float = 1.0):
    """Turn a ValueError (bad input: the message names the fix) into one printed line and an exit.

    Every rank raises the same error (the checks are deterministic and run before any
    communication), but only rank 0 prints it; all ranks exit with `exit_code`.  The other ranks
    wait `grace_s` first: torchrun terminates the whole group when the first rank exits, and
    rank 0 must have printed by then.
    """
    try:
        yield
    except ValueError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(grace_s)
        raise SystemExit(exit_code) from None
