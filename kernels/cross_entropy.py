"""A chunk of the output head's logits in, its rows' cross-entropy out, and the gradient written
over the logits in the same call: two reads and one write of each logit (bf16: 6 bytes).

Shape letters (README.md): T tokens (the rows of a chunk), V vocabulary.

    cross_entropy_grad_(x_TV, labels_T, scale_T, write_grad) -> loss_T (fp32)
        loss_T and grad_TV as kernels/reference_loss.py defines them; with write_grad, x_TV holds
        grad_TV on return (its dtype), else it is left alone.

Why: the torch sequence (reference_loss.py) makes the chunk's fp32 logits, log-softmax, exp,
scale and cast back, ~38 bytes a logit over five kernels, some on torch's slow mixed-dtype path;
at the Qwen3 vocabulary (151,936) that is most of a step's elementwise time (bench/NOTES.md).
One program owns a row: pass 1 reads it in BLOCK_V pieces and keeps the running max m and
sum s of exp(x - m) (rescaled when m grows), lse = m + log(s); pass 2 reads it again and writes
exp(x - lse) * scale, minus scale at the label. The label's logit is one load. Against the
reference the math differs only in the order of the sum of exps and in lse's rounding (x - lse
where torch takes (x - max) - log(sum)): tests/test_cross_entropy.py bounds it.
Labels are not checked against V on the device (that needs a sync): a label outside [0, V) other
than IGNORE_INDEX counts as ignored here, where torch raises; the embedding has already refused
such a token id before the loss sees it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import tl_round_bf16_if, triton_interpret
from kernels.dispatch import kernel_op
from kernels.reference_loss import check_cross_entropy_args, torch_cross_entropy_grad_

BLOCK_V = 4096  # logits a program holds at once: 16 a thread at 8 warps (bf16: two 16-byte loads)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _cross_entropy_kernel(
    x_ptr, labels_ptr, scale_ptr, loss_ptr, V, stride_x,
    WRITE_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for start in range(0, V, BLOCK_V):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + row)
    labelled = (label >= 0) & (label < V)
    x_label = tl.load(x_row + label, mask=labelled, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(labelled, lse - x_label, 0.0))
    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * scale
            g = tl.where(offs == label, g - scale, g)
            tl.store(x_row + offs, tl_round_bf16_if(g, ROUND_BF16).to(x_ptr.dtype.element_ty), mask=offs < V)


def triton_cross_entropy_grad_(
    x_TV: torch.Tensor, labels_T: torch.Tensor, scale_T: torch.Tensor, write_grad: bool, block_v: int = BLOCK_V
) -> torch.Tensor:
    """loss_T; see the module docstring. block_v: logits a program reads at once (tests shrink it
    to make small rows take several)."""
    check_cross_entropy_args(x_TV, labels_T, scale_T)
    if x_TV.stride(1) != 1:
        raise ValueError(f"x_TV must have contiguous rows (stride(1) == 1), got strides {x_TV.stride()}")
    T, V = x_TV.shape
    loss_T = x_TV.new_empty(T, dtype=torch.float32)
    if T == 0:
        return loss_T
    block = min(block_v, triton.next_power_of_2(V))
    _cross_entropy_kernel[(T,)](
        x_TV, labels_T, scale_T, loss_T, V, x_TV.stride(0),
        WRITE_GRAD=write_grad, ROUND_BF16=triton_interpret() and x_TV.dtype == torch.bfloat16, BLOCK_V=block,
        num_warps=max(1, min(8, block // 512)),
    )  # fmt: skip
    return loss_T


def _fake_cross_entropy_grad_(x_TV, labels_T, scale_T, write_grad, block_v=BLOCK_V):
    check_cross_entropy_args(x_TV, labels_T, scale_T)
    return x_TV.new_empty(x_TV.shape[0], dtype=torch.float32)


def _kernel_ok(x_TV: torch.Tensor, *_args, **_kwargs) -> bool:
    """The kernel on a GPU (and under the interpreter, which tests/test_cross_entropy.py runs it
    in); fp64 logits (gradcheck) take the reference."""
    return (x_TV.is_cuda or triton_interpret()) and x_TV.dtype in _KERNEL_DTYPES


cross_entropy_grad_ = kernel_op(
    "cross_entropy_grad_", triton_cross_entropy_grad_, _fake_cross_entropy_grad_, torch_cross_entropy_grad_,
    use_kernel=_kernel_ok, mutates_args=("x_TV",),
)
