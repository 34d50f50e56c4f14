"""FP8 recipes for the experts: how each GEMM operand is scaled. E4M3 everywhere.

    rowwise     activations and gradients: one scale per row of the reduction dimension;
                weights: one scale per output channel (and per input channel for the
                transposed copy dgrad reads); weight gradients: per-expert column scales along
                tokens. GEMMs: torch._scaled_grouped_mm (CUTLASS) forward and dgrad, our
                Triton grouped GEMM for the weight gradients (moe/fp8/gemm.py says why).
    blockwise   DeepSeek-V3: 1x128 tiles for activations and gradients, 128x128 blocks for
                weights (the transposed weight reuses the same blocks, so weights are quantized
                once per step). GEMMs: our Triton grouped GEMM.
(Tensorwise scaling exists for weights in kernels/quantize_weight.py, but the expert path has no
tensorwise activation kernels or GEMM call yet, so it is not offered as an expert recipe.)

`align` is the row alignment the weight-gradient GEMMs need for each expert's token group:
the 2d x 2d grouped GEMM contracts over tokens 128 at a time (one blockwise scale tile, one
promotion step), so every group starts at a multiple of 128 and a K step never holds tokens of
two experts. The padding is zero columns: at most E x 127 tokens of wgrad work (Mixtral-8x7B
width, 16k routed rows: ~3%; Qwen3-30B-A3B's 128 experts over 64k rows: ~12%).
"""

from __future__ import annotations

from dataclasses import dataclass

RECIPES = ("rowwise", "blockwise")


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
        return 128


# ---- dense layers (moe/fp8/float8_linear.py) ---------------------------------------------------
# Dense projections (attention, dense FFNs, shared experts) are plain 2d GEMMs, so they take the
# classic recipes: one scale per tensor, current (from this call's amax) or delayed (from an amax
# history, float8_experimental / TransformerEngine style), or one per row along the reduction dim.

DENSE_SCALINGS = ("tensorwise_delayed", "tensorwise", "rowwise")
GRAD_DTYPES = ("e4m3", "e5m2")


@dataclass(frozen=True)
class Float8LinearRecipe:
    """How a Float8Linear scales its operands.

    scaling       one of DENSE_SCALINGS
    grad_dtype    the output gradient's format: e4m3 (max 448, finer) or e5m2 (max 57344, wider range)
    history_len   tensorwise_delayed: amaxes kept per operand (the scale uses their max)
    margin        tensorwise_delayed: scale = max(history) * 2**margin / fmax; a margin > 0
                  leaves headroom for amaxes that grow between steps
    """

    scaling: str = "tensorwise"
    grad_dtype: str = "e4m3"
    history_len: int = 16
    margin: int = 0

    def __post_init__(self) -> None:
        if self.scaling not in DENSE_SCALINGS:
            raise ValueError(f"fp8.dense recipe must be one of {DENSE_SCALINGS}, got {self.scaling!r}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"fp8.dense_grad_dtype must be one of {GRAD_DTYPES}, got {self.grad_dtype!r}")
        if self.scaling == "rowwise" and self.grad_dtype != "e4m3":
            # quantize_rows writes E4M3 only, and E4M3 x E5M2 rowwise _scaled_mm is not on every build.
            raise ValueError(f"fp8.dense=rowwise takes fp8.dense_grad_dtype=e4m3 only, got {self.grad_dtype!r}")
        if self.history_len < 1:
            raise ValueError(f"fp8.amax_history_len must be >= 1, got {self.history_len}")
        if self.margin < 0:
            raise ValueError(f"fp8.amax_margin must be >= 0, got {self.margin}")

    @property
    def delayed(self) -> bool:
        return self.scaling == "tensorwise_delayed"
