"""Where a training run meets Hugging Face weights: `init_from_hf` on a fresh start
(checkpoint.init_from_hf; trainer/loop.py `Trainer.resume` calls it when no checkpoint is resumed,
so a resumed run keeps its own weights) and `export_at_end` after the last step
(checkpoint.export_hf_at_end; trainer/run.py), which converts the final checkpoint, every rank
writing its share of the files (interop/hf_export.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from interop.checkpoint_tensors import CheckpointTensors
from interop.hf_export import export_hf
from interop.hf_import import load_hf_weights

log = logging.getLogger("fp8moe")


def init_from_hf(trainer) -> None:
    """A fresh start's weights from checkpoint.init_from_hf (nothing when it is empty)."""
    hf_dir = trainer.cfg.checkpoint.init_from_hf
    if hf_dir:
        load_hf_weights(trainer.model, hf_dir, trainer.cfg.model)


def export_dir(trainer) -> Path:
    return Path(trainer.cfg.checkpoint.export_hf_dir or Path(trainer.run_dir) / "hf")


def export_at_end(trainer) -> Path | None:
    """The run's last checkpoint as an HF model in checkpoint.export_hf_dir (when export_hf_at_end)."""
    ck, env = trainer.cfg.checkpoint, trainer.env
    if not ck.export_hf_at_end:
        return None
    step = trainer.ckpt.last_saved_step
    if step is None:
        log.warning("checkpoint.export_hf_at_end: no checkpoint was saved, nothing to export")
        return None
    if step != trainer.step:
        log.warning("checkpoint.export_hf_at_end: exporting step %d, the last checkpoint (step %d was not "
                    "saved: a non-finite streak)", step, trainer.step)  # fmt: skip
    # Just written by this run, so not hashed again.
    source = CheckpointTensors(trainer.ckpt.path_for(step), verify=False)
    barrier = dist.barrier if env.distributed else (lambda: None)
    return export_hf(source.load, trainer.cfg.model, export_dir(trainer), dtype=ck.export_hf_dtype,
                     base_dir=ck.init_from_hf or None, overwrite=True, rank=env.rank,
                     world_size=env.world_size, barrier=barrier)  # fmt: skip
