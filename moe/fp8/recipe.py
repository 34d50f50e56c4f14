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

from moe.config import require

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


def check_dense_fields(
    scaling: str, grad_dtype: str, history_len: int, margin: int, allowed: tuple[str, ...] = DENSE_SCALINGS
) -> None:
    """The dense recipe's fields, named as the `fp8` config group names them."""
    require(scaling in allowed, f"fp8.dense recipe must be one of {allowed}, got {scaling!r}")
    require(grad_dtype in GRAD_DTYPES, f"fp8.dense_grad_dtype must be one of {GRAD_DTYPES}, got {grad_dtype!r}")
    # quantize_rows writes E4M3 only, and E4M3 x E5M2 rowwise _scaled_mm is not on every build.
    require(scaling != "rowwise" or grad_dtype == "e4m3",
            f"fp8.dense=rowwise takes fp8.dense_grad_dtype=e4m3 only, got {grad_dtype!r}")  # fmt: skip
    require(history_len >= 1, f"fp8.amax_history_len must be >= 1, got {history_len}")
    require(margin >= 0, f"fp8.amax_margin must be >= 0, got {margin}")


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
        check_dense_fields(self.scaling, self.grad_dtype, self.history_len, self.margin)

    @property
    def delayed(self) -> bool:
        return self.scaling == "tensorwise_delayed"


# ---- the trainer's `fp8` config group (configs/fp8/*.yaml) ------------------------------------

FP8_EXPERT_RECIPES = ("bf16", *RECIPES)
FP8_DENSE_RECIPES = ("bf16", *DENSE_SCALINGS)


@dataclass
class FP8Config:
    experts: str = "bf16"  # one of FP8_EXPERT_RECIPES
    dense: str = "bf16"  # one of FP8_DENSE_RECIPES (attention, dense FFNs, shared experts)
    dense_grad_dtype: str = "e4m3"  # one of GRAD_DTYPES: dense layers' output-gradient format
    amax_history_len: int = 16  # dense=tensorwise_delayed: amaxes kept per operand
    amax_margin: int = 0  # dense=tensorwise_delayed: scale = max(history) * 2**margin / fmax
    pow2_scales: bool = False  # round scales to powers of two

    def validate(self) -> None:
        require(self.experts in FP8_EXPERT_RECIPES,
                f"fp8.experts must be one of {FP8_EXPERT_RECIPES}, got {self.experts!r}")  # fmt: skip
        check_dense_fields(self.dense, self.dense_grad_dtype, self.amax_history_len, self.amax_margin,
                           allowed=FP8_DENSE_RECIPES)  # fmt: skip
