"""Media I/O: the reference image, and the output mp4 written as frames arrive (SPEC-ENCODERS.md 5, 6).

`load_image(path, width, height)` -> [1, 3, 1, H, W] float32 in [-1, 1]: PIL -> RGB -> centre rescale-crop that
keeps the aspect ratio (scale = max(W/w, H/h), PIL BICUBIC resize to (round(w*s), round(h*s)), crop the centre box
with left = (new_w - W)//2, top = (new_h - H)//2) -> /255 -> (x - 0.5) / 0.5.

`Mp4Writer(path, fps, width, height, audio_path=None)`: PyAV only (no ffmpeg binary).
- `write(frames)` appends frames as they come: uint8 [T, H, W, 3], or float in [-1, 1] as [T, H, W, 3],
  [3, T, H, W] or [1, 3, T, H, W] (mapped like the reference: (x + 1) / 2 in the input dtype, x255, truncation
  to uint8).  Once at least `min_part_frames` (16) are pending they are encoded (libx264, yuv420p, crf 25 like
  diffusers' export_to_video) into the next part file `<name>.parts/part_NNNNNN.mp4`, closed at once: each part is
  a complete, playable mp4.  A chunk of 21 or 32 frames is therefore on disk as soon as it is written; if the run
  is interrupted, `concat_parts("<name>.parts", "<name>.mp4", fps, audio)` joins what was made.
- `close()` joins the parts into `<name>.mp4` (video packets copied, not re-encoded) with the ORIGINAL audio
  re-encoded to AAC, both trimmed to the shorter of audio and video (like `ffmpeg -shortest`): video frames past
  the audio's end are dropped while writing (frame i is kept iff i / fps < audio seconds), and the audio is cut
  at the video's end.  Then the parts directory is deleted.
- Existing files are never overwritten: with `overwrite=False` (default) an existing `<name>.mp4` makes the writer
  pick `<name>_1.mp4`, `<name>_2.mp4`, ... (`writer.path` is the name actually used); `overwrite=True` replaces it.
- Used as a context manager, an exception inside the block still finalizes what was written.

`probe_mp4(path)` reads back frame count, fps, size and the audio duration (for tests and the CLI).
"""
from __future__ import annotations

import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


class MediaError(ValueError):
    """An input image / audio / output path that cannot be used; the message names the fix."""


# ---------------------------------------------------------------------------------------------------------
# image

def center_rescale_crop(img, width: int, height: int):
    """PIL image -> PIL image of exactly (width, height): scale to cover, PIL BICUBIC, centre crop."""
    from PIL import Image
    w, h = img.size
    s = max(width / w, height / h)
    nw, nh = round(w * s), round(h * s)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


def load_image(path, width: int, height: int, dtype=torch.float32) -> torch.Tensor:
    """Reference image -> cond_image [1, 3, 1, height, width] in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: image not found; pass an existing PNG/JPEG as cond_image")
    if width <= 0 or height <= 0:
        raise MediaError(f"image size must be positive, got {width}x{height}")
    try:
        with Image.open(p) as im:
            im.load()
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"{p}: cannot read the image ({e}); use a PNG or JPEG file") from None
    if min(img.size) < 1:
        raise MediaError(f"{p}: the image is empty ({img.size[0]}x{img.size[1]})")
    img = center_rescale_crop(img, width, height)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    x = x.sub_(0.5).div_(0.5)
    return x.view(1, 3, 1, height, width).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# frames -> uint8

def to_uint8_frames(frames) -> np.ndarray:
    """uint8 [T, H, W, 3] from uint8 [T, H, W, 3] / [H, W, 3] or float [-1, 1] [T, H, W, 3] / [3, T, H, W] /
    [1, 3, T, H, W].  Float: (x + 1) / 2 in the input dtype (bf16 as the reference), then x255 truncated."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor):
        raise MediaError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    x = frames.detach()
    if x.dim() == 5:
        if x.shape[0] != 1:
            raise MediaError(f"frames [B, 3, T, H, W] must have B == 1, got {tuple(x.shape)}")
        x = x[0]
    if x.dim() == 4 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.permute(1, 2, 3, 0)  # [3, T, H, W] -> [T, H, W, 3]
    if x.dim() == 3 and x.shape[-1] == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise MediaError(f"frames must be [T, H, W, 3], [3, T, H, W] or [1, 3, T, H, W]; got {tuple(frames.shape)}")
    if x.dtype == torch.uint8:
        return x.cpu().contiguous().numpy()
    if not x.is_floating_point():
        raise MediaError(f"frames must be uint8 or float in [-1, 1], got {x.dtype}")
    x = ((x + 1) / 2).float().cpu() * 255.0
    return x.clamp_(0, 255).to(torch.uint8).contiguous().numpy()


# ---------------------------------------------------------------------------------------------------------
# output names

def free_path(path, overwrite: bool = False) -> Path:
    """`path` if it does not exist (or overwrite), else the first free `<stem>_<k><suffix>`."""
    p = Path(path)
    if overwrite or not p.exists():
        return p
    k = 1
    while True:
        q = p.with_name(f"{p.stem}_{k}{p.suffix}")
        if not q.exists():
            return q
        k += 1


def audio_duration(path) -> float:
    """Duration in seconds of the first audio stream of a media file (decoded, so exact for any container)."""
    import av
    with av.open(str(path)) as c:
        if not c.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        n, sr = 0, None
        for fr in c.decode(audio=0):
            n += fr.samples
            sr = fr.sample_rate
    return n / sr if sr else 0.0


class Mp4Writer:
    """Streaming mp4 writer (h264 yuv420p) that muxes the original audio on close.  See the module docstring."""

    def __init__(self, path, fps: int, width: int, height: int, audio_path=None, overwrite: bool = False,
                 crf: int = 25, preset: str = "medium", min_part_frames: int = 16, audio_bitrate: int = 192000):
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise MediaError(f"video size {width}x{height}: width and height must be positive and even (yuv420p)")
        if not (isinstance(fps, int) or float(fps).is_integer()) or fps <= 0:
            raise MediaError(f"fps must be a positive integer, got {fps}")
        self.fps, self.width, self.height = int(fps), width, height
        self.crf, self.preset, self.min_part_frames = crf, preset, max(1, min_part_frames)
        self.audio_path = Path(audio_path) if audio_path is not None else None
        self.audio_seconds = None
        self.max_frames = None
        if self.audio_path is not None:
            self.audio_seconds = _checked_audio_duration(self.audio_path)
            # ffmpeg -shortest keeps video frame i iff its start i / fps lies before the audio's end
            self.max_frames = max(1, math.ceil(self.audio_seconds * self.fps - 1e-9))
        self.overwrite, self.audio_bitrate = overwrite, audio_bitrate
        target = Path(path)
        if target.suffix.lower() != ".mp4":
            target = target.with_name(target.name + ".mp4")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = free_path(target, overwrite)
        # reserve a fresh parts directory atomically (mkdir fails if another writer took the name)
        k = 0
        while True:
            self.parts_dir = self.path.with_name(self.path.stem + (f".parts{k}" if k else ".parts"))
            try:
                self.parts_dir.mkdir()
                break
            except FileExistsError:
                k += 1
        self._pending = []
        self.parts = []
        self.frames_written = 0   # frames accepted (encoded or pending)
        self.frames_dropped = 0   # frames past the audio's end
        self.closed = False

    def write(self, frames) -> int:
        """Append frames; returns how many were accepted (frames past the audio's end are dropped)."""
        if self.closed:
            raise MediaError(f"{self.path}: write() after close()")
        arr = to_uint8_frames(frames)
        if arr.shape[1:3] != (self.height, self.width):
            raise MediaError(f"frames are {arr.shape[2]}x{arr.shape[1]} but the writer was opened for "
                             f"{self.width}x{self.height}")
        if self.max_frames is not None:
            keep = max(0, min(len(arr), self.max_frames - self.frames_written))
            self.frames_dropped += len(arr) - keep
            arr = arr[:keep]
        if len(arr):
            self._pending.append(arr)
            self.frames_written += len(arr)
        if sum(len(a) for a in self._pending) >= self.min_part_frames:
            self._flush_part()
        return len(arr)

    def _flush_part(self) -> None:
        """Encode the pending frames into the next complete, playable part file."""
        if not self._pending:
            return
        arr = np.concatenate(self._pending)
        self._pending = []
        part = self.parts_dir / f"part_{len(self.parts):06d}.mp4"
        encode_h264(part, arr, self.fps, crf=self.crf, preset=self.preset)
        self.parts.append(part)

    def close(self) -> Path:
        """Encode what is pending, concatenate the parts, mux the original audio (AAC, trimmed), write
        `<name>.mp4` and delete the parts directory.  Returns the path written."""
        if self.closed:
            return self.path
        self.closed = True
        self._flush_part()
        if not self.parts:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            raise MediaError(f"{self.path}: no frames were written; nothing to save")
        self.path = concat_parts(self.parts_dir, self.path, self.fps, self.audio_path, overwrite=self.overwrite,
                                 audio_bitrate=self.audio_bitrate)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.close()
        except MediaError:
            if exc_type is None:
                raise
        return False


def _checked_audio_duration(path: Path) -> float:
    if not path.exists():
        raise MediaError(f"{path}: audio file not found (needed to mux the output)")
    try:
        return audio_duration(path)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{path}: cannot decode the audio for muxing ({e})") from None


def encode_h264(path, frames: np.ndarray, fps: int, crf: int = 25, preset: str = "medium") -> Path:
    """uint8 [T, H, W, 3] -> a complete h264 yuv420p mp4 (libx264 through PyAV)."""
    import av
    t, h, w, _ = frames.shape
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(int(fps)))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.time_base = Fraction(1, int(fps))
        s.options = {"crf": str(crf), "preset": preset}
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts = i
            for pkt in s.encode(vf):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)
    return Path(path)


def _count_packets(part: Path):
    """Video packets (= frames) in a part file, or None if it cannot be read (cut short by a crash)."""
    import av
    try:
        with av.open(str(part)) as inp:
            return sum(1 for pkt in inp.demux(inp.streams.video[0]) if pkt.dts is not None)
    except Exception:
        return None


def concat_parts(parts_dir, out_path, fps: int, audio_path=None, overwrite: bool = False,
                 audio_bitrate: int = 192000) -> Path:
    """Join the part files of `parts_dir` (in name order; video packets copied) into one mp4, mux the audio
    (AAC) trimmed like `-shortest`, and return the path written (a free name unless overwrite).  Also the way to
    recover an interrupted run: `concat_parts("out.parts", "out.mp4", fps, audio)`."""
    import av
    parts = []
    for part in sorted(Path(parts_dir).glob("part_*.mp4")):
        n = _count_packets(part)
        if not n:
            break  # keep everything before a damaged part
        parts.append((part, n))
    if not parts:
        raise MediaError(f"{parts_dir}: no readable part_*.mp4 files to join")
    out_path = free_path(Path(out_path), overwrite)
    tmp = out_path.with_name(out_path.stem + ".muxing.mp4")
    video_seconds = sum(n for _, n in parts) / fps
    audio = None
    if audio_path is not None:
        seconds = min(video_seconds, _checked_audio_duration(Path(audio_path)))
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        with av.open(str(parts[0][0])) as first:
            vout = out.add_stream_from_template(first.streams.video[0])
        if audio_path is not None:
            audio = _AacStream(out, Path(audio_path), seconds, audio_bitrate)
        n_frames = 0
        for part, n in parts:
            with av.open(str(part)) as inp:
                vin = inp.streams.video[0]
                shift = int(round(Fraction(n_frames, int(fps)) / vin.time_base))
                for pkt in inp.demux(vin):
                    if pkt.dts is None:
                        continue
                    pkt.pts += shift
                    pkt.dts += shift
                    pkt.stream = vout
                    out.mux(pkt)
            n_frames += n
            if audio is not None:
                audio.mux_until(n_frames / fps)  # keep the two streams interleaved
        if audio is not None:
            audio.mux_until(None)
    os.replace(tmp, out_path)
    return out_path


class _AacStream:
    """Decode an audio file, cut it at `seconds`, encode AAC into an open output container, on demand."""

    AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)

    def __init__(self, out, audio_path: Path, seconds: float, bitrate: int):
        import av
        self.out = out
        self.inp = av.open(str(audio_path))
        ain = self.inp.streams.audio[0]
        sr = ain.codec_context.sample_rate
        self.sr = sr if sr in self.AAC_RATES else 48000
        self.layout = "stereo" if (ain.codec_context.channels or 1) >= 2 else "mono"
        self.stream = out.add_stream("aac", rate=self.sr)
        self.stream.codec_context.layout = self.layout
        self.stream.codec_context.bit_rate = bitrate
        self.resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.sr)
        self.limit = int(round(seconds * self.sr))
        self.done = 0
        self.frames = self.inp.decode(ain)
        self.finished = False

    def _emit(self, frames):
        import av
        for f in frames:
            if self.done >= self.limit:
                return
            take = min(f.samples, self.limit - self.done)
            if take < f.samples:
                f2 = av.AudioFrame.from_ndarray(np.ascontiguousarray(f.to_ndarray()[:, :take]), format="fltp",
                                                layout=self.layout)
                f2.sample_rate = self.sr
                f = f2
            f.pts = self.done
            f.time_base = Fraction(1, self.sr)
            self.done += f.samples
            for p in self.stream.encode(f):
                self.out.mux(p)

    def mux_until(self, t):
        """Encode audio up to time t (seconds; None = to the end, then flush the encoder)."""
        if self.finished:
            return
        stop = self.limit if t is None else min(self.limit, int(t * self.sr))
        if self.done < stop:
            for fr in self.frames:
                fr.pts = None
                self._emit(self.resampler.resample(fr))
                if self.done >= stop:
                    break
            else:
                self._emit(self.resampler.resample(None))
                self.done = max(self.done, self.limit)  # the source ended early: nothing more to come
        if t is None or self.done >= self.limit:
            for p in self.stream.encode(None):
                self.out.mux(p)
            self.inp.close()
            self.finished = True


def probe_mp4(path) -> dict:
    """{'frames', 'fps', 'width', 'height', 'video_seconds', 'audio_seconds' (None without audio), 'codec'}."""
    import av
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        fps = float(v.average_rate) if v.average_rate else None
        n = sum(1 for _ in c.decode(video=0))
        info = dict(frames=n, fps=fps, width=v.codec_context.width, height=v.codec_context.height,
                    video_seconds=n / fps if fps else None, codec=v.codec_context.name,
                    pix_fmt=v.codec_context.pix_fmt, audio_seconds=None, audio_codec=None)
    with av.open(str(path)) as c:
        if c.streams.audio:
            info["audio_codec"] = c.streams.audio[0].codec_context.name
    if info["audio_codec"]:
        info["audio_seconds"] = audio_duration(path)
    return info
