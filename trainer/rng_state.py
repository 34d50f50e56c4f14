"""Per-process RNG state for checkpoints: python, numpy, torch CPU and the current CUDA device."""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.safe_dcp import DamagedCheckpointError, safe_torch_load

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy's global generator, torch CPU and current CUDA.

    Only plain types and tensors, so the file loads with `torch.load(weights_only=True)`.
    CUDA: only the current device, because asking for every device's state would create a CUDA
    context on each GPU of the node from every rank.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            log.warning("checkpoint has a CUDA RNG state but CUDA is unavailable; not restored")


def rng_file_bytes() -> bytes:
    """`capture_rng_state()` as the bytes of a torch.save file (written by the caller, so a full
    disk raises OSError(ENOSPC) from Python rather than a position error from torch's writer)."""
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    return buffer.getvalue()


def read_rng_file(path: Path) -> dict[str, Any]:
    """The RNG states in a file `rng_file_bytes` wrote, for `restore_rng_state`.

    Anything else raises DamagedCheckpointError naming the file (UnsafeCheckpointError if it
    names a Python global), never advising an unsafe `torch.load`.
    """
    what = f"RNG state file {path}"
    state = safe_torch_load(path, what)
    numpy_state = state.get("numpy") if isinstance(state, dict) else None
    if (not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys()
            or not isinstance(numpy_state, (list, tuple)) or len(numpy_state) != 5
            or not isinstance(state["torch"], torch.Tensor)):
        raise DamagedCheckpointError(f"{what} does not hold the python, numpy and torch RNG "
                                     f"states; the checkpoint is damaged")
    return state
