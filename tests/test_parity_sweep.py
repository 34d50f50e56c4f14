"""tools/parity_sweep.py end to end on the tiny model, and tools/parity_report.py on its real runs.

The runs are train.py subprocesses on CPU: the FP8 experts run their pure-torch emulation
(TRITON_INTERPRET=0 with CPU tensors selects it), quantizing exactly as the GPU recipe does, so
the FP8 loss differs from the BF16 one by a little, never by nothing.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from app_helpers import app_env

from tools import parity_report, parity_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.dim=128", "model.n_layers=1", "model.moe.ffn_dim=128", "run.seq_len=64", "run.micro_batch_size=2",
    "run.steps=6", "logging.interval=1", "run.eval_interval=3", "run.eval_steps=2", "logging.wandb=disabled",
    "optim.warmup_steps=6", "optim.lr=1.5e-3",
]  # fmt: skip

pytestmark = pytest.mark.slow


def _env(cache: Path) -> dict:
    return dict(app_env(cache), TRITON_INTERPRET="0")


def _sweep(env: dict, out: Path, *args: str, extra=TINY, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/parity_sweep.py", *args, "--out", str(out), "--wandb", "off", "--", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _env(tmp_path_factory.mktemp("cache"))  # one corpus preparation for the module


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("sweep")
    proc = _sweep(env, out, "--recipes", "bf16,rowwise", "--seeds", "1,2", "--parallel", "2")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out, env, proc


def test_sweep_runs_every_pair_and_reports(sweep):
    out, _, proc = sweep
    assert "4 run(s) in" in proc.stdout and "0 finished already, 4 to run, 2 at a time" in proc.stdout
    assert "[4/4] " in proc.stdout and "ETA" in proc.stdout
    for recipe in ("bf16", "rowwise"):
        for seed in (1, 2):
            run = out / f"run-{recipe}-s{seed}"
            cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
            assert cfg["run"]["seed"] == cfg["data"]["seed"] == seed and cfg["fp8"]["experts"] == recipe
            info = json.loads((run / "run_info.json").read_text())
            assert info["command"][:2] == ["train.py", f"fp8={recipe}"] and info["seconds"] > 0
            assert {"commit", "gpu", "torch", "triton"} <= set(info)
            assert (out / "logs" / f"{run.name}.log").read_text().startswith("$ ")
            assert not (run / "checkpoints").exists()  # a finished run keeps its metrics only
    s = json.loads((out / "parity" / "default_corpus-rowwise.json").read_text())
    assert s["corpus"] == "default_corpus" and s["recipe"] == "rowwise" and s["steps"] == 6
    assert s["seeds"] == [[1, 1], [2, 2]] and s["val_step"] == 6 and s["provenance"] == "runs"
    assert s["tokens"] == 6 * 2 * 64 and 1_000_000 < s["params_total"] < 2_000_000
    # FP8 emulation changes the loss a little: visible, yet far below a percent on 6 steps
    assert all(0 < abs(d) < 5e-3 for d in s["val_loss_rel_diffs"])
    lo, hi = s["val_loss_rel_diff_ci95"]
    assert lo < s["val_loss_rel_diff_paired"] < hi
    assert s["bf16_spread_by_step"]["steps"] == [3, 6] and s["bf16_seed_spread"] > 0
    assert isinstance(s["gap_slope_significant"], bool) and s["gap_slope_points"] == 3
    assert (out / "parity" / "parity.png").stat().st_size > 10_000
    assert "| default_corpus | rowwise | 2 | 6 |" in (out / "parity" / "parity.md").read_text()


def test_finished_runs_are_skipped(sweep, capsys):
    out = sweep[0]
    args = ["--recipes", "bf16,rowwise", "--seeds", "1,2,3", "--out", str(out), "--dry-run", "--", *TINY]
    assert parity_sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "6 run(s) in" in printed and "4 finished already, 2 to run" in printed
    assert "run-rowwise-s2 (finished)" in printed and "run-rowwise-s3 (to run): python train.py fp8=rowwise" in printed


def test_a_run_directory_of_other_overrides_is_refused(sweep):
    out, env, _ = sweep
    proc = _sweep(env, out, "--recipes", "bf16", "--seeds", "1", extra=[*TINY, "optim.beta2=0.9"])
    assert proc.returncode == 2 and "was launched with other overrides" in proc.stderr
    assert "optim.beta2=0.9" in proc.stderr and "Traceback" not in proc.stderr


# Stand-ins for train.py (argv[1]: the run directory): one that finishes a 2-step run, one that
# fails with a long output, one that waits for SIGTERM.
FINISH = """
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
(run / ".hydra").mkdir(parents=True)
(run / ".hydra" / "config.yaml").write_text("run:\\n  steps: 2\\n  eval_interval: 0\\n")
(run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\\n")
"""
FAIL = "import sys\nfor i in range(40): print('boom line', i)\nsys.exit(3)"
WAIT = """
import pathlib, signal, sys, time
run = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (run.with_suffix('.stopped').touch(), sys.exit(0)))
run.with_suffix('.started').touch()
time.sleep(60)
"""


def _job(tmp_path: Path, name: str, code: str) -> parity_sweep.Job:
    run = tmp_path / name
    return parity_sweep.Job(name, [], run, tmp_path / "logs" / f"{name}.log", [sys.executable, "-c", code, str(run)])


def test_a_failed_run_is_named_with_its_log_tail(tmp_path, capsys):
    good, bad = _job(tmp_path, "good", FINISH), _job(tmp_path, "bad", FAIL)
    failed = parity_sweep.run_jobs([good, bad], 2, [], dict(os.environ), 10.0, info={"commit": "c"})
    assert failed == [bad]
    out, err = capsys.readouterr()
    assert "[1/2] good finished in" in out and "ETA" in out
    assert json.loads((good.run_dir / "run_info.json").read_text())["commit"] == "c"
    assert "FAILED bad (exit 3)" in err and "boom line 39" in err and "boom line 14" not in err  # the last 25


def test_a_stop_sends_sigterm_to_every_run(tmp_path):
    jobs = [_job(tmp_path, f"wait{i}", WAIT) for i in range(2)]

    def stop_when_started():
        deadline = time.monotonic() + 120
        while not all(j.run_dir.with_suffix(".started").exists() for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_started, daemon=True).start()
    with pytest.raises(parity_sweep.Stop):
        parity_sweep.run_jobs(jobs, 2, [], dict(os.environ), 60.0, info={})
    assert all(j.run_dir.with_suffix(".stopped").exists() for j in jobs)  # each got SIGTERM and stopped
    assert all(j.proc.returncode == 0 for j in jobs)


def test_single_seed_report_on_real_runs(sweep, tmp_path, capsys):
    out = sweep[0]
    assert parity_report.main([str(out / "run-rowwise-s1"), str(out / "run-bf16-s1"), "--out", str(tmp_path)]) == 0
    assert "| default_corpus | rowwise | 1 | 6 |" in capsys.readouterr().out  # the table is printed
    s = json.loads((tmp_path / "default_corpus-rowwise.json").read_text())
    assert s["val_loss_rel_diff_ci95"] is None and s["bf16_seed_spread"] is None
    assert 0 < abs(s["val_loss_rel_diff"]) < 5e-3 and 5 < s["val_loss_mean_bf16"] < 9
    assert s["speed_ratio"] == pytest.approx(s["tokens_per_s"]["fp8"] / s["tokens_per_s"]["bf16"])


def _copy_run(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    cfg_path = dst / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    cfg_path.write_text(yaml.safe_dump(cfg))
    return dst


def test_params_total_recomputed_without_log(sweep, tmp_path):
    run = _copy_run(sweep[0] / "run-rowwise-s1", tmp_path / "nolog")
    for log_file in run.glob("*.log"):
        log_file.unlink()
    with_log = parity_report.params_total(parity_report.load_run(sweep[0] / "run-rowwise-s1"))
    assert parity_report.params_total(parity_report.load_run(run)) == with_log


def test_logs_to_wandb_when_the_runs_did(sweep, tmp_path):
    pytest.importorskip("wandb")
    bf16 = _copy_run(sweep[0] / "run-bf16-s1", tmp_path / "b", logging__wandb="offline")
    fp8 = _copy_run(sweep[0] / "run-rowwise-s1", tmp_path / "f", logging__wandb="offline")
    parity_report.report([bf16, fp8], out=tmp_path / "o")
    assert list((tmp_path / "o" / "wandb").glob("offline-run-*/run-*.wandb"))
