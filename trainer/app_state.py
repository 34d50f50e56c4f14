"""What the training loop hands a checkpoint (`app_state`), sorted into the paths it takes into
torch.distributed.checkpoint: one model and one optimizer through get/set_state_dict, other
stateful objects through their state_dict, and metadata dicts as one JSON string each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


@dataclass
class AppParts:
    """app_state sorted by kind, because each kind takes a different path into DCP."""

    model_key: str | None = None
    model: nn.Module | None = None
    optim_key: str | None = None
    optim: torch.optim.Optimizer | None = None
    stateful: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, dict] = field(default_factory=dict)


def split_app_state(app_state: Mapping[str, Any]) -> AppParts:
    parts = AppParts()
    for key, value in app_state.items():
        if isinstance(value, nn.Module):
            if parts.model is not None:
                raise ValueError(f"app_state has two models ({parts.model_key!r}, {key!r}); "
                                 f"allowed: one nn.Module (wrap several in one module)")
            parts.model_key, parts.model = key, value
        elif isinstance(value, torch.optim.Optimizer):
            if parts.optim is not None:
                raise ValueError(f"app_state has two optimizers ({parts.optim_key!r}, {key!r}); "
                                 f"allowed: one torch.optim.Optimizer")
            parts.optim_key, parts.optim = key, value
        elif isinstance(value, dict):
            parts.meta[key] = value
        elif hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
            parts.stateful[key] = value
        else:
            raise ValueError(f"app_state[{key!r}] is a {type(value).__name__}; allowed: an "
                             f"nn.Module, an Optimizer, an object with state_dict() and "
                             f"load_state_dict() (LR scheduler, data loader), or a dict of JSON "
                             f"metadata")
    if parts.optim is not None and parts.model is None:
        raise ValueError(f"app_state[{parts.optim_key!r}] is an optimizer but app_state has no "
                         f"nn.Module; get_state_dict needs the model to name optimizer state")
    return parts


def dcp_state(parts: AppParts) -> dict[str, Any]:
    """The dict handed to dcp.save, or the template dcp.load fills in place."""
    state: dict[str, Any] = {}
    if parts.model is not None and parts.optim is not None:
        # On a fresh optimizer this also creates its (zero) state, so a load has tensors to fill.
        state[parts.model_key], state[parts.optim_key] = get_state_dict(parts.model, parts.optim)
    elif parts.model is not None:
        state[parts.model_key] = get_model_state_dict(parts.model)
    for key, obj in parts.stateful.items():
        state[key] = obj.state_dict()
    for key, meta in parts.meta.items():
        try:
            state[key] = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"app_state[{key!r}] must hold JSON-serialisable metadata (ints, "
                             f"floats, strings, lists, dicts): {exc}") from exc
    return state


def apply_loaded(parts: AppParts, state: dict[str, Any]) -> None:
    if parts.model is not None and parts.optim is not None:
        set_state_dict(parts.model, parts.optim, model_state_dict=state[parts.model_key],
                       optim_state_dict=state[parts.optim_key])
    elif parts.model is not None:
        set_model_state_dict(parts.model, state[parts.model_key])
    for key, obj in parts.stateful.items():
        obj.load_state_dict(state[key])
    for key, meta in parts.meta.items():
        meta.update(json.loads(state[key]))  # in place: the loop holds a reference to this dict
