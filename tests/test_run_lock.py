"""trainer/run_lock.py: one writer per run directory, stale-lock takeover, rank agreement, and
workers that stop when their launcher dies."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import default_corpus
from trainer.run_lock import (
    LAUNCHER_PID_ENV,
    UNREADABLE_STALE_S,
    FileLock,
    LockHeldError,
    LockHolder,
    acquire_run_lock,
    read_holder,
    stop_with_launcher,
)

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def _child_env(**extra):
    drop = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", LAUNCHER_PID_ENV)  # the children decide these
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**env, **extra}


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _plant(path, **holder):
    path.write_text(json.dumps(holder))


@pytest.fixture
def holder_process(tmp_path):
    """Another live process holding `tmp_path/.lock` through FileLock."""
    code = ("import sys, time; from trainer.run_lock import FileLock; "
            "lock = FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".lock")], stdout=subprocess.PIPE,
                            text=True, env=_child_env(FP8MOE_RUN_ID="launch-1"))
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


# ---- one mechanism ----------------------------------------------------------------------------------


def test_second_lock_fails_naming_the_holder(tmp_path, holder_process):
    with pytest.raises(LockHeldError, match=f"pid {holder_process.pid} on {HOST} \\(launch launch-1, since "):
        FileLock(tmp_path / ".lock").acquire()
    holder = read_holder(tmp_path / ".lock")
    assert (holder.host, holder.pid, holder.run_id) == (HOST, holder_process.pid, "launch-1")
    assert holder.start_time is not None  # /proc exists here


def test_lock_content_and_release_on_exception(tmp_path):
    path = tmp_path / ".lock"
    with pytest.raises(ZeroDivisionError):
        with FileLock(path):
            data = json.loads(path.read_text())
            assert set(data) == {"host", "pid", "start_time", "run_id", "taken_at"}
            assert (data["host"], data["pid"]) == (HOST, os.getpid())
            1 / 0
    assert not path.exists()


def test_same_process_reenters_and_the_outer_owner_releases(tmp_path):
    path = tmp_path / ".lock"
    with FileLock(path):
        with FileLock(path) as inner:
            assert not inner.owned
        assert path.exists()  # the inner exit left the outer's lock alone
    assert not path.exists()


@pytest.mark.parametrize("how", ["exited", "zombie", "reused pid"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, how):
    path = tmp_path / ".lock"
    if how == "reused pid":  # a live process, started at another time than the recorded one
        pid, start_time = os.getppid(), 1
    else:
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        if how == "exited":
            proc.wait()
        else:  # exited, not reaped yet
            while _alive(proc.pid):
                time.sleep(0.01)
        pid, start_time = proc.pid, None
    _plant(path, host=HOST, pid=pid, start_time=start_time, run_id="old", taken_at="then")
    with caplog.at_level(logging.WARNING, logger="trainer.run_lock"):
        with FileLock(path):
            assert read_holder(path).pid == os.getpid()
    if how == "zombie":
        proc.wait()
    assert f"took over the lock of pid {pid} on {HOST} (launch old, since then)" in caplog.text
    assert not path.exists()


def test_lock_from_another_host_is_refused_with_the_rm_hint(tmp_path):
    path = tmp_path / "run dir" / ".lock"
    path.parent.mkdir()
    _plant(path, host="elsewhere", pid=1, start_time=None, run_id=None, taken_at=None)
    with pytest.raises(LockHeldError, match="pid 1 on elsewhere, another host") as err:
        FileLock(path).acquire()
    assert f"rm '{path}'" in str(err.value)
    assert read_holder(path).host == "elsewhere"  # untouched


def test_unreadable_lock_is_busy_while_young_and_stale_when_old(tmp_path, caplog):
    path = tmp_path / ".lock"
    path.write_text("")
    with pytest.raises(LockHeldError, match="names no holder.*rm "):
        FileLock(path).acquire()
    old = time.time() - UNREADABLE_STALE_S - 1
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, logger="trainer.run_lock"), FileLock(path):
        pass
    assert "killed while writing it" in caplog.text


def test_reads_the_host_pid_text_of_older_locks(tmp_path):
    path = tmp_path / "prepare.lock"
    path.write_text(f"{HOST} 999999999")
    assert read_holder(path) == LockHolder(HOST, 999999999)
    assert read_holder(path).is_gone() and str(read_holder(path)) == f"pid 999999999 on {HOST}"
    assert read_holder(tmp_path / "missing") is None


# ---- the run lock -----------------------------------------------------------------------------------


def test_run_lock_second_launch_fails_at_once(tmp_path, holder_process):
    t0 = time.monotonic()
    expected = f"run directory {re.escape(str(tmp_path))} is locked by pid {holder_process.pid}"
    with pytest.raises(LockHeldError, match=expected + ".*another launch with this run.name"):
        with acquire_run_lock(tmp_path, is_main=True, distributed=False):
            pass
    assert time.monotonic() - t0 < 1.0


def test_run_lock_held_for_the_block(tmp_path):
    run_dir = tmp_path / "new" / "run"  # created by the lock: nothing else has written yet
    with acquire_run_lock(run_dir, is_main=True, distributed=False):
        assert read_holder(run_dir / ".lock").pid == os.getpid()
    assert not (run_dir / ".lock").exists()
    with acquire_run_lock(tmp_path / "other", is_main=False, distributed=False):
        assert not (tmp_path / "other").exists()  # ranks > 0 take nothing


def _two_ranks(rank, world, run_dir, holder_pid):
    import torch.distributed as dist

    errors = []
    try:
        with acquire_run_lock(run_dir, is_main=rank == 0, distributed=True):
            pass
    except LockHeldError as exc:
        errors.append(str(exc))
    gathered = [None] * world
    dist.all_gather_object(gathered, errors)
    assert gathered[0] == gathered[1] and len(gathered[0]) == 1, gathered
    assert f"pid {holder_pid} on {HOST}" in gathered[0][0], gathered
    dist.barrier()
    if rank == 0:
        os.unlink(os.path.join(run_dir, ".lock"))  # the other launch is gone
    dist.barrier()
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    with acquire_run_lock(run_dir, is_main=rank == 0, distributed=True):
        assert read_holder(Path(run_dir) / ".lock").pid == pids[0]
        dist.barrier()
    dist.barrier()
    assert not os.path.exists(os.path.join(run_dir, ".lock"))


@pytest.mark.slow
def test_run_lock_every_rank_fails_with_rank0s_message(tmp_path):
    from ep_helpers import _spawn

    # The holder: this test process, alive on this host (another process to the ranks).
    _plant(tmp_path / ".lock", host=HOST, pid=os.getpid(), start_time=None, run_id="first", taken_at=None)
    _spawn(_two_ranks, 2, str(tmp_path), os.getpid())


# ---- workers whose launcher died --------------------------------------------------------------------

_LAUNCHER = """
import os, subprocess, sys, time
env = dict(os.environ, LOCAL_RANK="0", {env}=str(os.getpid()))
# torchrun starts each worker in its own session: no signal of the launcher's group reaches it
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env, start_new_session=True)
{after_spawn}
"""

_WORKER = """
import os, sys, time
{before}
from trainer.run_lock import stop_with_launcher, _kill_when_orphaned
{call}
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(60)
"""


def _launch(tmp_path, after_spawn, before, call):
    launcher = _LAUNCHER.format(env=LAUNCHER_PID_ENV, after_spawn=after_spawn)
    worker = _WORKER.format(before=before, call=call)
    marker = tmp_path / "worker.pid"
    proc = subprocess.Popen([sys.executable, "-c", launcher, worker, str(marker)], env=_child_env(),
                            stderr=subprocess.PIPE, text=True)
    return proc, marker


def _wait_for(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("call", ["stop_with_launcher()", "_kill_when_orphaned(os.getppid(), 0.2)"],
                         ids=["prctl", "watchdog"])
def test_worker_stops_when_its_launcher_is_killed(tmp_path, call):
    proc, marker = _launch(tmp_path, "time.sleep(60)", "", call)
    worker = None
    try:
        assert _wait_for(lambda: marker.exists() and marker.read_text(), 30), "the worker did not start"
        worker = int(marker.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _wait_for(lambda: not _alive(worker), 5.0), "the worker outlived its launcher by 5 s"
    finally:
        proc.kill()
        proc.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_worker_whose_launcher_died_before_the_call_stops(tmp_path):
    # The launcher exits right after the spawn; the worker calls only once it has been orphaned.
    wait_orphaned = (f"launcher = int(os.environ['{LAUNCHER_PID_ENV}'])\n"
                     "deadline = time.monotonic() + 30\n"
                     "while os.getppid() == launcher and time.monotonic() < deadline:\n"
                     "    time.sleep(0.01)")
    proc, marker = _launch(tmp_path, "", wait_orphaned, "stop_with_launcher()")
    _, err = proc.communicate(timeout=60)  # the worker holds the same stderr until it ends
    assert "the launcher of this worker (pid" in err and "is gone: stopping" in err, err
    assert not marker.exists()


def test_stop_with_launcher_is_a_noop_outside_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv(LAUNCHER_PID_ENV, "999999999")  # would stop the process under torchrun
    stop_with_launcher()


def test_stop_with_launcher_rejects_a_bad_launcher_pid(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv(LAUNCHER_PID_ENV, "torchrun")
    with pytest.raises(ValueError, match=f"{LAUNCHER_PID_ENV}='torchrun': expected the launcher's pid"):
        stop_with_launcher()


# ---- the corpus preparation: the same lock, waiting -------------------------------------------------


def test_corpus_preparation_waits_for_a_live_preparer_and_names_it(tmp_path, monkeypatch):
    docs = ["a tiny corpus. " * 50, "of two documents"]
    monkeypatch.setattr(default_corpus, "pydoc_documents", lambda: docs)
    prefix = default_corpus.ensure_default_corpus(str(tmp_path))  # learn the directory
    out_dir = Path(prefix).parent
    (out_dir / "manifest.json").unlink()
    _plant(out_dir / "prepare.lock", host=HOST, pid=os.getppid(), start_time=None, run_id="x", taken_at=None)
    monkeypatch.setattr(default_corpus, "LOCK_TIMEOUT_S", 0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=f"another process to prepare the default corpus: .* is locked by "
                                           f"pid {os.getppid()} on {HOST}"):
        default_corpus.ensure_default_corpus(str(tmp_path))
    assert time.monotonic() - t0 >= 0.5  # it waited
    assert (out_dir / "prepare.lock").exists()
