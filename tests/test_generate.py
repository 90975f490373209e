"""`liveact generate` end to end on the tiny preset (CPU): mp4 frame count, fps, audio; bad inputs."""
import json
import shutil
from pathlib import Path

import pytest

from liveact.runtime.media import probe_mp4
from liveact.tools import cli


def main(argv):
    """The `liveact` command in-process: its exit code (bad input exits through SystemExit(2))."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code

EX = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    assert main(["checkpoint", "random", "--preset", "tiny", "--out", str(d)]) == 0
    return d


def _inputs(tmp_path, **over):
    item = {"prompt": "a person is speaking", "cond_image": str(EX / "image" / "portrait.png"),
            "cond_audio": str(EX / "audio" / "speech.wav"), "edit_prompt": {"[1, 1]": "nodding"}}
    item.update(over)
    p = tmp_path / "in.json"
    p.write_text(json.dumps([item]))
    return p


def test_generate_writes_mp4_with_audio(ckpt, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--ckpt-dir", str(ckpt), "--input-json", str(_inputs(tmp_path)), "--size", "64*96",
            "--fps", "20", "--max-chunks", "2", "--out-dir", str(out)]
    assert main(args) == 0
    info = probe_mp4(out / "portrait_speech.mp4")
    assert (info["width"], info["height"]) == (64, 96)
    assert info["fps"] == 20
    assert info["frames"] == 21 + 32  # 2 chunks; the 3 s clip is longer, so nothing is trimmed
    # the original 3 s audio, muxed and trimmed to the video like ffmpeg -shortest (+ <= 1 AAC frame of padding)
    assert info["audio_seconds"] == pytest.approx(53 / 20, abs=0.07)
    # a second run never overwrites: it picks a new name
    assert main(args) == 0
    assert (out / "portrait_speech_1.mp4").exists()
    assert not list(out.glob("*.parts*"))  # part files are cleaned up after the mux


@pytest.mark.parametrize("over, msg", [
    ({"cond_image": "nope.png"}, "cond_image 'nope.png' not found"),
    ({"cond_audio": "nope.wav"}, "cond_audio 'nope.wav' not found"),
    ({"edit_prompt": {"1-2": "x"}}, "must be \"\\[first_chunk, last_chunk\\]\""),
])
def test_generate_bad_inputs_are_one_clear_error(ckpt, tmp_path, capsys, over, msg):
    rc = main(["generate", "--ckpt-dir", str(ckpt), "--input-json", str(_inputs(tmp_path, **over)),
               "--size", "64*96", "--max-chunks", "1", "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and "Traceback" not in err
    import re
    assert re.search(msg, err), err


def test_generate_bad_size_and_missing_checkpoint(tmp_path, capsys, ckpt):
    assert main(["generate", "--ckpt-dir", str(ckpt), "--size", "60*96", "--out-dir", str(tmp_path)]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert main(["generate", "--ckpt-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
    assert "no such directory" in capsys.readouterr().err
    broken = tmp_path / "ck"
    shutil.copytree(ckpt, broken)
    (broken / "Wan2.1_VAE.pth").unlink()
    assert main(["generate", "--ckpt-dir", str(broken), "--size", "64*96", "--out-dir", str(tmp_path)]) == 2
    assert "VAE checkpoint not found" in capsys.readouterr().err
