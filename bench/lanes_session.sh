#!/usr/bin/env bash
# GPU tests and benchmarks spread over the GPUs of one machine (4 x H200: ~5 min for what takes a
# single GPU ~20), one lane per GPU, in one device call:
#   FP8MOE_COMMIT=<hash> bash bench/lanes_session.sh "STAGE STAGE ..." "STAGE ..." ...
# The Nth argument is GPU N-1's lane, its stages run one after the other. STAGE:
#   tests                 pytest -m gpu (-k "$KEXPR" when set)
#   kernels:FAM,FAM       bench.kernels --only FAM,FAM into kernels_part<GPU>.json; after the
#                         lanes, every part is merged into bench/results/kernels.json
#   train_step | gemm | linear | moe_block | all_to_all-free bench.NAME with its defaults
#   linear_compiled       bench.linear, compiled impls, into linear_compiled.json
#   linear_all            bench.linear, every impl (eager and compiled side by side), linear.json
#   train_step_accum8     bench.train_step, mixtral_2layer, 8 micro-batches a step
#   kernels_cast          bench.kernels --only cast into kernels_cast.json (ours vs torch's .to)
#   moe_block_compiled    bench.moe_block, eager and compiled, mixtral and qwen3, skewed
# Every stage runs under `timeout` (DEADLINE_S, default 560 s from the start, caps them all) and
# writes logs/<lane>_<stage>.log. Back in $OUT: session.tar.gz (logs/, results/ with the JSON
# files this call wrote) and summary.txt (each stage's status and the tails of its log).
set -uo pipefail
out=${OUT:-/tmp/fp8moe_out}
work=/tmp/fp8moe_lanes
rm -rf "$work" && mkdir -p "$work/logs" "$work/results" "$out"
t_start=$(date +%s)
deadline=$(( t_start + ${DEADLINE_S:-560} ))
PIP_LOG="$work/logs/pip.log" source bench/device_env.sh
touch -d "@$(( t_start - 1 ))" "$work/.start"
echo "commit ${FP8MOE_COMMIT:-unknown}; lanes: $#" | tee "$work/summary.txt"
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm,temperature.gpu --format=csv,noheader

stage_cmd() {  # gpu stage -> the command line
    local gpu=$1 stage=$2
    case $stage in
        tests) echo "python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors ${KEXPR:+-k \"$KEXPR\"}" ;;
        kernels:*) echo "python3 -m bench.kernels --only ${stage#kernels:} --out $work/kernels_part$gpu.json" ;;
        linear_compiled) echo "python3 -m bench.linear --impls ours_compiled,torchao_compiled --out bench/results/linear_compiled.json" ;;
        # every impl in one process: eager against compiled measured side by side (issue 8's bar)
        linear_all) echo "python3 -m bench.linear --impls bf16,ours_eager,ours_compiled,torchao_eager,torchao_compiled" ;;
        # 8 micro-batches a step (32k tokens): the optimizer and weight quantization amortised
        # as in real training, FP8 weights cached across the micro-batches
        kernels_cast) echo "python3 -m bench.kernels --only cast --out bench/results/kernels_cast.json" ;;
        train_step_accum8) echo "python3 -m bench.train_step --models mixtral_2layer --override run.grad_accum=8 --out bench/results/train_step_accum8.json" ;;
        moe_block_compiled) echo "python3 -m bench.moe_block --shapes mixtral_8x7b,qwen3_30b_a3b --routings skewed --impls rowwise,rowwise_compiled,blockwise,blockwise_compiled --out bench/results/moe_block_compiled.json" ;;
        *) echo "python3 -m bench.$stage" ;;
    esac
}

lane() {  # gpu "stages"
    local gpu=$1 stage cmd left rc t0
    for stage in $2; do
        left=$(( deadline - $(date +%s) ))
        if (( left < 30 )); then
            echo "GPU$gpu $stage skipped (${left}s left)" >> "$work/summary.txt"; continue
        fi
        cmd=$(stage_cmd "$gpu" "$stage")
        t0=$(date +%s)
        echo "[+$(( t0 - t_start ))s] GPU$gpu: $stage (limit ${left}s)"
        CUDA_VISIBLE_DEVICES=$gpu timeout -k 10 "$left" bash -c "$cmd" > "$work/logs/gpu${gpu}_${stage%%:*}.log" 2>&1
        rc=$?
        echo "GPU$gpu $stage rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$work/summary.txt"
    done
}

gpu=0
for stages in "$@"; do
    lane "$gpu" "$stages" &
    gpu=$(( gpu + 1 ))
done
wait

parts=("$work"/kernels_part*.json)
if [[ -e ${parts[0]} ]]; then
    python3 -m bench.kernels --merge "${parts[@]}" > "$work/logs/kernels_merge.log" 2>&1 \
        || echo "kernels merge failed" >> "$work/summary.txt"
    cp -f "${parts[@]}" "$work/results/"
fi
for f in bench/results/*.json; do
    [[ $f -nt "$work/.start" ]] && cp -f "$f" "$work/results/"
done
for log in "$work"/logs/gpu*.log; do
    { echo "== $(basename "$log")"; grep -E "passed|failed|FAILED|ERROR|Error|wrote" "$log" | tail -8; } >> "$work/summary.txt"
done
(cd "$work" && tar czf "$out/session.tar.gz" logs results summary.txt)
cp -f "$work/summary.txt" "$out/"
cat "$work/summary.txt"
