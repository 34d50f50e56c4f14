"""The GPU tests and every benchmark on this machine, one after the other, with one command.

    python -m bench.all [--only tests,kernels,...] [--deadline S] [--log-dir DIR]
                        [--pytest-args "-k router"] [--dry-run]

Each stage is a subprocess with its own time limit and log file (LOG_DIR/<stage>.log; default
outputs/bench/<timestamp>/), run from the repository root:
  tests        python -m pytest -m gpu (--pytest-args are appended, e.g. "-k permute")
  kernels, moe_block, train_step, step_profile, gemm, linear   python -m bench.<stage>, its default rows
  all_to_all   bench.all_to_all under torchrun on 2 GPUs          (2+ GPUs only)
  scaling      bench.scaling, which schedules its own torchruns   (2+ GPUs only)
  memory_plan  bench.memory_plan: the memory plan against measured peaks on one GPU
  fp8_all_gather  bench.fp8_all_gather: one FSDP rank's share of the FP8 weight quantization
Default: every stage this machine can run; a stage that needs more GPUs than are visible is
reported as skipped. A failing stage does not stop the others. --deadline S: everything ends S
seconds after the start; a stage whose expected duration no longer fits is skipped, a running one
is stopped at it. The last thing printed is one table: each stage's status, seconds and the
bench/results/*.json files it wrote. Exit code 1 when a stage failed or timed out.
LOG_DIR also gets gpu_clocks.csv (nvidia-smi every 500 ms): a slow spell in a timing shows there
as a lower SM clock or an active power cap.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL this much later


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]
    expected_s: float  # a typical run on one fresh H100/H200 (compilation and autotuning included)
    limit_s: float  # stopped after this long, deadline or not
    min_gpus: int = 1


@dataclass(frozen=True)
class Outcome:
    stage: str
    status: str  # "ok", "failed rc=N", "timed out" or "skipped: <why>"
    seconds: float
    results: tuple[str, ...]


def default_stages(pytest_args: Sequence[str] = ()) -> tuple[Stage, ...]:
    """The stages in the order they run; expected_s from H200 runs (bench/NOTES.md), limit_s
    with room for a slower or busier machine."""
    py = sys.executable  # the interpreter running this, so that every stage sees the same packages
    torchrun = (py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    return (
        Stage("tests", (py, "-m", "pytest", "-m", "gpu", "-q", "--durations=15", *pytest_args), 240, 600),
        Stage("kernels", (py, "-m", "bench.kernels"), 420, 900),
        Stage("moe_block", (py, "-m", "bench.moe_block"), 300, 600),
        Stage("train_step", (py, "-m", "bench.train_step"), 450, 900),
        Stage("step_profile", (py, "-m", "bench.step_profile"), 240, 480),
        Stage("gemm", (py, "-m", "bench.gemm"), 90, 240),
        Stage("linear", (py, "-m", "bench.linear"), 180, 360),
        Stage("all_to_all", (*torchrun, "-m", "bench.all_to_all"), 90, 300, min_gpus=2),
        # bench.scaling starts no job after its --deadline-s (540) and stops each after 300 s
        Stage("scaling", (py, "-m", "bench.scaling"), 600, 900, min_gpus=2),
        Stage("memory_plan", (py, "-m", "bench.memory_plan"), 120, 300),
        Stage("fp8_all_gather", (py, "-m", "bench.fp8_all_gather"), 120, 300),
        Stage("glue", (py, "-m", "bench.glue"), 90, 240),
        Stage("hf_experts", (py, "-m", "bench.hf_experts"), 240, 480),
        Stage("optim_step", (py, "-m", "bench.optim_step"), 60, 180),
    )


def parse_only(text: str | None, names: Sequence[str]) -> list[str]:
    """The stages --only names, in the table's order; ValueError naming the unknown ones."""
    if text is None:
        return list(names)
    picked = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in picked if s not in names]
    if unknown or not picked:
        raise ValueError(f"--only: unknown stage(s) {unknown or [text]}; allowed: {', '.join(names)}")
    return [n for n in names if n in picked]


def skip_reason(stage: Stage, gpus: int, left_s: float | None) -> str | None:
    """Why the stage cannot run now (None: it can): too few GPUs, or not enough time left."""
    if gpus < stage.min_gpus:
        return f"needs {stage.min_gpus} GPUs, {gpus} visible"
    if left_s is not None and stage.expected_s > left_s:
        return f"needs ~{stage.expected_s:.0f}s, {max(left_s, 0):.0f}s left before the deadline"
    return None


def visible_gpus() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def stop(proc: subprocess.Popen) -> None:
    """Stop the stage's whole process group: torchrun's workers and bench.scaling's jobs too."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:  # whatever is left: the leader, or children that outlived it and still hold a GPU
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_stage(stage: Stage, limit_s: float, log: Path) -> str:
    """Run the stage into its log, stopped after limit_s; its status for the table."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the stage as it runs
    with log.open("w") as f:
        f.write(f"$ {shlex.join(stage.argv)}\n")
        f.flush()
        # A process group of its own, so that stop() reaches every process the stage started.
        proc = subprocess.Popen(stage.argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            return "timed out"
        except KeyboardInterrupt:  # Ctrl-C reaches only this process: the stage's group is its own
            stop(proc)
            raise
    return "ok" if rc == 0 else f"failed rc={rc}"


def written_since(results_dir: Path, start_ns: int) -> tuple[str, ...]:
    """The results files a stage wrote: stages run one at a time, so what is newer is theirs."""
    return tuple(sorted(p.name for p in results_dir.glob("*.json") if p.stat().st_mtime_ns >= start_ns))


def start_clock_log(path: Path) -> subprocess.Popen | None:
    """nvidia-smi's clocks, power and throttle reasons into path every 500 ms, where it exists."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    with path.open("w") as f:
        return subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv", "-lms", "500"],
                                stdout=f, stderr=subprocess.STDOUT)


def run_all(stages: Sequence[Stage], gpus: int, deadline_s: float | None, log_dir: Path,
            results_dir: Path) -> list[Outcome]:
    t0 = time.monotonic()
    outcomes: list[Outcome] = []

    def say(msg: str) -> None:
        print(f"[+{time.monotonic() - t0:4.0f}s] {msg}", flush=True)

    for stage in stages:
        left = None if deadline_s is None else deadline_s - (time.monotonic() - t0)
        why = skip_reason(stage, gpus, left)
        if why:
            say(f"{stage.name}: skipped: {why}")
            outcomes.append(Outcome(stage.name, f"skipped: {why}", 0.0, ()))
            continue
        limit = stage.limit_s if left is None else min(stage.limit_s, left)
        log = log_dir / f"{stage.name}.log"
        say(f"{stage.name}: started, limit {limit:.0f}s, log {log}")
        start, start_ns = time.monotonic(), time.time_ns()
        status = run_stage(stage, limit, log)
        secs = time.monotonic() - start
        say(f"{stage.name}: {status} after {secs:.0f}s")
        outcomes.append(Outcome(stage.name, status, secs, written_since(results_dir, start_ns)))
    return outcomes


def format_table(outcomes: Sequence[Outcome]) -> str:
    rows = [("stage", "status", "seconds", "results")]
    rows += [(o.stage, o.status, f"{o.seconds:.0f}", ", ".join(o.results) or "-") for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:{widths[0]}}  {b:{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows)


def dry_run(stages: Sequence[Stage], gpus: int, deadline_s: float | None) -> None:
    """The plan, by expected durations; nothing runs and nothing is written."""
    if gpus == 0:
        print("no CUDA GPU visible: a real run refuses; planned here as on one GPU")
    print(f"plan for {max(gpus, 1)} GPU(s)" + (f", deadline {deadline_s:.0f}s" if deadline_s is not None else ""))
    at = 0.0
    for stage in stages:
        why = skip_reason(stage, max(gpus, 1), None if deadline_s is None else deadline_s - at)
        if why:
            print(f"{stage.name}: skip: {why}")
            continue
        print(f"{stage.name}: at ~{at:.0f}s, expected ~{stage.expected_s:.0f}s, limit {stage.limit_s:.0f}s: "
              f"{shlex.join(stage.argv)}")
        at += stage.expected_s


def main(argv: Sequence[str] | None = None, stages: Sequence[Stage] | None = None, gpus: int | None = None,
         results_dir: Path = RESULTS) -> int:
    """stages, gpus and results_dir replace the real table, GPU count and results folder (tests)."""
    p = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma list of stages (default: every one this machine can run)")
    p.add_argument("--deadline", type=float, default=None, help="seconds from the start by which all ends")
    p.add_argument("--log-dir", default=None, help="default outputs/bench/<timestamp>/")
    p.add_argument("--pytest-args", default="", help='more arguments for the tests stage, e.g. "-k permute"')
    p.add_argument("--dry-run", action="store_true", help="list what would run and the commands")
    args = p.parse_args(argv)
    table = tuple(stages) if stages is not None else default_stages(shlex.split(args.pytest_args))
    try:
        names = parse_only(args.only, [s.name for s in table])
    except ValueError as err:
        p.error(str(err))
    if args.deadline is not None and args.deadline <= 0:
        p.error(f"--deadline must be > 0 seconds, got {args.deadline}")
    picked = [s for s in table if s.name in names]
    gpus = visible_gpus() if gpus is None else gpus
    if args.dry_run:
        dry_run(picked, gpus, args.deadline)
        return 0
    if gpus == 0:  # before anything is written: as every benchmark, this needs a GPU
        print("bench.all needs a CUDA GPU (Hopper: H100/H200); --dry-run shows the plan", file=sys.stderr)
        return 2

    from bench.common import run_info

    log_dir = Path(args.log_dir or REPO / "outputs" / "bench" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    log_dir.mkdir(parents=True, exist_ok=True)
    info = run_info()
    header = f"commit {info['commit']}, {gpus} x {info['gpu']}, torch {info['torch']}, triton {info['triton']}"
    (log_dir / "env.txt").write_text(header + "\n")
    print(header, flush=True)
    clocks = start_clock_log(log_dir / "gpu_clocks.csv")
    try:
        outcomes = run_all(picked, gpus, args.deadline, log_dir, results_dir)
    finally:
        if clocks is not None:
            clocks.terminate()
            clocks.wait()
    summary = format_table(outcomes)
    (log_dir / "summary.txt").write_text(summary + "\n")
    print(f"logs in {log_dir}\n{summary}")
    return 1 if any(o.status == "timed out" or o.status.startswith("failed") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
