"""The numbers of the multi-seed loss-parity report (tools/parity_report.py), in pure Python.

Definitions (the README's "Loss parity" section documents the same):
- a *pair* is one BF16 run and one FP8 run with the same seeds (run.seed, data.seed): the same
  initialization and data order, so their difference is the recipe's and little else;
- the *paired relative difference* of a pair is (fp8 - bf16) / bf16; its mean over the pairs gets
  a t-based 95% confidence interval, mean +- t(0.975, n - 1) * s / sqrt(n), s the sample std;
- the *seed spread* of a recipe is the relative sample std, std / mean, of one loss over its seeds;
- the *smoothed training loss* of a run is the mean of its logged losses over the last 10% of steps
  (logged steps > S - ceil(S / 10), S the last step);
- the *gap* at a logged step is the mean over the pairs of the paired relative difference of the
  training loss there; its *slope* is the least-squares slope over the last half of the run
  (logged steps > S / 2), which is also the mean of the pairs' own slopes. The slope test treats
  the seed as the unit of replication: with two pairs or more, each pair's slope is one sample,
  and the slope is significant when |mean| > t(0.975, pairs - 1) * std / sqrt(pairs). (Within a
  pair the gap wanders over hundreds of steps: on prose the pairs' slopes spread by +-0.5% per
  1000 steps, ten times what the mean curve's own residuals suggest, so a test on the mean curve
  alone flags trends that another set of seeds reverses.) With one pair, the regression of its
  curve: the residuals' lag-1 autocorrelation r > 0 widens the standard error by
  sqrt((1 + r) / (1 - r)) and leaves n (1 - r) / (1 + r) points for the t quantile (an AR(1)
  correction), significant when |slope| / stderr > t(0.975, that count - 2); optimistic, since
  one pair cannot show how much the trend itself varies between seeds;
- *within the floor*: |val_loss_rel_diff| <= min(0.25%, bf16_seed_spread); with one seed (no
  spread) the bound is 0.25%;
- the *verdict* compares the 95% interval of the paired difference with that bound: "parity" when
  it lies inside [-bound, bound], "no parity" when it lies wholly outside, else "inconclusive".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from tools.parity_report import Run

PARITY_BOUND = 0.0025  # DeepSeek-V3's bar: FP8 within 0.25% of the BF16 loss
TAIL_FRACTION = 10  # the smoothed training loss averages the last 1/10 of the logged steps
BASELINE = "bf16"

# t(0.975, df) for df = 1..30; above 30 the Cornish-Fisher expansion below is within 1e-7 of it.
_T975 = (12.706204736, 4.30265273, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,
         2.306004135, 2.262157163, 2.228138852, 2.20098516, 2.17881283, 2.160368656, 2.144786688,
         2.131449546, 2.119905299, 2.109815578, 2.10092204, 2.093024054, 2.085963447, 2.079613845,
         2.073873068, 2.06865761, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142,
         2.045229642, 2.042272456)  # fmt: skip
_Z975 = 1.959963984540054


def t975(df: float) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (a fractional df is rounded
    down: the wider interval)."""
    if not df >= 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    d = int(df)
    if d <= len(_T975):
        return _T975[d - 1]
    z = _Z975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / d + g2 / d**2 + g3 / d**3 + g4 / d**4


def seed_order(seeds) -> list:
    """Seed tuples in numeric order (ints before anything else)."""
    return sorted(seeds, key=lambda s: tuple((0, v) if isinstance(v, int) else (1, str(v)) for v in s))


def sample_std(values: Sequence[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) >= 2 else None


def rel_std(values: Sequence[float]) -> Optional[float]:
    """std / mean over seeds: the seed spread; None for fewer than two values."""
    std = sample_std(values)
    return None if std is None else std / statistics.fmean(values)


def mean_ci95(values: Sequence[float]) -> tuple[float, Optional[list[float]]]:
    """The mean and its t-based 95% confidence interval [lo, hi] (None for fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, [mean - half, mean + half]


@dataclass(frozen=True)
class SlopeTest:
    slope: Optional[float]  # per step
    stderr: Optional[float]  # per step: across pairs, or AR(1)-widened for one curve
    autocorr: Optional[float]  # lag-1 autocorrelation of the (mean) curve's residuals
    points: int
    significant: Optional[bool]
    pair_slopes: Optional[list[float]] = None  # per step, one a pair (the test across pairs)


def slope_test(xs: Sequence[float], ys: Sequence[float]) -> SlopeTest:
    """Least-squares slope of ys on xs, its AR(1)-corrected standard error, and whether it differs
    from 0 at 95%; None fields for fewer than 3 points."""
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"slope_test: {n} x values but {len(ys)} y values")
    if n < 3:
        return SlopeTest(None, None, None, n, None)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("slope_test: all x values are equal")
    slope = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - my - slope * (x - mx) for x, y in zip(xs, ys)]
    ssr = math.fsum(e * e for e in resid)
    if ssr == 0:  # an exact line: no noise to test against
        return SlopeTest(slope, 0.0, None, n, slope != 0)
    r1 = math.fsum(a * b for a, b in zip(resid, resid[1:])) / ssr
    widen = (1 + r1) / (1 - r1) if 0 < r1 < 1 else (1.0 if r1 <= 0 else math.inf)
    stderr = math.sqrt(ssr / (n - 2) / sxx * widen)
    dof = n / widen - 2
    significant = dof >= 1 and abs(slope) > t975(dof) * stderr
    return SlopeTest(slope, stderr, r1, n, significant)


def gap_slope_test(steps: Sequence[int], base_runs: Sequence[Run], fp8_runs: Sequence[Run]) -> SlopeTest:
    """The slope test of the module docstring over `steps`: across the pairs' slopes with two pairs
    or more, the AR(1)-corrected regression of the one pair's gap curve otherwise."""
    gaps = [[(f.losses[s] - b.losses[s]) / b.losses[s] for s in steps] for b, f in zip(base_runs, fp8_runs)]
    curve = slope_test(steps, [statistics.fmean(g) for g in zip(*gaps)])
    if len(gaps) < 2 or curve.slope is None:
        return curve
    slopes = [slope_test(steps, g).slope for g in gaps]
    mean, std = statistics.fmean(slopes), statistics.stdev(slopes)
    stderr = std / math.sqrt(len(slopes))
    significant = abs(mean) > t975(len(slopes) - 1) * stderr if stderr > 0 else mean != 0
    return SlopeTest(mean, stderr, curve.autocorr, curve.points, significant, slopes)


def smoothed_loss(losses: dict[int, float]) -> float:
    last = max(losses)
    return statistics.fmean(v for s, v in losses.items() if s > last - math.ceil(last / TAIL_FRACTION))


def median_speed(run: Run) -> Optional[float]:
    values = run.tokens_per_s[1:] or run.tokens_per_s  # the first interval includes start-up
    return statistics.median(values) if values else None


def gap_by_step(base_runs: Sequence[Run], fp8_runs: Sequence[Run]) -> dict[int, tuple[float, Optional[list[float]]]]:
    """step -> (mean paired relative training-loss gap, its 95% interval) at every logged step."""
    steps = sorted(base_runs[0].losses)
    out = {}
    for s in steps:
        diffs = [(f.losses[s] - b.losses[s]) / b.losses[s] for b, f in zip(base_runs, fp8_runs)]
        out[s] = mean_ci95(diffs)
    return out


def _mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if len(kept) == len(values) and kept else None


def verdict(ci: Optional[list[float]], bound: float) -> Optional[str]:
    if ci is None:
        return None
    lo, hi = ci
    if -bound <= lo and hi <= bound:
        return "parity"
    if lo > bound or hi < -bound:
        return "no parity"
    return "inconclusive"


def _val_section(base_runs: Sequence[Run], fp8_runs: Sequence[Run], tokens_per_step: int) -> dict[str, Any]:
    """The validation-loss fields at the last eval step every run has (None fields without one)."""
    runs = [*base_runs, *fp8_runs]
    common = sorted(set.intersection(*(set(r.val_losses) for r in runs)))
    keys = ("val_step", "val_loss_bf16", "val_loss_fp8", "val_loss_mean_bf16", "val_loss_mean_fp8",
            "val_loss_std_bf16", "val_loss_std_fp8", "val_loss_rel_diff", "val_loss_rel_diffs",
            "val_loss_rel_diff_paired", "val_loss_rel_diff_ci95", "bf16_seed_spread", "fp8_seed_spread",
            "bf16_spread_by_step", "floor", "within_floor", "parity_verdict")  # fmt: skip
    out: dict[str, Any] = dict.fromkeys(keys)
    if not common:
        return out
    step = common[-1]
    vb = [r.val_losses[step] for r in base_runs]
    vf = [r.val_losses[step] for r in fp8_runs]
    mb, mf = statistics.fmean(vb), statistics.fmean(vf)
    diffs = [(f - b) / b for b, f in zip(vb, vf)]
    paired, ci = mean_ci95(diffs)
    spread = rel_std(vb)
    floor = PARITY_BOUND if spread is None else min(PARITY_BOUND, spread)
    by_step = None
    if len(base_runs) >= 2:
        base_steps = sorted(set.intersection(*(set(r.val_losses) for r in base_runs)))
        by_step = {"steps": base_steps, "tokens": [s * tokens_per_step for s in base_steps],
                   "rel_std": [rel_std([r.val_losses[s] for r in base_runs]) for s in base_steps]}
    out.update(val_step=step, val_loss_bf16=vb, val_loss_fp8=vf, val_loss_mean_bf16=mb, val_loss_mean_fp8=mf,
               val_loss_std_bf16=sample_std(vb), val_loss_std_fp8=sample_std(vf),
               val_loss_rel_diff=(mf - mb) / mb, val_loss_rel_diffs=diffs, val_loss_rel_diff_paired=paired,
               val_loss_rel_diff_ci95=ci, bf16_seed_spread=spread, fp8_seed_spread=rel_std(vf),
               bf16_spread_by_step=by_step, floor=floor, within_floor=abs((mf - mb) / mb) <= floor,
               parity_verdict=verdict(ci, floor))  # fmt: skip
    return out


def summarize(corpus: str, recipe: str, base_runs: Sequence[Run], fp8_runs: Sequence[Run]) -> dict[str, Any]:
    """Every number of one FP8 recipe against BF16 on one corpus; base_runs[i] and fp8_runs[i]
    are a pair (the same seeds, checked by the caller)."""
    if not base_runs or len(base_runs) != len(fp8_runs):
        raise ValueError(f"summarize: {len(base_runs)} BF16 runs and {len(fp8_runs)} FP8 runs; give pairs")
    tokens_per_step = base_runs[0].tokens_per_step
    last = max(base_runs[0].losses)
    tb = [smoothed_loss(r.losses) for r in base_runs]
    tf = [smoothed_loss(r.losses) for r in fp8_runs]
    train_paired, train_ci = mean_ci95([(f - b) / b for b, f in zip(tb, tf)])
    steps = sorted(base_runs[0].losses)
    slope = gap_slope_test([s for s in steps if s > last / 2], base_runs, fp8_runs)
    val = _val_section(base_runs, fp8_runs, tokens_per_step)
    speed_b = _mean_or_none([median_speed(r) for r in base_runs])
    speed_f = _mean_or_none([median_speed(r) for r in fp8_runs])
    per_k = None if slope.slope is None else 1000 * slope.slope
    return {
        "corpus": corpus,
        "recipe": recipe,
        "baseline": BASELINE,
        "steps": last,
        "tokens": last * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "logged_steps": len(steps),
        "seed_keys": ["run.seed", "data.seed"],
        "seeds": [list(r.seeds) for r in base_runs],
        "runs": {BASELINE: [str(r.path) for r in base_runs], "fp8": [str(r.path) for r in fp8_runs]},
        **val,
        "passes": None if val["within_floor"] is None else bool(val["within_floor"] and not slope.significant),
        "train_loss_smoothed_bf16": tb,
        "train_loss_smoothed_fp8": tf,
        "train_loss_mean_bf16": statistics.fmean(tb),
        "train_loss_mean_fp8": statistics.fmean(tf),
        "train_loss_std_bf16": sample_std(tb),
        "train_loss_std_fp8": sample_std(tf),
        "train_loss_rel_diff": (statistics.fmean(tf) - statistics.fmean(tb)) / statistics.fmean(tb),
        "train_loss_rel_diff_paired": train_paired,
        "train_loss_rel_diff_ci95": train_ci,
        "gap_slope_last_half": per_k,
        "gap_slope_stderr": None if slope.stderr is None else 1000 * slope.stderr,
        "gap_slope_significant": slope.significant,
        "gap_slope_autocorr": slope.autocorr,
        "gap_slope_points": slope.points,
        "gap_slope_pairs": None if slope.pair_slopes is None else [1000 * v for v in slope.pair_slopes],
        "tokens_per_s": {BASELINE: speed_b, "fp8": speed_f},
        "speed_ratio": speed_f / speed_b if speed_b and speed_f else None,
    }
