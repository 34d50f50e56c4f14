"""Preemption: notice SIGTERM / SIGUSR1 and stop every rank at the same step.

Slurm sends SIGUSR1 `N` seconds before the time limit when the job asks for
`--signal=USR1@N`, and SIGTERM on scancel or preemption (followed by SIGKILL after the cluster's
KillWait, 30 s by default). The handler only sets a flag: a signal can arrive in the middle of a
collective or of a CUDA call, and saving from inside the handler would deadlock or corrupt state.
The training loop polls `should_stop()` between steps, saves, and exits.

Signals reach ranks at different moments (or only some ranks), so `should_stop()` agrees on the
flag with an all-reduce MAX: every rank sees True at the same step and they save together.
That costs one tiny all-reduce and a host sync per call; a loop that wants to avoid the sync every
step may call it every k steps, as long as every rank calls it at the same steps.

    with PreemptionHandler() as preempt:
        for step in ...:
            train_step()
            if preempt.should_stop():
                mgr.save(step, app_state)
                break
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Installs flag-setting handlers for `signals`; restores the previous handlers on close()."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS,
                 device: torch.device | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        """device: where the agreement all-reduce runs; None picks CUDA for NCCL, else CPU.
        group: the process group to agree over; None is the default group."""
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.received: signal.Signals | None = None  # the first signal seen by this process
        self._device = device
        self._group = group
        self._previous: dict[signal.Signals, Any] = {}
        self._announced = False

    # ---- install / restore

    def install(self) -> PreemptionHandler:
        if self._previous:
            raise RuntimeError("PreemptionHandler.install() called twice without close()")
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError as exc:
            self.close()
            raise RuntimeError("PreemptionHandler must be installed from the main thread: Python "
                               "delivers signals only there") from exc
        return self

    def close(self) -> None:
        for sig, previous in self._previous.items():
            # None means the old handler was installed from C, which Python cannot put back;
            # the default action is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: no logging, I/O or collectives inside a signal handler.
        if self.received is None:
            self.received = signal.Signals(signum)

    # ---- query

    @property
    def requested(self) -> bool:
        """Whether this process has received a signal (no communication)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """Whether any rank has received a signal; a collective when distributed."""
        stop = self.requested
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self._group) > 1:
            flag = torch.tensor([int(stop)], dtype=torch.int32, device=self._reduce_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            stop = bool(flag.item())
        if stop and not self._announced:
            self._announced = True
            origin = self.received.name if self.received is not None else "another rank"
            log.warning("preemption requested (%s): saving and stopping", origin)
        return stop

    def _reduce_device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if dist.get_backend(self._group) == "nccl":  # NCCL only reduces CUDA tensors
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
