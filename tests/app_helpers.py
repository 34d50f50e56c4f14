"""Helpers for tests that run the training application as a user does (`python train.py`, torchrun)
in subprocesses over a tiny model. Test files import it as `app_helpers` (tests/ is on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.dim=64", "model.n_layers=2", "model.moe.ffn_dim=64", "run.seq_len=64", "run.micro_batch_size=2",
    "run.eval_interval=0", "logging.wandb=disabled", "logging.interval=1", "optim.warmup_steps=2",
]  # fmt: skip


def app_env(cache: Path) -> dict:
    """The environment of a test launch: its own corpus cache, one thread, no inherited run id or wandb service,
    and the kernels' pure-torch references (TRITON_INTERPRET=0, the CPU product path): these
    tests check the application, the kernels under the interpreter have their own tests and the
    in-process model tests."""
    env = dict(os.environ, FP8MOE_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRITON_INTERPRET="0")
    env.pop("FP8MOE_RUN_ID", None)
    # A wandb started in this test process exports its service's address; a launch inheriting it
    # would log through that service, which outlives a killed launch and keeps its run id taken.
    env.pop("WANDB_SERVICE", None)
    return env


def run_train(env: dict, out: Path, *overrides: str, torchrun: int = 0, check: bool = True,
              timeout: float = 600, tiny: tuple[str, ...] | list[str] = TINY) -> subprocess.CompletedProcess:
    """`python train.py` (torchrun: over that many local processes) with `tiny` and `overrides`,
    run directories under `out`; check: a failure shows the command and the output's tail."""
    cmd = [sys.executable, "train.py"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "train.py"]
    cmd += [*tiny, f"run.output_root={out}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's training records, in file order (a resumed run appends to the same file)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def by_step(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> value of the last record of each step."""
    return {r["step"]: r[key] for r in records(run_dir)}
