"""bench/all_to_all.py end to end on CPU: torchrun, 2 gloo processes, tiny shapes, every payload."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_all_to_all_bench_cpu_smoke(tmp_path):
    out = tmp_path / "all_to_all.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bench.all_to_all", "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("commit", "gpu", "torch", "triton", "world_size", "rows"):
        assert key in result
    assert result["world_size"] == 2
    rows = {(r["shape"], r["payload"]): r for r in result["rows"]}
    assert {p for _, p in rows} == {"bf16", "rowwise", "blockwise"} and len(rows) == 6
    for row in rows.values():
        assert "error" not in row, row
        for key in ("ms_fwd", "ms_fwd_bwd", "bytes_per_rank", "gbps"):
            assert row[key] > 0, (key, row)
        assert row["ms_fwd_max"] >= row["ms_fwd"] and row["ms_fwd_bwd_max"] >= row["ms_fwd_bwd"]
        assert row["peak_gib"] is None  # CPU: no allocator statistics
    for shape in {s for s, _ in rows}:
        bf16, rw, bw = (rows[shape, p] for p in ("bf16", "rowwise", "blockwise"))
        H = bf16["H"]
        # Same routing, so the same rows travel: FP8 dispatch is one packed row of H bytes + 4
        # (rowwise) or + 4 H / 128 (blockwise), padded to 16 bytes (H = 256, 384 here: no padding
        # before the scales), against 2H; combine is BF16 for every payload.
        rows_sent = bf16["dispatch_bytes"] // (2 * H)
        assert rw["dispatch_bytes"] == rows_sent * -(-(H + 4) // 16) * 16
        assert bw["dispatch_bytes"] == rows_sent * -(-(H + 4 * (H // 128)) // 16) * 16
        assert rw["combine_bytes"] == bw["combine_bytes"] == bf16["combine_bytes"]
        assert rw["dispatch_bytes_vs_bf16"] < 0.54
    assert "payload" in proc.stdout.splitlines()[-7]  # the table is printed last
