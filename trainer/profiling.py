"""`run.profile`: a torch.profiler trace and, on CUDA, a memory snapshot of chosen training steps.

    python train.py ... run.profile.steps=[10,11]

For each step N of run.profile.steps, every rank R writes into `<run_dir>/profile/`:
  step<N>.rank<R>.json.gz         a Chrome trace of the step, CPU ops and (on CUDA) kernels:
                                  open it in https://ui.perfetto.dev or chrome://tracing;
                                  `python -m bench.kernel_families TRACE` sums its GPU time by
                                  kernel family
  memory.step<N>.rank<R>.pickle   on CUDA (run.profile.memory_snapshot): the caching allocator's
                                  history during the step with Python stacks, for
                                  https://pytorch.org/memory_viz
Steps count from 1, as the log lines do: step N is the N-th optimizer step, all its micro-batches.
The profiler starts before the step and stops after a device synchronisation at its end, so the
trace holds every kernel the step launched; the log window holding a profiled step reports its
throughput with the profiler's overhead in it. A step that raises (out of memory) still writes
its memory snapshot. With no steps nothing is built and the loop runs as without profiling.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe.config import require

log = logging.getLogger("fp8moe")

# Allocator events kept by the memory history (a ring buffer): a Mixtral-width step makes ~20k.
MEMORY_HISTORY_ENTRIES = 200_000


@dataclass
class ProfileConfig:
    steps: list[int] = field(default_factory=list)  # optimizer steps to profile, from 1; empty: off
    record_shapes: bool = False  # input shapes of every op in the trace (larger, slower)
    with_stack: bool = False  # Python stacks of every op in the trace (much slower)
    memory_snapshot: bool = True  # on CUDA: the allocator's history of each profiled step

    def validate(self, run_steps: int, prefix: str = "run.profile") -> None:
        bad = [s for s in self.steps if not 1 <= s <= run_steps]
        require(not bad, f"{prefix}.steps must hold optimizer steps in [1, run.steps={run_steps}] "
                         f"(steps count from 1), got {list(self.steps)}")  # fmt: skip


def trace_path(run_dir: str | Path, step: int, rank: int) -> Path:
    return Path(run_dir) / "profile" / f"step{step}.rank{rank}.json.gz"


def memory_path(run_dir: str | Path, step: int, rank: int) -> Path:
    return Path(run_dir) / "profile" / f"memory.step{step}.rank{rank}.pickle"


class StepProfiler:
    """Profiles the steps of `cfg.steps` on this rank (`around`); build it with `build_step_profiler`."""

    def __init__(self, cfg: ProfileConfig, run_dir: str | Path, rank: int, device: torch.device) -> None:
        self.cfg, self.run_dir, self.rank, self.device = cfg, Path(run_dir), rank, device
        self.steps = frozenset(cfg.steps)

    @contextlib.contextmanager
    def around(self, step: int) -> Iterator[None]:
        """Run the body (one optimizer step, `step` counted from 1) under the profiler when it
        is one of the chosen steps; else run it as it is."""
        if step not in self.steps:
            yield
            return
        cuda = self.device.type == "cuda"
        trace = trace_path(self.run_dir, step, self.rank)
        memory = memory_path(self.run_dir, step, self.rank) if cuda and self.cfg.memory_snapshot else None
        trace.parent.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if memory is not None:
            # Python stacks only: "all" adds C++ frames, whose symbolisation takes minutes.
            torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                     max_entries=MEMORY_HISTORY_ENTRIES)  # fmt: skip
        try:
            prof = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                          with_stack=self.cfg.with_stack)  # fmt: skip
            with prof:
                yield
                if cuda:
                    torch.cuda.synchronize(self.device)  # the step's last kernels into the trace
            prof.export_chrome_trace(str(trace))
            if memory is not None:
                torch.cuda.memory._dump_snapshot(str(memory))
        except BaseException:
            if memory is not None:  # the history up to the failure: what an out-of-memory step held
                with contextlib.suppress(Exception):
                    torch.cuda.memory._dump_snapshot(str(memory))
                    log.warning("step %d failed; its memory snapshot is in %s", step, memory)
            raise
        finally:
            if memory is not None:
                torch.cuda.memory._record_memory_history(enabled=None)
        written = f"{trace}" + (f" and memory snapshot {memory}" if memory is not None else "")
        log.info("step %d profiled: trace %s (each rank writes its own .rank<R> files)", step, written)


def build_step_profiler(cfg: ProfileConfig, run_dir: str | Path, rank: int, device: torch.device,
                        start_step: int = 0) -> StepProfiler | None:
    """None when no step is chosen (nothing to do per step); a warning when every chosen step
    lies at or before `start_step`, the step a resumed run starts after."""
    if not cfg.steps:
        return None
    if max(cfg.steps) <= start_step:
        log.warning("run.profile.steps=%s: every one is at or before step %d, where this run resumes; "
                    "nothing will be profiled", list(cfg.steps), start_step)  # fmt: skip
    return StepProfiler(cfg, run_dir, rank, device)


def profiled(profiler: StepProfiler | None, step: int) -> contextlib.AbstractContextManager:
    """`profiler.around(step)`, or nothing to do when profiling is off."""
    return contextlib.nullcontext() if profiler is None else profiler.around(step)
