"""BF16 GroupedMLP: the routed experts of one MoE layer, all experts in one grouped GEMM pair.

Legend: M routed rows (tokens already grouped by expert), H hidden, F expert FFN, E experts.

Contract (DESIGN.md): weights are stored like `nn.Linear`, per expert (out_features, in_features):
    w1_EFH: (E, F, H) for GELU, (E, 2F, H) for SwiGLU with rows [0, F) the gate and [F, 2F) the up
    w2_EHF: (E, H, F)
`forward(x_MH, tokens_per_expert_E)` takes rows grouped by expert (any counts: zero, odd, not
multiples of 16), returns (M, H), and never synchronises with the host. Rows past
sum(tokens_per_expert) (tokens dropped by a capacity limit) come back as unspecified values; the
unpermute step masks them. `forward(x_TH, tokens_per_expert_E, token_rows=meta)` takes the
tokens before the permutation instead, with the `moe.permute.PermuteMeta` that groups them (the
layer's path when no rows travel, EP=1): the BF16 experts gather the rows first
(`moe.permute.gather_rows`), the FP8 ones (`gathers_tokens`) gather them inside their
quantization, so FP8 bytes are what leaves the permutation.

FP8 variants subclass this and override only `grouped_mlp`: same constructor, same parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ACTIVATIONS, EXPERT_IMPLS
from moe.permute import PermuteMeta, gather_rows


def activation_fn(h_MX: torch.Tensor, activation: str) -> torch.Tensor:
    """SwiGLU on (M, 2F) -> (M, F) with the gate first, or exact-erf GELU on (M, F)."""
    if activation == "swiglu":
        gate_MF, up_MF = h_MX.chunk(2, dim=-1)
        return F.silu(gate_MF) * up_MF
    return F.gelu(h_MX)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on (fp32 master weights, bf16 compute)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def torch_grouped_mlp(
    x_MH: torch.Tensor,
    w1_EXH: torch.Tensor,
    w2_EHF: torch.Tensor,
    group_end_E: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Both grouped GEMMs through `torch._grouped_mm` (CUTLASS on Hopper; runs on CPU in torch >= 2.13).

    `_grouped_mm` wants the right operand as (E, K, N); the transposed view of our (E, N, K)
    storage is exactly the column-major layout its fast path reads, so no copy is made.
    """
    h_MX = torch._grouped_mm(x_MH, w1_EXH.transpose(-2, -1), offs=group_end_E)
    a_MF = activation_fn(h_MX, activation)
    return torch._grouped_mm(a_MF, w2_EHF.transpose(-2, -1), offs=group_end_E)


def loop_grouped_mlp(
    x_MH: torch.Tensor,
    w1_EXH: torch.Tensor,
    w2_EHF: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Per-expert reference: one plain matmul pair per expert. Synchronises (reads the counts).

    The only path that runs in float64, so `torch.autograd.gradcheck` uses it.
    """
    counts = tokens_per_expert_E.tolist()
    y_MH = x_MH.new_zeros(x_MH.shape[0], w2_EHF.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            h = x_MH[start : start + n] @ w1_EXH[e].t()
            y_MH[start : start + n] = activation_fn(h, activation) @ w2_EHF[e].t()
        start += n
    return y_MH


class GroupedMLP(nn.Module):
    """E independent MLPs (SwiGLU or GELU) over rows grouped by expert."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int,
        activation: str = "swiglu",
        impl: str = "grouped_mm",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        self.dim, self.ffn_dim, self.num_experts = dim, ffn_dim, num_experts
        self.activation, self.impl = activation, impl
        rows_1 = 2 * ffn_dim if activation == "swiglu" else ffn_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, rows_1, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))

    def reset_parameters(self, init_std: float, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w2, std=init_std if out_std is None else out_std)

    # Whether `grouped_mlp` can take rows the dispatcher already quantized (FP8 on the wire).
    accepts_fp8_rows = False
    # Whether `grouped_mlp` can take the tokens and gather their rows itself (token_rows=...).
    gathers_tokens = False

    def forward(
        self,
        x: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        x_fp8=None,
        token_rows: PermuteMeta | None = None,
    ) -> torch.Tensor:
        """x: the permuted rows x_MH, or with token_rows the tokens x_TH they are gathered from.
        x_fp8: optional `moe.dispatch.Fp8Rows`, x_MH's rows already quantized by an FP8
        all-to-all dispatch (x_MH then holds their dequantized values); FP8 experts only."""
        if x_fp8 is not None and not self.accepts_fp8_rows:
            raise ValueError(f"{type(self).__name__} cannot take FP8 rows; FP8 dispatch needs FP8 experts")
        if x_fp8 is not None and token_rows is not None:
            raise ValueError("x_fp8 and token_rows exclude each other: FP8 rows arrive already permuted")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"experts expect x of shape (M, {self.dim}), got {tuple(x.shape)}")
        if token_rows is not None and x.shape[0] != token_rows.num_tokens:
            raise ValueError(
                f"with token_rows, x must be the {token_rows.num_tokens} tokens they permute, got {x.shape[0]} rows"
            )
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert must have shape ({self.num_experts},), got {tuple(tokens_per_expert_E.shape)}"
            )
        dtype = compute_dtype(x)
        if token_rows is not None and (self.impl == "loop" or not self.gathers_tokens):
            x, token_rows = gather_rows(x, token_rows, dtype), None
        if self.impl == "loop":
            w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
            return loop_grouped_mlp(x.to(dtype), w1, w2, tokens_per_expert_E, self.activation)
        group_end_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        if token_rows is not None:  # x stays in its dtype: the gathering quantizer casts it
            return self.grouped_mlp(x, group_end_E, token_rows=token_rows)
        x_MH = x.to(dtype)
        if x_fp8 is not None:
            return self.grouped_mlp(x_MH, group_end_E, x_fp8)
        return self.grouped_mlp(x_MH, group_end_E)

    def grouped_mlp(self, x_MH: torch.Tensor, group_end_E: torch.Tensor) -> torch.Tensor:
        """The seam an FP8 variant overrides: (M, H) rows and cumulative group ends -> (M, H)."""
        dtype = x_MH.dtype
        return torch_grouped_mlp(
            x_MH, self.w1.to(dtype), self.w2.to(dtype), group_end_E, self.activation
        )

    def flops_per_row(self) -> int:
        """Forward FLOPs of one routed row (two GEMMs); x3 for forward + backward."""
        return 2 * self.w1.shape[1] * self.dim + 2 * self.dim * self.ffn_dim

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
            f"activation={self.activation}, impl={self.impl}"
        )


class DenseMLP(nn.Module):
    """A SwiGLU (or GELU) MLP every token goes through: DeepSeek's first dense layers and shared experts."""

    def __init__(self, dim: int, ffn_dim: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        rows_1 = 2 * ffn_dim if activation == "swiglu" else ffn_dim
        self.w1 = nn.Linear(dim, rows_1, bias=False)  # [gate; up] stacked like GroupedMLP.w1
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def reset_parameters(self, init_std: float, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=init_std if out_std is None else out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(activation_fn(self.w1(x), self.activation))


def scaled_out_std(init_std: float, n_layers: int) -> float:
    """Output projections start smaller, 1/sqrt(2 * layers), so the residual stream's variance
    does not grow with depth (GPT-2 / Megatron init)."""
    return init_std / math.sqrt(2 * n_layers)
