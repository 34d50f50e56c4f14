#!/usr/bin/env bash
# One device call on a 2-GPU machine (nvidia-h200-x2), ~9.5 min, two lanes side by side:
#   GPU 0  1. pytest -m gpu (per-test timeout 120 s)
#          2. issue 7's loss parity: the corpus (tools/prepare_python_corpus.py, CPU only, prepared
#             while the tests run), then configs/experiment/parity_300m.yaml with fp8=bf16, rowwise
#             and blockwise (1000 steps each, the three side by side on GPU 0: a small model leaves
#             the GPU idle between kernels, so three share it at little cost), then
#             tools/parity_report.py over the three run directories
#   GPU 1  bench.kernels, bench.moe_block, bench.train_step, bench.gemm, bench.linear (eager impls),
#          bench.linear (compiled impls, into linear_compiled.json), each under its own time limit
# With one GPU the two lanes run one after the other on it (pick stages to fit a call).
# Expected on 2 x H200 / 32 cores: set-up ~15 s. GPU 0: tests ~150-180 s (limit 240 s), the corpus
# (~1 min on CPU) beside them; the three parity runs together ~3-4 min (start-up ~45 s, 1000 steps
# of ~50 ms of GPU work each, so ~150 s shared; end-of-run checkpoints ~10 s), the report ~10 s:
# done at ~7-7.5 min. Their tokens/s are measured while sharing the GPU: bench.train_step gives the
# throughput of the same model alone. GPU 1: kernels ~5 min (~310 s on a fresh H200, session 8),
# moe_block ~5 (3 x 500 ms of steps per row and setting), train_step ~2, gemm ~1.5, linear ~1,
# linear_compiled what is left (limits: BENCH_CAP below). With one GPU, tests + moe_block fill one
# call; tests (~225 s, 108 of them at 14143dd) + kernels (154 rows, ~5.5 min fresh) no longer do:
# the kernels bench ran out of time at 258 s after five of its eight families (H200, session 10),
# so give it a call of its own, or the families left over with `bench.kernels --only`.
#
#   FP8MOE_COMMIT=$(git rev-parse HEAD) bash bench/gpu_session.sh [STAGE ...]
#   STAGE: tests | parity | bench (default: all three; also STAGES="tests bench")
#
# Every stage has a time limit and a log; a failing stage does not stop the others; a stage that
# would start too close to the deadline (DEADLINE_S after the start) is skipped and says so.
# What comes back ($OUT; at most 8 files come back from a device call, so everything is packed):
#   session.tar.gz  logs/ (one log per stage), results/ (bench/results/*.json made by this call),
#                   parity/ (each run's metrics.jsonl, .hydra/config.yaml and train.log under
#                   parity/<run>/, and the report: parity.png, parity.md, <run>.json; parity/partial/
#                   instead when a run did not reach its last step), corpus.stats.json, status.tsv,
#                   env.txt, summary.txt; repacked every 30 s, so a call cut short still returns it
#   summary.txt, parity.png, parity.md   loose copies
# Knobs (environment):
#   DEADLINE_S (555)        seconds from the start by which every stage must have ended
#   KEXPR                   pytest -k expression for the GPU tests
#   BENCHES                 default "kernels moe_block train_step gemm linear linear_compiled";
#                           also moe_block_compiled, moe_block_bf16w, moe_block_profile (a log only)
#   PARITY_RECIPES          default "bf16 rowwise blockwise"
#   PARITY_SERIAL=1         the parity runs one after the other instead of side by side
#   PARITY_ARGS             extra Hydra overrides for every parity run
#   CORPUS_MAX_BYTES (160000000), CORPUS_BPE_BYTES (64000000), CORPUS_WORKERS (8)
#   SESSION_DIR, CORPUS_DIR, PARITY_ROOT   staging, corpus and run directories (under /tmp;
#                           the runs under /dev/shm when it has 30 GB free)
#   DRY=1                   CPU check of the plumbing: tests collected only, benches --help, the
#                           corpus capped at 3 MB, the parity runs 4 steps of 2 x 64 tokens, serial
set -uo pipefail

t_start=$(date +%s)
deadline=$(( t_start + ${DEADLINE_S:-555} ))
stages=" ${*:-${STAGES:-tests parity bench}} "
for s in $stages; do
    case $s in tests|parity|bench) ;; *) echo "unknown stage '$s' (tests, parity, bench)"; exit 2 ;; esac
done
has() { [[ $stages == *" $1 "* ]]; }
dry=${DRY:-0}
repo=$PWD
out=${OUT:-/tmp/fp8moe_out}
work=${SESSION_DIR:-/tmp/fp8moe_session}  # everything lands here first, then is packed into $out
rm -rf "$work" && mkdir -p "$work/logs" "$work/results" "$work/parity" "$out"
printf 'lane\tstage\tstatus\tseconds\tstart_s\n' > "$work/status.tsv"

elapsed() { echo $(( $(date +%s) - t_start )); }
stamp() { printf '[+%3ds] %s\n' "$(elapsed)" "$*"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$work/status.tsv"; }

# run_stage LANE NAME CAP_S RESERVE_S CMD...: CMD under `timeout`, its output in logs/NAME.log; the
# limit is CAP_S, or less so that RESERVE_S remain before the deadline (skipped under 20 s).
run_stage() {
    local lane=$1 name=$2 cap=$3 reserve=$4
    shift 4
    local left=$(( deadline - $(date +%s) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 20 )); then
        stamp "$lane: $name skipped (${left}s left before the deadline)"
        record "$lane" "$name" skipped 0 "$(elapsed)"
        return 124
    fi
    stamp "$lane: $name (limit ${limit}s)"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" > "$work/logs/$name.log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status="failed(rc=$rc)" ;; esac
    stamp "$lane: $name $status after $(( $(date +%s) - t0 ))s"
    record "$lane" "$name" "$status" "$(( $(date +%s) - t0 ))" "$(( t0 - t_start ))"
    return $rc
}

pack() {  # the staging directory into $out/session.tar.gz (+ loose copies); safe from both lanes
    (
        flock 9
        tar -czf "$out/session.tar.gz.tmp" -C "$work" --exclude=.pack.lock --exclude=.bench_start . 2>/dev/null
        (( $? <= 1 )) && mv -f "$out/session.tar.gz.tmp" "$out/session.tar.gz"  # 1: a file grew meanwhile
        for f in parity/parity.png parity/parity.md summary.txt; do
            [[ -f $work/$f ]] && cp -f "$work/$f" "$out/"
        done
        if [[ ! -f $work/parity/parity.md && -f $work/parity/partial/parity.md ]]; then
            cp -f "$work/parity/partial/parity.png" "$out/parity_partial.png" 2>/dev/null
            cp -f "$work/parity/partial/parity.md" "$out/parity_partial.md"
        fi
    ) 9> "$work/.pack.lock"
}

# ---- set-up -------------------------------------------------------------------------------------
PIP_LOG="$work/logs/pip.log" source bench/device_env.sh  # wheels, PYTHONPATH (with $repo = $PWD)
[[ -n ${FP8MOE_COMMIT:-} ]] || echo "warning: FP8MOE_COMMIT is unset (the tree travels without .git): results say 'unknown'"
if [[ $dry == 1 ]]; then
    ngpu=0
elif command -v nvidia-smi >/dev/null; then
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
else
    ngpu=0
fi
if [[ $dry != 1 ]] && (( ngpu == 0 )); then
    echo "no GPU found (nvidia-smi -L); DRY=1 checks the plumbing on CPU"
    exit 2
fi
{
    echo "commit ${FP8MOE_COMMIT:-unknown}  stages:$stages dry=$dry gpus=$ngpu cpus=$(nproc)"
    [[ $dry == 1 ]] || nvidia-smi --query-gpu=index,name,memory.used,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
    python3 -W ignore -c 'import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)
import megatron.core as m, hydra, omegaconf
print("megatron-core", m.__version__, "hydra", hydra.__version__, "omegaconf", omegaconf.__version__)' 2>&1 | tail -n 2
} > "$work/env.txt"
cat "$work/env.txt"
( while sleep 30; do pack; done ) &
packer=$!

# ---- lane A: GPU tests, then loss parity -------------------------------------------------------
RECIPES=${PARITY_RECIPES:-bf16 rowwise blockwise}
parity_root=/tmp/fp8moe_parity
shm_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
(( ${shm_kib:-0} > 30 * 1024 * 1024 )) && parity_root=/dev/shm/fp8moe_parity  # 3 end-of-run checkpoints, ~4 GB each
parity_root=${PARITY_ROOT:-$parity_root}  # run directories, checkpoints deleted as each run ends
corpus_dir=${CORPUS_DIR:-/tmp/fp8moe_corpus}  # FP8MOE_CACHE: configs/experiment/parity_300m.yaml reads the corpus there

prepare_corpus() {
    local args=(--max-bytes "${CORPUS_MAX_BYTES:-160000000}" --bpe-max-bytes "${CORPUS_BPE_BYTES:-64000000}"
                --workers "${CORPUS_WORKERS:-8}")
    [[ $dry == 1 ]] && args=(--max-bytes 3000000 --bpe-max-bytes 1000000 --workers 1)
    FP8MOE_CACHE=$corpus_dir run_stage A corpus 420 0 python3 tools/prepare_python_corpus.py "${args[@]}"
    local rc=$?
    cp -f "$corpus_dir/python_corpus/python_sources.stats.json" "$work/corpus.stats.json" 2>/dev/null
    return $rc
}

parity_run() {  # RECIPE GPU LIMIT_S: one train.py run; its checkpoint is deleted when it ends
    local r=$1 gpu=$2 limit=$3 args=()
    [[ $dry == 1 ]] && args=(run.steps=4 run.seq_len=64 run.micro_batch_size=2 logging.interval=1
                             run.eval_interval=2 run.eval_steps=1)
    # shellcheck disable=SC2206
    args+=(${PARITY_ARGS:-})
    CUDA_VISIBLE_DEVICES=$gpu FP8MOE_CACHE=$corpus_dir OMP_NUM_THREADS=4 TRITON_INTERPRET=0 \
        run_stage A "parity_$r" "$limit" 0 python3 train.py experiment=parity_300m "fp8=$r" \
        logging.wandb=disabled "run.output_root=$parity_root" checkpoint.resume=none \
        "data.cache_dir=$parity_root/index_$r" "${args[@]}"
    rm -rf "$parity_root/parity_300m-$r/checkpoints"
}

cat > "$work/.parity_collect.py" <<'EOF'
"""Copy the parity runs (no checkpoints) into DEST; print the run dirs for the report, or, when some
run stopped early, make copies cut to the steps all runs reached under DEST/partial and print those."""
import json, shutil, sys
from pathlib import Path

import yaml

root, dest, recipes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split()
runs = {}
for r in recipes:
    src = root / f"parity_300m-{r}"
    if not (src / "metrics.jsonl").is_file():
        print(f"parity_300m-{r}: no metrics.jsonl", file=sys.stderr)
        continue
    shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("checkpoints", "wandb"), dirs_exist_ok=True)
    recs = [json.loads(l) for l in (src / "metrics.jsonl").read_text().splitlines() if l.strip()]
    last = max((x["step"] for x in recs if "loss" in x), default=0)
    target = yaml.safe_load((src / ".hydra" / "config.yaml").read_text())["run"]["steps"]
    runs[src.name] = (last, target, recs)
    print(f"{src.name}: last logged step {last} of {target}", file=sys.stderr)
if "parity_300m-bf16" not in runs or len(runs) < 2:
    sys.exit("parity: need the bf16 run and at least one FP8 run with metrics")
if all(last == target for last, target, _ in runs.values()):
    print(" ".join(runs))
    sys.exit(0)
common = min(last for last, _, _ in runs.values())
if common == 0:
    sys.exit("parity: a run logged no step")
for name, (_, _, recs) in runs.items():
    d = dest / "partial" / name
    shutil.copytree(dest / name, d, dirs_exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs if x["step"] <= common))
print(" ".join(f"partial/{n}" for n in runs))
print(f"parity: runs stopped early; the report covers steps <= {common}: parity/partial/", file=sys.stderr)
EOF

parity() {  # [CORPUS_PID]: waits for the corpus first
    local prep_pid=${1:-}
    if [[ -n $prep_pid ]] && ! wait "$prep_pid"; then
        stamp "A: the corpus failed: no parity runs (logs/corpus.log)"
        record A parity skipped 0 "$(elapsed)"
        return 1
    fi
    rm -rf "$parity_root" && mkdir -p "$parity_root"
    local gpu=${GPU_A:-0} reserve=45 r
    local -a recipes
    read -r -a recipes <<< "$RECIPES"
    if [[ ${PARITY_SERIAL:-$dry} == 1 ]]; then
        local n=${#recipes[@]} i=0
        for r in "${recipes[@]}"; do  # an equal share of what is left for each run still to come
            parity_run "$r" "$gpu" $(( (deadline - $(date +%s) - reserve) / (n - i) ))
            i=$(( i + 1 ))
        done
    else
        local pids=()
        for r in "${recipes[@]}"; do
            parity_run "$r" "$gpu" $(( deadline - $(date +%s) - reserve )) &
            pids+=($!)
            sleep 2  # stagger the start-up (imports, corpus index)
        done
        wait "${pids[@]}"
    fi
    local dirs
    dirs=$(python3 "$work/.parity_collect.py" "$parity_root" "$work/parity" "$RECIPES" 2> "$work/logs/parity_collect.log")
    cat "$work/logs/parity_collect.log"
    [[ -n $dirs ]] || { record A parity_report skipped 0 "$(elapsed)"; return 1; }
    local outdir=.
    [[ $dirs == partial/* ]] && outdir=partial
    # shellcheck disable=SC2086
    (cd "$work/parity" && run_stage A parity_report 60 0 python3 "$repo/tools/parity_report.py" $dirs \
        --out "$outdir" --wandb off)
}

lane_a() {
    export CUDA_VISIBLE_DEVICES=${GPU_A:-0}
    local prep_pid=""
    if has parity; then
        prepare_corpus &
        prep_pid=$!
    fi
    if has tests; then
        # --durations: the tests took ~230 s on a fresh H200 in session 8 (~150-180 before), near
        # the 240 s limit they get beside the parity runs: the log says which grew.
        local args=(-m gpu -q -p no:cacheprovider --continue-on-collection-errors --durations=15)
        python3 -c 'import pytest_timeout' 2>/dev/null && args+=(--timeout 120)
        [[ -n ${KEXPR:-} ]] && args+=(-k "$KEXPR")
        [[ $dry == 1 ]] && args+=(--co tests/test_router.py tests/test_permute.py)
        local cap=240
        has parity || cap=540
        run_stage A gpu_tests "$cap" 0 python3 -m pytest "${args[@]}"
    fi
    if has parity; then
        parity "$prep_pid"
    fi
    pack
}

# ---- lane B: benchmarks ------------------------------------------------------------------------
declare -A BENCH_CAP=([kernels]=330 [moe_block]=420 [train_step]=170 [gemm]=120 [linear]=120
                      [linear_compiled]=150 [moe_block_compiled]=150 [moe_block_bf16w]=90
                      [moe_block_profile]=120)  # seconds; any other bench.NAME in BENCHES gets 120
lane_b() {
    export CUDA_VISIBLE_DEVICES=${GPU_B:-1}
    local b json cmd
    for b in ${BENCHES:-kernels moe_block train_step gemm linear linear_compiled}; do
        json=$b
        [[ $b == moe_block_bf16w ]] && json=moe_block_bf16_weights
        case $b in
            linear) cmd=(python3 -m bench.linear --impls "bf16,ours_eager,torchao_eager") ;;
            linear_compiled) cmd=(python3 -m bench.linear --impls "ours_compiled,torchao_compiled"
                                  --out bench/results/linear_compiled.json) ;;
            # issue 5's eager-vs-compiled bar, at the largest and the many-small-experts shape
            moe_block_compiled) cmd=(python3 -m bench.moe_block --shapes mixtral_8x7b,qwen3_30b_a3b
                                     --routings skewed --impls rowwise,rowwise_compiled,blockwise,blockwise_compiled
                                     --out bench/results/moe_block_compiled.json) ;;
            # bf16 parameters (no cast in the BF16 path): the other weight setting, skewed only
            moe_block_bf16w) cmd=(python3 -m bench.moe_block --weights bf16 --routings skewed
                                  --out bench/results/moe_block_bf16_weights.json) ;;
            # GPU time per kernel (the log is the result; the JSON stays on the machine)
            moe_block_profile) cmd=(python3 -m bench.moe_block --shapes mixtral_8x7b,qwen3_30b_a3b --routings skewed
                                    --impls bf16,rowwise,blockwise --profile --out /tmp/moe_block_profile.json) ;;
            *) cmd=(python3 -m "bench.$b") ;;
        esac
        [[ $dry == 1 ]] && cmd=(python3 -m "${cmd[2]}" --help)
        touch -d "@$(( $(date +%s) - 1 ))" "$work/.bench_start"  # a second back: coarse mtimes
        run_stage B "bench_$b" "${BENCH_CAP[$b]:-120}" 0 "${cmd[@]}"
        if [[ "bench/results/$json.json" -nt "$work/.bench_start" ]]; then  # only what this call made
            cp -f "bench/results/$json.json" "$work/results/"
        fi
        pack
    done
}

# ---- run ---------------------------------------------------------------------------------------
# Clocks, power and throttle reasons every 500 ms into logs/gpu_clocks.csv: a slow spell in a
# timing (issue 5's repeatability) shows here as a lower SM clock or an active power cap.
if command -v nvidia-smi > /dev/null && [[ $dry != 1 ]]; then
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv -lms 500 > "$work/logs/gpu_clocks.csv" 2>&1 &
    clocks_pid=$!
fi
if (( ngpu >= 2 )) && has bench && { has tests || has parity; }; then
    GPU_A=0 GPU_B=1
    lane_a &
    pid_a=$!
    lane_b &
    pid_b=$!
    wait "$pid_a" "$pid_b"
else  # one GPU (or CPU): one lane after the other
    GPU_A=0 GPU_B=0
    if has tests || has parity; then lane_a; fi
    if has bench; then lane_b; fi
fi
kill "$packer" ${clocks_pid:-} 2>/dev/null
wait "$packer" ${clocks_pid:-} 2>/dev/null

# ---- the short report, the summary table last --------------------------------------------------
cat > "$work/.summary.py" <<'EOF'
import json, re, sys
from pathlib import Path

work = Path(sys.argv[1])
rows = [l.split("\t") for l in (work / "status.tsv").read_text().splitlines()[1:] if l.strip()]


def note(stage):
    log = work / "logs" / f"{stage}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    if stage == "gpu_tests":
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*?) in [\d.]+s", text, re.M)
        return m[-1] if m else (text.strip().splitlines() or ["no output"])[-1][:70]
    if stage == "corpus" and (work / "corpus.stats.json").is_file():
        s = json.loads((work / "corpus.stats.json").read_text())
        return f"{s['bytes'] / 1e6:.0f} MB, {s['files']} files, {s['tokens'] / 1e6:.1f}M tokens"
    if stage.startswith("parity_") and stage != "parity_report":
        metrics = work / "parity" / f"parity_300m-{stage[len('parity_'):]}" / "metrics.jsonl"
        recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.is_file() else []
        train = [r for r in recs if "loss" in r]
        val = [r for r in recs if "val_loss" in r]
        speed = sorted(r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s"))
        s = re.search(r"params total=(\d+) active=(\d+)", text)
        bits = []
        if train:
            bits.append(f"step {train[-1]['step']} loss {train[-1]['loss']:.4f}")
        if val:
            bits.append(f"val {val[-1]['val_loss']:.4f}")
        if speed:
            bits.append(f"{speed[len(speed) // 2]:,.0f} tok/s")
        if s:
            bits.append(f"{int(s.group(1)) / 1e6:.0f}M/{int(s.group(2)) / 1e6:.0f}M params")
        if not train:
            err = [l for l in text.splitlines() if "Error" in l or "error" in l]
            bits.append((err[-1] if err else "no steps logged")[:70])
        return ", ".join(bits)
    if stage.startswith("bench_"):
        name = stage[len("bench_"):]
        path = work / "results" / f"{name}.json"
        if path.is_file():
            n = len(json.loads(path.read_text()).get("rows", []))
            return f"results/{name}.json, {n} rows"
        return "no json"
    return ""


def clocks():
    """One line from logs/gpu_clocks.csv: SM clocks and how often the power cap held them, over
    the samples drawing > 300 W (the GPU at work)."""
    path = work / "logs" / "gpu_clocks.csv"
    busy = []
    for line in (path.read_text(errors="replace").splitlines()[1:] if path.is_file() else []):
        f = [x.strip() for x in line.split(",")]
        try:
            sm, watts, reasons = int(f[2].split()[0]), float(f[4].split()[0]), int(f[6], 16)
        except (IndexError, ValueError):
            continue
        if watts > 300:
            busy.append((sm, reasons))
    if not busy:
        return []
    sms = sorted(sm for sm, _ in busy)
    capped = sum(1 for _, r in busy if r & 0x4) / len(busy)  # 0x4: software power cap
    return [f"gpu clocks (logs/gpu_clocks.csv, {len(busy)} samples > 300 W): SM {sms[0]}-{sms[-1]} MHz, "
            f"median {sms[len(sms) // 2]}; power cap active in {capped:.0%}"]


failed = [r[1] for r in rows if r[2] != "ok"]
lines = [f"== session summary: {(work / 'env.txt').read_text().splitlines()[0]}",
         f"{'stage':26} {'lane':4} {'status':14} {'secs':>5} {'start':>6}  note"]
for lane, stage, status, secs, start in rows:
    lines.append(f"{stage:26} {lane:4} {status:14} {secs:>5} {'+' + start:>6}  {note(stage)}")
for md in ("parity/parity.md", "parity/partial/parity.md"):
    if (work / md).is_file():
        lines += [f"-- {md}", (work / md).read_text().rstrip()]
lines += clocks()
lines.append(f"not ok: {', '.join(failed)}" if failed else "all stages ok")
text = "\n".join(lines) + "\n"
(work / "summary.txt").write_text(text)
print(text, end="")
EOF
{
    if [[ -f $work/logs/gpu_tests.log ]]; then
        echo "== GPU tests (logs/gpu_tests.log)"
        grep -E "^(FAILED|ERROR)|Timeout" "$work/logs/gpu_tests.log" | cut -c1-200 | head -n 25
        tail -n 2 "$work/logs/gpu_tests.log" | cut -c1-200
    fi
    for f in "$work"/logs/bench_*.log; do
        [[ -f $f ]] || continue
        echo "== $(basename "$f" .log) (tail)"
        tail -n "${BENCH_TAIL:-8}" "$f" | cut -c1-160
    done
} | tee "$work/tails.txt"
stamp "done"
python3 "$work/.summary.py" "$work"
pack
