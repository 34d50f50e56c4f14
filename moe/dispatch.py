"""Dispatch step of the MoE layer: where routed rows travel to the ranks owning their experts.

The layer calls `dispatch` between permute and the experts and `combine` after them. With one
expert-parallel rank (EP=1) nothing travels: `LocalDispatcher` passes rows through unchanged.
The all-to-all dispatcher for EP>1 implements the same two methods (trainer/ applies it to a
built model; the model code stays free of parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs to undo dispatch. Empty for the local dispatcher."""

    num_rows: int  # M rows that entered dispatch
    extra: Optional[object] = None  # dispatcher-specific (split sizes, handles)


class LocalDispatcher:
    """EP=1: every expert is local, so dispatch and combine are identities."""

    def dispatch(
        self, x_MH: torch.Tensor, tokens_per_expert_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        return x_MH, tokens_per_expert_E, DispatchMeta(num_rows=x_MH.shape[0])

    def combine(self, y_MH: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return y_MH
