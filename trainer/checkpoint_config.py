"""`checkpoint.*` of the run config: where and how often to save, what to resume from."""

from __future__ import annotations

import math
from dataclasses import dataclass

from interop.hf_config import EXPORT_DTYPES


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint, and what to resume from.

    dir: "" means <run dir>/checkpoints; a relative path is relative to the working directory.
    interval: save every `interval` optimizer steps; 0 saves only at the end and on preemption.
    interval_minutes: also save once this many minutes have passed since the last save (or the
        start), so a crash of a long run loses at most that much work; 0 disables. The training
        loop decides when it is due.
    keep_last: complete checkpoints to keep; 0 keeps every one.
    resume: "auto" (newest complete checkpoint in `dir`, or a fresh start if none), "none" (fresh
        start even if checkpoints exist), or the path of one step_NNNNNN directory.
    at_end: save after the last step. Throughput runs turn it off: a Qwen3-30B-width 4-layer
        model on one GPU writes ~48 GB of weights and optimizer state that nobody resumes from.
        Preemption still saves.
    verify: write a CRC32 of every file at save and check it at load (each rank hashes a share).
        False skips both, for checkpoints too large to read twice; such a checkpoint later
        loads unverified, with a warning.
    apply_changes: on resume, apply this run's values where they differ from the checkpoint's
        in what decides the trajectory (optimizer, lr schedule, data, batch, FP8 recipe, seed)
        instead of refusing the resume (trainer/resume.py).
    init_from_hf: a Hugging Face model directory (config.json + safetensors) a fresh start takes
        its weights from, each rank reading only its shards (interop/hf_import.py); the model
        config must have its architecture. A resumed run keeps its checkpoint's weights.
    export_hf_at_end: after the last step, convert the final checkpoint (so at_end must be true)
        into an HF model directory, export_hf_dir ("" = <run dir>/hf), in export_hf_dtype
        (interop/hf_export.py; tools/hf_export.py converts any saved checkpoint).
    """

    dir: str = ""
    interval: int = 0
    interval_minutes: float = 30.0
    keep_last: int = 3
    resume: str = "auto"
    at_end: bool = True
    verify: bool = True
    apply_changes: bool = False
    init_from_hf: str = ""
    export_hf_at_end: bool = False
    export_hf_dir: str = ""
    export_hf_dtype: str = "bfloat16"  # one of interop.hf_config.EXPORT_DTYPES

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 0:
            raise ValueError(f"checkpoint.interval must be an integer >= 0 (0 = only at the end "
                             f"and on preemption), got {self.interval!r}")
        minutes = self.interval_minutes
        if (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                or not math.isfinite(minutes) or minutes < 0):
            raise ValueError(f"checkpoint.interval_minutes must be a number >= 0 (0 = no "
                             f"time-based saves), got {minutes!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be an integer >= 0 (0 = keep all), "
                             f"got {self.keep_last!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"checkpoint.resume must be 'auto', 'none' or the path of a "
                             f"checkpoint directory, got {self.resume!r}")
        for name in ("at_end", "verify", "apply_changes", "export_hf_at_end"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"checkpoint.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}")
        for name in ("init_from_hf", "export_hf_dir"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"checkpoint.{name} must be a directory path or '', "
                                 f"got {getattr(self, name)!r}")
        if self.export_hf_dtype not in EXPORT_DTYPES:
            raise ValueError(f"checkpoint.export_hf_dtype must be one of {EXPORT_DTYPES}, "
                             f"got {self.export_hf_dtype!r}")
        if self.export_hf_at_end and not self.at_end:
            raise ValueError("checkpoint.export_hf_at_end=true converts the checkpoint saved after "
                             "the last step: it needs checkpoint.at_end=true")
