"""Checkpoint safety on CPU: planted pickles refused, checksums, protected steps, the saved
config, a full disk, a damaged RNG file, and one verdict on every rank."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.multiprocessing as mp
from torch import nn

import trainer.checkpoint as checkpoint_module
from trainer.checkpoint import MANIFEST, CheckpointConfig, CheckpointManager, DiskFullError
from trainer.checkpoint_files import crc32_file


def make_app(seed: int, dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(dtype)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 4))
    model(torch.randn(3, 4, dtype=dtype)).sum().backward()
    optim.step()
    sched.step()
    return {"model": model, "optim": optim, "sched": sched, "meta": {"consumed_samples": 7}}


def manager(tmp_path: Path, **cfg) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(**cfg), run_dir=tmp_path)


def params(app: dict) -> list[torch.Tensor]:
    return [p.detach().clone() for p in app["model"].parameters()]


def replant(ckpt: Path, name: str, data: bytes) -> None:
    """Replace one file and make the manifest agree, as whoever planted it would."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = len(data)
    manifest["checksums"][name] = crc32_file(ckpt / name)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


class RunsShell:
    """Unpickling this runs `touch marker` in a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CreatesFile:
    """Unpickling this creates `marker` through open()."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


PAYLOADS = [pytest.param(RunsShell, r"(posix|os)\.system", id="os.system"),
            pytest.param(CreatesFile, r"(io|builtins)\.open", id="open")]


# --------------------------------------------------------------------------------------------
# no code runs on load


@pytest.mark.parametrize("payload, name", PAYLOADS)
def test_planted_metadata_pickle_is_refused(tmp_path, payload, name):
    mgr = manager(tmp_path)
    ckpt = mgr.save(1, make_app(0))
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own, trusted file
    marker = tmp_path / "pwned"
    metadata.planner_data = payload(marker)  # valid metadata with a payload tucked in
    replant(ckpt, ".metadata", pickle.dumps(metadata))
    fresh = make_app(1)
    before = params(fresh)
    with pytest.raises(RuntimeError, match=rf"step_000001.*global {name}") as info:
        manager(tmp_path).load(fresh)
    assert "refusing" in str(info.value)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, params(fresh)))


class EvilState:
    """A stateful object whose state holds a payload: DCP pickles it as a bytes entry."""

    def __init__(self, value: object) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


@pytest.mark.parametrize("payload, name", PAYLOADS)
def test_planted_bytes_entry_is_refused(tmp_path, payload, name):
    marker = tmp_path / "pwned"
    manager(tmp_path).save(1, {**make_app(0), "extra": EvilState(payload(marker))})
    with pytest.raises(RuntimeError, match=rf"step_000001.*'extra\.value'.*global {name}"):
        manager(tmp_path).load({**make_app(1), "extra": EvilState(None)})
    assert not marker.exists()


def test_planted_rng_file_is_refused(tmp_path):
    ckpt = manager(tmp_path).save(1, make_app(0))
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"python": RunsShell(marker)}, buffer)
    replant(ckpt, "rng_rank00000.pt", buffer.getvalue())
    with pytest.raises(RuntimeError, match=r"rng_rank00000\.pt.*global (posix|os)\.system"):
        manager(tmp_path).load(make_app(1))
    assert not marker.exists()


def test_metadata_of_other_dtypes_loads(tmp_path):
    app = make_app(0, torch.bfloat16)
    manager(tmp_path).save(1, app)
    fresh = make_app(1, torch.bfloat16)
    assert manager(tmp_path).load(fresh) == 1
    assert all(torch.equal(a, b) for a, b in zip(params(app), params(fresh)))


# --------------------------------------------------------------------------------------------
# checksums


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_is_found_and_names_the_file(tmp_path):
    ckpt = manager(tmp_path).save(1, make_app(0))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["checksum"] == "crc32"
    assert manifest["checksums"].keys() == manifest["files"].keys()
    _flip_a_byte(ckpt / "__0_0.distcp")
    fresh = make_app(1)
    before = params(fresh)
    with pytest.raises(RuntimeError, match=r"step_000001/__0_0\.distcp does not match its checks"):
        manager(tmp_path).load(fresh)
    assert all(torch.equal(a, b) for a, b in zip(before, params(fresh)))


def test_verify_false_skips_checksums_with_a_log_line(tmp_path, caplog):
    ckpt = manager(tmp_path, verify=False).save(1, make_app(0))
    assert "checksums" not in json.loads((ckpt / MANIFEST).read_text())
    with caplog.at_level(logging.INFO, logger="trainer.checkpoint"):
        assert manager(tmp_path, verify=False).load(make_app(1)) == 1
        assert manager(tmp_path).load(make_app(1)) == 1  # written unverified: loads, warns
    assert "without checking its checksums" in caplog.text and "unverified" in caplog.text


def test_manifest_without_checksums_loads_with_a_warning(tmp_path, caplog):
    ckpt = manager(tmp_path).save(1, make_app(0))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for key in ("checksum", "checksums"):
        del manifest[key]
    manifest["format"] = 1
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert manager(tmp_path).load(make_app(1)) == 1
    assert "unverified" in caplog.text


# --------------------------------------------------------------------------------------------
# protected steps, the saved config, interval_minutes


def test_protected_checkpoint_survives_pruning(tmp_path):
    mgr = manager(tmp_path, keep_last=2)
    app = make_app(0)
    for step in range(1, 6):
        mgr.save(step, app, protect={2})
    assert mgr.last_saved_step == 5
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["step_000002", "step_000004",
                                                         "step_000005"]


def test_config_is_saved_checksummed_and_handed_back(tmp_path):
    config = {"optim": {"lr": 3e-4, "betas": [0.9, 0.95]}, "run": {"steps": 10}}
    mgr = manager(tmp_path)
    assert mgr.loaded is None and mgr.load(make_app(1)) is None and mgr.loaded is None
    ckpt = mgr.save(3, make_app(0), config=config)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert "config.json" in manifest["files"] and "config.json" in manifest["checksums"]
    resumed = manager(tmp_path)
    assert resumed.load(make_app(1)) == 3
    loaded = resumed.loaded
    assert (loaded.step, loaded.path, loaded.config) == (3, ckpt, config)
    assert loaded.manifest["step"] == 3 and resumed.last_saved_step == 3
    manager(tmp_path).save(4, make_app(0))
    again = manager(tmp_path)
    again.load(make_app(1))
    assert again.loaded.step == 4 and again.loaded.config is None
    with pytest.raises(ValueError, match="config"):
        manager(tmp_path).save(5, make_app(0), config={"bad": object()})


def test_config_defaults_and_validation():
    cfg = CheckpointConfig()
    assert (cfg.interval_minutes, cfg.interval, cfg.verify, cfg.apply_changes) == (30.0, 0, True,
                                                                                  False)
    assert CheckpointConfig(interval_minutes=0).interval_minutes == 0
    for bad in (-1.0, float("nan"), "10", True):
        with pytest.raises(ValueError, match="checkpoint.interval_minutes"):
            CheckpointConfig(interval_minutes=bad)
    for name in ("verify", "apply_changes", "at_end"):
        with pytest.raises(ValueError, match=f"checkpoint.{name} must be true or false"):
            CheckpointConfig(**{name: "yes"})


# --------------------------------------------------------------------------------------------
# a full disk, a damaged RNG file


class _FullAfter:
    """A write stream on a disk that fills up after `room` bytes; the rest is the real file's."""

    def __init__(self, stream, room: int) -> None:
        self.stream, self.room = stream, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.stream.write(data)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _fill_disk(monkeypatch, where: str, err: int = errno.ENOSPC) -> None:
    if where == "dcp":  # DCP's writer: torch.save hits ENOSPC and says "unexpected pos ..."
        real = dcp_filesystem.FileSystem.create_stream

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with real(self, path, mode) as stream:
                yield _FullAfter(stream, 600) if "w" in mode else stream

        monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", create_stream)
        return
    real_write = checkpoint_module.write_durably

    def write_durably(path: Path, data: bytes) -> None:
        if path.name.startswith(where):
            raise OSError(err, os.strerror(err))
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "write_durably", write_durably)


@pytest.mark.parametrize("where", ["dcp", "rng_rank", "config", "manifest"])
def test_full_disk_names_the_directory_and_leaves_no_trace(tmp_path, monkeypatch, where):
    mgr = manager(tmp_path)
    good = mgr.save(1, make_app(0))
    sums = {p.name: crc32_file(p) for p in good.iterdir()}
    _fill_disk(monkeypatch, where)
    with pytest.raises(DiskFullError, match=rf"disk full in {mgr.dir} \(\d+ bytes free\)"):
        mgr.save(2, make_app(0), config={"run": {}})
    monkeypatch.undo()
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["step_000001"]
    assert {p.name: crc32_file(p) for p in good.iterdir()} == sums
    assert manager(tmp_path).load(make_app(1)) == 1


def test_other_write_errors_keep_their_cause_and_leave_no_trace(tmp_path, monkeypatch):
    mgr = manager(tmp_path)
    _fill_disk(monkeypatch, "rng_rank", errno.EIO)
    with pytest.raises(OSError) as info:
        mgr.save(1, make_app(0))
    assert info.value.errno == errno.EIO and not isinstance(info.value, DiskFullError)
    assert list(mgr.dir.iterdir()) == []


def _chain_text(exc: BaseException) -> str:
    text = ""
    while exc is not None:
        text += str(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return text


@pytest.mark.parametrize("content", [b"not a torch file" * 10, b"", "wrong state"])
def test_damaged_rng_file_names_it(tmp_path, content):
    ckpt = manager(tmp_path).save(1, make_app(0))
    if isinstance(content, str):
        buffer = io.BytesIO()
        torch.save({"python": content}, buffer)
        content = buffer.getvalue()
    replant(ckpt, "rng_rank00000.pt", content)
    with pytest.raises(RuntimeError, match=r"rng_rank00000\.pt.*damaged") as info:
        manager(tmp_path).load(make_app(1))
    assert "weights_only" not in _chain_text(info.value)


# --------------------------------------------------------------------------------------------
# two ranks over gloo: a damaged file in rank 1's share fails the load on both


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _verify_worker(rank: int, world_size: int, port: int, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        mgr = CheckpointManager(CheckpointConfig(), run_dir, rank, world_size)
        ckpt = mgr.save(1, make_app(0))
        files = sorted(json.loads((ckpt / MANIFEST).read_text())["files"])
        victim = files[1::world_size][0]  # hashed by rank 1 only
        dist.barrier()
        if rank == 0:
            _flip_a_byte(ckpt / victim)
        dist.barrier()
        try:
            mgr.load(make_app(1))
            message = "loaded"
        except RuntimeError as exc:
            message = str(exc)
        assert victim in message and "checksum" in message, message
        (Path(run_dir) / f"verdict{rank}").write_text(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_checksum_verdict(tmp_path):
    mp.spawn(_verify_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "verdict0").read_text() == (tmp_path / "verdict1").read_text()
