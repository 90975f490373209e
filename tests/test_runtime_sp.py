"""The streaming engine under sequence parallelism (2 gloo processes) equals the one-process engine:
several chunks, memory updates, audio CFG, FP8 cache on and off."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from liveact.model import VideoGeometry
from liveact.runtime.engine import EngineOptions, StreamingEngine

from helpers import audio_window, conditioning, rel_err, tiny_model

GEO = VideoGeometry.parse("96*64")  # Fl = 24: divisible by 2 and 3
CHUNKS = 4


def _run(sp, fp8):
    m = tiny_model(torch.float32)
    ctx, y = conditioning(m, GEO)
    eng = StreamingEngine(m, GEO, EngineOptions(seed=4, audio_cfg=2.0, fp8_kv_cache=fp8), sp=sp)
    eng.start(y, {"main": ctx})
    return [eng.generate_chunk(n, audio_window(m.cfg, n)) for n in range(CHUNKS)], eng


def _worker(rank, world, store, out, fp8):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from liveact.runtime.ring import launch_info
    info = launch_info(init_method=f"file://{store}")
    torch.set_num_threads(1)
    lat, eng = _run(info.sequence_parallel(), fp8)
    rows = eng.caches[1][0].k.shape[1]
    torch.save({"lat": lat, "rows": rows}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("fp8", [False, True])
def test_engine_with_two_ranks_equals_one_process(tmp_path, fp8):
    ref, eng1 = _run(None, fp8)
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path / "out"), fp8), nprocs=world, join=True)
    for r in range(world):
        got = torch.load(tmp_path / f"out.{r}")
        assert got["rows"] == 14 * GEO.tokens_per_frame // world  # each rank holds 1/N of every cache
        for n, (a, b) in enumerate(zip(got["lat"], ref)):
            assert rel_err(a, b) < (1e-5 if not fp8 else 2e-2), (r, n)
