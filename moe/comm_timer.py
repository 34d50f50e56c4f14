"""CommTimer: how long a step spends inside expert-parallel all-to-alls, measured where it runs.

The dispatcher (moe/dispatch.py) wraps each `all_to_all_single` it issues in `timer.span()`; the
trainer calls `drain_ms()` once per log window and divides by the window's steps (trainer/loop.py).

On CUDA a span is a pair of `torch.cuda.Event(enable_timing=True)` recorded on the current stream
around the call: recording never blocks the host, and the end event is reached only once the
stream has waited for the collective (a synchronous NCCL call makes the current stream wait for
its communication stream). A span therefore holds the transfer AND the time the stream waits for
the slowest peer to arrive (load skew between ranks, a peer still computing): both are what the
user pays for communication, so both count. On CPU (gloo) the collective is synchronous on the
host, and `time.perf_counter` around it measures the same thing.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class CommTimer:
    """Accumulates the durations of collective calls until `drain_ms` reads and forgets them.

    device: where the timed collectives run; CUDA events on a CUDA device, host clock otherwise.
    One timer may be shared by every MoE layer's dispatcher (spans simply add up).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: (start, end)
        self._host_s: list[float] = []  # CPU: seconds per span

    @property
    def spans(self) -> int:
        """Spans recorded since the last `drain_ms`."""
        return len(self._events) + len(self._host_s)

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        """Time the block: one collective call (no host synchronisation on CUDA)."""
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            yield
            end.record(stream)
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_s.append(time.perf_counter() - t0)

    def drain_ms(self) -> float:
        """Total milliseconds of the spans recorded since the last drain; forgets them.

        On CUDA this blocks the host until the last span's end event has run on the device
        (elapsed_time needs both events complete). The trainer calls it only at log steps, which
        synchronise anyway (the loss goes to the host, the throughput clock needs the GPU done),
        so it adds no stall to training.
        """
        total_ms = 1e3 * sum(self._host_s)
        if self._events:
            # Spans are recorded in program order on the current stream (autograd runs a backward
            # op on its forward's stream), so once the last end event is done, all of them are.
            self._events[-1][1].synchronize()
            total_ms += sum(start.elapsed_time(end) for start, end in self._events)
        self._events.clear()
        self._host_s.clear()
        return total_ms
