"""bench/scaling.py on CPU: the job plan, bad EP sizes, and the whole tool over tiny gloo runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from argparse import Namespace

from bench.scaling import Job, grad_accum, max_rel_diff, plan

ROOT = Path(__file__).resolve().parents[1]


def test_plan_same_global_batch_and_variants():
    jobs = plan([1, 2, 4], ["bf16", "blockwise"], bf16_wire=True, rerun=True)
    names = [j.name for j in jobs]
    assert names == ["ep1_bf16", "ep1_blockwise", "ep1again_bf16", "ep1again_blockwise", "ep2_bf16",
                     "ep2_blockwise", "ep2_blockwise_bf16wire", "ep4_bf16", "ep4_blockwise",
                     "ep4_blockwise_bf16wire"]  # fmt: skip
    wires = {j.name: j.wire for j in jobs}
    # EP=1 sends nothing; BF16 experts always BF16; FP8 experts FP8 unless told otherwise.
    assert wires["ep1_blockwise"] == "bf16" and wires["ep2_bf16"] == "bf16"
    assert wires["ep2_blockwise"] == "fp8" and wires["ep4_blockwise_bf16wire"] == "bf16"
    assert Job("x", 1, "bf16").wire == "bf16"


def test_grad_accum_same_global_batch_or_weak():
    strong, weak = Namespace(weak=False), Namespace(weak=True)
    assert [grad_accum(Job("x", ep, "bf16"), strong, 4) for ep in (1, 2, 4)] == [4, 2, 1]
    assert [grad_accum(Job("x", ep, "bf16"), weak, 4) for ep in (1, 2, 4)] == [4, 4, 4]


def test_max_rel_diff_counts_non_finite_as_infinite():
    assert max_rel_diff({1: 2.0, 2: 4.0}, {1: 2.0, 2: 4.4}) == pytest.approx(0.1)
    assert max_rel_diff({1: 2.0}, {1: float("nan")}) == float("inf")
    assert max_rel_diff({1: 2.0}, {2: 2.0}) is None


def test_bad_ep_sizes_are_refused():
    cmd = [sys.executable, "-m", "bench.scaling", "--device", "cpu", "--tiny", "--gpus", "2", "--eps", "1,3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--eps [3]" in proc.stderr and "divide the largest" in proc.stderr


@pytest.mark.slow
def test_scaling_tool_cpu_smoke(tmp_path):
    """EP=1 (twice) and EP=2 with BF16 and FP8 (emulated) experts, FP8 and BF16 on the wire."""
    out = tmp_path / "scaling.json"
    # TRITON_INTERPRET=0: the torch paths (the kernels under the interpreter have their own tests)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.scaling", "--device", "cpu", "--tiny", "--gpus", "2", "--eps", "1,2",
           "--steps", "3", "--skip", "1", "--root", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("commit", "gpu", "settings", "rows", "loss_checks", "fp8_vs_bf16_per_gpu"):
        assert key in result, key
    rows = {r["run"]: r for r in result["rows"]}
    assert len(rows) == 7 and all(r["ok"] for r in rows.values())
    for name, r in rows.items():
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / r["ep"])
        if r["ep"] == 1:
            assert r["a2a_ms"] is None and r["a2a_share"] is None
        else:
            assert r["a2a_ms"] > 0 and 0 < r["a2a_share"] < 1, name
    # The same global batch at every EP size: EP=2 follows EP=1 to float tolerance on CPU.
    checks = {(c["a"], c["b"]): c for c in result["loss_checks"]}
    for recipe in ("bf16", "blockwise"):
        assert checks[f"ep1_{recipe}", f"ep1again_{recipe}"]["max_rel_diff"] == 0.0  # CPU is deterministic
        assert checks[f"ep1_{recipe}", f"ep2_{recipe}"]["matches"] is True
    assert len(result["losses"]["ep2_blockwise_bf16wire"]) == 3
    assert out.with_suffix(".png").stat().st_size > 1000
    # checkpoint.at_end=false: throughput runs leave no checkpoint behind
    assert not any((tmp_path / "runs").glob("*/checkpoints/step_*"))


def _row(ep, recipe, wire, per_gpu, base=None, again=False):
    return {"run": f"ep{ep}_{recipe}_{wire}", "ep": ep, "gpus": ep, "recipe": recipe, "wire": wire, "again": again,
            "ok": True, "tokens_per_s_per_gpu": per_gpu, "per_gpu_vs_ep1": per_gpu / base if base else None}


def test_scaling_plot_names_the_model_and_draws_ideal_and_efficiency(tmp_path):
    from bench.scaling import plot

    rows = [_row(1, "bf16", "bf16", 1000.0, 1000.0), _row(1, "blockwise", "bf16", 1200.0, 1200.0),
            _row(1, "bf16", "bf16", 990.0, again=True), _row(2, "bf16", "bf16", 900.0, 1000.0),
            _row(2, "blockwise", "fp8", 1140.0, 1200.0), _row(2, "blockwise", "bf16", 1080.0, 1200.0),
            _row(4, "bf16", "bf16", 800.0, 1000.0), _row(4, "blockwise", "fp8", 1020.0, 1200.0)]
    summary = {"gpu": "4 x NVIDIA H200", "rows": rows, "settings": {
        "scaling": "same global batch: grad_accum = max EP / EP", "model_args": "model=qwen3_30b_a3b",
        "model": {"name": "qwen3_30b_a3b", "n_layers": 4, "dim": 2048, "num_experts": 128, "top_k": 8,
                  "ffn_dim": 768}, "seq_len": 2048, "micro_batch_size_per_gpu": 2}}
    fig = plot(summary, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    assert ax.get_xlabel() == "GPUs (EP size)" and ax.get_ylabel().startswith("tokens/s per GPU")
    title = ax.get_title()
    assert "4 x NVIDIA H200" in title and "one global batch" in title and "seq 2048" in title
    assert "qwen3_30b_a3b: 4 layers, dim 2048, 128 experts of ffn 768, top-8" in title
    lines = {line.get_label(): line for line in ax.get_lines()}
    # the EP=1 run starts both wire series of its recipe; the rerun is no point
    assert list(lines["bf16"].get_xdata()) == [1, 2, 4] and list(lines["bf16"].get_ydata()) == [1000, 900, 800]
    assert list(lines["blockwise (fp8 on the wire)"].get_xdata()) == [1, 2, 4]
    assert list(lines["blockwise (bf16 on the wire)"].get_ydata()) == [1200, 1080]
    # ideal: flat at each recipe's EP=1 tokens/s per GPU
    assert list(lines["bf16 ideal (EP=1 tokens/s per GPU)"].get_ydata()) == [1000, 1000]
    assert list(lines["blockwise ideal (EP=1 tokens/s per GPU)"].get_ydata()) == [1200, 1200]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 5 and "blockwise (fp8 on the wire)" in legend
    # efficiency per EP > 1 point, at that point
    notes = {(t.xy, t.get_text()) for t in ax.texts}
    assert notes == {((2, 900.0), "90%"), ((4, 800.0), "80%"), ((2, 1140.0), "95%"), ((4, 1020.0), "85%"),
                     ((2, 1080.0), "90%")}
