"""`liveact generate`: portrait + audio (+ prompt, + timed edit prompts) -> lip-synced mp4.

    liveact generate --preset tiny                                   # random tiny checkpoint + examples/
    liveact generate --ckpt-dir LiveAct --wav2vec-dir chinese-wav2vec2-base --input-json in.json \
                     --size 416*720 --fps 20 --fp8-kv-cache --ops triton

The input JSON is the seed's format: a list of {"prompt", "cond_image", "cond_audio",
"edit_prompt": {"[a, b]": text}} (paths relative to the JSON file, or to the working directory).
Per input: CLIP image tokens, the VAE latent of [image, 52 grey frames] with its mask (y), T5
embeddings of the prompt and every edit prompt (once), wav2vec2 features (whole clip, or one window
per chunk with --stream-audio); then chunk after chunk: DiT (3 steps) -> streaming VAE decode ->
frames appended to `<out-dir>/<image-stem>_<audio-stem>.mp4` as they are made (an interrupted run
keeps its chunks: they are muxed on exit, and left as part files if even that fails).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..model.config import CACHE_FRAMES, VideoGeometry
from ..tools.ops_select import add_ops_arguments, make_ops, ops_description

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class InputError(ValueError):
    """An input JSON or conditioning file that cannot be used."""


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--ckpt-dir", default=None, help="LiveAct checkpoint directory (DiT + VAE + CLIP + T5 files)")
    p.add_argument("--preset", default=None, help="without --ckpt-dir: write/reuse a random checkpoint of this "
                   "preset under --out-dir (tiny runs on a CPU)")
    p.add_argument("--wav2vec-dir", default=None, help="chinese-wav2vec2-base directory (default <ckpt-dir>/chinese-wav2vec2-base)")
    p.add_argument("--input-json", default=None, help="list of {prompt, cond_image, cond_audio, edit_prompt} "
                   "(default: the shipped examples/example.json)")
    p.add_argument("--size", default=None, help="W*H (default 416*720; 128*128 for --preset tiny)")
    p.add_argument("--fps", type=int, default=24, help="output frame rate (default 24, as published)")
    p.add_argument("--audio-cfg", type=float, default=1.0, help="audio classifier-free guidance (>1 enables)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stream-audio", action="store_true", help="encode a window of audio per chunk (live mode)")
    p.add_argument("--mean-memory", action="store_true", help="mean instead of ConvKV memory compression")
    p.add_argument("--fp8-kv-cache", action="store_true", help="e4m3 KV caches (needed on one 80 GB GPU with bf16 weights)")
    p.add_argument("--t5-cpu", action="store_true", help="run the T5 text encoder on the CPU")
    p.add_argument("--dura-print", action="store_true", help="print each chunk's time against its real-time budget")
    p.add_argument("--vae-mode", default="carry", choices=["carry", "overlap"],
                   help="carry = streaming decode with the causal cache (default); overlap = published re-decode")
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (testing)")
    p.add_argument("--out-dir", default="out", help="where videos go (default ./out)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: new name _1, _2, ...)")
    p.add_argument("--device", default=None)
    add_ops_arguments(p)


def read_inputs(path: Path) -> list:
    if not path.exists():
        raise InputError(f"{path}: input JSON not found")
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        raise InputError(f"{path}: expected a list of {{prompt, cond_image, cond_audio}} objects")
    out = []
    for i, it in enumerate(items):
        where = f"{path} item {i}"
        if not isinstance(it, dict):
            raise InputError(f"{where}: expected an object")
        for k in ("cond_image", "cond_audio"):
            if k not in it:
                raise InputError(f"{where}: missing {k!r}")
        resolved = {}
        for k in ("cond_image", "cond_audio"):
            p = Path(it[k])
            cands = [p] if p.is_absolute() else [path.parent / p, Path.cwd() / p]
            hit = next((c for c in cands if c.exists()), None)
            if hit is None:
                raise InputError(f"{where}: {k} {it[k]!r} not found (looked in {', '.join(str(c.parent) for c in cands)})")
            resolved[k] = hit
        edits = []
        for key, text in (it.get("edit_prompt") or {}).items():
            try:
                a, b = json.loads(key)
                a, b = int(a), int(b)
            except (ValueError, TypeError):
                raise InputError(f"{where}: edit_prompt key {key!r} must be \"[first_chunk, last_chunk]\"") from None
            edits.append((a, b, str(text)))
        out.append({"prompt": str(it.get("prompt", "")), "edits": edits, **resolved})
    return out


def ensure_random_checkpoint(preset: str, out_dir: Path) -> Path:
    from ..model.checkpoint import WEIGHTS_NAME, INDEX_NAME, write_random_checkpoint
    from ..model.config import get_preset
    from .random_assets import VAE_FILE, WAV2VEC_DIR, write_random_assets
    d = out_dir / f"ckpt-{preset}"
    if not ((d / WEIGHTS_NAME).exists() or (d / INDEX_NAME).exists()) or not (d / VAE_FILE).exists() \
            or not (d / WAV2VEC_DIR).exists():
        print(f"writing a random {preset} checkpoint (published layout) to {d}", file=sys.stderr)
        write_random_checkpoint(get_preset(preset), d)
        write_random_assets(preset, d, log=None)
    return d


class Pipeline:
    """All networks of one run, loaded once."""

    def __init__(self, args, device):
        from ..model.audio import AudioEncoder
        from ..model.checkpoint import load_model
        from ..model.clip import load_clip
        from ..model.t5 import load_text_encoder
        from ..model.vae import StreamingDecoder, WanVAE
        from .random_assets import VAE_FILE, WAV2VEC_DIR
        ck = Path(args.ckpt_dir)
        dtype = torch.bfloat16
        t0 = time.perf_counter()
        self.dit = load_model(ck, device=device, dtype=dtype)
        self.dit.set_ops(make_ops(args, device))
        vae_path = ck / VAE_FILE
        if not vae_path.exists():
            raise InputError(f"{vae_path}: VAE checkpoint not found in --ckpt-dir")
        self.vae = WanVAE.load(vae_path, device=device, dtype=dtype)
        self.decoder = StreamingDecoder(self.vae, mode=args.vae_mode)
        self.clip = load_clip(ck, device=device, dtype=dtype)
        self.t5 = load_text_encoder(ck, device="cpu" if args.t5_cpu else device, dtype=dtype)
        w2v = Path(args.wav2vec_dir) if args.wav2vec_dir else ck / WAV2VEC_DIR
        if not w2v.exists():
            raise InputError(f"{w2v}: wav2vec2 directory not found; pass --wav2vec-dir (chinese-wav2vec2-base)")
        self.audio = AudioEncoder.load(w2v, device=device, dtype=dtype)
        self.device = device
        self.load_s = time.perf_counter() - t0

    @torch.no_grad()
    def condition(self, item, geo: VideoGeometry):
        """-> y [20, 14, h, w], {name: Context}, EditPrompts."""
        from ..runtime.engine import EditPrompts
        from ..runtime.media import load_image
        img = load_image(item["cond_image"], geo.width, geo.height).to(self.device, torch.bfloat16)
        clip_fea = self.clip(img)
        frames = 1 + 4 * (CACHE_FRAMES - 1)  # 53: the reference frame then 52 grey (zero) frames
        video = torch.zeros(1, 3, frames, geo.height, geo.width, device=self.device, dtype=torch.bfloat16)
        video[:, :, :1] = img
        z = self.vae.encode(video)                                         # [16, 14, h, w]
        mask = torch.zeros(4, CACHE_FRAMES, geo.lat_h, geo.lat_w, device=self.device, dtype=z.dtype)
        mask[:, 0] = 1
        y = torch.cat([mask, z], dim=0)
        texts = {"main": item["prompt"]}
        ranges = []
        for i, (a, b, text) in enumerate(item["edits"]):
            texts[f"edit{i}"] = text
            ranges.append((a, b, f"edit{i}"))
        contexts = {}
        for name, text in texts.items():
            emb = self.t5.encode(text).to(self.device)
            contexts[name] = self.dit.embed_context(emb, clip_fea)
        return y, contexts, EditPrompts(ranges)


def run(args) -> int:
    """Under `torchrun --nproc-per-node N` every chunk is spread over the N ranks (ring attention); each rank
    computes the conditioning itself, and rank 0 alone writes videos and prints."""
    from ..runtime.ring import launch_info, rank0_errors
    info = launch_info()
    with rank0_errors(info.rank):
        return _run(args, info)


def _run(args, info) -> int:
    from ..runtime.engine import EngineOptions, StreamingEngine
    from ..runtime.media import Mp4Writer
    sp = info.sequence_parallel() if info.world_size > 1 else None
    main = info.rank == 0
    log = (lambda *a, **k: print(*a, **k)) if main else (lambda *a, **k: None)
    device = info.device if sp else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(args.out_dir)
    if args.ckpt_dir is None:
        if args.preset is None:
            raise InputError("pass --ckpt-dir (the LiveAct checkpoint directory) or --preset tiny for a random demo")
        if sp is not None:
            raise InputError("with several processes pass --ckpt-dir (write it first with `liveact checkpoint random`)")
        args.ckpt_dir = str(ensure_random_checkpoint(args.preset, out_dir))
    size = args.size or ("128*128" if args.preset == "tiny" and args.size is None else "416*720")
    geo = VideoGeometry.parse(size)
    json_path = Path(args.input_json) if args.input_json else EXAMPLES / "example.json"
    items = read_inputs(json_path)
    if args.fps <= 0:
        raise InputError(f"--fps must be a positive integer, got {args.fps}")
    pipe = Pipeline(args, device)
    log(f"loaded {args.ckpt_dir} in {pipe.load_s:.1f} s ({ops_description(pipe.dit.ops)}, {device})", file=sys.stderr)
    eng = StreamingEngine(pipe.dit, geo, EngineOptions(fp8_kv_cache=args.fp8_kv_cache, mean_memory=args.mean_memory,
                                                       audio_cfg=args.audio_cfg, cuda_graphs=not args.no_cuda_graph,
                                                       seed=args.seed), sp=sp)
    from tqdm import tqdm
    for item in items:
        stem = f"{item['cond_image'].stem}_{item['cond_audio'].stem}"
        y, contexts, edits = pipe.condition(item, geo)
        n_chunks, windows = pipe.audio.chunk_windows(item["cond_audio"], args.fps, stream=args.stream_audio)
        if args.max_chunks:
            n_chunks = min(n_chunks, args.max_chunks)
        eng.start(y, contexts, edits, seed=args.seed)
        pipe.decoder.reset()
        writer = Mp4Writer(out_dir / f"{stem}.mp4", args.fps, geo.width, geo.height, audio_path=item["cond_audio"],
                           overwrite=args.overwrite) if main else None
        bar = tqdm(total=n_chunks, desc=stem, unit="chunk", file=sys.stderr, disable=not (sys.stderr.isatty() and main))
        t_start = time.perf_counter()
        try:
            for n, window in zip(range(n_chunks), windows):
                t0 = time.perf_counter()
                latent = eng.generate_chunk(n, window)
                frames = pipe.decoder.decode_chunk(latent) if main else None
                if main:
                    writer.write(frames)
                dt = time.perf_counter() - t0
                if args.dura_print and main:
                    budget = frames.shape[2] / args.fps
                    print(f"chunk {n}: {dt:.3f} s for {frames.shape[2]} frames (real-time budget {budget:.3f} s, "
                          f"{'ok' if dt <= budget else 'SLOW'})", file=sys.stderr)
                bar.update(1)
        finally:
            bar.close()
            path = writer.close() if main else None  # mux whatever was made, also after an interruption or error
        wall = time.perf_counter() - t_start
        if main:
            print(f"wrote {path} ({writer.frames_written} frames, {n_chunks} chunks, {wall:.1f} s, "
                  f"{writer.frames_written / wall:.2f} FPS end to end)")
    return 0
