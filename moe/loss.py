"""The language-model loss over the output head: plain, or chunked so that the fp32 logits of the
whole micro-batch never exist.

Shape letters (README.md): T tokens (rows), H hidden, V vocabulary.

    linear_cross_entropy(h_TH, head, labels_T, chunk_rows) -> loss, fp32 scalar
        = F.cross_entropy(head(h).float(), labels, ignore_index=IGNORE_INDEX): the mean over the
        labelled rows (NaN when none is), the head's GEMM in autocast's dtype when autocast is on.

chunk_rows = 0, or no fewer than T, is that expression as written: autograd keeps the bf16
logits' input, the fp32 log-probabilities (4TV bytes), and backward makes two more fp32 T x V
tensors. 0 < chunk_rows < T (`ChunkedLinearCrossEntropy`) takes the rows chunk by chunk: the
chunk's logits (the same GEMM), then one kernel (kernels/cross_entropy.py: on a CPU its torch
reference, the log_softmax and nll_loss F.cross_entropy calls) gives each row's loss and
overwrites the logits with the gradient of the mean w.r.t. them, (softmax - onehot) / n on
labelled rows and 0 on ignored ones, from which the chunk's dh = g @ W and its share of
dW = g^T h (summed over chunks in fp32, `_add_dw`) follow; the chunk's logits are freed
before the next. What autograd keeps is dh (T x H) and dW (V x H); backward only scales them by
the loss's gradient. At most one chunk's logits are alive: one chunk_rows x V tensor in the
compute dtype (the CPU reference adds two fp32 ones).
Summing each chunk's dW costs 8 bytes a weight on a GPU (the fp32 sum read and written in the
GEMM's epilogue), a few hundred / chunk_rows of the chunk's three GEMMs' time on an H100: chunks of
a few thousand rows keep it near 10%; one chunk would only move dW's making into forward, so
T <= chunk_rows takes the plain path.
The idea is the "fused linear cross-entropy" of Liger-Kernel and others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cross_entropy import cross_entropy_grad_
from kernels.reference_loss import IGNORE_INDEX  # labels left out of the loss and its mean
from moe.config import require


def linear_cross_entropy(h_TH: torch.Tensor, head: nn.Module, labels_T: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Mean cross-entropy of head(h_TH) against labels_T; see the module docstring."""
    if chunk_rows == 0 or h_TH.shape[0] <= chunk_rows:
        return F.cross_entropy(head(h_TH).float(), labels_T, ignore_index=IGNORE_INDEX)
    require(
        type(head) is nn.Linear and head.bias is None,
        f"model.loss_chunk_rows={chunk_rows} reads the output head's weight directly and needs a plain "
        f"nn.Linear without bias, got {type(head).__name__}; set model.loss_chunk_rows=0",
    )
    # Under no_grad (evaluation) the Function still sees inputs that require grad: tell it.
    return ChunkedLinearCrossEntropy.apply(h_TH, head.weight, labels_T, chunk_rows, torch.is_grad_enabled())


def _compute_dtype(h_TH: torch.Tensor, w_VH: torch.Tensor) -> torch.dtype:
    """What autocast would run the head's GEMM in (it leaves fp64 alone), else the inputs' dtype."""
    device = h_TH.device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in (h_TH.dtype, w_VH.dtype):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h_TH.dtype, w_VH.dtype)


def _add_dw(dw_VH: torch.Tensor | None, g_TV: torch.Tensor, h_TH: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """dw_VH + g_TV^T h_TH in acc (dw_VH None: the first chunk's product alone). On a GPU with
    16-bit operands and an fp32 sum the GEMM writes the first chunk's product in fp32 and adds each
    later one into dw_VH in its epilogue (aten's mm / addmm with out_dtype): no 16-bit product and
    no separate add, 8 bytes a weight a chunk where those moved 12 (the add ran on torch's slow
    mixed-dtype path). The CPU build has no out_dtype GEMM: the product, then the add."""
    g_VT = g_TV.t()
    if g_TV.is_cuda and g_TV.dtype in (torch.bfloat16, torch.float16) and acc == torch.float32:
        if dw_VH is None:
            return torch.mm(g_VT, h_TH, out_dtype=acc)
        return torch.addmm(dw_VH, g_VT, h_TH, out_dtype=acc, out=dw_VH)
    dw_c = g_VT @ h_TH
    return dw_c.to(acc) if dw_VH is None else dw_VH.add_(dw_c)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = mean cross-entropy of (h_TH @ w_VH.T) against labels_T over labelled rows, chunk_rows
    rows at a time, gradients made in forward unless make_grads is False. Usage:
    ChunkedLinearCrossEntropy.apply(h_TH, w_VH, labels_T, chunk_rows, make_grads)."""

    @staticmethod
    def forward(ctx, h_TH, w_VH, labels_T, chunk_rows, make_grads):
        T = h_TH.shape[0]
        need_dh, need_dw = (make_grads and needed for needed in ctx.needs_input_grad[:2])
        dtype = _compute_dtype(h_TH, w_VH)
        with torch.autocast(h_TH.device.type, enabled=False):
            w_c = w_VH.to(dtype)  # autocast's one cast of the weight
            labelled_T = labels_T != IGNORE_INDEX
            n_labelled = labelled_T.sum()
            # 1/n on labelled rows, 0 on ignored ones: the mean's gradient (all 0 when n = 0)
            scale_T = torch.where(labelled_T, 1.0 / n_labelled.float(), 0.0)
            loss_sum = torch.zeros((), dtype=torch.float32, device=h_TH.device)
            dh_TH = torch.empty_like(h_TH) if need_dh else None
            dw_VH = None
            for start in range(0, T, chunk_rows):
                rows = slice(start, min(start + chunk_rows, T))
                h_c = h_TH[rows].to(dtype)
                grad = h_c @ w_c.t()  # the chunk's logits, then (one kernel) their gradient in place
                loss_sum += cross_entropy_grad_(grad, labels_T[rows], scale_T[rows], need_dh or need_dw).sum()
                if not (need_dh or need_dw):
                    continue
                if need_dh:
                    dh_TH[rows] = grad @ w_c
                if need_dw:
                    dw_VH = _add_dw(dw_VH, grad, h_c, torch.promote_types(w_VH.dtype, torch.float32))
        if need_dw:
            dw_VH = dw_VH.to(w_VH.dtype) if dw_VH is not None else torch.zeros_like(w_VH)
        ctx.save_for_backward(dh_TH, dw_VH)
        return loss_sum / n_labelled

    @staticmethod
    def backward(ctx, grad_loss):
        dh_TH, dw_VH = ctx.saved_tensors
        return (dh_TH * grad_loss if dh_TH is not None else None,
                dw_VH * grad_loss if dw_VH is not None else None, None, None, None)  # fmt: skip
