"""One wandb run per run directory: a launch killed mid-run and the launch that resumes it write
into one wandb run (offline, read back with wandb's own reader), each step once and in order."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from app_helpers import ROOT, TINY, app_env, records, run_train
from trainer.metrics import WANDB_FLUSH_S, wandb_key, wandb_run_id

pytestmark = pytest.mark.slow


def _wandb_records(offline_run_dir) -> list[dict]:
    """Every record of an offline run's .wandb log, by `wandb leet inspect` (wandb's own reader)."""
    proc = subprocess.run([shutil.which("wandb") or "wandb", "leet", "inspect", "--json", str(offline_run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _logs(run_dir) -> list:
    """The non-empty .wandb transaction logs of a run directory's offline launches, oldest first."""
    return sorted(f for f in (run_dir / "wandb").glob("offline-run-*/*.wandb") if f.stat().st_size)


def test_killed_and_resumed_run_writes_into_one_wandb_run(tmp_path):
    env = app_env(tmp_path / "cache")
    run_dir = tmp_path / "wr"
    common = [f"run.output_root={tmp_path}", "run.name=wr", "logging.wandb=offline", "checkpoint.interval=3",
              "logging.expert_hist_interval=0"]
    cmd = [sys.executable, "train.py", *TINY, *common, "run.steps=500"]
    # Its own process group: the kill takes wandb's service process with it, as a job's crash does.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    ckpt = run_dir / "checkpoints" / "step_000003"
    deadline = time.time() + 300
    while not (ckpt / "manifest.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    while proc.poll() is None and time.time() < deadline and max((r["step"] for r in records(run_dir)), default=0) < 4:
        time.sleep(0.05)
    # wandb's own process writes the transaction log: wait for it (a loaded machine starts it late),
    # then for two more flushes, so the log holds the steps so far.
    while not _logs(run_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3 * WANDB_FLUSH_S)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # wandb gets no finish
    proc.wait()
    killed_at = max(r["step"] for r in records(run_dir))
    assert killed_at >= 4

    relaunch = run_train(env, tmp_path, *common, f"run.steps={killed_at + 2}")
    assert "wandb failed" not in relaunch.stderr, relaunch.stderr[-3000:]
    run_id = wandb_run_id("wr", str(run_dir))
    launches = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[-1] for d in launches] == [run_id.rsplit("-", 1)[-1]] * 2, launches
    assert all(d.name.endswith(f"-{run_id}") for d in launches)
    history = []
    logs = _logs(run_dir)
    assert [f.parent for f in logs] == launches, [(d.name, sorted(f.name for f in d.iterdir())) for d in launches]
    for log_file in logs:
        recs = _wandb_records(log_file)
        run = next(r["run"] for r in recs if r["type"] == "run")
        assert run["run_id"] == run_id and run["display_name"] == "wr" and run["resume"] is True
        assert run["config"]["update"]["model"]["dim"] == 64  # the run's config is logged
        assert any(r["type"] == "stats" for r in recs)  # system statistics
        history.append([(int(r["history"]["step"]["num"]), r["history"]["item"]) for r in recs
                        if r["type"] == "history"])
    first, second = ([step for step, _ in h] for h in history)
    # The resumed launch re-runs the steps after its checkpoint (every 3rd step); wandb gets only
    # the new ones: each step once, in order, across both launches.
    assert first[0] == 1 and all(a < b for a, b in zip(first, first[1:])) and first[-1] <= killed_at, first
    assert second == [killed_at + 1, killed_at + 2], (second, killed_at)
    # metrics.jsonl keeps every record, the re-run steps twice; wandb has each launch's numbers
    recs = records(run_dir)
    assert sorted({r["step"] for r in recs}) == list(range(1, killed_at + 3))
    killed = {r["step"]: r["loss"] for r in recs[:killed_at]}  # the killed launch wrote steps 1..killed_at
    assert sorted(killed) == list(range(1, killed_at + 1))
    resumed = {r["step"]: r["loss"] for r in recs[killed_at:]}
    assert [row[wandb_key("loss")] for _, row in history[0]] == [killed[step] for step in first]
    assert [row[wandb_key("loss")] for _, row in history[1]] == [resumed[step] for step in second]
