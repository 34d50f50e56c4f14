"""tools/parity_report.py on two real tiny runs (BF16 and FP8 rowwise experts), and the corpus tool.

The runs are train.py subprocesses on CPU: the FP8 experts run their pure-torch emulation
(TRITON_INTERPRET=0 with CPU tensors selects it), quantizing exactly as the GPU recipe does, so
the FP8 loss differs from the BF16 one by a little, never by nothing.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools import parity_report, prepare_python_corpus
from trainer.indexed import indexed_counts

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.dim=128", "model.n_layers=1", "model.moe.ffn_dim=128", "run.seq_len=64",
    "run.micro_batch_size=4", "run.steps=10", "logging.interval=1", "run.eval_interval=5",
    "run.eval_steps=2", "logging.wandb=disabled", "logging.group=pair",
    "optim.warmup_steps=10", "optim.lr=1.5e-3",  # the default warm-up's lr (20 steps to 3e-3) at steps 1-10
]
FIELDS = ("steps", "params_total", "recipe", "mean_rel_diff_last10pct", "max_rel_diff_last10pct",
          "val_loss", "tokens_per_s", "speed_ratio")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, FP8MOE_CACHE=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1",
               TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
    env.pop("FP8MOE_RUN_ID", None)
    for recipe in ("bf16", "rowwise"):
        cmd = [sys.executable, "train.py", *TINY, f"fp8={recipe}", f"run.name={recipe}", f"run.output_root={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return out


def _copy_run(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    cfg_path = dst / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    for dotted, value in config_changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg_path.write_text(yaml.safe_dump(cfg))
    return dst


def test_report_files_and_values(runs, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "tools/parity_report.py", str(runs / "rowwise"), str(runs / "bf16"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rowwise | 10 |" in proc.stdout  # the markdown table is printed

    png = (out / "parity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    summary = json.loads((out / "rowwise.json").read_text())
    for key in FIELDS:
        assert key in summary, key
    assert summary["recipe"] == "rowwise" and summary["steps"] == 10
    assert 1_000_000 < summary["params_total"] < 2_000_000  # dim 128, 1 layer, vocab 4096
    # FP8 emulation changes the loss a little: visible, yet far below a percent on 10 steps.
    assert 0 < summary["mean_rel_diff_last10pct"] <= summary["max_rel_diff_last10pct"] < 5e-3
    val = summary["val_loss"]
    assert val["steps"] == [5, 10] and len(val["bf16"]) == len(val["fp8"]) == 2
    assert abs(val["final_rel_diff"]) < 5e-3 and 5 < val["final_bf16"] < 9
    speeds = summary["tokens_per_s"]
    assert speeds["bf16"] > 0 and speeds["fp8"] > 0
    assert summary["speed_ratio"] == pytest.approx(speeds["fp8"] / speeds["bf16"])

    table = (out / "parity.md").read_text()
    assert table.startswith("| recipe |") and "| rowwise | 10 | 1.5M |" in table


def test_params_total_recomputed_without_log(runs, tmp_path):
    run = _copy_run(runs / "rowwise", tmp_path / "nolog")
    for log_file in run.glob("*.log"):
        log_file.unlink()
    with_log = parity_report.params_total(parity_report.load_run(runs / "rowwise"))
    assert parity_report.params_total(parity_report.load_run(run)) == with_log


def test_default_out_dir_is_beside_the_first_run(runs, tmp_path):
    bf16 = _copy_run(runs / "bf16", tmp_path / "b")
    fp8 = _copy_run(runs / "rowwise", tmp_path / "f")
    parity_report.report([bf16, fp8], wandb="off")
    assert (tmp_path / "parity" / "f.json").is_file()


def test_missing_metrics_is_named(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no metrics.jsonl"):
        parity_report.report([runs / "bf16", empty], out=tmp_path / "o")


def test_no_bf16_run(runs, tmp_path):
    other = _copy_run(runs / "rowwise", tmp_path / "blockwise", fp8__experts="blockwise")
    with pytest.raises(ValueError, match=r"no BF16 run .*rowwise \(fp8.experts=rowwise\)"):
        parity_report.report([runs / "rowwise", other], out=tmp_path / "o")


def test_different_steps(runs, tmp_path):
    short = _copy_run(runs / "rowwise", tmp_path / "short")
    lines = (short / "metrics.jsonl").read_text().splitlines()
    (short / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] != 10) + "\n")
    with pytest.raises(ValueError, match=r"different steps.*steps only there: \[10\]"):
        parity_report.report([runs / "bf16", short], out=tmp_path / "o")


def test_different_data_and_seed_are_named(runs, tmp_path):
    other = _copy_run(runs / "rowwise", tmp_path / "reseeded", run__seed=7, data__split="90,10,0")
    with pytest.raises(ValueError, match=r"data\.split .*run\.seed \(1234 vs 7\)"):
        parity_report.report([runs / "bf16", other], out=tmp_path / "o")
    # the command line says so in one line and exits 2, without a traceback
    proc = subprocess.run([sys.executable, "tools/parity_report.py", str(runs / "bf16"), str(other)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_python_corpus_tiny_cap_is_deterministic(tmp_path):
    prefix = tmp_path / "py"
    proc = subprocess.run([sys.executable, "tools/prepare_python_corpus.py", "--output-prefix", str(prefix),
                           "--max-bytes", "60000", "--workers", "1", "--vocab-size", "512"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for suffix in (".bin", ".idx", ".tokenizer.json", ".jsonl", ".files.txt"):
        assert Path(f"{prefix}{suffix}").is_file(), suffix
    docs = [json.loads(l) for l in Path(f"{prefix}.jsonl").read_text().splitlines()]
    assert docs and all(d["path"].endswith(".py") and d["text"].strip() for d in docs)
    sizes = [int(l.split("\t")[0]) for l in Path(f"{prefix}.files.txt").read_text().splitlines()]
    assert len(sizes) == len(docs) and sum(sizes) <= 60000
    again = tmp_path / "again.jsonl"
    prepare_python_corpus.collect(prepare_python_corpus.site_packages(), str(again), max_bytes=60000)
    assert again.read_bytes() == Path(f"{prefix}.jsonl").read_bytes()


def test_logs_to_wandb_when_the_runs_did(runs, tmp_path):
    pytest.importorskip("wandb")
    bf16 = _copy_run(runs / "bf16", tmp_path / "b", logging__wandb="offline")
    fp8 = _copy_run(runs / "rowwise", tmp_path / "f", logging__wandb="offline")
    parity_report.report([bf16, fp8], out=tmp_path / "o")
    assert list((tmp_path / "o" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_python_corpus_bpe_sample_workers_and_stats(tmp_path):
    prefix = tmp_path / "py"
    proc = subprocess.run([sys.executable, "tools/prepare_python_corpus.py", "--output-prefix", str(prefix),
                           "--max-bytes", "200000", "--bpe-max-bytes", "50000", "--workers", "2",
                           "--vocab-size", "512"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    assert stats["workers"] == 2 and stats["bpe_max_bytes"] == 50000 and 0 < stats["bytes"] <= 200000
    assert set(stats["seconds"]) == {"collect", "bpe", "tokenize", "total"}
    # the token count is the .bin's: every document's tokens plus one EOD each
    assert stats["documents"] == stats["files"] and stats["tokens"] > stats["bytes"] / 8
    assert indexed_counts(str(prefix)) == (stats["documents"], stats["tokens"])
    # the BPE saw a spread sample (every k-th document), not the first files only
    sample = list(prepare_python_corpus.sample_texts(f"{prefix}.jsonl", stats["bytes"], 50000))
    docs = [json.loads(l)["text"] for l in Path(f"{prefix}.jsonl").read_text().splitlines()]
    stride = -(-stats["bytes"] // 50000)
    assert sample == docs[::stride][:len(sample)] and len(sample) > 1
    assert sum(len(t.encode()) for t in sample[:-1]) < 50000
    assert "tokens in" in proc.stderr and f"data.paths=[{prefix}]" in proc.stdout
