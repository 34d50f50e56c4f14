"""Expert parallelism at the trainer level on CPU: expert-shard checkpoints saved and loaded over
gloo, configuration errors for EP sizes, and train.py end to end (torchrun EP=2 against one
process, BF16 and FP8, resume from an EP checkpoint, a bad EP size).
"""

import tempfile

import pytest
import torch

from app_helpers import TINY, app_env, by_step, records, run_train
from ep_helpers import _build, _env, _spawn, _tiny_cfg
from trainer.config import ParallelConfig

pytestmark = pytest.mark.slow


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

# fp32: the EP and one-process runs differ only in the order of their sums.
EP_TINY = [*TINY, "run.dtype=float32"]


def _train(env, out, *overrides, torchrun=0, check=True):
    return run_train(env, out, *overrides, torchrun=torchrun, check=check, timeout=300, tiny=EP_TINY)


@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
    return app_env(tmp_path_factory.mktemp("cache"))


# The lr of the default warm-up (20 steps to 3e-3) at each of these runs' steps, within the
# warm-up a run of 4 or 5 steps now needs (optim.warmup_steps <= run.steps).
SCHEDULE_4 = ["optim.warmup_steps=4", "optim.lr=6e-4"]
SCHEDULE_5 = ["optim.warmup_steps=5", "optim.lr=7.5e-4"]


def test_torchrun_ep2_matches_single_process_and_resumes(train_env, tmp_path):
    _train(train_env, tmp_path, "run.name=single", "run.grad_accum=2", "run.steps=4", "checkpoint.interval=2",
           *SCHEDULE_4)
    proc = _train(train_env, tmp_path, "run.name=ep", "run.steps=4", "checkpoint.interval=2", "parallel.ep=2",
                  *SCHEDULE_4, torchrun=2)
    single, ep = by_step(tmp_path / "single"), by_step(tmp_path / "ep")
    assert sorted(single) == sorted(ep) == [1, 2, 3, 4]
    for step in single:
        assert ep[step] == pytest.approx(single[step], rel=1e-5), (step, single, ep)
    # All-to-all time per step and its share of the step: EP only, every window (the first too).
    for r in records(tmp_path / "single"):
        assert r["a2a_ms"] is None and r["a2a_share"] is None, r
    for r in records(tmp_path / "ep"):
        assert r["a2a_ms"] > 0 and 0 < r["a2a_share"] < 1, r
    assert " | a2a " in proc.stdout + proc.stderr
    assert (tmp_path / "ep" / "checkpoints" / "step_000004").is_dir()
    # Resume the EP run from its step-2 checkpoint: steps 3 and 4 come out the same.
    proc = _train(train_env, tmp_path, "run.name=ep", "run.steps=4", "parallel.ep=2",
           f"checkpoint.resume={tmp_path / 'ep' / 'checkpoints' / 'step_000002'}",
           "checkpoint.dir=" + str(tmp_path / "resumed_ckpt"), *SCHEDULE_4, torchrun=2)
    assert "resumed from step 2" in proc.stdout + proc.stderr
    resumed = by_step(tmp_path / "ep")  # appended records: the last of each step wins
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(ep[step], rel=1e-6), (step, ep, resumed)
    # Across layouts, the same global batch: the EP=2 checkpoint on one process, and the one-process
    # checkpoint under EP=2 (the optimizer's groups and the scheduler are the same at every layout).
    _train(train_env, tmp_path, "run.name=ep_to_one", "run.steps=4", "run.grad_accum=2", *SCHEDULE_4,
           f"checkpoint.resume={tmp_path / 'ep' / 'checkpoints' / 'step_000002'}")
    _train(train_env, tmp_path, "run.name=one_to_ep", "run.steps=4", "parallel.ep=2", *SCHEDULE_4,
           f"checkpoint.resume={tmp_path / 'single' / 'checkpoints' / 'step_000002'}", torchrun=2)
    for name in ("ep_to_one", "one_to_ep"):
        got = by_step(tmp_path / name)
        assert sorted(got) == [3, 4], (name, got)
        for step in (3, 4):  # fp32: the layouts differ only in the order of gradient sums
            assert got[step] == pytest.approx(single[step], rel=1e-5), (name, step, single, got)


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
    common = ["run.steps=5", *SCHEDULE_5, f"fp8={recipe}", "model.dim=128", "model.moe.ffn_dim=128"]
    _train(env, tmp_path, "run.name=single", "run.grad_accum=2", *common)
    _train(env, tmp_path, "run.name=ep", "parallel.ep=2", *common, torchrun=2)
    single, ep = by_step(tmp_path / "single"), by_step(tmp_path / "ep")
    assert sorted(single) == sorted(ep) == [1, 2, 3, 4, 5]
    for step in single:
        assert ep[step] == pytest.approx(single[step], rel=5e-4), (step, single, ep)
