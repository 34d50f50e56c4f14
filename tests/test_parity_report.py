"""tools/parity_report.py and tools/parity_stats.py on synthetic run directories with known answers.

Each run directory is written by the test (`.hydra/config.yaml`, `metrics.jsonl`, a `train.log`
with the lines the report parses), so every number below is computed by hand. The real train.py
runs are in tests/test_parity_sweep.py.
"""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools import parity_plot, parity_report, parity_stats

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "model": {"name": "synthetic", "dim": 8, "n_layers": 2, "moe": {"num_experts": 4, "top_k": 2}},
    "data": {"kind": "megatron", "paths": ["/corpora/synth"], "split": "98,2,0", "seed": 0, "num_workers": 2},
    "optim": {"lr": 1e-3},
    "run": {"seed": 0, "seq_len": 16, "micro_batch_size": 2, "grad_accum": 1, "dtype": "bfloat16", "steps": 200},
    "fp8": {"experts": "bf16", "dense": "bf16", "pow2_scales": False},
    "logging": {"wandb": "disabled"},
}
# The last half of a 200-step run logged every 10 steps: 110..200. A pattern symmetric about its
# middle is uncorrelated with the step, so it moves neither the slope nor the intercept.
HALF = list(range(110, 201, 10))
SYMMETRIC = [1, -1, 1, -1, 0, 0, -1, 1, -1, 1]


def make_run(root: Path, recipe: str, seed: int, gap=lambda s: 0.0, val=None, base=5.0, steps=200,
             eval_interval=100, name=None, fp8=None, corpus="synth", **changes) -> Path:
    """A run whose training loss is (base - s/1000) * (1 + gap(s)) at every 10th step, with
    validation losses val(s) at every eval_interval (default: the training loss)."""
    cfg = copy.deepcopy(CONFIG)
    cfg["fp8"].update(experts=recipe, **(fp8 or {}))
    cfg["run"].update(seed=seed, steps=steps)
    cfg["data"].update(seed=seed, paths=[f"/corpora/{corpus}"])
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    run_dir = root / (name or f"{corpus}-{recipe}-s{seed}")
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for s in range(10, steps + 1, 10):
        loss = (base - s / 1000) * (1 + gap(s))
        lines.append({"step": s, "loss": loss, "tokens_per_s": 1000.0 if recipe == "bf16" else 1200.0})
        if s % eval_interval == 0:
            lines.append({"step": s, "val_loss": val(s) if val else loss})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "train.log").write_text("model synthetic: params total=1234 active=1000, 0.001 GFLOP/token; "
                                       "global batch 2 x 16 tokens; 1 rank(s) on cpu; fp8.experts=x\n")
    return run_dir


def summary(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_t_quantiles_match_the_tables():
    # Student's t 0.975 quantiles from the standard tables; beyond df=30 the expansion.
    for df, t in ((1, 12.7062), (2, 4.3027), (9, 2.2622), (30, 2.0423), (31, 2.0395), (60, 2.0003),
                  (120, 1.9799), (10**6, 1.9600)):
        assert parity_stats.t975(df) == pytest.approx(t, abs=1e-4), df
    assert parity_stats.t975(2.9) == parity_stats.t975(2)  # fractional df: the wider interval
    with pytest.raises(ValueError, match="degrees of freedom"):
        parity_stats.t975(0.5)


def test_paired_difference_interval_spread_and_floor(tmp_path):
    bf16_val, diffs = [4.0, 4.1, 4.2], [0.001, 0.002, 0.003]
    early = [4.4, 4.6, 4.8]  # step 100: a wider spread than at the end
    for i, seed in enumerate((1, 2, 3)):
        make_run(tmp_path / "runs", "bf16", seed, val=lambda s, i=i: early[i] if s < 200 else bf16_val[i],
                 eval_interval=100)
        make_run(tmp_path / "runs", "rowwise", seed, eval_interval=100,
                 val=lambda s, i=i: (early[i] if s < 200 else bf16_val[i]) * (1 + diffs[i]))
    parity_report.report([tmp_path / "runs"], out=tmp_path / "out", wandb="off")
    s = summary(tmp_path / "out", "synth-rowwise")
    assert s["corpus"] == "synth" and s["recipe"] == "rowwise" and s["steps"] == 200
    assert s["seeds"] == [[1, 1], [2, 2], [3, 3]] and s["tokens"] == 200 * 32 and s["params_total"] == 1234
    assert s["val_loss_mean_bf16"] == pytest.approx(4.1)
    assert s["val_loss_mean_fp8"] == pytest.approx(sum(b * (1 + d) for b, d in zip(bf16_val, diffs)) / 3)
    assert s["val_loss_rel_diff"] == pytest.approx((s["val_loss_mean_fp8"] - 4.1) / 4.1)
    assert s["val_loss_rel_diffs"] == pytest.approx(diffs)
    half = 4.30265273 * 0.001 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n), s = 0.001
    assert s["val_loss_rel_diff_paired"] == pytest.approx(0.002)
    assert s["val_loss_rel_diff_ci95"] == pytest.approx([0.002 - half, 0.002 + half])
    assert s["bf16_seed_spread"] == pytest.approx(0.1 / 4.1)
    assert s["val_loss_std_bf16"] == pytest.approx(0.1)
    spread = s["bf16_spread_by_step"]
    assert spread["steps"] == [100, 200] and spread["tokens"] == [3200, 6400]
    assert spread["rel_std"] == pytest.approx([0.2 / 4.6, 0.1 / 4.1])
    # the floor is 0.25% (the spread, 2.4%, is wider); the mean is inside it, the interval is not
    assert s["floor"] == 0.0025 and s["within_floor"] is True
    assert s["parity_verdict"] == "inconclusive" and s["passes"] is True
    assert s["tokens_per_s"] == {"bf16": 1000.0, "fp8": 1200.0} and s["speed_ratio"] == pytest.approx(1.2)
    assert s["provenance"] == "report" and {"commit", "gpu", "torch", "triton"} <= set(s)
    table = (tmp_path / "out" / "parity.md").read_text()
    assert "| synth | rowwise | 3 | 200 | 6.4k | 4.1000 ± 0.1000 |" in table
    png = (tmp_path / "out" / "parity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_one_pair_growing_gap_is_flagged_and_a_flat_one_is_not(tmp_path):
    """One seed: the AR(1)-corrected regression of the pair's gap curve."""
    slope = 2e-5  # per step: 2% per 1000 steps
    noise = dict(zip(HALF, SYMMETRIC))
    make_run(tmp_path / "runs", "bf16", 1)
    make_run(tmp_path / "runs", "blockwise", 1, gap=lambda s: 0.001 + slope * s + 1e-4 * noise.get(s, 0))
    make_run(tmp_path / "runs", "rowwise", 1, gap=lambda s: 0.001 + 1e-4 * noise.get(s, 0))
    parity_report.report([tmp_path / "runs"], out=tmp_path / "out", wandb="off")
    growing, flat = summary(tmp_path / "out", "synth-blockwise"), summary(tmp_path / "out", "synth-rowwise")
    # residuals = the pattern * 1e-4: SSR = 8e-8 over 10 points, Sxx = 8250; its lag-1 correlation is
    # negative, so no widening
    stderr = 1000 * math.sqrt(8e-8 / 8 / 8250)
    assert growing["gap_slope_last_half"] == pytest.approx(1000 * slope, rel=1e-6)
    assert growing["gap_slope_stderr"] == pytest.approx(stderr, rel=1e-6)
    assert growing["gap_slope_points"] == 10 and growing["gap_slope_autocorr"] == pytest.approx(-6 / 8)
    assert growing["gap_slope_significant"] is True and growing["passes"] is False
    assert growing["gap_slope_pairs"] is None
    assert flat["gap_slope_last_half"] == pytest.approx(0.0, abs=1e-12)
    assert flat["gap_slope_significant"] is False
    assert flat["train_loss_rel_diff_paired"] == pytest.approx(0.001, rel=1e-3)  # the last 10%: steps 190, 200
    assert "(significant)" in (tmp_path / "out" / "parity.md").read_text().splitlines()[2]


def test_several_pairs_test_the_slope_across_pairs(tmp_path):
    """Two pairs or more: each pair's slope is one sample. A trend every pair shares is flagged;
    pairs whose gaps drift apart, each along a clean line, are not, although the mean curve alone
    (a clean line too) would be."""
    slope = 2e-5
    noise = dict(zip(HALF, SYMMETRIC))
    drifts = {1: 3e-5, 2: -1e-5, 3: 1e-5}  # mean 1e-5, std 2e-5
    for seed in (1, 2, 3):
        make_run(tmp_path / "runs", "bf16", seed, base=5.0 + seed / 10)
        make_run(tmp_path / "runs", "blockwise", seed, base=5.0 + seed / 10,
                 gap=lambda s, k=seed: (1 + (k - 2) / 20) * slope * s + 1e-4 * noise.get(s, 0))
        make_run(tmp_path / "runs", "rowwise", seed, base=5.0 + seed / 10,
                 gap=lambda s, k=seed: drifts[k] * (s - 150) + 1e-4 * noise.get(s, 0))
    parity_report.report([tmp_path / "runs"], out=tmp_path / "out", wandb="off")
    shared, drifting = summary(tmp_path / "out", "synth-blockwise"), summary(tmp_path / "out", "synth-rowwise")
    # the gap is relative to a loss that falls with the step, so the pairs' slopes are exact only
    # up to that: ~1e-3 of the slope
    assert shared["gap_slope_pairs"] == pytest.approx([1000 * slope * f for f in (0.95, 1.0, 1.05)], rel=1e-3)
    assert shared["gap_slope_last_half"] == pytest.approx(1000 * slope, rel=1e-3)
    # std of the three slopes = 0.05 * slope, over sqrt(3); |mean| / stderr = 20 sqrt(3) > t(0.975, 2) = 4.30
    assert shared["gap_slope_stderr"] == pytest.approx(1000 * 0.05 * slope / math.sqrt(3), rel=1e-2)
    assert shared["gap_slope_significant"] is True and shared["passes"] is False
    assert drifting["gap_slope_pairs"] == pytest.approx([1000 * v for v in drifts.values()], rel=1e-3)
    assert drifting["gap_slope_last_half"] == pytest.approx(1000 * 1e-5, rel=1e-3)
    # |mean| / stderr = 1e-5 / (2e-5 / sqrt(3)) = 0.87 < 4.30
    assert drifting["gap_slope_stderr"] == pytest.approx(1000 * 2e-5 / math.sqrt(3), rel=1e-2)
    assert drifting["gap_slope_significant"] is False
    mean_curve = [sum(drifts.values()) / 3 * (s - 150) + 1e-4 * noise.get(s, 0) for s in HALF]
    assert parity_stats.slope_test(HALF, mean_curve).significant is True


def test_slope_error_widens_with_autocorrelated_residuals():
    xs = list(range(8))
    pattern = [1, 1, -1, -1, -1, -1, 1, 1]  # symmetric: slope 0.5 exactly; lag-1 correlation 3/8
    test = parity_stats.slope_test(xs, [0.5 * x + p for x, p in zip(xs, pattern)])
    widen = (1 + 3 / 8) / (1 - 3 / 8)
    assert test.slope == pytest.approx(0.5) and test.autocorr == pytest.approx(3 / 8)
    assert test.stderr == pytest.approx(math.sqrt(8 / 6 / 42 * widen))  # SSR 8, n - 2 = 6, Sxx 42
    assert parity_stats.slope_test([1, 2], [0.0, 1.0]).significant is None  # too few points


def test_recipe_labels_from_the_fp8_defaults():
    label = parity_report.recipe_label
    assert label({"experts": "rowwise", "dense": "bf16", "pow2_scales": False}) == "rowwise"
    assert label({"experts": "rowwise", "pow2_scales": True}) == "rowwise+pow2_scales=true"
    assert label({"experts": "rowwise", "dense": "rowwise", "amax_margin": 1}) == "rowwise+amax_margin=1+dense=rowwise"
    assert label({"experts": "bf16"}) == "bf16"
    assert parity_report.slug("rowwise+pow2_scales=true") == "rowwise+pow2_scales-true"
    with pytest.raises(ValueError, match="no fp8.experts"):
        label({"dense": "bf16"})


def test_ablation_label_runs_beside_its_recipe_single_seed(tmp_path):
    make_run(tmp_path, "bf16", 1)
    make_run(tmp_path, "rowwise", 1, gap=lambda s: 0.001)
    make_run(tmp_path, "rowwise", 1, gap=lambda s: 0.003, fp8={"pow2_scales": True}, name="pow2")
    parity_report.report([tmp_path / "synth-bf16-s1", tmp_path / "synth-rowwise-s1", tmp_path / "pow2"],
                         wandb="off")
    out = tmp_path / "parity"  # the default: beside the first run
    plain, pow2 = summary(out, "synth-rowwise"), summary(out, "synth-rowwise+pow2_scales-true")
    assert pow2["recipe"] == "rowwise+pow2_scales=true" and pow2["val_loss_rel_diff"] == pytest.approx(0.003)
    # one seed: no interval, no spread; the floor is the 0.25% bound alone
    for key in ("val_loss_rel_diff_ci95", "bf16_seed_spread", "bf16_spread_by_step", "parity_verdict",
                "val_loss_std_bf16", "train_loss_rel_diff_ci95"):
        assert plain[key] is None and pow2[key] is None, key
    assert plain["within_floor"] is True and pow2["within_floor"] is False and plain["floor"] == 0.0025


def test_two_corpora_in_one_report(tmp_path):
    for corpus in ("python_sources", "prose"):
        make_run(tmp_path / "runs", "bf16", 1, corpus=corpus)
        make_run(tmp_path / "runs", "blockwise", 1, corpus=corpus, gap=lambda s: -0.001)
    summaries = parity_report.report([tmp_path / "runs"], out=tmp_path / "out", wandb="off")
    assert sorted(s["corpus"] for s in summaries) == ["prose", "python_sources"]
    assert (tmp_path / "out" / "prose-blockwise.json").is_file()
    assert (tmp_path / "out" / "python_sources-blockwise.json").is_file()


def test_a_seed_missing_for_one_recipe_is_named(tmp_path):
    for seed in (1, 2):
        make_run(tmp_path, "bf16", seed)
    make_run(tmp_path, "rowwise", 1)
    make_run(tmp_path, "blockwise", 3)
    with pytest.raises(ValueError, match=r"recipe rowwise lacks the seeds run.seed=2 data.seed=2 that BF16 has"):
        parity_report.report([tmp_path / "synth-bf16-s1", tmp_path / "synth-bf16-s2", tmp_path / "synth-rowwise-s1"],
                             out=tmp_path / "o")
    with pytest.raises(ValueError, match=r"BF16 lacks the seeds run.seed=3 data.seed=3 that recipe blockwise has"):
        parity_report.report([tmp_path / "synth-bf16-s1", tmp_path / "synth-bf16-s2", tmp_path / "synth-blockwise-s3"],
                             out=tmp_path / "o")


def test_mismatching_config_is_named_seeds_may_differ(tmp_path):
    make_run(tmp_path, "bf16", 1)
    make_run(tmp_path, "bf16", 2, optim__lr=2e-3)
    make_run(tmp_path, "rowwise", 1)
    make_run(tmp_path, "rowwise", 2)
    with pytest.raises(ValueError, match=r"synth-bf16-s1 and synth-bf16-s2 differ .*: optim\.lr \(0\.001 vs 0\.002\)"):
        parity_report.report([tmp_path], out=tmp_path / "o")
    # the command line says so in one line and exits 2, without a traceback
    proc = subprocess.run([sys.executable, "tools/parity_report.py", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "optim.lr" in proc.stderr


def test_duplicate_runs_steps_baseline_and_files_are_named(tmp_path):
    make_run(tmp_path, "bf16", 1)
    make_run(tmp_path, "rowwise", 1)
    make_run(tmp_path, "rowwise", 1, name="again")
    with pytest.raises(ValueError, match=r"two runs of recipe rowwise on corpus synth with run.seed=1 data.seed=1"):
        parity_report.report([tmp_path], out=tmp_path / "o")
    make_run(tmp_path, "blockwise", 1, steps=190)
    with pytest.raises(ValueError, match=r"different steps.*steps only there: \[200\]"):
        parity_report.report([tmp_path / "synth-bf16-s1", tmp_path / "synth-blockwise-s1"], out=tmp_path / "o")
    with pytest.raises(ValueError, match=r"no BF16 run .* on corpus synth: again \(rowwise\)"):
        parity_report.report([tmp_path / "again", tmp_path / "synth-blockwise-s1"], out=tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no metrics.jsonl and no run directory"):
        parity_report.report([tmp_path / "synth-bf16-s1", tmp_path / "empty"], out=tmp_path / "o")


def test_parity_plot_shows_the_gap_against_bf16_noise_with_labels(tmp_path):
    """parity.png as the report draws it: labelled axes and panels, the model in the title, BF16's
    seed-to-seed spread on the gap axis, and the last-10% figure printed."""
    for seed in (1, 2):
        make_run(tmp_path / "runs", "bf16", seed, base=5.0 + seed / 100)
        make_run(tmp_path / "runs", "rowwise", seed, base=5.0 + seed / 100, gap=lambda s: 0.002)
    runs = [parity_report.load_run(p) for p in parity_report.expand_run_dirs([tmp_path / "runs"])]
    fig = parity_plot.plot(parity_report.group_runs(runs), tmp_path / "parity.png")
    assert (tmp_path / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top, bottom = fig.axes
    assert top.get_ylabel() == "training loss" and bottom.get_ylabel() == "(fp8 - bf16) / bf16 [%]"
    assert bottom.get_xlabel() == "tokens [k]" and "paired by seed" in bottom.get_title()
    assert "synth" in top.get_title() and "synthetic: 2 layers, dim 8, 4 experts top-2" in top.get_title()
    assert "2 seed(s)" in top.get_title()
    top_labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert top_labels[:3] == ["bf16 mean of 2 seed(s)", "bf16 seed band (min..max)", "rowwise mean"]
    labels = [t.get_text() for t in bottom.get_legend().get_texts()]
    for label in ("bf16 seed-to-seed spread (+-rel. std)", "rowwise mean paired gap", "rowwise 95% interval",
                  "slope test window", "last 10% of steps"):
        assert label in labels, labels
    # the spread band: +-std/mean of the two BF16 losses, widest at the last step (the lowest mean)
    band = next(c for c in bottom.collections if c.get_label().startswith("bf16 seed-to-seed"))
    widest = max(abs(y) for path in band.get_paths() for y in path.vertices[:, 1])
    assert widest == pytest.approx(100 * 0.01 / math.sqrt(2) / (5.015 - 0.2), rel=1e-6)
    # last 10%: steps 190 and 200; the gap is 0.2% in every pair, the BF16 spread std/mean there
    spread = 100 * 0.01 / math.sqrt(2) / (5.015 - 0.195)
    assert bottom.get_title().splitlines()[1:] == [f"last 10% of steps, bf16 seed spread {spread:.3f}%:",
                                                   "rowwise +0.200% [95% CI +0.200%, +0.200%]"]
