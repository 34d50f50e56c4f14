"""bench/gpu_session.sh on CPU: argument handling, and its DRY=1 mode end to end.

DRY=1 swaps each GPU stage for a stand-in that runs here (the GPU tests collected only, each
benchmark's --help, a 3 MB corpus, 4-step parity runs of a shrunken model, the real parity report),
so the plumbing (lanes, time limits, logs, the pack that comes back, the summary) is what is tested.
"""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"
TINY = ("model.n_layers=1 model.dim=128 model.n_heads=4 model.n_kv_heads=2 model.moe.ffn_dim=128")


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("STAGES", "FP8MOE_RUN_ID")}
    env.update(OUT=str(tmp_path / "out"), SESSION_DIR=str(tmp_path / "session"),
               CORPUS_DIR=str(tmp_path / "corpus"), PARITY_ROOT=str(tmp_path / "runs"), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_unknown_stage_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "tests", "benchmarks"], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown stage 'benchmarks'" in proc.stdout


def test_no_gpu_without_dry_is_refused(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/bash\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = _env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(SCRIPT), "bench"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no GPU found" in proc.stdout


@pytest.mark.slow
def test_dry_session_end_to_end(tmp_path):
    env = _env(tmp_path, DRY="1", FP8MOE_COMMIT="abc123", PARITY_ARGS=TINY, BENCHES="kernels moe_block")
    results = REPO / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")} == before  # the tree's results stay
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["parity.md", "parity.png", "session.tar.gz", "summary.txt"]  # a device call returns <= 8

    # the summary table comes last, every stage in it, and says all went well
    tail = proc.stdout[proc.stdout.index("== session summary"):]
    assert "commit abc123" in tail and tail.rstrip().endswith("all stages ok")
    for stage in ("gpu_tests", "corpus", "parity_bf16", "parity_rowwise", "parity_blockwise", "parity_report",
                  "bench_kernels", "bench_moe_block"):
        assert f"\n{stage} " in tail, stage
    assert "| rowwise | 4 |" in tail and "| blockwise | 4 |" in tail

    with tarfile.open(out / "session.tar.gz") as tar:
        names = set(tar.getnames())
        status = tar.extractfile("./status.tsv").read().decode()
        summary = json.loads(tar.extractfile("./parity/parity_300m-rowwise.json").read())
        stats = json.loads(tar.extractfile("./corpus.stats.json").read())
    for run in ("bf16", "rowwise", "blockwise"):
        assert f"./parity/parity_300m-{run}/metrics.jsonl" in names
        assert f"./parity/parity_300m-{run}/.hydra/config.yaml" in names
        assert f"./logs/parity_{run}.log" in names
    assert not any("checkpoints" in n for n in names)
    assert {"./parity/parity.png", "./parity/parity.md", "./logs/gpu_tests.log", "./env.txt"} <= names
    assert summary["recipe"] == "rowwise" and summary["steps"] == 4 and summary["run"] == "parity_300m-rowwise"
    assert stats["tokens"] > 100_000 and stats["bytes"] <= 3_000_000
    rows = [line.split("\t") for line in status.splitlines()[1:]]
    assert all(r[2] == "ok" for r in rows) and len(rows) == 8
