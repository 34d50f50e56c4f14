"""parity.png of tools/parity_report.py: one column per corpus, tokens on the x axis.

Top: the BF16 mean training loss with its seed band (min..max over the seeds), each FP8 recipe's
mean (dashed), the validation means as open markers; the y range starts at the BF16 mean at 10%
of the run, so the first steep drop does not flatten the rest. Bottom: each FP8 recipe's mean
paired relative gap (fp8 - bf16) / bf16 of the training loss with its 95% interval band, the
+-0.25% bound dotted, and the last half of the run (the slope test's window) shaded.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tools.parity_stats import BASELINE, PARITY_BOUND, gap_by_step, seed_order

if TYPE_CHECKING:
    from tools.parity_report import Run


def _mean_curve(runs: Sequence[Run]) -> tuple[list[int], list[float]]:
    steps = sorted(runs[0].losses)
    return steps, [statistics.fmean(r.losses[s] for r in runs) for s in steps]


def _val_means(runs: Sequence[Run]) -> tuple[list[int], list[float]]:
    steps = sorted(set.intersection(*(set(r.val_losses) for r in runs)))
    return steps, [statistics.fmean(r.val_losses[s] for r in runs) for s in steps]


def plot(groups: dict[str, dict[str, dict[tuple, Run]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    fig, axes = plt.subplots(2, n, figsize=(8 * n, 7), sharex="col", height_ratios=(2, 1), squeeze=False)
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
        bottom.axhline(0.0, color="k", lw=0.8)
        for sign in (1, -1):
            bottom.axhline(100 * sign * PARITY_BOUND, color="k", lw=0.8, ls=":")
        model = base[0].config.get("model", {}).get("name", "?")
        top.set_title(f"{corpus}: FP8 vs BF16 loss ({model}, {len(base)} seed(s))")
        if col == 0:
            top.set_ylabel("training loss")
            bottom.set_ylabel("(fp8 - bf16) / bf16 [%]")
        bottom.set_xlabel(f"tokens [{unit}]")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
