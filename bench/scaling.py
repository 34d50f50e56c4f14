"""Expert-parallel scaling of the trainer: EP = 1, 2, 4 (8) GPUs, BF16 vs FP8 experts and dispatch.

    python -m bench.scaling --gpus 4 [--eps 1,2,4] [--recipes bf16,blockwise] [--steps 20]
        [--model-args "model=qwen3_30b_a3b model.n_layers=4 ..."] [--root DIR] [--out PATH]
    python -m bench.scaling --report-only --root DIR     # summarise runs already made
    python -m bench.scaling --device cpu --tiny           # gloo smoke test of the plumbing

Every run is `train.py` itself (torchrun for EP > 1) on synthetic tokens, 20 steps, the same
global batch and data order at every EP size: each GPU takes `--mbs` sequences a micro-batch and
the runs accumulate max(eps) / EP micro-batches a step, so EP=1 (1 GPU, 4 micro-batches),
EP=2 (2 GPUs, 2) and EP=4 (4 GPUs, 1) see the same 4 x mbs sequences a step in the same order,
and tokens/s per GPU compares like with like (every GPU always works on mbs sequences at once).
Variants per EP size:
  <recipe>            fp8.experts=<recipe>; FP8 recipes send E4M3 + scales on the wire
  <recipe>_bf16wire   FP8 experts, BF16 on the wire (parallel.fp8_dispatch=false; EP > 1 only):
                      the all-to-all share with BF16 against FP8 dispatch, experts unchanged
  <recipe> again      EP=1 only, the identical job once more: the run-to-run noise yardstick
--weak instead keeps every GPU's work per step fixed: grad_accum = max(eps) at every EP size, so
the global batch grows with the GPUs and per-step costs (optimizer, gradient all-reduce, clipping)
are amortised over the same micro-batches everywhere (weak scaling; no loss check then: the runs
see different batches). The default (same global batch) pays EP=4's per-step costs every
micro-batch against EP=1's every 4, which the per-GPU figures then include.
Jobs run side by side when GPUs are free (first come, first served: the four EP=1 jobs together on
4 GPUs, then the EP=2 pairs, then each EP=4 job alone); jobs that overlapped share only the host.

From each run's metrics.jsonl (one record per step): tokens/s, TFLOP/s per GPU and MFU (trainer's
FLOP count), peak memory, and the all-to-all time per step (`a2a_ms`: CUDA-event spans around every
all-to-all of dispatch and combine, forward and backward, including the wait for the slowest peer)
and its share of the step, each the median over steps > --skip (compilation, autotuning and
allocator warm-up excluded). Loss check: per-step relative loss difference of every EP > 1 run
against EP=1 and against the next smaller EP size; it "matches" when its largest difference over
the steps is at most twice the run-to-run noise, the largest difference between an EP=1 run and
its identical rerun over all recipes (nondeterministic reductions alone, amplified by training:
one rerun pair is one sample of it, 1.7% for rowwise against 6.8% for BF16 in the same Mixtral
-width call), with a floor of 1e-3 where reruns agree bitwise.
Writes bench/results/scaling.json and bench/results/scaling.png (tokens/s per GPU against GPUs,
each recipe's ideal line, flat at its EP=1 value, and each point's share of it; the title names
the GPU, the model and its shape) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.common import REPO, print_table, run_info, write_json

DEFAULT_MODEL_ARGS = (
    # Qwen3-30B-A3B width (dim 2048, 128 experts of ffn 768, top-8), 4 layers: 3.0B parameters,
    # ~48 GB with fp32 masters, gradients and AdamW state, so EP=1 fits one H200 with activations.
    # lr 1e-4: at the 3e-3 tiny-model default and even 3e-4 the 20-step losses swing by 2x from step
    # to step (bench/results/ep_loss_check.json), which hides any EP difference in chaos.
    "model=qwen3_30b_a3b model.n_layers=4 model.max_seq_len=2048 optim.lr=1e-4 optim.warmup_steps=5"
)
TINY_MODEL_ARGS = (
    "model.dim=128 model.n_layers=2 model.moe.num_experts=8 model.moe.top_k=2 model.moe.ffn_dim=128 "
    "optim.lr=1e-3 optim.warmup_steps=2 data.mock_vocab_size=4096"
)
COLUMNS = ["run", "ep", "gpus", "recipe", "wire", "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu",
           "peak_gib", "a2a_ms", "a2a_share", "step_ms", "per_gpu_vs_ep1"]  # fmt: skip


@dataclass(frozen=True)
class Job:
    name: str
    ep: int
    recipe: str
    fp8_wire: bool = True  # FP8 recipes: E4M3 + scales on the wire (parallel.fp8_dispatch)
    again: bool = False  # the EP=1 rerun (noise yardstick)

    @property
    def wire(self) -> str:
        return "fp8" if self.recipe != "bf16" and self.fp8_wire and self.ep > 1 else "bf16"


def plan(eps: list[int], recipes: list[str], bf16_wire: bool, rerun: bool) -> list[Job]:
    jobs = [Job(f"ep1_{r}", 1, r) for r in recipes if 1 in eps]
    if rerun and 1 in eps:
        jobs += [Job(f"ep1again_{r}", 1, r, again=True) for r in recipes]
    for ep in sorted(e for e in eps if e > 1):
        jobs += [Job(f"ep{ep}_{r}", ep, r) for r in recipes]
        if bf16_wire:
            jobs += [Job(f"ep{ep}_{r}_bf16wire", ep, r, fp8_wire=False) for r in recipes if r != "bf16"]
    return jobs


def grad_accum(job: Job, args, max_ep: int) -> int:
    return max_ep if args.weak else max_ep // job.ep


def overrides(job: Job, args, max_ep: int) -> list[str]:
    return [
        *args.model_args.split(), "data=mock", f"run.seq_len={args.seq}", f"run.micro_batch_size={args.mbs}",
        f"run.grad_accum={grad_accum(job, args, max_ep)}", f"run.steps={args.steps}", "run.eval_interval=0",
        f"parallel.ep={job.ep}", f"fp8={job.recipe}", f"parallel.fp8_dispatch={str(job.fp8_wire).lower()}",
        "logging.wandb=disabled", "logging.interval=1", "logging.expert_hist_interval=0",
        "checkpoint.interval=0", "checkpoint.interval_minutes=0", "checkpoint.at_end=false", "checkpoint.resume=none",
        f"run.output_root={args.root}", f"run.name={job.name}", f"run.device={args.device}",
    ]  # fmt: skip


def command(job: Job) -> list[str]:
    if job.ep == 1:
        return [sys.executable, "train.py"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.ep}", "train.py"]


def run_jobs(jobs: list[Job], args) -> dict[str, dict]:
    """First come, first served on `args.gpus` GPUs; returns name -> {rc, start_s, end_s, gpus}."""
    max_ep = max(j.ep for j in jobs)
    free = list(range(args.gpus))
    pending, running, done = list(jobs), {}, {}
    t0 = time.monotonic()
    stamp = lambda: f"[scaling +{time.monotonic() - t0:4.0f}s]"  # noqa: E731
    while pending or running:
        while pending and len(free) >= pending[0].ep:
            job = pending.pop(0)
            left = args.deadline_s - (time.monotonic() - t0)
            if left < args.min_job_s:
                print(f"{stamp()} {job.name} skipped: {left:.0f}s left before the deadline", flush=True)
                done[job.name] = {"rc": None, "skipped": True}
                continue
            gpus, free = free[: job.ep], free[job.ep :]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if args.device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
            else:
                env.setdefault("OMP_NUM_THREADS", "1")
            log = open(Path(args.root) / f"{job.name}.log", "w")
            cmd = command(job) + overrides(job, args, max_ep)
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            limit = min(args.job_timeout_s, left)
            running[job.name] = (proc, log, gpus, time.monotonic(), limit)
            print(f"{stamp()} start {job.name} on GPUs {gpus} (limit {limit:.0f}s)", flush=True)
        time.sleep(0.5)
        for name, (proc, log, gpus, start, limit) in list(running.items()):
            if proc.poll() is None and time.monotonic() - start > limit:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                log.close()
                free = sorted(free + gpus)
                del running[name]
                rc = proc.returncode
                done[name] = {"rc": rc, "gpus": gpus, "start_s": start - t0, "end_s": time.monotonic() - t0}
                print(f"{stamp()} {name} exited {rc} after {time.monotonic() - start:.0f}s", flush=True)
                if rc != 0:
                    tail = (Path(args.root) / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                    print("\n".join("    " + line for line in tail), flush=True)
    return done


# ---- summary ---------------------------------------------------------------------------------


def read_run(run_dir: Path, skip: int) -> Optional[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and "tokens_per_s" in r]
    if not steps:
        return None
    timed = [r for r in steps if r["step"] > skip] or steps

    def med(key):
        vals = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    tokens_per_s = med("tokens_per_s")
    return {
        "losses": {r["step"]: r["loss"] for r in steps},
        "tokens_per_s": tokens_per_s,
        "tflops_per_gpu": med("tflops_per_gpu"),
        "mfu": med("mfu"),
        "peak_gib": max((r.get("memory_gib") or 0.0) for r in steps),
        "a2a_ms": med("a2a_ms"),
        "a2a_share": med("a2a_share"),
    }


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> Optional[float]:
    steps = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) / abs(a[s]) for s in steps if a[s] and math.isfinite(a[s]) and math.isfinite(b[s])]
    return max(diffs) if diffs and len(diffs) == len(steps) else (math.inf if steps else None)


def summarize(jobs: list[Job], root: Path, args, timing: dict[str, dict]) -> dict:
    max_ep = max(j.ep for j in jobs)
    runs = {j.name: read_run(root / j.name, args.skip) for j in jobs}
    rows = []
    for j in jobs:
        r = runs[j.name]
        row = {"run": j.name, "ep": j.ep, "gpus": j.ep, "recipe": j.recipe, "wire": j.wire, "again": j.again,
               "ok": r is not None and timing.get(j.name, {}).get("rc", 0) == 0}  # fmt: skip
        if r:
            tps = r["tokens_per_s"]
            row.update({k: r[k] for k in ("tokens_per_s", "tflops_per_gpu", "mfu", "peak_gib", "a2a_ms", "a2a_share")})
            row["tokens_per_s_per_gpu"] = tps / j.ep if tps else None
            tokens_per_step = j.ep * grad_accum(j, args, max_ep) * args.mbs * args.seq
            row["step_ms"] = 1e3 * tokens_per_step / tps if tps else None
        rows.append(row)
    per_gpu = {(r["recipe"], r["wire"], r["ep"]): r.get("tokens_per_s_per_gpu") for r in rows if not r["again"]}
    for r in rows:
        base = per_gpu.get((r["recipe"], "bf16", 1))
        mine = r.get("tokens_per_s_per_gpu")
        r["per_gpu_vs_ep1"] = mine / base if mine and base else None
    fp8_vs_bf16 = {}
    for r in rows:
        b = per_gpu.get(("bf16", "bf16", r["ep"]))
        if r["recipe"] != "bf16" and not r["again"] and b and r.get("tokens_per_s_per_gpu"):
            fp8_vs_bf16[r["run"]] = r["tokens_per_s_per_gpu"] / b

    losses = {n: (run["losses"] if run else None) for n, run in runs.items()}
    checks = []
    recipes = list(dict.fromkeys(j.recipe for j in jobs))  # in plan order
    eps = sorted({j.ep for j in jobs})
    noise = {r: max_rel_diff(losses.get(f"ep1_{r}") or {}, losses.get(f"ep1again_{r}") or {}) for r in recipes}
    known = [n for n in noise.values() if n is not None and math.isfinite(n)]
    bound = max(2 * max(known), 1e-3) if known else None
    for recipe in recipes:
        checks.append({"a": f"ep1_{recipe}", "b": f"ep1again_{recipe}", "max_rel_diff": noise[recipe], "what": "noise"})
        for ep in (e for e in eps if e > 1):
            for ref_ep in sorted({1, max(e for e in eps if e < ep)}):
                a, b = f"ep{ref_ep}_{recipe}", f"ep{ep}_{recipe}"
                d = max_rel_diff(losses.get(a) or {}, losses.get(b) or {}) if losses.get(a) and losses.get(b) else None
                judged = d is not None and bound is not None and not args.weak  # weak: other batches
                checks.append({"a": a, "b": b, "max_rel_diff": d, "bound": bound,
                               "matches": d <= bound if judged else None})  # fmt: skip
    if "bf16" in recipes:
        for recipe in recipes[1:]:
            d = max_rel_diff(losses.get("ep1_bf16") or {}, losses.get(f"ep1_{recipe}") or {})
            checks.append({"a": "ep1_bf16", "b": f"ep1_{recipe}", "max_rel_diff": d, "what": "fp8 vs bf16 (scale)"})
    settings = {"model_args": args.model_args, "model": model_shape(root, jobs), "seq_len": args.seq,
                "micro_batch_size_per_gpu": args.mbs,
                "scaling": "weak: grad_accum = max EP at every EP size" if args.weak
                else "same global batch: grad_accum = max EP / EP",
                "global_batch_sequences": {j.ep: j.ep * grad_accum(j, args, max_ep) * args.mbs for j in jobs},
                "steps": args.steps,
                "throughput": f"median of steps > {args.skip}"}  # fmt: skip
    return {"settings": settings, "rows": rows, "fp8_vs_bf16_per_gpu": fp8_vs_bf16, "loss_checks": checks,
            "losses": losses, "timing": timing}  # fmt: skip


def model_shape(root: Path, jobs: list[Job]) -> Optional[dict]:
    """The model the runs trained, from the first recorded run config: name and shape."""
    for j in jobs:
        path = root / j.name / ".hydra" / "config.yaml"
        if path.is_file():
            from omegaconf import OmegaConf

            model = OmegaConf.to_container(OmegaConf.load(path), resolve=False)["model"]
            moe = model.get("moe", {})
            return {"name": model.get("name"), "n_layers": model.get("n_layers"), "dim": model.get("dim"),
                    "num_experts": moe.get("num_experts"), "top_k": moe.get("top_k"), "ffn_dim": moe.get("ffn_dim")}
    return None


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """label -> rows by GPUs. EP=1 sends nothing, so a recipe's EP=1 run starts each of its wire
    series (FP8 and BF16 on the wire); the EP=1 reruns are left out."""
    rows = [r for r in rows if not r["again"] and r.get("tokens_per_s_per_gpu")]
    out: dict[str, list[dict]] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        ep1 = [r for r in mine if r["ep"] == 1]
        wires = list(dict.fromkeys(r["wire"] for r in mine if r["ep"] > 1))
        for wire in wires or ["bf16"]:
            label = recipe if recipe == "bf16" or not wires else f"{recipe} ({wire} on the wire)"
            out[label] = sorted(ep1 + [r for r in mine if r["ep"] > 1 and r["wire"] == wire], key=lambda r: r["gpus"])
    return out


def _title(summary: dict) -> str:
    settings = summary["settings"]
    how = "weak scaling" if settings["scaling"].startswith("weak") else "one global batch"
    m = settings.get("model")
    model = (f"{m['name']}: {m['n_layers']} layers, dim {m['dim']}, {m['num_experts']} experts of ffn "
             f"{m['ffn_dim']}, top-{m['top_k']}") if m else settings["model_args"]
    return (f"{summary['gpu']}: expert-parallel scaling ({how})\n{model}\n"
            f"seq {settings['seq_len']}, {settings['micro_batch_size_per_gpu']} sequences per GPU per micro-batch")


def plot(summary: dict, path: Path):
    """tokens/s per GPU against GPUs, each series with its ideal (flat at its EP=1 value) and
    each point's efficiency (per_gpu_vs_ep1) printed; writes `path`, returns the Figure (closed)
    or None without matplotlib or a finished run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    series = _series(summary["rows"])
    if not series:
        print("no run finished: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    ideal_drawn: set[str] = set()
    for i, (label, rows) in enumerate(series.items()):
        color = f"C{i}"
        xs, ys = [r["gpus"] for r in rows], [r["tokens_per_s_per_gpu"] for r in rows]
        ax.plot(xs, ys, marker="o", color=color, label=label)
        ep1 = next((r for r in rows if r["ep"] == 1), None)
        recipe = rows[0]["recipe"]
        if ep1 is not None and recipe not in ideal_drawn:  # both wire series share their EP=1 run
            ideal_drawn.add(recipe)
            ax.axhline(ep1["tokens_per_s_per_gpu"], color=color, ls=":", lw=1.0,
                       label=f"{recipe} ideal (EP=1 tokens/s per GPU)")
        for r in rows:
            if r["ep"] > 1 and r.get("per_gpu_vs_ep1") is not None:
                ax.annotate(f"{100 * r['per_gpu_vs_ep1']:.0f}%", (r["gpus"], r["tokens_per_s_per_gpu"]),
                            textcoords="offset points", xytext=(6, 2), fontsize=7, color=color)
    ax.set_xlabel("GPUs (EP size)")
    ax.set_ylabel("tokens/s per GPU (labels: % of the recipe's EP=1)")
    ax.set_xticks(sorted({r["gpus"] for r in summary["rows"]}))
    ax.margins(x=0.1)  # room for the last point's label
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(_title(summary), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="GPUs to schedule on (default: all visible)")
    p.add_argument("--eps", default=None, help="comma list of EP sizes (default: 1, 2, 4, ... up to --gpus)")
    p.add_argument("--recipes", default="bf16,blockwise", help="fp8.experts values; the first is the baseline")
    p.add_argument("--no-bf16-wire", action="store_true", help="skip the FP8-experts-BF16-wire runs")
    p.add_argument("--no-rerun", action="store_true", help="skip the EP=1 reruns (noise yardstick)")
    p.add_argument("--model-args", default=None, help="Hydra overrides for the model and optimizer")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; --tiny: 64)")
    p.add_argument("--mbs", type=int, default=2, help="sequences per GPU per micro-batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of throughput")
    p.add_argument("--root", default=None, help="run directories (default: /dev/shm or the temp dir)")
    p.add_argument("--out", default=None, help="default bench/results/scaling.json (--weak: scaling_weak.json); "
                   "with --device cpu, under --root")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    p.add_argument("--job-timeout-s", type=float, default=300)
    p.add_argument("--deadline-s", type=float, default=540, help="no job starts after this many seconds")
    p.add_argument("--min-job-s", type=float, default=60, help="a job needs this long left to start")
    p.add_argument("--weak", action="store_true", help="grad_accum = max EP everywhere (module docstring)")
    p.add_argument("--report-only", action="store_true", help="summarise the runs under --root")
    args = p.parse_args(argv)

    if args.gpus is None:
        if args.device == "cpu":
            args.gpus = 2
        else:
            import torch

            args.gpus = torch.cuda.device_count()
    if args.gpus < 1:
        p.error("no GPU visible: pass --device cpu --tiny for the CPU smoke test")
    eps = [int(e) for e in args.eps.split(",")] if args.eps else [e for e in (1, 2, 4, 8) if e <= args.gpus]
    bad = [e for e in eps if e < 1 or e > args.gpus or max(eps) % e]
    if bad:
        p.error(f"--eps {bad}: each EP size must be between 1 and --gpus={args.gpus} and divide the largest")
    recipes = args.recipes.split(",")
    args.model_args = args.model_args or (TINY_MODEL_ARGS if args.tiny else DEFAULT_MODEL_ARGS)
    args.seq = args.seq or (64 if args.tiny else 2048)
    if args.root is None:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 20e9 else Path(os.environ.get("TMPDIR", "/tmp"))
        args.root = str(base / "fp8moe_scaling")
    # A CPU smoke run never lands in the committed GPU results: its default is under --root.
    results = Path(args.root) if args.device == "cpu" else REPO / "bench" / "results"
    args.out = args.out or str(results / ("scaling_weak.json" if args.weak else "scaling.json"))
    root = Path(args.root)
    jobs = plan(eps, recipes, bf16_wire=not args.no_bf16_wire, rerun=not args.no_rerun)
    timing: dict[str, dict] = {}
    if not args.report_only:
        root.mkdir(parents=True, exist_ok=True)
        for j in jobs:
            shutil.rmtree(root / j.name, ignore_errors=True)
        print(f"{len(jobs)} jobs on {args.gpus} GPU(s), runs under {root}", flush=True)
        timing = run_jobs(jobs, args)
        (root / "timing.json").write_text(json.dumps(timing, indent=1))
    elif (root / "timing.json").exists():
        timing = json.loads((root / "timing.json").read_text())

    summary = summarize(jobs, root, args, timing)
    info = run_info()
    if args.device == "cpu":
        info["gpu"] = "none (cpu)"
    else:
        import torch

        info["gpu"] = f"{torch.cuda.device_count()} x {info['gpu']}"
    if args.report_only and Path(args.out).exists():  # re-summarised elsewhere: keep where it ran
        before = json.loads(Path(args.out).read_text())
        info = {k: before[k] for k in ("commit", "gpu", "torch") if k in before} or info
    summary = {**info, **summary}
    if not args.report_only and not any(r["ok"] for r in summary["rows"]):
        raise SystemExit(f"every job failed: {args.out} left as it was")
    out = write_json(args.out, summary)
    png = out.with_suffix(".png")
    fig = plot(summary, png)
    print(f"wrote {out}" + (f" and {png}" if fig is not None else ""))
    for c in summary["loss_checks"]:
        d = c["max_rel_diff"]
        verdict = {None: "  (not judged)", True: "  matches", False: "  DIFFERS"}[c["matches"]] if "matches" in c else ""
        verdict += f" (bound {c['bound']:.2e})" if c.get("bound") is not None else ""
        print(f"loss {c['a']} vs {c['b']}: max rel diff {d if d is None else f'{d:.2e}'}{verdict}")
    print_table(summary["rows"], COLUMNS)
    return 0 if all(r["ok"] for r in summary["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
