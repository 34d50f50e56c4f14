"""The training application end to end, as a user runs it: `python train.py` and torchrun.

Every run is a subprocess over a tiny model on the embedded corpus (prepared once per session
in a temporary cache) with logging to files; each test reads metrics.jsonl back.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from app_helpers import ROOT, TINY, app_env, by_step, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return app_env(tmp_path_factory.mktemp("cache"))


def test_default_run_loss_falls_and_metrics_and_wandb(env, tmp_path):
    run_train(env, tmp_path, "run.name=base", "run.steps=30", "logging.interval=5", "logging.wandb=offline",
           "logging.group=pair1", "logging.job_type=bf16", "logging.expert_hist_interval=10")
    run_dir = tmp_path / "base"
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5, [r["loss"] for r in steps]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu",
                "memory_gib", "load_imbalance"):
        assert key in steps[0], key
    assert any("expert_load/layer_0" in r for r in records)  # histogram every 10 steps
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "step_000030").is_dir()

    inspect = subprocess.run(
        ["wandb", "leet", "inspect", "--summary", "--json", str(run_dir / "wandb")],
        capture_output=True, text=True, timeout=120,
    )
    assert inspect.returncode == 0, inspect.stderr
    text = inspect.stdout
    assert "pair1" in text and '"bf16"' in text, text[:2000]


def test_resume_after_kill_gives_identical_losses(env, tmp_path):
    common = ["run.steps=12", "checkpoint.interval=6"]
    run_train(env, tmp_path, "run.name=straight", *common)
    straight = by_step(tmp_path / "straight")

    cmd = [sys.executable, "train.py", *TINY, f"run.output_root={tmp_path}", "run.name=killed", *common]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "checkpoints" / "step_000006"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()
    assert ckpt.exists(), proc.stderr.read().decode()[-3000:]
    assert not (tmp_path / "killed" / "checkpoints" / "step_000012").exists(), "killed too late to test resume"

    run_train(env, tmp_path, "run.name=killed", *common)
    resumed = by_step(tmp_path / "killed")
    assert sorted(resumed) == sorted(straight) == list(range(1, 13))
    assert resumed == straight  # bitwise: same data order, RNG, optimizer and scheduler state


def test_sigterm_saves_checkpoint_that_resumes(env, tmp_path):
    cmd = [sys.executable, "train.py", *TINY, f"run.output_root={tmp_path}", "run.name=term", "run.steps=500"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    ckpts = sorted((tmp_path / "term" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp")
    saved_step = int(ckpts[0].name.split("_")[1])
    assert 3 <= saved_step < 500

    out = run_train(env, tmp_path, "run.name=term", f"run.steps={saved_step + 2}")
    assert f"resumed from step {saved_step}" in out.stderr + out.stdout
    assert max(by_step(tmp_path / "term")) == saved_step + 2


@pytest.mark.parametrize("parallel", ["single", "fsdp"])
def test_torchrun_two_ranks_matches_one_process_same_global_batch(env, tmp_path, parallel):
    common = ["run.steps=6", "run.dtype=float32", "checkpoint.interval=3"]
    # One process: 2 micro-batches of 2 = global batch 4. Two ranks: 1 micro-batch of 2 each.
    run_train(env, tmp_path, "run.name=single", "run.grad_accum=2", *common)
    # FSDP2 also with activation checkpointing: recomputation in fp32 changes no number.
    extra = ["parallel=fsdp", "run.activation_checkpointing=true"] if parallel == "fsdp" else []
    run_train(env, tmp_path, "run.name=ddp", *common, *extra, torchrun=2)
    single, ddp = by_step(tmp_path / "single"), by_step(tmp_path / "ddp")
    assert sorted(single) == sorted(ddp) == list(range(1, 7))
    for step in single:
        # fp32 everywhere; only the order of the gradient sums differs (all-reduce vs accumulate).
        assert ddp[step] == pytest.approx(single[step], rel=1e-5), (step, single, ddp)
    assert not (tmp_path / "ddp" / ".hydra").exists() or len(list((tmp_path / "ddp").glob(".hydra*"))) == 1
    # Checkpoints resume across the layouts, the same global batch: two ranks -> one process and
    # one process -> two ranks, steps 4-6 as the uninterrupted run's.
    ckpt = lambda name: f"checkpoint.resume={tmp_path / name / 'checkpoints' / 'step_000003'}"  # noqa: E731
    run_train(env, tmp_path, "run.name=to_one", "run.grad_accum=2", *common, ckpt("ddp"))
    run_train(env, tmp_path, "run.name=to_two", *common, *extra, ckpt("single"), torchrun=2)
    for name in ("to_one", "to_two"):
        got = by_step(tmp_path / name)
        assert sorted(got) == [4, 5, 6], (name, got)
        for step in got:
            assert got[step] == pytest.approx(single[step], rel=1e-5), (name, step, single, got)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["run.no_such_key=1"], "no_such_key"),
        (["run.steps=many"], "run.steps"),
        (["data=megatron", "data.paths=[/nonexistent/corpus]", "data.tokenizer=/nonexistent/tok.json"],
         "/nonexistent/"),
        (["model.moe.top_k=9"], "model.moe.top_k"),
        (["fp8.experts=int4"], "fp8.experts"),
        (["optim.weight_decay=-1"], "optim.weight_decay must be finite and >= 0"),
        (["run.eval_interval=-1"], "run.eval_interval must be >= 0"),
        (["optim.beta1=1.5"], "optim.beta1 must be in [0, 1)"),
        (["optim.eps=0"], "optim.eps must be finite and > 0"),
        (["optim.warmup_steps=3"], "optim.warmup_steps must be <= run.steps=2"),
        (["+modle=tiny"], "'modle': did you mean 'model'?"),
        (["+run.stepz=5"], "'run.stepz': did you mean 'run.steps'?"),
        (["data=mock", "optim.warmup_steps=2"], "data.mock_vocab_size=N with 2 <= N <= 4096"),
    ],
)
def test_bad_input_is_a_clear_error(env, tmp_path, overrides, needle):
    proc = run_train(env, tmp_path, "run.steps=2", *overrides, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-3000:]


def test_corrupted_checkpoint_is_refused_not_restarted(env, tmp_path):
    run_train(env, tmp_path, "run.name=corrupt", "run.steps=2")
    ckpt = tmp_path / "corrupt" / "checkpoints" / "step_000002"
    metadata = ckpt / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:20])  # truncated DCP metadata
    proc = run_train(env, tmp_path, "run.name=corrupt", "run.steps=4", check=False)
    assert proc.returncode != 0
    assert str(ckpt) in proc.stderr, proc.stderr[-3000:]


def test_non_finite_losses_are_skipped_then_stop_the_run(env, tmp_path):
    # lr 1e30: the first update blows the weights up, every later loss is NaN.
    proc = run_train(env, tmp_path, "run.name=nan", "run.steps=10", "optim.lr=1e30",
                  "run.max_nonfinite_steps=3", check=False)
    assert proc.returncode != 0
    assert "3 consecutive steps with a non-finite loss or gradient norm (run.max_nonfinite_steps=3) at step 4" in proc.stderr
    assert "update skipped" in proc.stdout + proc.stderr
