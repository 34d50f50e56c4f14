"""What the MoE layer hands its experts, and the dispatcher that decides it.

Shape letters (README.md): T tokens, A experts a token is routed to (top-k), H hidden, E experts
(those of this rank), M routed rows.

The layer's path: route -> `plan_permute` -> `dispatcher.dispatch` -> experts -> `dispatcher.combine`
-> `unpermute`. A dispatcher takes the tokens, their permutation and the per-expert counts, and
returns one `ExpertInput` (and a handle for `combine`); the experts compute on whatever form it
holds, and `combine` brings their (M, H) outputs back in the permutation's row order.

- `LocalDispatcher` (EP=1): every expert is local, so no row travels: the experts get the tokens
  and the permutation, and gather the rows themselves (the FP8 experts inside their quantization,
  so FP8 bytes are what leaves the permutation). `combine` is the identity.
- `moe.all_to_all.AllToAllDispatcher` (EP>1, installed by trainer/parallel.py on a built model):
  the rows travel, so the experts get the rows that arrived, optionally already in FP8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

from moe.permute import PermuteMeta, gather_rows


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts' GEMMs run in: autocast's when it is on (fp32 master weights, bf16
    compute), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass(frozen=True)
class Fp8Rows:
    """Rows already quantized for the experts' first GEMM: q_MH E4M3, scale (M,) or (M, H // 128)."""

    q_MH: Tensor
    scale: Tensor


@dataclass(frozen=True)
class ExpertInput:
    """The rows the experts compute on, grouped by expert, in one of two forms:

    tokens  `perm` set: `x` is x_TH, the tokens, and the rows are x_TH[perm.token_idx_M]
            (no row has moved yet; the experts gather them)
    rows    `perm` None: `x` is x_MH, the rows themselves, grouped by expert; `fp8` optionally
            holds their E4M3 bytes and scales (FP8 on the wire; x then holds the dequantized
            values, the autograd handle for dx)
    tokens_per_expert_E: int64 (E,) counts of this rank's experts; rows past their sum belong to
    no expert (dropped by a capacity limit) and come back from the experts as unspecified values.
    """

    x: Tensor
    tokens_per_expert_E: Tensor
    perm: Optional[PermuteMeta] = None
    fp8: Optional[Fp8Rows] = None

    def __post_init__(self) -> None:
        if self.x.dim() != 2:
            raise ValueError(f"experts take 2-D x (rows or tokens by hidden), got shape {tuple(self.x.shape)}")
        if self.perm is not None and self.fp8 is not None:
            raise ValueError("an ExpertInput holds tokens with their permutation or FP8 rows, not both")
        if self.perm is not None and self.x.shape[0] != self.perm.num_tokens:
            raise ValueError(
                f"x must be the {self.perm.num_tokens} tokens the permutation groups, got {self.x.shape[0]} rows"
            )

    def rows(self, dtype: torch.dtype) -> Tensor:
        """x_MH in `dtype`: gathered from the tokens, or the rows themselves (differentiable)."""
        if self.perm is not None:
            return gather_rows(self.x, self.perm, dtype)
        return self.x.to(dtype)

    def group_end_E(self) -> Tensor:
        """int32 (E,) cumulative row ends of the expert groups (on the device, no sync)."""
        return torch.cumsum(self.tokens_per_expert_E, 0, dtype=torch.int32)


class Dispatcher(Protocol):
    def dispatch(
        self, x_TH: Tensor, perm: PermuteMeta, tokens_per_expert_E: Tensor
    ) -> tuple[ExpertInput, object]:
        """The experts' input, and a handle that `combine` needs."""
        ...

    def combine(self, y: Tensor, handle: object) -> Tensor:
        """The experts' outputs back as (M, H) rows in the permutation's order."""
        ...


class LocalDispatcher:
    """EP=1: no row travels; the experts get the tokens and their permutation."""

    def dispatch(
        self, x_TH: Tensor, perm: PermuteMeta, tokens_per_expert_E: Tensor
    ) -> tuple[ExpertInput, None]:
        return ExpertInput(x_TH, tokens_per_expert_E, perm=perm), None

    def combine(self, y_MH: Tensor, handle: None) -> Tensor:
        return y_MH
