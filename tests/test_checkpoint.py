"""Checkpoint save/resume and preemption signals, on CPU (one process, and two over gloo)."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainer.checkpoint import MANIFEST, CheckpointConfig, CheckpointManager
from trainer.rng_state import capture_rng_state, restore_rng_state
from trainer.preemption import PreemptionHandler


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Dropout makes every step consume torch RNG, so a wrong RNG restore changes the loss.
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_app_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = TinyNet()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 4))
    return {"model": model, "optim": optim, "sched": sched, "meta": {"consumed_samples": 0}}


def train_steps(app: dict, n: int, model: nn.Module | None = None) -> list[float]:
    """n steps whose data draws on python, numpy and torch RNG, so all three must be restored."""
    model = model if model is not None else app["model"]
    losses = []
    for _ in range(n):
        batch = 4 + random.randint(0, 3)
        x = torch.randn(batch, 8) * float(np.random.uniform(0.5, 1.5))
        loss = model(x).pow(2).mean()
        app["optim"].zero_grad()
        loss.backward()
        app["optim"].step()
        app["sched"].step()
        app["meta"]["consumed_samples"] += batch
        losses.append(loss.item())
    return losses


def snapshot(app: dict) -> dict:
    return {k: copy.deepcopy(v.state_dict() if hasattr(v, "state_dict") else v)
            for k, v in app.items()}


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def manager(tmp_path: Path, **cfg) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(**cfg), run_dir=tmp_path)


def test_round_trip_gives_identical_state_and_next_steps(tmp_path):
    app = make_app_state(seed=0)
    train_steps(app, 3)
    path = manager(tmp_path).save(3, app)
    saved = snapshot(app)
    expected = train_steps(app, 4)
    expected_params = snapshot(app)["model"]

    fresh = make_app_state(seed=123)  # other weights, empty optimizer state, other RNG position
    random.seed(5)
    np.random.seed(5)
    assert manager(tmp_path).load(fresh) == 3
    assert_same(snapshot(fresh), saved)
    assert fresh["meta"]["consumed_samples"] == saved["meta"]["consumed_samples"] > 0
    assert train_steps(fresh, 4) == expected
    assert_same(snapshot(fresh)["model"], expected_params)

    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["complete"] is True and manifest["world_size"] == 1
    assert "rng_rank00000.pt" in manifest["files"] and ".metadata" in manifest["files"]
    assert not list(tmp_path.glob("checkpoints/*.tmp"))


def test_rng_helpers_round_trip():
    state = capture_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_keep_last_prunes_oldest_complete(tmp_path):
    mgr = manager(tmp_path, keep_last=2, interval=1)
    app = make_app_state(seed=0)
    for step in range(1, 5):
        assert mgr.due(step)
        mgr.save(step, app)
    names = sorted(p.name for p in mgr.dir.iterdir())
    assert names == ["step_000003", "step_000004"]
    assert mgr.latest() == mgr.path_for(4)


def test_unfinished_tmp_dirs_are_ignored_and_reported(tmp_path, caplog):
    mgr = manager(tmp_path)
    app = make_app_state(seed=0)
    mgr.save(2, app)
    junk = mgr.dir / "step_000005.tmp"
    junk.mkdir()
    (junk / "__0_0.distcp").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert mgr.latest() == mgr.path_for(2)
        assert mgr.load(make_app_state(seed=1)) == 2
    assert "step_000005.tmp" in caplog.text


def _break_manifest_json(path: Path) -> None:
    (path / MANIFEST).write_text("{not json")


def _remove_manifest(path: Path) -> None:
    (path / MANIFEST).unlink()


def _truncate_dcp_metadata(path: Path) -> None:
    meta = path / ".metadata"
    meta.write_bytes(meta.read_bytes()[:20])


def _scramble_dcp_metadata(path: Path) -> None:
    # Same size, so only reading the DCP metadata itself can notice.
    meta = path / ".metadata"
    meta.write_bytes(bytes(meta.stat().st_size))


def _scramble_dcp_shard(path: Path) -> None:
    shard = path / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))


@pytest.mark.parametrize("damage", [_break_manifest_json, _remove_manifest, _truncate_dcp_metadata,
                                    _scramble_dcp_metadata, _scramble_dcp_shard])
def test_damaged_checkpoint_raises_naming_path(tmp_path, damage):
    mgr = manager(tmp_path)
    mgr.save(1, make_app_state(seed=0))
    mgr.save(2, make_app_state(seed=0))
    damage(mgr.path_for(2))
    # Never a silent fresh start, and never a silent fall-back to step 1.
    with pytest.raises(RuntimeError, match="step_000002"):
        manager(tmp_path).load(make_app_state(seed=1))
    with pytest.raises(RuntimeError, match="step_000002"):
        manager(tmp_path, resume=str(mgr.path_for(2))).load(make_app_state(seed=1))


def test_resume_none_auto_empty_and_missing_path(tmp_path):
    app = make_app_state(seed=0)
    assert manager(tmp_path).load(app) is None  # auto, nothing saved yet
    manager(tmp_path).save(1, app)
    fresh = make_app_state(seed=1)
    before = snapshot(fresh)
    assert manager(tmp_path, resume="none").load(fresh) is None
    assert_same(snapshot(fresh), before)
    missing = tmp_path / "nowhere" / "step_000007"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        manager(tmp_path, resume=str(missing)).load(fresh)
    assert manager(tmp_path, resume=str(tmp_path / "checkpoints" / "step_000001")).load(fresh) == 1


def test_bad_config_and_app_state_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.keep_last"):
        CheckpointConfig(keep_last=-1)
    with pytest.raises(ValueError, match="checkpoint.interval"):
        CheckpointConfig(interval=-5)
    with pytest.raises(ValueError, match=r"app_state\['meta'\]"):
        manager(tmp_path).save(1, {"meta": {"bad": object()}})
    with pytest.raises(ValueError, match=r"app_state\['weird'\]"):
        manager(tmp_path).save(1, {"weird": 3})


def test_preemption_flag_from_sigterm_and_handlers_restored():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    original_usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        with PreemptionHandler() as preempt:
            assert not preempt.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert preempt.should_stop() and preempt.received == signal.SIGTERM
        assert calls == []  # our handler, not the previous one, saw the signal
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGUSR1) is original_usr1
        with PreemptionHandler() as preempt:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert preempt.requested
    finally:
        signal.signal(signal.SIGTERM, original)


# --------------------------------------------------------------------------------------------
# two ranks over gloo, DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        def ddp_app(seed: int) -> tuple[dict, nn.Module]:
            app = make_app_state(seed)
            return app, nn.parallel.DistributedDataParallel(app["model"])

        # Per-rank seeds: each rank has its own RNG stream, which the checkpoint must keep apart.
        random.seed(rank)
        np.random.seed(rank)
        app, ddp = ddp_app(seed=0)
        app["model"] = ddp
        train_steps(app, 2, model=ddp)
        mgr = CheckpointManager(CheckpointConfig(), run_dir, rank, world_size)
        with PreemptionHandler() as preempt:
            if rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            assert preempt.should_stop()  # rank 0 got no signal but agrees
        path = mgr.save(2, app)
        expected = train_steps(app, 3, model=ddp)

        fresh, fresh_ddp = ddp_app(seed=99)
        fresh["model"] = fresh_ddp
        torch.manual_seed(1234 + rank)
        assert mgr.load(fresh) == 2
        assert train_steps(fresh, 3, model=fresh_ddp) == expected
        if rank == 0:
            files = json.loads((Path(path) / MANIFEST).read_text())["files"]
            assert {"rng_rank00000.pt", "rng_rank00001.pt"} <= files.keys()
        # Tear down in order: DDP's reducers before the group, and both ranks together (a rank
        # destroying gloo while its peer still talks to it aborted the process, seen once in CI).
        del app, ddp, fresh, fresh_ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gloo_ddp_save_load(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
