#!/usr/bin/env bash
# One device call: GPU tests and the benchmarks together, a short table last.
#   bash bench/gpu_session.sh [tests|bench|all] [extra pytest -k expression]
# On the lent machine (no registry): the wheels from ../shared/tools/gpu-wheels.sh travel in .whl/.
set -uo pipefail
what=${1:-all}
# The tree travels without .git: pass FP8MOE_COMMIT=$(git rev-parse HEAD) in the command.
kexpr=${2:-}
out=${OUT:-/tmp/fp8moe_out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
if [[ $what == tests || $what == all ]]; then
    python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 600 ${kexpr:+-k "$kexpr"} 2>&1 | tee "$out/gpu_tests.log" | grep -E "passed|failed|error|FAILED|ERROR" | tail -40
fi
if [[ $what == bench || $what == all ]]; then
    for b in kernels gemm moe_block; do
        timeout 400 python3 -m bench.$b > "$out/bench_$b.log" 2>&1 || echo "bench.$b exited $?"
        cp -f "bench/results/$b.json" "$out/" 2>/dev/null
    done
    for b in kernels gemm moe_block; do echo "== $b"; tail -n 45 "$out/bench_$b.log"; done
fi
