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
        config.json           the resolved run config, when the caller passes one
        manifest.json         written last by rank 0: step, files, sizes, CRC32s, "complete"
      step_000200.tmp/        a save that never finished (crash, SIGKILL); resume ignores it

What a checkpoint guarantees: it appears under its final name only once complete (atomic
rename); every file is checked against the manifest's size and CRC32 before anything is loaded
(checkpoint.verify); loading never runs code from the files (trainer/safe_dcp.py); and a save
that fails, a full disk included, leaves no partial directory and touches no complete one.

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
import pickle
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.app_state import apply_loaded, dcp_state, split_app_state
from trainer.checkpoint_config import CheckpointConfig
from trainer.checkpoint_files import (
    CHECKSUM,
    CONFIG,
    FIX,
    MANIFEST,
    MANIFEST_FORMAT,
    STEP_DIR,
    TMP_DIR,
    DiskFullError,
    checksums,
    disk_full,
    fsync,
    list_files,
    read_config,
    read_manifest,
    verify_checksums,
    write_durably,
)
from trainer.rng_state import read_rng_file, restore_rng_state, rng_file_bytes
from trainer.safe_dcp import (
    DamagedCheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    read_dcp_metadata,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `CheckpointManager.load` resumed from; the loop compares `config` with its own."""

    path: Path
    step: int
    manifest: dict[str, Any]
    config: dict[str, Any] | None  # None: saved without one


def _run_dcp(op: Callable[..., Any], state: dict[str, Any], path: Path, fail: str,
             **kwargs: Any) -> None:
    """dcp.save or dcp.load, single-process without a process group, errors as RuntimeError."""
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():
            # Without a process group DCP warns on every call; a single process is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            op(state, checkpoint_id=str(path), no_dist=no_dist, **kwargs)
    except CheckpointException as exc:  # a BaseException, which `except Exception` would miss
        for failure in exc.failures.values():  # rank -> (exception, traceback)
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, (UnsafeCheckpointError, DamagedCheckpointError)):
                raise type(cause)(str(cause)) from None  # already names file and cause
        raise RuntimeError(f"checkpoint {path}: {fail}. DCP said:\n{exc}") from exc


def _config_json(config: Mapping[str, Any] | None) -> bytes | None:
    if config is None:
        return None
    try:
        return json.dumps(dict(config), indent=1).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save(config=...) must be a JSON-serialisable mapping (the resolved "
                         f"run config): {exc}") from exc


def _portable(exc: Exception, rank: int) -> Exception:
    """exc, or a RuntimeError with its message if it cannot be pickled to the other ranks."""
    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"rank {rank}: {type(exc).__name__}: {exc}")


class CheckpointManager:
    """Saves and restores a training run; every rank calls every public method except latest().

    app_state is a dict such as {"model": model, "optim": optimizer, "sched": scheduler,
    "meta": {"consumed_samples": 0}}: at most one nn.Module and one Optimizer, any objects with
    state_dict()/load_state_dict(), and dicts of JSON metadata (identical on every rank; restored
    in place). The RNG states of every rank are saved and restored without being listed.
    The directory must be on a filesystem all nodes see: rank 0 lists and renames every file.
    After a load, `loaded` tells what was resumed from (None for a fresh start).
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
        self.loaded: LoadedCheckpoint | None = None
        if not cfg.verify and rank == 0:
            log.info("checkpoint.verify=false: checkpoints are written without checksums")

    @property
    def last_saved_step(self) -> int | None:
        """The step of the last checkpoint this run saved or resumed from (None: neither yet)."""
        return self._last_saved_step

    def due(self, step: int) -> bool:
        """Whether an interval checkpoint falls on `step`."""
        return self.cfg.interval > 0 and step > 0 and step % self.cfg.interval == 0

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}"

    # ---- save

    def save(self, step: int, app_state: Mapping[str, Any], *,
             config: Mapping[str, Any] | None = None, protect: Collection[int] = ()) -> Path:
        """Write checkpoint `step`; returns its directory once it is complete on every rank.

        config: the resolved run config (JSON types), saved as config.json and handed back by
            `load` in `loaded.config`.
        protect: steps whose checkpoints pruning never deletes, on top of the keep_last newest
            (the loop passes the last checkpoint saved before a run of non-finite steps, so
            keep_last cannot prune every good state away).
        A failed save (DiskFullError when the disk is full) leaves no step_*.tmp behind and
        touches no complete checkpoint.
        """
        final = self.path_for(step)
        if step == self._last_saved_step:
            return final  # the end-of-run or preemption save landed on an interval step
        parts = split_app_state(app_state)
        config_bytes = _config_json(config)
        tmp = final.with_name(final.name + ".tmp")
        started = time.monotonic()

        def prepare() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                log.warning("removing %s left by an earlier save that did not finish", tmp)
                shutil.rmtree(tmp)

        def write() -> None:  # every rank: DCP's files (collectively), its RNG, rank 0 the config
            try:
                _run_dcp(dcp.save, dcp_state(parts), tmp, "writing failed")
                write_durably(tmp / _rng_file(self.rank), rng_file_bytes())
                if self.rank == 0 and config_bytes is not None:
                    write_durably(tmp / CONFIG, config_bytes)
            except (OSError, RuntimeError) as exc:
                raise disk_full(exc, self.dir, f"checkpoint {tmp}") or exc

        self._on_rank0(prepare)
        try:
            self._on_every_rank(write)  # also the barrier: every file is on disk after it
            files = self._on_rank0(lambda: list_files(tmp))
            sums: dict[str, str] | None = None
            if self.cfg.verify:
                names = sorted(files)[self.rank::self.world_size]
                sums = {}
                for share in self._on_every_rank(lambda: checksums(tmp, names)):
                    sums.update(share)
            self._on_rank0(lambda: self._finalize(step, tmp, final, files, sums,
                                                  set(protect)))
        except Exception:
            if self.rank == 0:  # every rank is past its writes: each raise follows a collective
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._last_saved_step = step
        log.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
        return final

    def _finalize(self, step: int, tmp: Path, final: Path, files: dict[str, int],
                  sums: dict[str, str] | None, protect: set[int]) -> None:
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "step": step,
            "world_size": self.world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        if sums is not None:
            manifest |= {"checksum": CHECKSUM, "checksums": sums}
        manifest["complete"] = True  # the marker: written last, after every file above
        try:
            write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            fsync(tmp)
        except OSError as exc:
            raise disk_full(exc, self.dir, f"checkpoint {tmp}") or exc
        replaced = None
        if final.exists():
            # Same step saved by an earlier run (resume=none, or resumed from an older step):
            # the new state wins, and the old one is out of the way before the rename.
            replaced = final.with_name(final.name + ".old.tmp")
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        tmp.rename(final)
        fsync(self.dir)
        if replaced is not None:
            shutil.rmtree(replaced)
        self._prune(step, protect)

    def _prune(self, step: int, protect: set[int]) -> None:
        """Delete complete checkpoints beyond keep_last (but never a protected step), and
        unfinished saves, older than `step`.

        Checkpoints with a higher step are left alone: they belong to another trajectory in the
        same directory (resume=none), and deleting them is the user's call.
        """
        complete, unfinished, newer = [], [], []
        for entry in self.dir.iterdir():
            if m := STEP_DIR.match(entry.name):
                (newer if int(m.group(1)) > step else complete).append((int(m.group(1)), entry))
            elif (m := TMP_DIR.match(entry.name)) and int(m.group(1)) < step:
                unfinished.append(entry)
        if newer:
            log.warning("%s holds checkpoints newer than step %d from another run (%s); a later "
                        "resume=auto would pick those", self.dir, step,
                        ", ".join(p.name for _, p in sorted(newer)))
        doomed = sorted(complete)[: -self.cfg.keep_last] if self.cfg.keep_last else []
        for path in [p for s, p in doomed if s not in protect] + unfinished:
            log.info("deleting old checkpoint %s", path)
            shutil.rmtree(path)

    # ---- load

    def latest(self) -> Path | None:
        """The newest complete checkpoint in the directory, or None.

        Unfinished saves (*.tmp) are reported and skipped. The newest step_* directory must be
        complete (its manifest, every file at its size): if it is not, this raises RuntimeError
        rather than falling back to an older one. Checksums are checked by `load`.
        """
        if not self.dir.is_dir():
            return None
        steps, unfinished = [], []
        for entry in self.dir.iterdir():
            if entry.is_dir() and (m := STEP_DIR.match(entry.name)):
                steps.append((int(m.group(1)), entry))
            elif TMP_DIR.match(entry.name):
                unfinished.append(entry.name)
        if unfinished:
            log.warning("ignoring unfinished checkpoint saves in %s: %s", self.dir,
                        ", ".join(sorted(unfinished)))
        if not steps:
            return None
        newest = max(steps)[1]
        read_manifest(newest)
        return newest

    def load(self, app_state: Mapping[str, Any], resume: str | None = None) -> int | None:
        """Restore app_state (in place) and every rank's RNG; returns the step, or None if fresh.

        resume defaults to cfg.resume: "auto", "none", or a checkpoint directory. Before any
        state changes, every file is checked against the manifest (sizes, then checksums, each
        rank hashing files[rank::world_size]); every rank raises the same error if one fails.
        Afterwards `self.loaded` holds the step, manifest and saved config.
        """
        resume = self.cfg.resume if resume is None else resume
        parts = split_app_state(app_state)
        self.loaded = None
        # Rank 0 decides and tells the others, so every rank resumes from the same checkpoint
        # and an error raises on every rank instead of leaving the rest waiting in a collective.
        path, manifest = self._on_rank0(lambda: self._resolve(resume))
        if path is None:
            return None
        self._verify(path, manifest)
        listed = set(manifest["files"])
        config = self._on_rank0(lambda: self._read_checked(path, manifest, listed))
        rng: dict[str, Any] = {}  # this rank's, read (and agreed on) before any state changes
        self._on_every_rank(lambda: rng.update(state=self._read_rng(path, manifest)))
        state = dcp_state(parts)
        _run_dcp(dcp.load, state, path, f"loading failed: damaged, or app_state differs from "
                                        f"the saved one; {FIX}",
                 storage_reader=SafeFileSystemReader(path, listed), planner=SafeLoadPlanner(path))
        apply_loaded(parts, state)
        if rng["state"] is not None:
            try:
                restore_rng_state(rng["state"])
            except (TypeError, ValueError, RuntimeError) as exc:
                raise DamagedCheckpointError(f"checkpoint {path}: {_rng_file(self.rank)} holds "
                                             f"an invalid RNG state ({exc}); {FIX}") from exc
        self._last_saved_step = manifest["step"]
        self.loaded = LoadedCheckpoint(path, manifest["step"], manifest, config)
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return manifest["step"]

    def _resolve(self, resume: str) -> tuple[Path | None, dict[str, Any]]:
        if resume == "none":
            # Only a name check: a damaged checkpoint must not stop a run told to ignore it.
            if self.dir.is_dir() and any(STEP_DIR.match(p.name) for p in self.dir.iterdir()):
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
        return path, read_manifest(path)

    def _verify(self, path: Path, manifest: dict[str, Any]) -> None:
        if not self.cfg.verify:
            if self.rank == 0:
                log.info("checkpoint.verify=false: loading %s without checking its checksums",
                         path)
            return
        if "checksums" not in manifest:
            if self.rank == 0:
                log.warning("%s has no checksums (saved by an older version or with "
                            "checkpoint.verify=false): loading it unverified", path)
            return
        names = sorted(manifest["files"])[self.rank::self.world_size]
        self._on_every_rank(lambda: verify_checksums(path, manifest, names))

    @staticmethod
    def _read_checked(path: Path, manifest: dict[str, Any],
                      listed: set[str]) -> dict[str, Any] | None:
        """DCP metadata through the allow-list (before DCP reads it), and the saved config."""
        try:
            read_dcp_metadata(path, listed)
        except DamagedCheckpointError as exc:
            raise DamagedCheckpointError(f"{exc}; {FIX}") from exc
        return read_config(path, manifest)

    def _read_rng(self, path: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
        rng_path = path / _rng_file(self.rank)
        if rng_path.is_file():
            try:
                return read_rng_file(rng_path)
            except DamagedCheckpointError as exc:
                raise DamagedCheckpointError(f"checkpoint {path}: {exc}; {FIX}") from None
        log.warning("%s has no RNG state for rank %d (saved with world_size=%s); this rank keeps "
                    "its current RNG, so results will differ from an uninterrupted run",
                    path, self.rank, manifest.get("world_size"))
        return None

    # ---- collectives

    def _on_rank0(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 only and hand its result, or its exception, to every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = _portable(exc, self.rank)
        if self._distributed:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            if self.rank != 0:
                result, error = box[0]
        if error is not None:
            raise error
        return result

    def _on_every_rank(self, fn: Callable[[], T]) -> list[T]:
        """Run fn on every rank; hand every rank all results in rank order, or the same exception.

        That exception is the lowest rank's, a full disk first (it explains the others' errors).
        """
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = _portable(exc, self.rank)
        outcomes: list[Any] = [(result, error)]
        if self._distributed:
            outcomes = [None] * self.world_size
            dist.all_gather_object(outcomes, (result, error))
        failed = [r for r, (_, e) in enumerate(outcomes) if e is not None]
        if failed:
            first = next((r for r in failed if isinstance(outcomes[r][1], DiskFullError)),
                         failed[0])
            raise error if first == self.rank else outcomes[first][1]
        return [r for r, _ in outcomes]
