"""Checkpoints: save and resume model, optimizer, scheduler, metadata and per-rank RNG.

Tensors and other state go through torch.distributed.checkpoint (DCP), so the same code saves a
single CPU process, DDP replicas and FSDP2 shards, and a checkpoint can be loaded at another world
size. Model and optimizer pass through `get_state_dict` / `set_state_dict`, which strip DDP and
compile wrappers and keep FSDP2 parameters sharded.

One run's checkpoint directory:

    checkpoints/
      step_000100/            complete: renamed from step_000100.tmp after every rank finished
        .metadata             DCP's global metadata
        __0_0.distcp ...      DCP data, one or more files per rank
        rng_rank00000.pt      this rank's RNG states (python, numpy, torch CPU, CUDA)
        manifest.json         written last by rank 0: step, files and sizes, time, "complete"
      step_000200.tmp/        a save that never finished (crash, SIGKILL); resume ignores it

DCP pickles non-tensor leaves and de-duplicates entries with the same key across ranks, writing
one rank's copy. So metadata dicts must be equal on every rank (step, consumed samples), while RNG
states, which differ per rank, go to one small file per rank (this also copes with a change of
world size). A metadata dict is stored as one JSON string, so a resumed run gets back exactly the
saved keys, and keys added since keep their defaults instead of failing the load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.app_state import apply_loaded, dcp_state, split_app_state
from trainer.rng_state import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^step_(\d+)\..*tmp$")  # step_000200.tmp and step_000200.old.tmp
_FIX = "delete that directory or set checkpoint.resume to another checkpoint (or 'none')"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint, and what to resume from.

    dir: "" means <run dir>/checkpoints; a relative path is relative to the working directory.
    interval: save every `interval` optimizer steps; 0 saves only at the end and on preemption.
    keep_last: complete checkpoints to keep; 0 keeps every one.
    resume: "auto" (newest complete checkpoint in `dir`, or a fresh start if none), "none" (fresh
        start even if checkpoints exist), or the path of one step_NNNNNN directory.
    at_end: save after the last step. Throughput runs turn it off: a Qwen3-30B-width 4-layer
        model on one GPU writes ~48 GB of weights and optimizer state that nobody resumes from.
        Preemption still saves.
    """

    dir: str = ""
    interval: int = 0
    keep_last: int = 3
    resume: str = "auto"
    at_end: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 0:
            raise ValueError(f"checkpoint.interval must be an integer >= 0 (0 = only at the end "
                             f"and on preemption), got {self.interval!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be an integer >= 0 (0 = keep all), "
                             f"got {self.keep_last!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"checkpoint.resume must be 'auto', 'none' or the path of a "
                             f"checkpoint directory, got {self.resume!r}")


# --------------------------------------------------------------------------------------------
# files


def _fsync(path: Path) -> None:
    """fsync a file, or a directory: a rename is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _list_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _run_dcp(op: Callable[..., Any], state: dict[str, Any], path: Path, fail: str) -> None:
    """dcp.save or dcp.load, single-process without a process group, errors as RuntimeError."""
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():
            # Without a process group DCP warns on every call; a single process is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            op(state, checkpoint_id=str(path), no_dist=no_dist)
    except CheckpointException as exc:  # a BaseException, which `except Exception` would miss
        raise RuntimeError(f"checkpoint {path}: {fail}. DCP said:\n{exc}") from exc


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint `path`, after checking that every file it lists is intact.

    Any defect raises RuntimeError naming the path: resuming from scratch or from an older
    checkpoint without being asked would silently throw away training.
    """
    if not path.is_dir():
        raise RuntimeError(f"checkpoint {path} is not a directory; name a step_* directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        hint = ""
        if any(_STEP_DIR.match(p.name) for p in path.iterdir() if p.is_dir()):
            hint = " (this looks like a checkpoints root; name one of its step_* directories)"
        raise RuntimeError(f"checkpoint {path} has no {MANIFEST}, so it is incomplete or not a "
                           f"checkpoint{hint}; {_FIX}")
    try:
        manifest = json.loads(manifest_path.read_text())
        step, files, complete = manifest["step"], manifest["files"], manifest["complete"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"checkpoint {path}: {MANIFEST} is corrupt ({exc!r}); {_FIX}") from exc
    if complete is not True or not isinstance(step, int) or not isinstance(files, dict):
        raise RuntimeError(f"checkpoint {path}: {MANIFEST} is malformed or not marked complete; "
                           f"{_FIX}")
    name_match = _STEP_DIR.match(path.name)
    if name_match and int(name_match.group(1)) != step:
        raise RuntimeError(f"checkpoint {path}: {MANIFEST} says step {step}, the directory name "
                           f"says {int(name_match.group(1))}; {_FIX}")
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise RuntimeError(f"checkpoint {path}: {file} is missing or truncated (manifest says "
                               f"{size} bytes); {_FIX}")
    try:
        dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the same thing
        raise RuntimeError(f"checkpoint {path}: DCP metadata {path / '.metadata'} is unreadable "
                           f"({exc!r}); {_FIX}") from exc
    return manifest


# --------------------------------------------------------------------------------------------
# the manager


class CheckpointManager:
    """Saves and restores a training run; every rank calls every public method except latest().

    app_state is a dict such as {"model": model, "optim": optimizer, "sched": scheduler,
    "meta": {"consumed_samples": 0}}: at most one nn.Module and one Optimizer, any objects with
    state_dict()/load_state_dict(), and dicts of JSON metadata (identical on every rank; restored
    in place). The RNG states of every rank are saved and restored without being listed.
    The directory must be on a filesystem all nodes see: rank 0 lists and renames every file.
    """

    def __init__(self, cfg: CheckpointConfig | Mapping[str, Any], run_dir: str | os.PathLike,
                 rank: int = 0, world_size: int = 1) -> None:
        if not isinstance(cfg, CheckpointConfig):
            cfg = CheckpointConfig(**cfg)  # a Hydra DictConfig: validate it like the dataclass
        cfg.validate()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"CheckpointManager: rank {rank} / world_size {world_size} invalid; "
                             f"need 0 <= rank < world_size")
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"CheckpointManager: world_size={world_size} but no default "
                               f"process group is initialised; call dist.init_process_group first")
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.rank = rank
        self.world_size = world_size
        self._distributed = world_size > 1
        self._last_saved_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether an interval checkpoint falls on `step`."""
        return self.cfg.interval > 0 and step > 0 and step % self.cfg.interval == 0

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}"

    # ---- save

    def save(self, step: int, app_state: Mapping[str, Any]) -> Path:
        """Write checkpoint `step`; returns its directory once it is complete on every rank."""
        final = self.path_for(step)
        if step == self._last_saved_step:
            return final  # the end-of-run or preemption save landed on an interval step
        parts = split_app_state(app_state)
        tmp = final.with_name(final.name + ".tmp")
        started = time.monotonic()

        def prepare() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                log.warning("removing %s left by an earlier save that did not finish", tmp)
                shutil.rmtree(tmp)

        self._on_rank0(prepare)
        _run_dcp(dcp.save, dcp_state(parts), tmp, "writing failed")
        rng_path = tmp / _rng_file(self.rank)
        torch.save(capture_rng_state(), rng_path)
        _fsync(rng_path)
        if self._distributed:
            dist.barrier()  # every rank's files are on disk before rank 0 declares completeness
        self._on_rank0(lambda: self._finalize(step, tmp, final))
        self._last_saved_step = step
        log.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
        return final

    def _finalize(self, step: int, tmp: Path, final: Path) -> None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "step": step,
            "world_size": self.world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": _list_files(tmp),
            "complete": True,  # the marker: written last, after every file above
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        replaced = None
        if final.exists():
            # Same step saved by an earlier run (resume=none, or resumed from an older step):
            # the new state wins, and the old one is out of the way before the rename.
            replaced = final.with_name(final.name + ".old.tmp")
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        tmp.rename(final)
        _fsync(self.dir)
        if replaced is not None:
            shutil.rmtree(replaced)
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Delete complete checkpoints beyond keep_last, and unfinished saves, older than `step`.

        Checkpoints with a higher step are left alone: they belong to another trajectory in the
        same directory (resume=none), and deleting them is the user's call.
        """
        complete, unfinished, newer = [], [], []
        for entry in self.dir.iterdir():
            if m := _STEP_DIR.match(entry.name):
                (newer if int(m.group(1)) > step else complete).append((int(m.group(1)), entry))
            elif (m := _TMP_DIR.match(entry.name)) and int(m.group(1)) < step:
                unfinished.append(entry)
        if newer:
            log.warning("%s holds checkpoints newer than step %d from another run (%s); a later "
                        "resume=auto would pick those", self.dir, step,
                        ", ".join(p.name for _, p in sorted(newer)))
        doomed = sorted(complete)[: -self.cfg.keep_last] if self.cfg.keep_last else []
        for path in [p for _, p in doomed] + unfinished:
            log.info("deleting old checkpoint %s", path)
            shutil.rmtree(path)

    # ---- load

    def latest(self) -> Path | None:
        """The newest complete checkpoint in the directory, or None.

        Unfinished saves (*.tmp) are reported and skipped. The newest step_* directory must be
        intact: if it is not, this raises RuntimeError rather than falling back to an older one.
        """
        if not self.dir.is_dir():
            return None
        steps, unfinished = [], []
        for entry in self.dir.iterdir():
            if entry.is_dir() and (m := _STEP_DIR.match(entry.name)):
                steps.append((int(m.group(1)), entry))
            elif _TMP_DIR.match(entry.name):
                unfinished.append(entry.name)
        if unfinished:
            log.warning("ignoring unfinished checkpoint saves in %s: %s", self.dir,
                        ", ".join(sorted(unfinished)))
        if not steps:
            return None
        newest = max(steps)[1]
        _read_manifest(newest)
        return newest

    def load(self, app_state: Mapping[str, Any], resume: str | None = None) -> int | None:
        """Restore app_state (in place) and every rank's RNG; returns the step, or None if fresh.

        resume defaults to cfg.resume: "auto", "none", or a checkpoint directory.
        """
        resume = self.cfg.resume if resume is None else resume
        parts = split_app_state(app_state)
        # Rank 0 decides and tells the others, so every rank resumes from the same checkpoint
        # and an error raises on every rank instead of leaving the rest waiting in a collective.
        path, manifest = self._on_rank0(lambda: self._resolve(resume))
        if path is None:
            return None
        state = dcp_state(parts)
        _run_dcp(dcp.load, state, path, f"loading failed: damaged, or app_state differs from "
                                        f"the saved one; {_FIX}")
        apply_loaded(parts, state)
        rng_path = path / _rng_file(self.rank)
        if rng_path.is_file():
            restore_rng_state(torch.load(rng_path, weights_only=True))
        else:
            log.warning("%s has no RNG state for rank %d (saved with world_size=%s); this rank "
                        "keeps its current RNG, so results will differ from an uninterrupted run",
                        path, self.rank, manifest.get("world_size"))
        self._last_saved_step = manifest["step"]
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return manifest["step"]

    def _resolve(self, resume: str) -> tuple[Path | None, dict[str, Any]]:
        if resume == "none":
            # Only a name check: a damaged checkpoint must not stop a run told to ignore it.
            if self.dir.is_dir() and any(_STEP_DIR.match(p.name) for p in self.dir.iterdir()):
                log.warning("checkpoint.resume=none: starting fresh although %s holds "
                            "checkpoints; new saves go to the same directory", self.dir)
            return None, {}
        if resume == "auto":
            path = self.latest()
            if path is None:
                log.info("no checkpoint in %s; starting fresh", self.dir)
                return None, {}
        else:
            path = Path(resume)
            if not path.exists():
                raise FileNotFoundError(f"checkpoint.resume={resume!r}: {path} does not exist; "
                                        f"allowed: 'auto', 'none' or an existing step_* directory")
        return path, _read_manifest(path)

    # ---- collectives

    def _on_rank0(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 only and hand its result, or its exception, to every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        if self._distributed:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            if self.rank != 0:
                result, error = box[0]
        if error is not None:
            raise error
        return result
