"""Expert parallelism at the trainer level on CPU: expert-shard checkpoints saved and loaded over
gloo, configuration errors for EP sizes, and train.py end to end (torchrun EP=2 against one
process, BF16 and FP8, resume from an EP checkpoint, a bad EP size).
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ep_helpers import _build, _env, _spawn, _tiny_cfg
from trainer.config import ParallelConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


# ---- checkpoint under EP -------------------------------------------------------------------------


def _checkpoint(rank, world, path):
    from torch.distributed.tensor import DTensor

    from trainer.checkpoint import CheckpointConfig, CheckpointManager
    from trainer.optim import build_optimizer
    from trainer.config import OptimConfig
    from trainer.parallel import apply_expert_parallel, reduce_gradients

    env = _env(world, world)
    cfg = _tiny_cfg()
    model = apply_expert_parallel(_build(cfg), env)
    opt = build_optimizer(model, OptimConfig())
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(rank))
    model(tokens, tokens).loss.backward()
    reduce_gradients(model, env)  # replicated parameters stay equal on every rank
    opt.step()
    mgr = CheckpointManager(CheckpointConfig(dir=path), path, rank, world)
    mgr.save(1, {"model": model, "optim": opt, "meta": {"step": 1}})

    torch.manual_seed(123)
    fresh = apply_expert_parallel(_build(cfg), env)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_opt = build_optimizer(fresh, OptimConfig())
    meta = {"step": 0}
    mgr.load({"model": fresh, "optim": fresh_opt, "meta": meta})
    assert meta["step"] == 1
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        if isinstance(a, DTensor):
            a, b = a.to_local(), b.to_local()  # this rank's own experts came back
        assert torch.equal(a, b), name
    st_a, st_b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for k in st_a:
        a, b = st_a[k]["exp_avg"], st_b[k]["exp_avg"]
        if isinstance(a, DTensor):
            a, b = a.to_local(), b.to_local()
        assert torch.equal(a, b), k


def test_checkpoint_saves_and_loads_expert_shards():
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_checkpoint, 2, tmp)


# ---- configuration errors ------------------------------------------------------------------------


def test_ep_not_dividing_world_size_or_experts_is_a_clear_error():
    from trainer.config import TrainConfig

    with pytest.raises(ValueError, match="parallel.ep=3 must divide the world size 4"):
        ParallelConfig(ep=3).validate(world_size=4)
    with pytest.raises(ValueError, match="parallel.ep=2 must divide model.moe.num_experts=3"):
        ParallelConfig(ep=2).validate(num_experts=3, world_size=2)
    cfg = TrainConfig()
    cfg.model.moe.num_experts, cfg.model.moe.top_k, cfg.parallel.ep = 6, 2, 4
    with pytest.raises(ValueError, match="parallel.ep=4 must divide model.moe.num_experts=6"):
        cfg.validate()


# ---- torchrun end to end -------------------------------------------------------------------------

TINY = [
    "model.dim=64", "model.n_layers=2", "model.moe.ffn_dim=64", "run.seq_len=64",
    "run.micro_batch_size=2", "run.eval_interval=0", "logging.wandb=disabled", "logging.interval=1",
    "run.dtype=float32",
]


def _train(env, out, *overrides, torchrun=0, check=True):
    cmd = [sys.executable, "train.py"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "train.py"]
    cmd += [*TINY, f"run.output_root={out}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _records(run_dir):
    import json

    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _records(run_dir)}


@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
    e = dict(os.environ, FP8MOE_CACHE=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1",
             PYTHONUNBUFFERED="1")
    e.pop("FP8MOE_RUN_ID", None)
    return e


def test_torchrun_ep2_matches_single_process_and_resumes(train_env, tmp_path):
    _train(train_env, tmp_path, "run.name=single", "run.grad_accum=2", "run.steps=4")
    proc = _train(train_env, tmp_path, "run.name=ep", "run.steps=4", "checkpoint.interval=2", "parallel.ep=2",
                  torchrun=2)
    single, ep = _losses(tmp_path / "single"), _losses(tmp_path / "ep")
    assert sorted(single) == sorted(ep) == [1, 2, 3, 4]
    for step in single:
        assert ep[step] == pytest.approx(single[step], rel=1e-5), (step, single, ep)
    # All-to-all time per step and its share of the step: EP only, every window (the first too).
    for r in _records(tmp_path / "single"):
        assert r["a2a_ms"] is None and r["a2a_share"] is None, r
    for r in _records(tmp_path / "ep"):
        assert r["a2a_ms"] > 0 and 0 < r["a2a_share"] < 1, r
    assert " | a2a " in proc.stdout + proc.stderr
    assert (tmp_path / "ep" / "checkpoints" / "step_000004").is_dir()
    # Resume the EP run from its step-2 checkpoint: steps 3 and 4 come out the same.
    proc = _train(train_env, tmp_path, "run.name=ep", "run.steps=4", "parallel.ep=2",
           f"checkpoint.resume={tmp_path / 'ep' / 'checkpoints' / 'step_000002'}",
           "checkpoint.dir=" + str(tmp_path / "resumed_ckpt"), torchrun=2)
    assert "resumed from step 2" in proc.stdout + proc.stderr
    resumed = _losses(tmp_path / "ep")  # appended records: the last of each step wins
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(ep[step], rel=1e-6), (step, ep, resumed)


def test_train_py_bad_ep_is_a_clear_error(train_env, tmp_path):
    proc = _train(train_env, tmp_path, "run.steps=1", "parallel.ep=3", check=False)
    assert proc.returncode != 0 and "parallel.ep=3" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_torchrun_ep2_fp8_tracks_single_process_fp8(train_env, tmp_path, recipe):
    """FP8 experts under EP=2 against one process, same global batch. The FP8 dispatch rounds
    once more (wgrad1's column copy is made from the received FP8 rows), so losses are not
    bitwise equal; the bound is 10x below the drift seen when each step's weight update failed
    to reach the cached FP8 weights (0.5-0.7% by step 4)."""
    env = dict(train_env, TRITON_INTERPRET="0")  # CPU: the kernels' pure-torch references
    common = ["run.steps=5", f"fp8={recipe}", "model.dim=128", "model.moe.ffn_dim=128"]
    _train(env, tmp_path, "run.name=single", "run.grad_accum=2", *common)
    _train(env, tmp_path, "run.name=ep", "parallel.ep=2", *common, torchrun=2)
    single, ep = _losses(tmp_path / "single"), _losses(tmp_path / "ep")
    assert sorted(single) == sorted(ep) == [1, 2, 3, 4, 5]
    for step in single:
        assert ep[step] == pytest.approx(single[step], rel=5e-4), (step, single, ep)
