"""FP8 recipes for the experts: how each GEMM operand is scaled. E4M3 everywhere.

    rowwise     activations and gradients: one scale per row of the reduction dimension;
                weights: one scale per output channel (and per input channel for the
                transposed copy dgrad reads); weight gradients: per-expert column scales along
                tokens. GEMMs: torch._scaled_grouped_mm (CUTLASS).
    blockwise   DeepSeek-V3: 1x128 tiles for activations and gradients, 128x128 blocks for
                weights (the transposed weight reuses the same blocks, so weights are quantized
                once per step). GEMMs: our Triton grouped GEMM.
    tensorwise  one scale per tensor (per expert for weights).

`align` is the row alignment the weight-gradient GEMMs need for each expert's token group:
the 2d x 2d grouped GEMM contracts over tokens, and FP8 TMA loads need 16-byte (16-element)
aligned group starts; blockwise scales come in 128-token tiles, so its groups start at 128.
"""

from __future__ import annotations

from dataclasses import dataclass

RECIPES = ("rowwise", "blockwise", "tensorwise")


@dataclass(frozen=True)
class Fp8Recipe:
    name: str
    pow2_scales: bool = False

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"fp8.experts recipe must be one of {RECIPES}, got {self.name!r}")

    @property
    def block(self) -> int:
        """Tile length along the reduction dimension for activations (0: a whole row)."""
        return 128 if self.name == "blockwise" else 0

    @property
    def align(self) -> int:
        """Per-expert token-group alignment of the weight-gradient operands."""
        return 128 if self.name == "blockwise" else 16
