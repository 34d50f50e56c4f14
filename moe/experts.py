"""BF16 GroupedMLP: the routed experts of one MoE layer, all experts in one grouped GEMM pair.

Shape letters (README.md): M routed rows (grouped by expert), H hidden, F expert FFN, X = 2F
(SwiGLU) or F (GELU), E experts.

Weights are stored like `nn.Linear`, per expert (out_features, in_features):
    w1_EXH: (E, 2F, H) for SwiGLU with rows [0, F) the gate and [F, 2F) the up; (E, F, H) for GELU
    w2_EHF: (E, H, F)
`forward(inp)` takes one `moe.dispatch.ExpertInput` (the rows grouped by expert, any counts: zero,
odd, not multiples of 16, or the tokens and their permutation), returns (M, H), and never
synchronises with the host. Rows past sum(tokens_per_expert) (tokens dropped by a capacity
limit) come back as unspecified values; the unpermute step masks them.

`grouped_mlp(inp)` is the one seam an FP8 variant overrides, and the one place where each class
says what it consumes: the BF16 experts compute on the rows (gathered from the tokens when they
got tokens) and refuse FP8 rows; moe/fp8/grouped_mlp.py's gather inside their quantization and
take FP8 rows as they come. Same constructor, same parameters.

SwiGLU's activation and second GEMM are one autograd node (moe/swiglu_down.py) that saves h and
recomputes a = swiglu(h) in backward; so do DenseMLP's. GELU keeps the plain ops (h and a saved).

The BF16 experts cast their fp32 weights to the compute dtype themselves (autocast sees no op of
theirs): in every forward, or once inside moe/step_casts.py `weights_cast_once` (the trainer's
run.weight_cast=step), which hands the module its scope's copies through `_step_casts`. The cast's
backward brings the bf16 weight gradient to fp32 in one pass, or under gradient accumulation adds it
into .grad (moe/grad_accumulation.py), as the FP8 experts' weight-gradient GEMMs do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ACTIVATIONS, EXPERT_IMPLS
from moe.dispatch import ExpertInput, compute_dtype
from moe.step_casts import CastWeight, StepCasts
from moe.swiglu_down import swiglu_down


def activation_fn(h_MX: torch.Tensor, activation: str) -> torch.Tensor:
    """SwiGLU on (M, 2F) -> (M, F) with the gate first, or exact-erf GELU on (M, F), as plain
    differentiable ops: the loop reference's, GELU's and the FP8 references' activation."""
    if activation == "swiglu":
        gate_MF, up_MF = h_MX.chunk(2, dim=-1)
        return F.silu(gate_MF) * up_MF
    return F.gelu(h_MX)


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
    SwiGLU: the activation and the second GEMM through `swiglu_down` (saves h, not a).
    """
    h_MX = torch._grouped_mm(x_MH, w1_EXH.transpose(-2, -1), offs=group_end_E)
    if activation == "swiglu":
        return swiglu_down(h_MX, w2_EHF, group_end_E)
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

    _step_casts: StepCasts | None = None  # inside moe/step_casts.py `weights_cast_once`
    accumulate_grads: bool = False  # moe/grad_accumulation.py: add weight gradients into .grad

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

    def forward(self, inp: ExpertInput) -> torch.Tensor:
        if inp.x.shape[1] != self.dim:
            raise ValueError(f"experts expect x of shape (rows, {self.dim}), got {tuple(inp.x.shape)}")
        if inp.tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert must have shape ({self.num_experts},), got {tuple(inp.tokens_per_expert_E.shape)}"
            )
        return self.grouped_mlp(inp)

    def grouped_mlp(self, inp: ExpertInput) -> torch.Tensor:
        """The seam an FP8 variant overrides: the experts' input -> (M, H) outputs."""
        if inp.fp8 is not None:
            raise ValueError(f"{type(self).__name__} cannot take FP8 rows: FP8 dispatch needs FP8 experts")
        dtype = compute_dtype(inp.x)
        x_MH = inp.rows(dtype)
        w1_EXH, w2_EHF = self._weight("w1", dtype), self._weight("w2", dtype)
        if self.impl == "loop":
            return loop_grouped_mlp(x_MH, w1_EXH, w2_EHF, inp.tokens_per_expert_E, self.activation)
        return torch_grouped_mlp(x_MH, w1_EXH, w2_EHF, inp.group_end_E(), self.activation)

    def _weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """w1 or w2 in the compute dtype: the scope's copy inside weights_cast_once, else a cast;
        either way backward brings the gradient back to fp32 in one pass, or adds it into .grad
        (`accumulate_grads`; moe/step_casts.py `CastWeight`). A compiled graph casts by itself."""
        w = getattr(self, name)
        if w.dtype == dtype or torch.compiler.is_compiling():
            return w.to(dtype)
        if self._step_casts is not None:
            return self._step_casts.cast(self, name, w, dtype, self.accumulate_grads)
        return CastWeight.apply(w, w.detach().to(dtype), self.accumulate_grads)

    def flops_per_row(self) -> int:
        """Forward FLOPs of one routed row (two GEMMs); x3 for forward + backward."""
        return 2 * self.w1.shape[1] * self.dim + 2 * self.dim * self.ffn_dim

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
            f"activation={self.activation}, impl={self.impl}"
        )


class DenseMLP(nn.Module):
    """A SwiGLU (or GELU) MLP every token goes through: DeepSeek's first dense layers and shared experts.

    SwiGLU with a plain nn.Linear w2 runs the activation and w2 through `swiglu_down` (saves h, not
    a); an FP8 w2 (Float8Linear) and GELU take the plain ops.
    """

    def __init__(self, dim: int, ffn_dim: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        rows_1 = 2 * ffn_dim if activation == "swiglu" else ffn_dim
        self.w1 = nn.Linear(dim, rows_1, bias=False)  # [gate; up] stacked like GroupedMLP.w1
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def reset_parameters(self, init_std: float, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=init_std if out_std is None else out_std)

    @property
    def recomputes_activation(self) -> bool:
        """Whether backward recomputes a from h (trainer/memory_activations.py counts on it)."""
        return self.activation == "swiglu" and type(self.w2) is nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        if not self.recomputes_activation:
            return self.w2(activation_fn(h, self.activation))
        dtype = compute_dtype(h)  # what autocast would cast w2's input and weight to
        h_MX = h.reshape(-1, h.shape[-1]).to(dtype)
        return swiglu_down(h_MX, self._w2_weight(dtype)).view(*h.shape[:-1], self.w2.out_features)

    def _w2_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """w2's weight in the compute dtype: inside moe/step_casts.py `weights_cast_once` the scope's
        copy (the one its hooks would swap into the Linear), else a cast."""
        w, casts = self.w2.weight, getattr(self.w2, "_step_casts", None)
        if casts is None or w.dtype == dtype:
            return w.to(dtype)
        return casts.cast(self.w2, "weight", w, dtype)


def scaled_out_std(init_std: float, n_layers: int) -> float:
    """Output projections start smaller, 1/sqrt(2 * layers), so the residual stream's variance
    does not grow with depth (GPT-2 / Megatron init)."""
    return init_std / math.sqrt(2 * n_layers)
