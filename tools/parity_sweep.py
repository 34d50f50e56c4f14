"""A loss-parity sweep: train.py once per (experiment, recipe, seed), K at a time, then the report.

    python tools/parity_sweep.py --experiment parity_300m[,parity_300m_prose] \\
        --recipes bf16,rowwise,blockwise --seeds 1,2,3 [--parallel K] [--out DIR] \\
        [--seed-keys run.seed,data.seed] [--devices 0,1] [--wandb auto|off] [--dry-run] [-- overrides ...]

Each run is `python train.py experiment=E fp8=<recipe> run.seed=S data.seed=S run.name=<name>
run.output_root=DIR <overrides>`: one seed S per pair sets the initialization and the data order
together (--seed-keys run.seed holds the data order at the experiment's data.seed, data.seed the
initialization), so the BF16 spread over seeds covers both sources of run-to-run noise. A recipe
is a label of tools/parity_report.py: an fp8 config group (configs/fp8/) and "+key=value" knobs,
`rowwise+pow2_scales=true` runs `fp8=rowwise fp8.pow2_scales=true`.

Layout: DIR/<name>/ the run directories (name: <experiment>-<recipe>-s<S>, "run" for no
experiment), DIR/logs/<name>.log each run's output, DIR/parity/ the report
(tools/parity_report.py over the sweep's runs). A finished run gets DIR/<name>/run_info.json
(commit, GPU, torch and triton versions, command, seconds), which the report copies, and loses
its checkpoints (parity_300m's: ~3.7 GB a run) unless --keep-checkpoints.

Resuming: a run whose metrics reach its run.steps (and its validation there, when it evaluates)
is skipped; an unfinished one is launched again and resumes from its newest checkpoint. A run
directory launched with other overrides stops the sweep before anything starts (another --out,
or remove it). SIGTERM or Ctrl-C stops the sweep: every running train.py gets SIGTERM, saves a
checkpoint at the end of its step and exits; the same command later carries on. The runs also
get SIGTERM when this process dies (Linux).

Concurrency: --parallel K processes at once. A model as small as parity_300m leaves the GPU idle
between kernels, so several runs share one GPU well (their tokens/s are then measured while
sharing); --devices spreads the K slots over GPUs (CUDA_VISIBLE_DEVICES, round-robin).
A failed run is named with its log's last lines; the others go on, and the report is skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
SEED_KEYS = ("run.seed", "data.seed")
RESERVED = ("fp8", "run.name", "run.output_root", "experiment", *SEED_KEYS)  # the sweep sets these
TAIL_LINES = 25
_PR_SET_PDEATHSIG = 1


@dataclass
class Job:
    name: str
    overrides: list[str]
    run_dir: Path
    log: Path
    cmd: list[str] = field(default_factory=list)  # train.py with the overrides (plan sets it)
    proc: Optional[subprocess.Popen] = None
    slot: int = -1
    started: float = 0.0
    log_file: Optional[object] = field(default=None, repr=False)


def _split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: give a comma-separated list, got {text!r}")
    return items


def recipe_overrides(spec: str) -> list[str]:
    """`rowwise+pow2_scales=true` -> [fp8=rowwise, fp8.pow2_scales=true]; the group must exist."""
    group, *knobs = spec.split("+")
    groups = sorted(p.stem for p in (ROOT / "configs" / "fp8").glob("*.yaml"))
    if group not in groups:
        raise ValueError(f"--recipes: {spec!r} starts with {group!r}; allowed: one of {groups}, then "
                         "optional +key=value fp8 knobs (rowwise+pow2_scales=true)")
    out = [f"fp8={group}"]
    for knob in knobs:
        key, sep, value = knob.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--recipes: {spec!r}: knob {knob!r} must be key=value (an fp8.* key)")
        out.append(f"fp8.{key}={value}")
    return out


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in text)


def plan(experiments: Sequence[str], recipes: Sequence[str], seeds: Sequence[int], seed_keys: Sequence[str],
         out: Path, extra: Sequence[str]) -> list[Job]:
    """Every run of the sweep, experiments outermost, then seeds, then recipes: the runs of one
    seed finish close together, so a stopped sweep leaves whole pairs behind."""
    for override in extra:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in RESERVED or key.startswith("fp8."):
            raise ValueError(f"override {override!r}: the sweep sets {key} itself (--recipes, --seeds, "
                             f"--experiment, --out); allowed: any other key")
    jobs = []
    for exp in experiments or [""]:
        for seed in seeds:
            for spec in recipes:
                name = f"{exp or 'run'}-{_safe(spec)}-s{seed}"
                overrides = [*([f"experiment={exp}"] if exp else []), *recipe_overrides(spec),
                             *(f"{k}={seed}" for k in seed_keys), f"run.name={name}",
                             f"run.output_root={out}", *extra]
                cmd = [sys.executable, "train.py", *overrides]
                jobs.append(Job(name, overrides, out / name, out / "logs" / f"{name}.log", cmd))
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--recipes/--seeds/--experiment repeat a run: {dupes}")
    return jobs


def recorded_overrides(run_dir: Path) -> Optional[list[str]]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def finished(run_dir: Path) -> bool:
    """metrics.jsonl reaches the run's run.steps, with a validation record there when it evaluates."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / ".hydra" / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        return False
    from omegaconf import OmegaConf

    try:
        run = OmegaConf.to_container(OmegaConf.load(config), resolve=True).get("run", {})
        steps, evals = int(run.get("steps", 0)), int(run.get("eval_interval", 0))
    except Exception:  # an unreadable or unresolvable config: not a finished run
        return False
    loss = val = False
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if rec.get("step") == steps:
            loss = loss or "loss" in rec
            val = val or "val_loss" in rec
    return loss and (val or not evals)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the sweep dies, so it checkpoints and stops."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the sweep's own handler still stops the runs
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def environment_info() -> dict:
    """commit, GPU and versions, read in a short-lived process, so this one never holds a CUDA
    context on the GPU the runs share."""
    code = "import json; from bench.common import run_info; print(json.dumps(run_info()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"commit": "unknown", "gpu": "unknown", "torch": "unknown", "triton": "unknown"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Stop(Exception):
    """SIGTERM or SIGINT reached the sweep."""


def _raise_stop(signum, _frame) -> None:
    raise Stop(signal.Signals(signum).name)


def run_jobs(jobs: Sequence[Job], parallel: int, devices: Sequence[str], env: dict, grace_s: float,
             info: Optional[dict] = None, keep_checkpoints: bool = True) -> list[Job]:
    """Run the jobs' commands K at a time from the repository root; returns the failed ones.
    Prints one line per finished run. A job succeeds when its command exits 0 and its run is
    finished; then `info` (default: environment_info()) goes into its run_info.json, and its
    checkpoints are removed unless keep_checkpoints."""
    if info is None:
        info = environment_info() if jobs else {}
    queue, running, failed = list(jobs), [], []
    free = list(range(parallel))
    t0, done, total = time.perf_counter(), 0, len(jobs)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            while queue and free:
                job = queue.pop(0)
                job.slot = free.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                job_env = dict(env)
                if devices:
                    job_env["CUDA_VISIBLE_DEVICES"] = devices[job.slot % len(devices)]
                job.log_file = open(job.log, "a")
                job.log_file.write(f"$ {' '.join(job.cmd)}\n")
                job.log_file.flush()
                job.started = time.perf_counter()
                job.proc = subprocess.Popen(job.cmd, cwd=ROOT, env=job_env,
                                            stdout=job.log_file, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_die_with_parent)
                running.append(job)
            time.sleep(0.2)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                free.append(job.slot)
                job.log_file.close()
                seconds = time.perf_counter() - job.started
                rc = job.proc.returncode
                if rc == 0 and finished(job.run_dir):
                    if not keep_checkpoints:  # a finished parity run is read from its metrics alone
                        shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)
                    info_file = job.run_dir / "run_info.json"
                    info_file.write_text(json.dumps({**info, "command": job.cmd[1:],
                                                     "seconds": round(seconds, 1)}, indent=1) + "\n")
                    done += 1
                    elapsed = time.perf_counter() - t0
                    left = len(queue) + len(running)
                    print(f"[{done}/{total}] {job.name} finished in {_duration(seconds)}; elapsed "
                          f"{_duration(elapsed)}, {left} to go, ETA {_duration(elapsed / done * left)}", flush=True)
                else:
                    failed.append(job)
                    why = f"exit {rc}" if rc else "exit 0 before its last step"
                    print(f"FAILED {job.name} ({why}) after {_duration(seconds)}; log {job.log}, last lines:\n"
                          f"{_tail(job.log)}", file=sys.stderr, flush=True)
    except Stop as stop:
        print(f"{stop}: stopping {len(running)} running run(s) (SIGTERM: each saves a checkpoint); "
              "the same command resumes", file=sys.stderr, flush=True)
        for job in running:
            job.proc.terminate()
        deadline = time.perf_counter() + grace_s
        for job in running:
            try:
                job.proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="",
                        help="configs/experiment name(s), comma-separated (default: none, the base config)")
    parser.add_argument("--recipes", default="bf16,rowwise,blockwise", help="recipe labels, comma-separated")
    parser.add_argument("--seeds", default="1,2,3", help="seeds, comma-separated integers")
    parser.add_argument("--seed-keys", default=",".join(SEED_KEYS),
                        help=f"which of {', '.join(SEED_KEYS)} each seed sets (default: both)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--devices", default="", help="CUDA device ids the slots cycle through (default: inherit)")
    parser.add_argument("--out", default=None, help="sweep directory (default: outputs/parity_sweep)")
    parser.add_argument("--wandb", choices=("auto", "off"), default="auto", help="the report's wandb logging")
    parser.add_argument("--stop-grace", type=float, default=120.0,
                        help="seconds the runs get to checkpoint after a stop before they are killed")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep a finished run's checkpoints (default: removed; parity_300m's take ~3.7 GB a run)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args(argv)
    try:
        if args.parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
        seed_texts = _split_list(args.seeds, "--seeds")
        if not all(s.isdigit() for s in seed_texts):
            raise ValueError(f"--seeds: non-negative integers only, got {args.seeds!r}")
        seeds = [int(s) for s in seed_texts]
        seed_keys = _split_list(args.seed_keys, "--seed-keys")
        bad = [k for k in seed_keys if k not in SEED_KEYS]
        if bad:
            raise ValueError(f"--seed-keys: {bad} not allowed; allowed: {list(SEED_KEYS)}")
        experiments = [e for e in args.experiment.split(",") if e.strip()]
        for exp in experiments:
            if not (ROOT / "configs" / "experiment" / f"{exp}.yaml").is_file():
                known = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
                raise ValueError(f"--experiment: no configs/experiment/{exp}.yaml; allowed: {known}")
        out = Path(args.out or "outputs/parity_sweep").resolve()
        jobs = plan(experiments, _split_list(args.recipes, "--recipes"), seeds, seed_keys, out, extra)
        for job in jobs:
            recorded = recorded_overrides(job.run_dir)
            if recorded is not None and recorded != job.overrides:
                raise ValueError(f"{job.run_dir} was launched with other overrides ({recorded}) than this sweep "
                                 f"gives it ({job.overrides}); use another --out or remove that directory")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    todo = [j for j in jobs if not finished(j.run_dir)]
    pending = {j.name for j in todo}
    print(f"{len(jobs)} run(s) in {out}: {len(jobs) - len(todo)} finished already, {len(todo)} to run, "
          f"{args.parallel} at a time", flush=True)
    if args.dry_run:
        for job in jobs:
            state = "to run" if job.name in pending else "finished"
            print(f"  {job.name} ({state}): python train.py {' '.join(job.overrides)}")
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        failed = run_jobs(todo, args.parallel, _split_list(args.devices, "--devices") if args.devices else [],
                          env, args.stop_grace, keep_checkpoints=args.keep_checkpoints)
    except Stop:
        return 143
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(j.name for j in failed)}; the report is skipped. "
              "Fix the cause and run the same command again: finished runs are kept.", file=sys.stderr)
        return 1
    from tools import parity_report

    return parity_report.main([*(str(j.run_dir) for j in jobs), "--out", str(out / "parity"), "--wandb", args.wandb])


if __name__ == "__main__":
    sys.exit(main())
