"""Per-process RNG state for checkpoints: python, numpy, torch CPU and the current CUDA device."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

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
