"""tools/kernel_registers.py: the quantizers' launches compiled for sm_90 without a GPU, and the
blockwise weight quantizer's statistics kept from spilling its held 128x128 block. The tool runs
in a process of its own: this suite interprets the kernels (TRITON_INTERPRET=1, tests/conftest.py),
and interpreted kernels do not compile."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ptxas_present() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # a Triton without its NVIDIA backend
        return False


pytestmark = pytest.mark.skipif(not _ptxas_present(), reason="this Triton ships no ptxas for sm_90")


def _tool(*args: str, interpret: str = "0") -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    return subprocess.run([sys.executable, "tools/kernel_registers.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_weight_quantizer_launches_and_the_blockwise_statistics_spill():
    """Counting from the held tile spilled 844 bytes a thread (triton 3.6); counted from the block
    read again in slices, tens. 200 bytes: well under the old spill, above what the block's
    stores alone spill (28-56 bytes across Triton versions)."""
    out = _tool("--only", "weight")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("triton ") and "sm_90a" in lines[0]
    rows = [line.split() for line in lines[2:]]
    # rowwise: an amax pass and the quantize pass; blockwise: the quantize pass; stats off and on
    assert [(r[1], r[2]) for r in rows] == [(s, k) for s in ("off", "on") for k in
                                            ("_weight_amax_kernel", "_weight_quant_kernel", "_weight_quant_kernel")]
    for r in rows:
        assert 0 < int(r[4]) <= 255, r
    blockwise_stats = [r for r in rows if r[1] == "on" and "'MODE': 1" in " ".join(r) and r[2] == "_weight_quant_kernel"]
    assert len(blockwise_stats) == 1 and int(blockwise_stats[0][5]) < 200, blockwise_stats


def test_refuses_interpreted_kernels_and_unknown_cases():
    out = _tool("--only", "weight", interpret="1")
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr
    out = _tool("--only", "weights")
    assert out.returncode == 2 and "unknown case(s) ['weights']" in out.stderr and "'grouped'" in out.stderr
