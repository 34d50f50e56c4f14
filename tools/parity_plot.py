"""parity.png of tools/parity_report.py: one column per corpus, tokens on the x axis.

Top: the BF16 mean training loss with its seed band (min..max over the seeds), each FP8 recipe's
mean (dashed), the validation means as open markers; the y range starts at the BF16 mean at 10%
of the run, so the first steep drop does not flatten the rest. Bottom: each FP8 recipe's mean
paired relative gap (fp8 - bf16) / bf16 of the training loss with its 95% interval band, against
the noise: BF16's seed-to-seed spread at each step (+- its relative std over the seeds, the
report's floor quantity) in grey; the +-0.25% bound dotted, the last half of the run (the slope
test's window) shaded and its last 10% darker, with each recipe's figure there printed (the
paired gap of the smoothed training loss, tools/parity_stats.py, with its 95% interval and the
BF16 spread of the same quantity).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tools.parity_stats import (BASELINE, PARITY_BOUND, TAIL_FRACTION, gap_by_step, mean_ci95, rel_std,
                                seed_order, smoothed_loss)

if TYPE_CHECKING:
    from tools.parity_report import Run


def _mean_curve(runs: Sequence[Run]) -> tuple[list[int], list[float]]:
    steps = sorted(runs[0].losses)
    return steps, [statistics.fmean(r.losses[s] for r in runs) for s in steps]


def _val_means(runs: Sequence[Run]) -> tuple[list[int], list[float]]:
    steps = sorted(set.intersection(*(set(r.val_losses) for r in runs)))
    return steps, [statistics.fmean(r.val_losses[s] for r in runs) for s in steps]


def _shape(config: dict) -> str:
    """The model and its shape from a run's config: "tiny: 2 layers, dim 64, 8 experts top-2"."""
    model = config.get("model", {})
    moe = model.get("moe", {})
    return (f"{model.get('name', '?')}: {model.get('n_layers', '?')} layers, dim {model.get('dim', '?')}, "
            f"{moe.get('num_experts', '?')} experts top-{moe.get('top_k', '?')}")


def _tail_text(label: str, base: Sequence[Run], runs: Sequence[Run]) -> str:
    """The last-10% figure of one recipe, as the report's JSON has it (train_loss_rel_diff_paired)."""
    tb = [smoothed_loss(r.losses) for r in base]
    paired, ci = mean_ci95([(smoothed_loss(f.losses) - b) / b for b, f in zip(tb, runs)])
    ci_text = "" if ci is None else f" [95% CI {100 * ci[0]:+.3f}%, {100 * ci[1]:+.3f}%]"
    return f"{label} {100 * paired:+.3f}%{ci_text}"


def plot(groups: dict[str, dict[str, dict[tuple, Run]]], path: Path):
    """Draws the figure, writes it to `path` and returns it (a matplotlib Figure, closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    fig, axes = plt.subplots(2, n, figsize=(8 * n, 9), sharex="col", height_ratios=(2, 1.4), squeeze=False)
    for col, (corpus, recipes) in enumerate(groups.items()):
        top, bottom = axes[0, col], axes[1, col]
        seeds = seed_order(recipes[BASELINE])
        colors = {label: f"C{i}" for i, label in enumerate([BASELINE, *(k for k in recipes if k != BASELINE)])}
        base = [recipes[BASELINE][s] for s in seeds]
        total = max(base[0].losses) * base[0].tokens_per_step
        unit, scale = ("M", 1e6) if total >= 1e6 else ("k", 1e3)
        per_step = base[0].tokens_per_step / scale
        steps, mean_b = _mean_curve(base)
        x = [s * per_step for s in steps]
        top.plot(x, mean_b, color="C0", lw=1.4, label=f"{BASELINE} mean of {len(base)} seed(s)")
        if len(base) > 1:
            lo = [min(r.losses[s] for r in base) for s in steps]
            hi = [max(r.losses[s] for r in base) for s in steps]
            top.fill_between(x, lo, hi, color="C0", alpha=0.25, lw=0, label=f"{BASELINE} seed band (min..max)")
        lowest = min(mean_b)
        shown = [100 * PARITY_BOUND, -100 * PARITY_BOUND]  # the gap axis: steps past the first 10%
        if len(base) > 1:
            spread = [100 * rel_std([r.losses[s] for r in base]) for s in steps]
            bottom.fill_between(x, [-v for v in spread], spread, color="0.6", alpha=0.35, lw=0,
                                label=f"{BASELINE} seed-to-seed spread (+-rel. std)")
            shown += [v for s, v in zip(steps, spread) if s >= steps[-1] / 10 for v in (v, -v)]
        tail = []
        for label, by_seed in recipes.items():
            if label == BASELINE:
                continue
            color = colors[label]
            runs = [by_seed[s] for s in seeds]
            _, mean_f = _mean_curve(runs)
            lowest = min(lowest, min(mean_f))
            top.plot(x, mean_f, color=color, ls="--", lw=1.2, label=f"{label} mean")
            gaps = gap_by_step(base, runs)
            g = [100 * gaps[s][0] for s in steps]
            bottom.plot(x, g, color=color, lw=1.0, label=f"{label} mean paired gap")
            band = [(100 * gaps[s][1][0], 100 * gaps[s][1][1]) if gaps[s][1] else (v, v) for s, v in zip(steps, g)]
            if len(base) > 1:
                bottom.fill_between(x, [b[0] for b in band], [b[1] for b in band], color=color, alpha=0.2, lw=0,
                                    label=f"{label} 95% interval")
            shown += [v for s, b in zip(steps, band) if s >= steps[-1] / 10 for v in b]
            tail.append(_tail_text(label, base, runs))
        for label, by_seed in recipes.items():
            vs, vm = _val_means([by_seed[s] for s in seeds])
            if vs:
                lowest = min(lowest, *vm)
                top.plot([s * per_step for s in vs], vm, ls="none", marker="o", ms=5, mfc="none",
                         color=colors[label], label=f"{label} validation mean")
        start = next((m for s, m in zip(steps, mean_b) if s >= steps[-1] / 10), mean_b[0])
        top.set_ylim(lowest - 0.05 * (start - lowest + 1e-3), start)
        margin = 0.1 * (max(shown) - min(shown))
        bottom.set_ylim(min(shown) - margin, max(shown) + margin)
        last = steps[-1] * per_step
        bottom.axvspan(last / 2, last, color="0.92", zorder=0, label="slope test window")
        tail_from = (steps[-1] - math.ceil(steps[-1] / TAIL_FRACTION)) * per_step
        bottom.axvspan(tail_from, last, color="0.8", zorder=0, label=f"last {100 // TAIL_FRACTION}% of steps")
        spread_tail = rel_std([smoothed_loss(r.losses) for r in base])
        spread_text = "" if spread_tail is None else f", {BASELINE} seed spread {100 * spread_tail:.3f}%"
        tail_title = f"last {100 // TAIL_FRACTION}% of steps{spread_text}:\n" + "\n".join(tail)
        bottom.axhline(0.0, color="k", lw=0.8)
        for sign in (1, -1):
            bottom.axhline(100 * sign * PARITY_BOUND, color="k", lw=0.8, ls=":")
        top.set_title(f"{corpus}: FP8 vs BF16 training loss, {len(base)} seed(s)\n{_shape(base[0].config)}",
                      fontsize=10)
        bottom.set_title(f"FP8 - BF16 gap of the training loss, paired by seed\n{tail_title}", fontsize=9)
        top.set_ylabel("training loss")
        bottom.set_ylabel("(fp8 - bf16) / bf16 [%]")
        bottom.set_xlabel(f"tokens [{unit}]")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=7)
        bottom.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the gap legends sit below their panels
    plt.close(fig)
    return fig
