#!/usr/bin/env bash
# One device call for issues 2-3: GPU tests, 18B checkpoint write + load, FPS baselines.
# Usage (device tool): bash bench/run_gpu_foundation.sh
source bench/devenv.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L() { echo "== $*" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw --format=csv | tee "$OUT/gpu.txt"
L "pytest gpu runtime"
python3 -m pytest -q -m gpu tests/test_gpu_runtime.py -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/log.txt"
L "write random 18B checkpoint"
( time python3 -m liveact.tools.cli checkpoint random --preset liveact-18b --out /tmp/ck18 --dit-only --device cuda ) 2>&1 | tail -4 | tee -a "$OUT/log.txt"
du -sh /tmp/ck18 | tee -a "$OUT/log.txt"
L "load 18B + one chunk step"
python3 -m liveact.bench.gpu_foundation --ckpt-dir /tmp/ck18 --json "$OUT/foundation.json" 2>&1 | tail -15 | tee -a "$OUT/log.txt"
rm -rf /tmp/ck18
B="python3 -m liveact.tools.cli bench fps --preset liveact-18b --size 416*720 --no-progress"
L "bf16 caches (expect a clear does-not-fit message on 80 GB)"
$B --chunks 4 --warmup 1 2>&1 | tail -3 | tee -a "$OUT/log.txt"
L "reference ops, fp8 kv cache, CUDA graphs"
$B --chunks ${CHUNKS:-7} --warmup 3 --fp8-kv-cache --json "$OUT/fps_graph.json" 2>&1 | tail -30 | tee -a "$OUT/log.txt"
L "reference ops, fp8 kv cache, eager"
$B --chunks ${CHUNKS:-7} --warmup 3 --fp8-kv-cache --no-cuda-graph --json "$OUT/fps_eager.json" 2>&1 | tail -30 | tee -a "$OUT/log.txt"
