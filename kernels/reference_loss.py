"""Pure-torch reference of kernels/cross_entropy.py: a block of logits' cross-entropy and, in the
same call, its gradient written over the logits.

Shape letters (README.md): T tokens (the rows of a chunk of the output head), V vocabulary.

    lse_T = logsumexp(x_TV) in fp32             (log_softmax's, as F.cross_entropy computes it)
    loss_T = lse_T - x[t, label_t]               0 where label_t == IGNORE_INDEX
    grad_TV = softmax(x) * scale_T - scale_T at the label column, rounded to x's dtype
              (scale_T: the gradient of the caller's reduction w.r.t. each row's loss; 1 / n on
              labelled rows and 0 on ignored ones for a mean)

This is the sequence moe/loss.py ran before the kernel existed (log_softmax, nll_loss, then
log_softmax's and nll_loss's backwards folded into exp(logp) * scale minus scale at the label),
and it stays the path of plain CPU tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels with this value are left out of the loss and get no gradient
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_cross_entropy_args(x_TV: torch.Tensor, labels_T: torch.Tensor, scale_T: torch.Tensor) -> None:
    """What every path of `cross_entropy_grad_` refuses, with the same ValueError."""
    if x_TV.ndim != 2:
        raise ValueError(f"x_TV must be 2-D (T, V), got shape {tuple(x_TV.shape)}")
    if x_TV.dtype not in LOGIT_DTYPES:
        raise ValueError(f"x_TV must be one of {LOGIT_DTYPES}, got {x_TV.dtype}")
    T = x_TV.shape[0]
    if labels_T.shape != (T,) or labels_T.dtype != torch.int64:
        raise ValueError(f"labels_T must be int64 of shape ({T},), got {labels_T.dtype} {tuple(labels_T.shape)}")
    if scale_T.shape != (T,) or scale_T.dtype != torch.float32:
        raise ValueError(f"scale_T must be float32 of shape ({T},), got {scale_T.dtype} {tuple(scale_T.shape)}")


def torch_cross_entropy_grad_(
    x_TV: torch.Tensor, labels_T: torch.Tensor, scale_T: torch.Tensor, write_grad: bool, block_v: int = 0
) -> torch.Tensor:
    """loss_T (fp32, fp64 for fp64 logits); with write_grad, x_TV is overwritten by grad_TV.
    block_v is the kernel's tiling, unused here."""
    check_cross_entropy_args(x_TV, labels_T, scale_T)
    acc = torch.promote_types(x_TV.dtype, torch.float32)
    logp_TV = F.log_softmax(x_TV.to(acc), dim=-1)
    loss_T = F.nll_loss(logp_TV, labels_T, ignore_index=IGNORE_INDEX, reduction="none")
    if write_grad:
        scale_T1 = scale_T.to(acc)[:, None]
        grad_TV = logp_TV.exp_().mul_(scale_T1)
        grad_TV.scatter_add_(1, labels_T.clamp_min(0)[:, None], -scale_T1 * (labels_T != IGNORE_INDEX)[:, None])
        x_TV.copy_(grad_TV)
    return loss_T
