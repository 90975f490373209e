"""`liveact bench fps` on the tiny preset (CPU): the report, the JSON and the --profile table are written;
the ops flags that need `--ops triton`."""

import argparse
import json

import pytest

from liveact.tools import cli
from liveact.tools.ops_select import add_ops_arguments, make_ops


def test_bench_fps_tiny_with_profile(tmp_path, capsys):
    out, prof = tmp_path / "fps.json", tmp_path / "profile.txt"
    rc = cli.main(["bench", "fps", "--preset", "tiny", "--size", "64*64", "--chunks", "2", "--warmup", "1",
                   "--no-progress", "--device", "cpu", "--json", str(out), "--profile", str(prof)])
    assert rc == 0
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["steady_fps"] > 0 and s["chunks"] == 2 and len(res["chunks"]) == 2
    assert all(len(r["ms_per_step"]) == 3 for r in res["chunks"])
    lines = prof.read_text().splitlines()
    assert lines[0].startswith("one chunk (3 steps) profiled") and len(lines) > 5
    assert res["profile"]["top"] and res["profile"]["kernel_ms_per_step"] > 0
    assert "profile of one chunk" in capsys.readouterr().out


def test_kernel_flags_need_ops_triton(capsys):
    """Flags that choose our kernels are refused with the reference ops, with the fix named."""
    for flags in (["--fp8-gemm"], ["--fast-accum"], ["--attention-kernel", "gluon"]):
        p = argparse.ArgumentParser()
        add_ops_arguments(p)
        with pytest.raises(SystemExit, match="add --ops triton"):
            make_ops(p.parse_args(flags), "cpu")
    p = argparse.ArgumentParser()
    add_ops_arguments(p)
    ops = make_ops(p.parse_args(["--ops", "triton", "--attention-kernel", "gluon"]), "cpu")
    assert ops.attention_kernel == "gluon"
    assert make_ops(p.parse_args(["--ops", "triton"]), "cpu").attention_kernel == "auto"
    # describe() says what runs: no Gluon without an sm90 GPU
    assert ops.self_attention_kernel() in ops.describe()
