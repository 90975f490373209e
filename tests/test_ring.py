"""Ring attention and the log-sum-exp merge (runtime/ring.py), on CPU with gloo processes.

Reference: full (single-process) softmax attention in fp32 over all keys.  Tolerance: relative
error ||out - ref|| / ||ref|| < 1e-5 (fp32 throughout).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from liveact.model.ops import ReferenceOps
from liveact.runtime.ring import SequenceParallel, merge_lse, rank0_errors, ring_attention

TOL = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def full_attention(q, k, v):
    return ReferenceOps().attention_lse(q.float(), k.float(), v.float())


def _qkv(seed, b=1, sq=30, sk=36, h=2, d=128, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g) * scale
    k = torch.randn(b, sk, h, d, generator=g)
    v = torch.randn(b, sk, h, d, generator=g)
    return q, k, v


# ------------------------------------------------------------------------------------------ merge alone
@pytest.mark.parametrize("parts", [(12, 24), (5, 17, 14), (1, 34, 1)])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_merge_lse_matches_full_attention(parts, scale):
    """Partial attentions over disjoint key blocks, merged pairwise, equal the full attention.
    scale 40 makes the scores large (lse > 88, where exp overflows fp32): the merge must stay stable."""
    q, k, v = _qkv(1, sk=sum(parts), scale=scale)
    ref_o, ref_lse = full_attention(q, k, v)
    ops, out, lse, s = ReferenceOps(), None, None, 0
    for n in parts:
        o_i, l_i = ops.attention_lse(q, k[:, s:s + n], v[:, s:s + n])
        out, lse = (o_i.float(), l_i) if out is None else merge_lse(out, lse, o_i, l_i)
        s += n
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel(out, ref_o) < TOL, rel(out, ref_o)
    assert rel(lse, ref_lse) < TOL
    if scale > 1:
        assert ref_lse.abs().max() > 88  # exp(lse) would overflow fp32


def test_merge_lse_is_symmetric_and_weights_by_lse():
    q, k, v = _qkv(2, sk=20)
    ops = ReferenceOps()
    o1, l1 = ops.attention_lse(q, k[:, :7], v[:, :7])
    o2, l2 = ops.attention_lse(q, k[:, 7:], v[:, 7:])
    a, la = merge_lse(o1, l1, o2, l2)
    b, lb = merge_lse(o2, l2, o1, l1)
    assert rel(a, b) < 1e-6 and rel(la, lb) < 1e-6
    # a block with far smaller lse contributes (almost) nothing
    c, _ = merge_lse(o1, l1, o2, l2 - 200.0)
    assert rel(c, o1) < 1e-6


def test_ring_attention_single_rank_is_plain_attention():
    q, k, v = _qkv(3)
    sp = SequenceParallel(None, 0, 1)
    out, lse = ring_attention(q, k, v, sp, ReferenceOps().attention_lse, return_lse=True)
    ref_o, ref_lse = full_attention(q, k, v)
    assert rel(out, ref_o) < TOL and rel(lse, ref_lse) < TOL


def test_ring_attention_rejects_mismatched_shapes():
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match="same B, H, D"):
        ring_attention(q, k[..., :64], v[..., :64], SequenceParallel(None, 0, 1))


def test_rank0_errors_prints_once(capsys):
    for rank in (0, 1):
        with pytest.raises(SystemExit) as ex:
            with rank0_errors(rank, grace_s=0.0):
                raise ValueError("N=3 does not divide Fl=20")
        assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.count("N=3 does not divide Fl=20") == 1


# ------------------------------------------------------------------------------------------ ring over gloo
def local_gloo_env():
    """Single-host test runs: let gloo talk over the loopback device (CI hostnames may not resolve)."""
    import os
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)


def init_gloo(rank, world, store_file):
    local_gloo_env()
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)


def _ring_worker(rank, world, store_file):
    init_gloo(rank, world, store_file)
    try:
        sp = SequenceParallel()
        assert (sp.rank, sp.world) == (rank, world)
        sk_shard = 12
        q, k, v = _qkv(10, sq=7 * world + 3, sk=sk_shard * world, scale=3.0)
        ref_o, ref_lse = full_attention(q, k, v)
        # uneven query shares (queries need not match across ranks), equal key shards
        qb = [0] + [7 * (i + 1) for i in range(world - 1)] + [q.shape[1]]
        qs = slice(qb[rank], qb[rank + 1])
        ks = slice(rank * sk_shard, (rank + 1) * sk_shard)
        out, lse = ring_attention(q[:, qs], k[:, ks].contiguous(), v[:, ks].contiguous(), sp,
                                  ReferenceOps().attention_lse, return_lse=True)
        err_o, err_l = rel(out, ref_o[:, qs]), rel(lse, ref_lse[:, :, qs])
        assert err_o < TOL and err_l < TOL, (rank, err_o, err_l)
        # the shards really differ per rank: attending to the local shard only is far off
        local, _ = ReferenceOps().attention_lse(q[:, qs], k[:, ks], v[:, ks])
        assert rel(local, ref_o[:, qs]) > 0.05
        # all_gather returns every rank's tensor in rank order
        g = sp.all_gather(torch.full((2, 3), float(rank)))
        assert g.shape == (world, 2, 3) and all((g[i] == i).all() for i in range(world))
    finally:
        dist.destroy_process_group()


def spawn(fn, world, tmp_path, *args):
    store = tmp_path / f"store_{fn.__name__}_{world}"
    mp.spawn(fn, args=(world, str(store)) + args, nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_gloo_matches_full_attention(world, tmp_path):
    spawn(_ring_worker, world, tmp_path)
