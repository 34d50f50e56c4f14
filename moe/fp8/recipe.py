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

Ablation knobs (`fp8.*` in the trainer's config; the defaults are the production recipe, and a
parity run with one knob changed isolates one source of FP8 error):

    gemms               all | forward | dgrad | wgrad: which GEMM kind runs in FP8, the others in
                        BF16 (forward: GEMM1 and GEMM2; dgrad: da = dy w2 and dx = dh w1; wgrad:
                        dw2 and dw1). Anything but `all` runs moe/fp8/ablation.py, a slow
                        diagnostic path; `all` is the fused production path.
    fast_accum          rowwise only: the CUTLASS GEMMs (forward and dgrad) accumulate in the
                        tensor core's own accumulator over the whole K (use_fast_accum=True)
                        instead of promoting partial sums into fp32 every few wgmma k-blocks.
                        The rowwise weight gradients are our Triton kernel and keep their
                        per-128 promotion.
    promotion_interval  blockwise only: K elements (32, 64 or 128) the tensor core sums before the
                        partial sum is promoted into the fp32 accumulator, in all three blockwise
                        GEMMs (Triton's max_num_imprecise_acc inside each 128-wide K step; 128 is
                        one promotion per scale block, DeepSeek-V3's interval).
    intermediate        fp8 | bf16: the form of h = GEMM1's output kept for backward, where act'(h)
                        and the recomputed act(h) come from it. bf16 holds 2X bytes a routed row
                        where FP8 holds X (rowwise: + 4 bytes of scale on both; blockwise: + X/32
                        on both), X more bytes a routed row and MoE layer until backward:
                        parity_300m (X = 3072, 16384 routed rows a micro-batch) 50 MB a layer,
                        302 MB for its 6; Mixtral-8x7B width (X = 28672) 28 KB a routed row.
    pow2_scales         every scale rounded up to a power of two (experts and dense layers).

On a CPU the FP8 GEMMs are emulated in fp32 (moe/fp8/gemm.py), so fast_accum and
promotion_interval change nothing there: they are GPU knobs (tests/test_fp8_ablation.py checks
that they reach the GEMM calls; its GPU tests check what they change).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from moe.config import require

RECIPES = ("rowwise", "blockwise")
GEMM_SUBSETS = ("all", "forward", "dgrad", "wgrad")
INTERMEDIATES = ("fp8", "bf16")
PROMOTION_INTERVALS = (32, 64, 128)  # wgmma sums 32 fp8 products per instruction; 128: one scale block
DEFAULT_PROMOTION_INTERVAL = 128
EXPERT_KNOBS = ("gemms", "fast_accum", "promotion_interval", "intermediate")  # Fp8Recipe's ablation fields


def scaled_grouped_mm_takes_fast_accum() -> bool:
    """Whether this torch build's torch._scaled_grouped_mm has the use_fast_accum argument."""
    packet = getattr(torch.ops.aten, "_scaled_grouped_mm", None)
    if packet is None:
        return False
    return any(arg.name == "use_fast_accum" for arg in packet.default._schema.arguments)


def check_expert_knobs(experts: str, gemms: str, fast_accum: bool, promotion_interval: int, intermediate: str) -> None:
    """The ablation knobs of the FP8 experts (module docstring), named as the `fp8` group names
    them; experts: the recipe they ablate, or "bf16" (then only their defaults are allowed)."""
    require(gemms in GEMM_SUBSETS, f"fp8.gemms must be one of {GEMM_SUBSETS}, got {gemms!r}")
    require(intermediate in INTERMEDIATES, f"fp8.intermediate must be one of {INTERMEDIATES}, got {intermediate!r}")
    require(promotion_interval in PROMOTION_INTERVALS,
            f"fp8.promotion_interval must be one of {PROMOTION_INTERVALS}, got {promotion_interval!r}")  # fmt: skip
    if experts == "bf16":
        knobs = dict(gemms=gemms, fast_accum=fast_accum, promotion_interval=promotion_interval,
                     intermediate=intermediate)  # fmt: skip
        changed = [f"fp8.{k}={str(v).lower() if isinstance(v, bool) else v}"
                   for k, v in knobs.items() if v != _KNOB_DEFAULTS[k]]  # fmt: skip
        require(not changed, f"{', '.join(changed)}: an ablation of the FP8 experts, but fp8.experts=bf16; "
                             f"set fp8.experts to one of {RECIPES}, or leave it at its default")  # fmt: skip
        return
    require(
        promotion_interval == DEFAULT_PROMOTION_INTERVAL or experts == "blockwise",
        f"fp8.promotion_interval={promotion_interval} sets the blockwise Triton GEMMs' promotion; with "
        f"fp8.experts={experts} only {DEFAULT_PROMOTION_INTERVAL} is allowed (rowwise: see fp8.fast_accum)",
    )
    require(
        not fast_accum or experts == "rowwise",
        f"fp8.fast_accum=true sets the rowwise recipe's CUTLASS GEMMs; with fp8.experts={experts} only false "
        "is allowed (blockwise: see fp8.promotion_interval)",
    )
    require(
        not fast_accum or scaled_grouped_mm_takes_fast_accum(),
        f"fp8.fast_accum=true: torch._scaled_grouped_mm of this torch build ({torch.__version__}) has no "
        "use_fast_accum argument; allowed here: false",
    )


@dataclass(frozen=True)
class Fp8Recipe:
    """name and pow2_scales: the scaling; the other fields: the ablation knobs (module docstring),
    whose defaults are the production recipe."""

    name: str
    pow2_scales: bool = False
    gemms: str = "all"  # one of GEMM_SUBSETS
    fast_accum: bool = False  # rowwise only
    promotion_interval: int = DEFAULT_PROMOTION_INTERVAL  # blockwise only, one of PROMOTION_INTERVALS
    intermediate: str = "fp8"  # one of INTERMEDIATES

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"fp8.experts recipe must be one of {RECIPES}, got {self.name!r}")
        check_expert_knobs(self.name, self.gemms, self.fast_accum, self.promotion_interval, self.intermediate)


    @property
    def block(self) -> int:
        """Tile length along the reduction dimension for activations (0: a whole row)."""
        return 128 if self.name == "blockwise" else 0

    @property
    def align(self) -> int:
        """Per-expert token-group alignment of the weight-gradient operands."""
        return 128


_KNOB_DEFAULTS = {f.name: f.default for f in fields(Fp8Recipe) if f.name in EXPERT_KNOBS}


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
    pow2_scales   every scale (weights, x, dy) rounded up to a power of two
    """

    scaling: str = "tensorwise"
    grad_dtype: str = "e4m3"
    history_len: int = 16
    margin: int = 0
    pow2_scales: bool = False

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
    pow2_scales: bool = False  # round scales to powers of two (experts and dense layers)
    # Ablations of the FP8 experts (the module docstring says what each isolates); the defaults
    # are the production recipe.
    gemms: str = "all"  # one of GEMM_SUBSETS: which GEMM kind runs in FP8, the others in BF16
    fast_accum: bool = False  # experts=rowwise: CUTLASS accumulates without fp32 promotion
    promotion_interval: int = DEFAULT_PROMOTION_INTERVAL  # experts=blockwise: one of PROMOTION_INTERVALS
    intermediate: str = "fp8"  # one of INTERMEDIATES: h kept for backward in FP8 or BF16

    def validate(self) -> None:
        require(self.experts in FP8_EXPERT_RECIPES,
                f"fp8.experts must be one of {FP8_EXPERT_RECIPES}, got {self.experts!r}")  # fmt: skip
        check_dense_fields(self.dense, self.dense_grad_dtype, self.amax_history_len, self.amax_margin,
                           allowed=FP8_DENSE_RECIPES)  # fmt: skip
        check_expert_knobs(self.experts, **self.expert_knobs())

    def expert_knobs(self) -> dict:
        """The ablation fields, as Fp8Recipe takes them."""
        return {k: getattr(self, k) for k in EXPERT_KNOBS}
