"""Loss parity of FP8 against BF16 over several seeds: a JSON summary per FP8 recipe, a table, a plot.

    python tools/parity_report.py RUN_OR_SWEEP_DIR [...] [--out DIR] [--wandb auto|off]

Each argument is a train.py run directory (`metrics.jsonl` and `.hydra/config.yaml`, or a
`config.yaml` beside the metrics) or a directory holding run directories (a sweep of
tools/parity_sweep.py). Runs are grouped by corpus, by recipe and by seeds:
- corpus: the basename of data.paths (several joined by "+"), or data.kind for the built-in
  corpora (default_corpus, mock);
- recipe: fp8.experts, then "+key=value" for every other fp8.* key that differs from the FP8Config
  defaults (moe/fp8/recipe.py), sorted by key: `rowwise+pow2_scales=true`; the baseline is `bf16`;
- seeds: (run.seed, data.seed), the initialization and the data order.
Within a corpus every run must share its logged steps and every config key that decides the model,
the data and the numerics (COMPARED_SECTIONS and COMPARED_RUN_KEYS, less IGNORED_KEYS; the seed
keys may differ between seeds), and every FP8 recipe must have exactly the BF16 runs' seeds: a run
of recipe R with seeds S is paired with the BF16 run with seeds S. One seed per recipe works (no
interval, no spread: those fields are null).

Writes into --out (default: <first run's parent>/parity):
  <corpus>-<recipe>.json  per FP8 recipe: the fields of tools/parity_stats.summarize (the README's
                          "Loss parity" section lists them), params_total, and commit, gpu, torch,
                          triton of the runs (from each run's run_info.json, which the sweep writes;
                          else the report's own environment, with "provenance": "report")
  parity.md               the table, also printed
  parity.png              per corpus, against tokens: the BF16 mean training loss with its seed band
                          (min..max over seeds), each FP8 recipe's mean, validation means as markers;
                          below, each recipe's mean paired relative gap with its 95% interval band
                          against BF16's seed-to-seed spread, and its last-10% figure printed
and logs them to wandb (a `parity_report` job in the runs' group) when the runs logged to wandb
and wandb is importable; a wandb failure only warns. tools/parity_stats.py defines every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `trainer` and `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.fp8.recipe import FP8Config  # noqa: E402
from tools import parity_plot  # noqa: E402
from tools.parity_stats import BASELINE, PARITY_BOUND, seed_order, summarize  # noqa: E402
from trainer.documents import json_lines  # noqa: E402
from trainer.resume import flatten  # noqa: E402

# Config sections whose keys must match between compared runs, and the keys inside them that do
# not change what is computed (worker counts, cache paths). The seed keys may differ between the
# seeds of a recipe; a BF16 run and an FP8 run are paired when theirs are equal. run.eval_steps
# sizes the validation set the validation losses are means over.
COMPARED_SECTIONS = ("model", "data", "optim")
COMPARED_RUN_KEYS = ("run.seed", "run.seq_len", "run.micro_batch_size", "run.grad_accum", "run.dtype",
                     "run.eval_steps")
IGNORED_KEYS = ("data.num_workers", "data.cache_dir")
SEED_KEYS = ("run.seed", "data.seed")
PARAMS_LINE = re.compile(r"params total=(\d+)")
BATCH_LINE = re.compile(r"global batch (\d+) x (\d+) tokens")
RUN_INFO = "run_info.json"  # written beside a run's metrics by tools/parity_sweep.py
PROVENANCE_KEYS = ("commit", "gpu", "torch", "triton")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    label: str  # the recipe label (recipe_label)
    corpus: str
    seeds: tuple[Any, Any]  # (run.seed, data.seed)
    losses: dict[int, float]  # step -> mean loss of the interval ending there
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: list[float] = field(default_factory=list)  # in log order
    tokens_per_step: int = 0

    @property
    def name(self) -> str:
        return self.path.name


def _format(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def recipe_label(fp8: dict[str, Any]) -> str:
    """fp8.experts plus "+key=value" for each other fp8 key away from its FP8Config default."""
    experts = str(fp8.get("experts", ""))
    if not experts:
        raise ValueError("no fp8.experts key in the run's config")
    defaults = {f.name: f.default for f in dataclasses.fields(FP8Config)}
    extra = [f"+{k}={_format(v)}" for k, v in sorted(fp8.items())
             if k != "experts" and (k not in defaults or defaults[k] != v)]  # fmt: skip
    return experts + "".join(extra)


def slug(label: str) -> str:
    """A label as a file or run name: characters other than letters, digits, . _ + - become '-'."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", label)


def corpus_name(config: dict[str, Any]) -> str:
    data = config.get("data", {})
    paths = [str(p) for p in data.get("paths") or []]
    if data.get("kind", "megatron") == "megatron" and paths:
        return "+".join(os.path.basename(p.rstrip("/")) for p in paths)
    return str(data.get("kind") or "unknown")


def _load_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an ${oc.env:...} unset here: compare the text as written
        return OmegaConf.to_container(cfg, resolve=False)


def _tokens_per_step(run_dir: Path, config: dict[str, Any]) -> int:
    """From the run's log line ("global batch N x S tokens": all data-parallel ranks), else
    one rank's micro_batch_size * grad_accum * seq_len."""
    for log_file in sorted(run_dir.glob("*.log")):
        match = BATCH_LINE.search(log_file.read_text(errors="replace"))
        if match:
            return int(match.group(1)) * int(match.group(2))
    run = config.get("run", {})
    return int(run.get("micro_batch_size", 1)) * int(run.get("grad_accum", 1)) * int(run.get("seq_len", 1))


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory; a resumed run's later record of a step replaces the earlier one."""
    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a train.py run directory?")
    config = next((p for p in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml") if p.is_file()), None)
    if config is None:
        raise FileNotFoundError(f"{run_dir} has no .hydra/config.yaml: is it a train.py run directory?")
    cfg = _load_config(config)
    try:
        label = recipe_label(cfg.get("fp8", {}))
    except ValueError as err:
        raise ValueError(f"{config}: {err}") from None
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
    seeds = (cfg.get("run", {}).get("seed"), cfg.get("data", {}).get("seed"))
    return Run(run_dir, cfg, label, corpus_name(cfg), seeds, losses, vals, [speed[s] for s in sorted(speed)],
               _tokens_per_step(run_dir, cfg))


def expand_run_dirs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run directories as given; a directory without metrics.jsonl stands for its sub-directories
    that have one (a sweep's output directory), in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "metrics.jsonl").exists():
            found = sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file())
            if not found:
                raise FileNotFoundError(f"{p} has no metrics.jsonl and no run directory with one")
            out.extend(found)
        else:
            out.append(p)
    return out


def check_comparable(base: Run, other: Run, ignore: Sequence[str] = ()) -> None:
    """Same logged steps and the same model, data and optimizer config (less `ignore`), or a ValueError."""
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
        if key in IGNORED_KEYS or key in ignore:
            return False
        return key.split(".")[0] in COMPARED_SECTIONS or key in COMPARED_RUN_KEYS

    keys = sorted(k for k in set(a) | set(b) if compared(k))
    differing = [k for k in keys if a.get(k) != b.get(k)]
    if differing:
        detail = ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in differing)
        raise ValueError(
            f"{base.name} and {other.name} differ in config that must match for a parity comparison "
            f"(same model, data and optimizer; only fp8.* and the seeds {', '.join(SEED_KEYS)} may "
            f"differ): {detail}"
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


def _seeds_text(seeds) -> str:
    return ", ".join(f"run.seed={r} data.seed={d}" for r, d in seed_order(seeds))


def group_runs(runs: Sequence[Run]) -> dict[str, dict[str, dict[tuple, Run]]]:
    """corpus -> recipe label -> seeds -> run, checked: one run per (recipe, seeds), comparable
    runs, a BF16 baseline, and every recipe with exactly the baseline's seeds."""
    groups: dict[str, dict[str, dict[tuple, Run]]] = {}
    for run in runs:
        by_seed = groups.setdefault(run.corpus, {}).setdefault(run.label, {})
        if run.seeds in by_seed:
            raise ValueError(
                f"two runs of recipe {run.label} on corpus {run.corpus} with run.seed={run.seeds[0]} "
                f"data.seed={run.seeds[1]}: {by_seed[run.seeds].path} and {run.path}; give one of them"
            )
        by_seed[run.seeds] = run
    for corpus, recipes in groups.items():
        base = recipes.get(BASELINE)
        if base is None:
            found = ", ".join(f"{r.name} ({r.label})" for rs in recipes.values() for r in rs.values())
            raise ValueError(f"no BF16 run (fp8.experts=bf16, other fp8 keys at their defaults) on corpus "
                             f"{corpus}: {found}")
        if len(recipes) < 2:
            raise ValueError(f"corpus {corpus}: only BF16 runs ({', '.join(r.name for r in base.values())}); "
                             "give at least one FP8 run")
        first = next(iter(base.values()))
        for label, by_seed in recipes.items():
            for run in by_seed.values():
                if run is not first:
                    check_comparable(first, run, ignore=SEED_KEYS)
            if label == BASELINE:
                continue
            missing, extra = set(base) - set(by_seed), set(by_seed) - set(base)
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"recipe {label} lacks the seeds {_seeds_text(missing)} that BF16 has")
                if extra:
                    parts.append(f"BF16 lacks the seeds {_seeds_text(extra)} that recipe {label} has")
                raise ValueError(f"corpus {corpus}: {'; '.join(parts)}: every recipe needs a run for each "
                                 "BF16 seed (run the missing ones or leave the unpaired ones out)")
    return groups


def provenance(runs: Sequence[Run]) -> dict[str, Any]:
    """commit, gpu, torch, triton of the runs (a list where they differ), from their run_info.json;
    else the report's own environment."""
    infos = []
    for run in runs:
        path = run.path / RUN_INFO
        if not path.is_file():
            break
        infos.append(json.loads(path.read_text()))
    else:
        out: dict[str, Any] = {}
        for key in PROVENANCE_KEYS:
            values = sorted({str(i.get(key)) for i in infos})
            out[key] = values[0] if len(values) == 1 else values
        return {**out, "provenance": "runs"}
    from bench.common import run_info

    return {**{k: run_info()[k] for k in PROVENANCE_KEYS}, "provenance": "report"}


def _pct(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{100 * v:+.{digits}f}%"


def _tokens(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    def mean_std(mean, std):
        return "-" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")

    lines = [
        "| corpus | recipe | seeds | steps | tokens | val loss bf16 | val loss fp8 | rel diff [95% CI] "
        "| bf16 spread | within floor | gap slope /1k steps | speed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ci = s["val_loss_rel_diff_ci95"]
        ci_text = "" if ci is None else f" [{_pct(ci[0])}, {_pct(ci[1])}]"
        slope = s["gap_slope_last_half"]
        slope_text = "-" if slope is None else f"{_pct(slope)}" + (
            "" if s["gap_slope_stderr"] is None else f" ± {100 * s['gap_slope_stderr']:.3f}%")
        if s["gap_slope_significant"]:
            slope_text += " (significant)"
        spread = s["bf16_seed_spread"]
        floor = "-" if s["within_floor"] is None else ("yes" if s["within_floor"] else "no")
        lines.append(
            f"| {s['corpus']} | {s['recipe']} | {len(s['seeds'])} | {s['steps']} | {_tokens(s['tokens'])} "
            f"| {mean_std(s['val_loss_mean_bf16'], s['val_loss_std_bf16'])} "
            f"| {mean_std(s['val_loss_mean_fp8'], s['val_loss_std_fp8'])} "
            f"| {_pct(s['val_loss_rel_diff'])}{ci_text} | {'-' if spread is None else f'{100 * spread:.3f}%'} "
            f"| {floor} | {slope_text} | {num(s['speed_ratio'], '.3f')}x |"
        )
    return "\n".join(lines) + "\n"


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
    columns = ["corpus", "recipe", "val_loss_rel_diff", "bf16_seed_spread", "gap_slope_last_half", "speed_ratio"]
    try:
        group = logging_cfg.get("group") or base.config.get("run", {}).get("name") or base.name
        run = wandb.init(project=logging_cfg.get("project", "fp8moe"), group=group, job_type="parity_report",
                         name=f"parity-{group}", dir=str(out), mode=mode,
                         settings=wandb.Settings(silent=True, x_disable_stats=True))
        rows = [[s[c] for c in columns] for s in summaries]
        run.log({"parity/plot": wandb.Image(str(png)), "parity/table": wandb.Table(columns=columns, data=rows)})
        for s in summaries:
            for key in columns[2:]:
                run.summary[f"{s['corpus']}/{s['recipe']}/{key}"] = s[key]
        run.summary["parity/markdown"] = table
        run.finish()
    except Exception as err:  # the report is on disk already; wandb is a convenience
        print(f"warning: wandb logging failed ({err}); the report files are written", file=sys.stderr)


def report(run_dirs: Sequence[str | os.PathLike], out: Optional[str | os.PathLike] = None,
           wandb: str = "auto") -> list[dict[str, Any]]:
    """Compare every FP8 recipe with BF16 on each corpus; write the JSONs, table and PNG; return
    the summaries."""
    paths = expand_run_dirs(run_dirs)
    if len(paths) < 2:
        raise ValueError(f"give a BF16 run and at least one FP8 run, got {len(paths)} run(s)")
    runs = [load_run(p) for p in paths]
    groups = group_runs(runs)
    out_dir = Path(out) if out else runs[0].path.resolve().parent / "parity"
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for corpus, recipes in groups.items():
        seeds = seed_order(recipes[BASELINE])
        base_runs = [recipes[BASELINE][s] for s in seeds]
        for label, by_seed in recipes.items():
            if label == BASELINE:
                continue
            fp8_runs = [by_seed[s] for s in seeds]
            summary = summarize(corpus, label, base_runs, fp8_runs)
            summary.update(params_total=params_total(fp8_runs[0]), parity_bound=PARITY_BOUND,
                           **provenance([*base_runs, *fp8_runs]))
            (out_dir / f"{slug(corpus)}-{slug(label)}.json").write_text(json.dumps(summary, indent=1) + "\n")
            summaries.append(summary)
    png = out_dir / "parity.png"
    parity_plot.plot(groups, png)
    table = markdown_table(summaries)
    (out_dir / "parity.md").write_text(table)
    print(table, end="")
    print(f"wrote {png}, {out_dir / 'parity.md'} and {len(summaries)} JSON summary file(s) in {out_dir}")
    if wandb == "auto":
        log_to_wandb(runs[0], summaries, png, table, out_dir)
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+",
                        help="run directories (BF16 and FP8, one or more seeds each), or directories holding them")
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
    sys.exit(main())
