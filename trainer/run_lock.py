"""One writer per run directory: a lock file that names its holder, and workers that die with
their launcher.

Two launches with the same `run.name` share one run directory. Unlocked, the second resumes from
the live run's checkpoint, both write the same checkpoints and `metrics.jsonl`, and one can delete
the other's save in progress. So rank 0 creates `<run_dir>/.lock` before the trainer writes
anything there, with O_CREAT | O_EXCL (exactly one creator wins, also on NFS v3 and later),
holding JSON that names the holder:

    {"host": "node7", "pid": 4242, "start_time": 81234567, "run_id": "...", "taken_at": "..."}

A lock is stale when its holder ran on this host and is gone: the pid no longer exists, is a
zombie, or now belongs to a process started at another time (`start_time`, field 22 of
/proc/<pid>/stat, tells a reused pid apart). A stale lock is taken over with a warning naming the
old holder, so a SIGKILLed run does not block the next launch. A lock taken on another host is
never assumed stale (this host cannot see that process): the error gives the `rm` to run by hand.

`FileLock` is the one mechanism; callers choose the policy. The run lock fails at once
(`acquire_run_lock`); the default corpus preparation waits for the other preparer
(`FileLock.try_acquire` in a loop, trainer/default_corpus.py).

torchrun starts its workers in their own session, so when the agent is SIGKILLed nothing signals
them: they keep training and saving into the run directory the next launch resumes from.
`stop_with_launcher()` has the kernel SIGKILL a worker when its launcher dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

RUN_LOCK_NAME = ".lock"
# The launch scripts export the pid that becomes torchrun (`exec` keeps it): a worker whose
# launcher died before `stop_with_launcher` ran can only tell by comparing with it.
LAUNCHER_PID_ENV = "FP8MOE_LAUNCHER_PID"
# A lock file is written right after it is created; one still unreadable this long after was
# left by a process killed in between.
UNREADABLE_STALE_S = 60.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class LockHeldError(RuntimeError):
    """The lock belongs to another process; the message names it and what to do."""


@dataclasses.dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    start_time: int | None = None  # clock ticks after boot (/proc/<pid>/stat field 22); None: unknown
    run_id: str | None = None  # FP8MOE_RUN_ID of the holder's launch
    taken_at: str | None = None

    @classmethod
    def this_process(cls) -> LockHolder:
        stat = _proc_stat(os.getpid())
        return cls(socket.gethostname(), os.getpid(), stat[1] if stat else None,
                   os.environ.get("FP8MOE_RUN_ID"),
                   datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    def is_this_process(self) -> bool:
        me = LockHolder.this_process()
        return (self.host, self.pid) == (me.host, me.pid) and self.start_time in (None, me.start_time)

    def is_gone(self) -> bool:
        """Ran on this host and no longer runs; a holder elsewhere is never known to be gone."""
        return self.host == socket.gethostname() and not _process_exists(self.pid, self.start_time)

    def __str__(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in (("launch", self.run_id), ("since", self.taken_at)) if v)
        return f"pid {self.pid} on {self.host}" + (f" ({extra})" if extra else "")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) from /proc/<pid>/stat; None without /proc or without that process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # comm, in parentheses, may hold spaces
    return fields[0], int(fields[19])  # fields 3 and 22, counted from 1 before the split


def _process_exists(pid: int, start_time: int | None) -> bool:
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        if state in ("Z", "X"):  # exited, not yet reaped: it writes nothing any more
            return False
        return start_time is None or started == start_time
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any pid
        return False
    except PermissionError:  # exists, under another user (or hidden from /proc)
        return True
    return True


def read_holder(path: Path) -> LockHolder | None:
    """The holder written in a lock file; None when unreadable (being written, or corrupt).

    Also reads the `host pid` text of locks written before the JSON format.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        data = json.loads(text)
        start = data.get("start_time")
        holder = LockHolder(str(data["host"]), int(data["pid"]), None if start is None else int(start),
                            data.get("run_id"), data.get("taken_at"))
    except (ValueError, TypeError, KeyError, AttributeError):  # not the JSON of a holder
        parts = text.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return None
        holder = LockHolder(parts[0], int(parts[1]))
    return holder if holder.pid > 0 else None


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


class FileLock:
    """An exclusive lock file naming its holder (module docstring); a context manager.

    `acquire()` fails at once with LockHeldError; `try_acquire()` returns that error instead of
    raising it, for callers that wait. Re-entering from the holding process succeeds without
    taking the lock a second time (the outer owner releases it). Released on exit, also on an
    exception; only by the process that took it (a forked child leaving does not release it).
    """

    def __init__(self, path: str | os.PathLike, *, what: str | None = None, busy_hint: str = "") -> None:
        """what: the thing locked, for messages (default: the lock's path).
        busy_hint: appended to the error when the holder is alive on this host."""
        self.path = Path(path)
        self.what = what or str(self.path)
        self.busy_hint = busy_hint
        self._owner_pid: int | None = None

    @property
    def owned(self) -> bool:
        return self._owner_pid == os.getpid()

    def try_acquire(self) -> LockHeldError | None:
        """Take the lock (or a stale one over); None on success, else why not."""
        if self.owned:
            return None
        for _ in range(3):  # a lock released or taken over between two looks: look again
            me = LockHolder.this_process()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.path)
                if holder is None and not self.path.exists():
                    continue  # released between the two looks
                if holder is not None and holder.is_this_process():
                    return None  # re-entered by its holder: not ours to release
                if self._is_stale(holder):
                    self._take_over(holder)
                    continue
                return self._held_error(holder)
            try:
                os.write(fd, json.dumps(dataclasses.asdict(me)).encode())
            finally:
                os.close(fd)
            self._owner_pid = os.getpid()
            return None
        return self._held_error(read_holder(self.path))

    def acquire(self) -> FileLock:
        error = self.try_acquire()
        if error is not None:
            raise error
        return self

    def release(self) -> None:
        """Remove the lock if this process took it; a lock someone else now holds stays."""
        if not self.owned:
            return
        self._owner_pid = None
        holder = read_holder(self.path)
        if holder is not None and holder.is_this_process():
            self.path.unlink(missing_ok=True)
        else:
            log.warning("%s: the lock was replaced while held (now: %s); leaving it",
                        self.path, holder or "unreadable")

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- stale locks

    def _is_stale(self, holder: LockHolder | None) -> bool:
        if holder is None:
            return _age_s(self.path) > UNREADABLE_STALE_S
        return holder.is_gone()

    def _take_over(self, stale: LockHolder | None) -> None:
        """Remove the stale lock if it still is the one judged stale.

        Two processes that both saw the stale lock could otherwise both remove it, the second
        removing the lock the first has just created. An flock on the directory (dropped by the
        kernel if the taker dies) serialises the look-and-remove; filesystems without flock on
        a directory (NFS, some Lustre mounts) fall back to looking again just before removing.
        """
        guard = os.open(self.path.parent, os.O_RDONLY)
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
            except OSError:
                pass
            current = read_holder(self.path)
            if current != stale or not self._is_stale(current):
                return  # taken over or released meanwhile
            self.path.unlink(missing_ok=True)
            log.warning("%s: took over the lock of %s, which is no longer running",
                        self.what, current or "a process killed while writing it")
        finally:
            os.close(guard)  # drops the flock

    def _held_error(self, holder: LockHolder | None) -> LockHeldError:
        rm = f"rm {shlex.quote(str(self.path))}"
        if holder is None:
            return LockHeldError(
                f"{self.what} is locked by {self.path}, which names no holder (being written right "
                f"now, or left by a process killed while writing it); if nothing is using it: {rm}")
        if holder.host != socket.gethostname():
            return LockHeldError(
                f"{self.what} is locked by {holder}, another host: this host cannot tell whether "
                f"that process still runs; if you are sure it does not: {rm}")
        return LockHeldError(f"{self.what} is locked by {holder}, which is still running"
                             + (f"; {self.busy_hint}" if self.busy_hint else ""))


@contextlib.contextmanager
def acquire_run_lock(run_dir: str | os.PathLike, *, is_main: bool, distributed: bool) -> Iterator[None]:
    """Hold `<run_dir>/.lock` for the duration; every rank fails together if rank 0 cannot.

    Rank 0 (is_main) takes the lock; when distributed, every rank learns rank 0's outcome through
    one broadcast on the default process group, so a second launch stops on all ranks at once
    with the message naming the holder, instead of ranks > 0 waiting in their first collective.
    Enter after init_process_group and before anything is written to run_dir; leave after the
    final barrier, so no rank still writes when the lock goes.
    """
    lock = FileLock(Path(run_dir) / RUN_LOCK_NAME, what=f"run directory {run_dir}",
                    busy_hint="another launch with this run.name is writing there: stop it, or give "
                              "this one another run.name")
    failure: Exception | None = None
    if is_main:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except (LockHeldError, OSError) as exc:
            failure = exc
    if distributed:
        import torch.distributed as dist

        outcome = [None if failure is None else (isinstance(failure, LockHeldError), str(failure))]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None and failure is None:
            held, message = outcome[0]
            failure = LockHeldError(message) if held else RuntimeError(
                f"rank 0 could not lock run directory {run_dir}: {message}")
    if failure is not None:
        raise failure
    try:
        yield
    finally:
        lock.release()


# ---- workers whose launcher died ----------------------------------------------------------------


def stop_with_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun (LOCAL_RANK or TORCHELASTIC_RUN_ID set): SIGKILL this process when its
    launcher dies. Call first thing at start-up; a no-op for a plain `python train.py`.

    SIGKILL, not SIGTERM: SIGTERM reaches the PreemptionHandler, whose save runs collectives
    whose peers may be gone, a hang of up to the process-group timeout. Checkpoints are atomic,
    so a killed worker loses only the steps since the last one. Linux: prctl(PR_SET_PDEATHSIG);
    the kernel sends it when the thread that started this process exits, and torchrun's agent
    starts workers from its main thread. Elsewhere: a daemon thread checks the parent every
    `poll_s` seconds.

    A launcher that died before this call sends no signal. With $FP8MOE_LAUNCHER_PID (the launch
    scripts export it) that is noticed here and stops the process with SystemExit; without it,
    the parent seen by this call is the reference.
    """
    if "LOCAL_RANK" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    declared = os.environ.get(LAUNCHER_PID_ENV, "")
    if declared and not declared.isdigit():
        raise ValueError(f"${LAUNCHER_PID_ENV}={declared!r}: expected the launcher's pid")
    launcher = int(declared) if declared else os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            code = ctypes.get_errno() or errno.EINVAL
            raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
    else:
        _kill_when_orphaned(os.getppid(), poll_s)
    # The parent is no longer the launcher: it died (before prctl, so no signal will come), unless
    # the variable names a process that never was our parent and still runs.
    if os.getppid() != launcher and not _process_exists(launcher, None):
        raise SystemExit(f"the launcher of this worker (pid {launcher}) is gone: stopping")


def _kill_when_orphaned(launcher: int, poll_s: float) -> threading.Thread:
    """A daemon thread that SIGKILLs this process once its parent is no longer `launcher`."""

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread
