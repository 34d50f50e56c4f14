#!/usr/bin/env bash
# Issue 9's expert-parallel scaling in one device call on a 4- or 8-GPU machine (~9 min on 4 x H200):
# bench.scaling over EP = 1, 2, 4 (8) at Qwen3-30B-A3B width, 4 layers, BF16 and blockwise FP8
# experts (FP8 and BF16 on the wire), 20 steps each, the same global batch at every EP size.
#   FP8MOE_COMMIT=$(git rev-parse HEAD) [NAME=scaling] bash bench/scaling_session.sh [bench.scaling options]
# What comes back ($OUT): NAME.json, NAME.png, NAME_runs.tar.gz (every run's metrics.jsonl and
# log, the job timing), NAME.log; NAME (default scaling) also names bench/results/NAME.json, so
# two invocations in one call (say NAME=scaling_weak ... --weak) keep both. The tree travels without .git: pass
# FP8MOE_COMMIT. Wheels in .whl/ (../shared/tools/gpu-wheels.sh) are installed first.
set -uo pipefail
out=${OUT:-/tmp/fp8moe_out}
mkdir -p "$out"
source bench/device_env.sh
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
name=${NAME:-scaling}
root=/dev/shm/fp8moe_$name
python3 -m bench.scaling --root "$root" --out "bench/results/$name.json" "$@" 2>&1 | tee "$out/$name.log"
rc=${PIPESTATUS[0]}
cp -f "bench/results/$name.json" "bench/results/$name.png" "$out/" 2>/dev/null
(cd "$root" && tar czf "$out/${name}_runs.tar.gz" -- *.log timing.json */metrics.jsonl */.hydra/config.yaml 2>/dev/null)
exit "$rc"
