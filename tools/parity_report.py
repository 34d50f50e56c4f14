"""Loss parity of FP8 against BF16 experts: plots, a JSON summary per FP8 run, a markdown table.

    python tools/parity_report.py RUN_BF16 RUN_FP8 [RUN_FP8 ...] [--out DIR] [--wandb auto|off]

Each RUN is a run directory of train.py (`outputs/<run.name>/`: `metrics.jsonl` and
`.hydra/config.yaml`). The run whose config has `fp8.experts=bf16` is the baseline; every other
run is compared with it. The runs must share their step set and every config key that decides
the data order and the numerics apart from the recipe (COMPARED_SECTIONS, less IGNORED_KEYS).

Writes into --out (default: <first run's parent>/parity):
  parity.png            loss curves overlaid (validation losses marked), and below them the
                        relative difference (fp8 - bf16) / bf16 per logged step
  <fp8 run dir>.json    {"steps", "params_total", "recipe", "mean_rel_diff_last10pct",
                        "max_rel_diff_last10pct", "val_loss", "tokens_per_s", "speed_ratio", ...}
  parity.md             the markdown table, also printed
and logs them to wandb (a `parity_report` job in the runs' group) when the runs logged to wandb
and wandb is importable; a wandb failure only warns.

Definitions:
- a logged loss is the mean training loss over its log interval, as in metrics.jsonl;
- the last 10% are the logged steps > S - ceil(S / 10), S the last step;
- mean/max_rel_diff_last10pct: mean/max of |fp8 - bf16| / bf16 over them (absolute values, so
  errors of opposite sign do not cancel); the signed mean is reported beside it;
- tokens_per_s: median over the run's log records, the first one excluded (start-up, compile);
- speed_ratio: fp8 tokens_per_s / bf16 tokens_per_s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.documents import json_lines  # noqa: E402
from trainer.resume import flatten  # noqa: E402

# Config sections whose keys must match between the paired runs, and the keys inside them that
# do not change what is computed (worker counts, cache paths, the step budget checked as steps).
COMPARED_SECTIONS = ("model", "data", "optim")
COMPARED_RUN_KEYS = ("run.seed", "run.seq_len", "run.micro_batch_size", "run.grad_accum", "run.dtype")
IGNORED_KEYS = ("data.num_workers", "data.cache_dir")
BASELINE = "bf16"
PARAMS_LINE = re.compile(r"params total=(\d+)")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    recipe: str
    losses: dict[int, float]  # step -> mean loss of the interval ending there
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: list[float] = field(default_factory=list)  # in log order

    @property
    def name(self) -> str:
        return self.path.name


def _load_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an ${oc.env:...} unset here: compare the text as written
        return OmegaConf.to_container(cfg, resolve=False)


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory; a resumed run's later record of a step replaces the earlier one."""
    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    config = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a train.py run directory?")
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} has no .hydra/config.yaml: is it a train.py run directory?")
    cfg = _load_config(config)
    recipe = str(cfg.get("fp8", {}).get("experts", ""))
    if not recipe:
        raise ValueError(f"{config}: no fp8.experts key")
    losses: dict[int, float] = {}
    vals: dict[int, float] = {}
    speed: dict[int, float] = {}
    for _, rec, _ in json_lines(str(metrics)):
        if "val_loss" in rec:
            vals[int(rec["step"])] = float(rec["val_loss"])
        elif "loss" in rec:
            step = int(rec["step"])
            losses[step] = float(rec["loss"])
            if rec.get("tokens_per_s") is not None:
                speed[step] = float(rec["tokens_per_s"])
    if not losses:
        raise ValueError(f"{metrics} holds no training loss records")
    return Run(run_dir, cfg, recipe, losses, vals, [speed[s] for s in sorted(speed)])


def check_comparable(base: Run, other: Run) -> None:
    """Same logged steps and the same data, seed, model and optimizer config, or a ValueError."""
    if set(base.losses) != set(other.losses):
        only_base = sorted(set(base.losses) - set(other.losses))
        only_other = sorted(set(other.losses) - set(base.losses))
        raise ValueError(
            f"runs log different steps: {base.name} has {len(base.losses)} (steps only there: "
            f"{only_base[:5]}{'...' if len(only_base) > 5 else ''}), {other.name} has {len(other.losses)} "
            f"(steps only there: {only_other[:5]}{'...' if len(only_other) > 5 else ''}); "
            "compare runs of the same run.steps and logging.interval"
        )
    a, b = flatten(base.config), flatten(other.config)

    def compared(key: str) -> bool:
        return key not in IGNORED_KEYS and (key.split(".")[0] in COMPARED_SECTIONS or key in COMPARED_RUN_KEYS)

    keys = sorted(k for k in set(a) | set(b) if compared(k))
    differing = [k for k in keys if a.get(k) != b.get(k)]
    if differing:
        detail = ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in differing)
        raise ValueError(
            f"{base.name} and {other.name} differ in config that must match for a parity comparison "
            f"(same model, data order and seed; only fp8.* may differ): {detail}"
        )


def params_total(run: Run) -> int:
    """From the run's log line ("params total=N"), else counted on a meta-device model."""
    for log_file in sorted(run.path.glob("*.log")):
        match = PARAMS_LINE.search(log_file.read_text(errors="replace"))
        if match:
            return int(match.group(1))
    import torch
    from omegaconf import OmegaConf

    from moe.config import ModelConfig
    from moe.counting import count_params
    from moe.model import MoETransformer

    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), run.config["model"]))
    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    return count_params(model).total


def _median_speed(run: Run) -> Optional[float]:
    values = run.tokens_per_s[1:] or run.tokens_per_s  # the first interval includes start-up
    return statistics.median(values) if values else None


def rel_diffs(base: Run, fp8: Run) -> dict[int, float]:
    return {s: (fp8.losses[s] - base.losses[s]) / base.losses[s] for s in sorted(base.losses)}


def summarize(base: Run, fp8: Run) -> dict[str, Any]:
    diffs = rel_diffs(base, fp8)
    last = max(diffs)
    tail = [d for s, d in diffs.items() if s > last - math.ceil(last / 10)]
    common_val = sorted(set(base.val_losses) & set(fp8.val_losses))
    val: dict[str, Any] = {
        "steps": common_val,
        BASELINE: [base.val_losses[s] for s in common_val],
        "fp8": [fp8.val_losses[s] for s in common_val],
    }
    if common_val:
        b, f = base.val_losses[common_val[-1]], fp8.val_losses[common_val[-1]]
        val.update(final_bf16=b, final_fp8=f, final_diff=f - b, final_rel_diff=(f - b) / b)
    speed_b, speed_f = _median_speed(base), _median_speed(fp8)
    return {
        "run": str(fp8.path),
        "baseline_run": str(base.path),
        "recipe": fp8.recipe,
        "steps": last,
        "logged_steps": len(diffs),
        "params_total": params_total(fp8),
        "final_loss": {BASELINE: base.losses[last], "fp8": fp8.losses[last]},
        "mean_rel_diff_last10pct": statistics.fmean(abs(d) for d in tail),
        "max_rel_diff_last10pct": max(abs(d) for d in tail),
        "mean_signed_rel_diff_last10pct": statistics.fmean(tail),
        "val_loss": val,
        "tokens_per_s": {BASELINE: speed_b, "fp8": speed_f},
        "speed_ratio": speed_f / speed_b if speed_b and speed_f else None,
    }


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        "| recipe | steps | params | mean rel diff (last 10%) | max rel diff (last 10%) "
        "| val loss bf16 / fp8 | tokens/s bf16 / fp8 | speed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        v, t = s["val_loss"], s["tokens_per_s"]
        lines.append(
            f"| {s['recipe']} | {s['steps']} | {s['params_total'] / 1e6:.1f}M "
            f"| {100 * s['mean_rel_diff_last10pct']:.3f}% | {100 * s['max_rel_diff_last10pct']:.3f}% "
            f"| {num(v.get('final_bf16'), '.4f')} / {num(v.get('final_fp8'), '.4f')} "
            f"| {num(t[BASELINE], ',.0f')} / {num(t['fp8'], ',.0f')} | {num(s['speed_ratio'], '.3f')}x |"
        )
    return "\n".join(lines) + "\n"


def plot(base: Run, fp8_runs: Sequence[Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(2, 1))
    runs = [base, *fp8_runs]
    for i, run in enumerate(runs):
        color = f"C{i}"
        steps = sorted(run.losses)
        style = "-" if run is base else "--"  # dashed FP8 stays visible where the curves coincide
        top.plot(steps, [run.losses[s] for s in steps], color=color, ls=style, lw=1.2,
                 label=f"{run.recipe} train")
        if run.val_losses:
            vs = sorted(run.val_losses)
            top.plot(vs, [run.val_losses[s] for s in vs], color=color, ls="none", marker="o", ms=5,
                     mfc="none", label=f"{run.recipe} validation")
        if run is not base:
            diffs = rel_diffs(base, run)
            bottom.plot(list(diffs), [100 * d for d in diffs.values()], color=color, lw=1.0, label=run.recipe)
    last = max(base.losses)
    for ax in (top, bottom):
        ax.axvspan(last - math.ceil(last / 10), last, color="0.9", zorder=0)  # the last 10%
        ax.grid(alpha=0.3)
    bottom.axhline(0.0, color="k", lw=0.8)
    top.set_ylabel("loss")
    top.set_title(f"FP8 vs BF16 loss parity ({base.config.get('model', {}).get('name', '?')}; "
                  "shaded: last 10%)")
    top.legend(fontsize=8)
    bottom.set_ylabel("(fp8 - bf16) / bf16 [%]")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_wandb(base: Run, summaries: Sequence[dict[str, Any]], png: Path, table: str, out: Path) -> None:
    """A `parity_report` job in the runs' wandb group, in the runs' wandb mode; never raises."""
    logging_cfg = base.config.get("logging", {})
    mode = logging_cfg.get("wandb", "disabled")
    if mode == "disabled":
        return
    try:
        import wandb
    except ImportError:
        return
    try:
        group = logging_cfg.get("group") or base.config.get("run", {}).get("name") or base.name
        run = wandb.init(project=logging_cfg.get("project", "fp8moe"), group=group, job_type="parity_report",
                         name=f"parity-{group}", dir=str(out), mode=mode,
                         settings=wandb.Settings(silent=True, x_disable_stats=True))
        columns = ["recipe", "mean_rel_diff_last10pct", "max_rel_diff_last10pct", "speed_ratio"]
        rows = [[s[c] for c in columns] for s in summaries]
        run.log({"parity/plot": wandb.Image(str(png)), "parity/table": wandb.Table(columns=columns, data=rows)})
        for s in summaries:
            for key in ("mean_rel_diff_last10pct", "max_rel_diff_last10pct", "speed_ratio"):
                run.summary[f"{s['recipe']}/{key}"] = s[key]
        run.summary["parity/markdown"] = table
        run.finish()
    except Exception as err:  # the report is on disk already; wandb is a convenience
        print(f"warning: wandb logging failed ({err}); the report files are written", file=sys.stderr)


def report(run_dirs: Sequence[str | os.PathLike], out: Optional[str | os.PathLike] = None,
           wandb: str = "auto") -> list[dict[str, Any]]:
    """Compare every FP8 run with the BF16 run; write the PNG, JSONs and table; return the summaries."""
    if len(run_dirs) < 2:
        raise ValueError(f"give a BF16 run and at least one FP8 run, got {len(run_dirs)} run(s)")
    runs = [load_run(p) for p in run_dirs]
    bases = [r for r in runs if r.recipe == BASELINE]
    if not bases:
        found = ", ".join(f"{r.name} (fp8.experts={r.recipe})" for r in runs)
        raise ValueError(f"no BF16 run (fp8.experts=bf16) among the runs: {found}")
    if len(bases) > 1:
        raise ValueError(f"more than one BF16 run: {', '.join(r.name for r in bases)}; give exactly one")
    base = bases[0]
    fp8_runs = [r for r in runs if r is not base]
    for run in fp8_runs:
        check_comparable(base, run)
    out_dir = Path(out) if out else runs[0].path.resolve().parent / "parity"
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(base, r) for r in fp8_runs]
    for run, summary in zip(fp8_runs, summaries):
        (out_dir / f"{run.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    png = plot(base, fp8_runs, out_dir / "parity.png")
    table = markdown_table(summaries)
    (out_dir / "parity.md").write_text(table)
    print(table, end="")
    print(f"wrote {png}, {out_dir / 'parity.md'} and {len(summaries)} JSON summary file(s) in {out_dir}")
    if wandb == "auto":
        log_to_wandb(base, summaries, png, table, out_dir)
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories: one BF16 run and one or more FP8 runs")
    parser.add_argument("--out", default=None, help="output directory (default: <first run's parent>/parity)")
    parser.add_argument("--wandb", choices=("auto", "off"), default="auto",
                        help="auto: log to wandb when the runs did and wandb is importable")
    args = parser.parse_args(argv)
    try:
        report(args.runs, args.out, args.wandb)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `moe` for params_total's fallback
    sys.exit(main())
