# Shared preamble of the per-session device scripts (bench/run_gpu_session*.sh), sourced with the section name:
#   source bench/gpu_session_lib.sh "$1"
# the liveact import path, $OUT, one log per section ($LOG), L (a timed header line), the GPU's name and clocks,
# and the commands they run: C (the CLI), B (bench fps, 18B preset at 416x720, triton ops, FP8 KV cache),
# A (accuracy after 3 chunks vs the reference path), S (the fps lines worth keeping).
source bench/devenv.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/log_$1.txt"
L() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader | tee -a "$LOG"
C="python3 -m liveact.tools.cli"
B="$C bench fps --preset liveact-18b --size 416*720 --no-progress --ops triton --fp8-kv-cache"
A="python3 -m liveact.bench.accuracy --preset liveact-18b --size 416*720 --chunks 3 --ops triton --fp8-kv-cache"
S="steady_fps|ms_per_step_steady|time_to_first_chunk|peak_mem|ops |sm_clock|ms_vae_steady"
