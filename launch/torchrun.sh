#!/usr/bin/env bash
# Single-node launch: one process per GPU on this machine.
#
#   launch/torchrun.sh [NGPUS] [--] <hydra overrides>
#   launch/torchrun.sh 8 -- experiment=qwen3_30b_a3b data=megatron data.paths=[/data/corpus] \
#       data.tokenizer=/data/corpus.tokenizer.json          # Qwen3-30B-A3B on one 8-GPU node
#   launch/torchrun.sh -- model=tiny            # NGPUS defaults to every visible GPU (1 on CPU)
#
# Only the environment lives here; hyperparameters are Hydra overrides, passed through as given.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ngpus=""
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    ngpus=$1
    shift
fi
if [[ $# -gt 0 && $1 == "--" ]]; then
    shift
fi
if [[ -z $ngpus ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        ngpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    fi
    if [[ -z $ngpus || $ngpus -lt 1 ]]; then
        ngpus=1  # no GPU: one CPU process, enough for the tiny config
    fi
fi

# torchrun would set 1 thread per process; share the cores instead, so data loading and the CPU
# side of the step are not starved (an explicit OMP_NUM_THREADS wins).
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    threads=$(( $(nproc) / ngpus ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi
# Fewer out-of-memory failures from fragmentation when sequence lengths or expert loads vary.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONUNBUFFERED=1

# NCCL: the defaults are right on a single NVLink node. Uncomment to debug or to pin interfaces.
# export NCCL_DEBUG=INFO              # or WARN; INFO prints topology and the chosen algorithms
# export NCCL_DEBUG_SUBSYS=INIT,GRAPH
# export NCCL_P2P_DISABLE=1           # only to rule out a broken NVLink/P2P path
# export TORCH_NCCL_BLOCKING_WAIT=1   # surface a hung collective as an error, at some speed cost

# exec keeps this pid: it becomes torchrun, the workers' parent; a worker whose launcher dies
# stops with it (trainer/run_lock.py stop_with_launcher).
export FP8MOE_LAUNCHER_PID=$$
exec torchrun --standalone --nnodes 1 --nproc_per_node "$ngpus" "$repo_dir/train.py" "$@"
