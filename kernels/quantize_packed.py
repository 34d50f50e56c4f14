"""FP8 rows and their scales in one uint8 buffer: a row's E4M3 bytes, then its fp32 scales.

    quantize_rows_packed(x_MK, block_k, pow2_scale, row_index_M) -> packed_MC uint8 (M, C)
    unpack_rows(packed_MC, K, block_k) -> (q_MK fp8, scale fp32), views of packed_MC, no copy

The same quantization as kernels/quantize.py's `quantize_rows` (same arguments, bitwise the same
q and scales), written by the same kernel straight into the buffer: one allocation, and one
tensor for a collective to move (the expert-parallel dispatch sends it as is, moe/all_to_all.py).

Row layout (`packed_row_layout`), byte offsets within a row of C bytes:

    [0, K)                  q, E4M3
    [K, scale_offset)       padding up to a multiple of 4
    [scale_offset, +4*n)    the row's n fp32 scales: n = 1 (block_k=0) or K // 128 (1x128 tiles)
    [.., C)                 padding up to a multiple of 16

Padding bytes are unspecified (never written, never read). The scales start 4-byte aligned in
every row because C is a multiple of 16 and the buffer's own start is aligned, so they are an fp32
`.view` of a column slice. C a multiple of 16 also lets the kernel's stores and any later copy of
whole rows use 16-byte accesses (Triton specializes strides divisible by 16).

Shape letters (README.md): M rows, K the row length, C bytes of a packed row.
"""

from __future__ import annotations

import torch

from kernels.common import FP8_DTYPE, round_up
from kernels.contracts import check_quantize_rows_args
from kernels.dispatch import kernel_op
from kernels.quantize import launch_quantize_rows
from kernels.reference import torch_quantize_rows

_ROW_ALIGN = 16  # bytes; see the module docstring


def packed_row_layout(K: int, block_k: int) -> tuple[int, int, int]:
    """(scale_offset, n_scales, C): where a row's scales start, how many, and the row's bytes."""
    n_scales = K // block_k if block_k else 1
    scale_offset = round_up(K, 4)
    return scale_offset, n_scales, round_up(scale_offset + 4 * n_scales, _ROW_ALIGN)


def unpack_rows(packed_MC: torch.Tensor, K: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_MK, scale) as views of packed_MC: q_MK fp8 (M, K), scale fp32 (M,) for block_k=0 or
    (M, K // block_k); both with packed_MC's row stride (C bytes)."""
    offset, n_scales, C = packed_row_layout(K, block_k)
    if packed_MC.dtype != torch.uint8 or packed_MC.dim() != 2 or packed_MC.shape[1] != C:
        raise ValueError(
            f"packed_MC must be uint8 (M, {C}) for K={K}, block_k={block_k}; "
            f"got {packed_MC.dtype} {tuple(packed_MC.shape)}"
        )
    if packed_MC.stride(1) != 1 or packed_MC.stride(0) % 4 or packed_MC.storage_offset() % 4:
        raise ValueError(
            f"packed_MC needs unit column stride and 4-byte aligned rows to view its fp32 scales; got "
            f"stride {packed_MC.stride()}, storage offset {packed_MC.storage_offset()}"
        )
    q_MK = packed_MC[:, :K].view(FP8_DTYPE)
    scale = packed_MC[:, offset : offset + 4 * n_scales].view(torch.float32)
    return q_MK, (scale[:, 0] if block_k == 0 else scale)


def _packed_output(x_MK: torch.Tensor, M: int, block_k: int) -> torch.Tensor:
    return x_MK.new_empty((M, packed_row_layout(x_MK.shape[1], block_k)[2]), dtype=torch.uint8)


def triton_quantize_rows_packed(
    x_MK: torch.Tensor, block_k: int = 0, pow2_scale: bool = False, row_index_M: torch.Tensor | None = None
) -> torch.Tensor:
    """packed_MC holding the FP8 rows of x_MK (or of x_MK[row_index_M]) and their scales; see
    the module docstring."""
    check_quantize_rows_args(x_MK, block_k)
    packed_MC = _packed_output(x_MK, x_MK.shape[0] if row_index_M is None else row_index_M.shape[0], block_k)
    launch_quantize_rows(x_MK, *unpack_rows(packed_MC, x_MK.shape[1], block_k), block_k, pow2_scale, row_index_M)
    return packed_MC


def torch_quantize_rows_packed(
    x_MK: torch.Tensor, block_k: int = 0, pow2_scale: bool = False, row_index_M: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference: torch_quantize_rows, copied into the layout (padding bytes left zero)."""
    check_quantize_rows_args(x_MK, block_k)
    q_MK, scale = torch_quantize_rows(x_MK, block_k, pow2_scale, row_index_M)
    packed_MC = torch.zeros((q_MK.shape[0], packed_row_layout(x_MK.shape[1], block_k)[2]), dtype=torch.uint8,
                            device=x_MK.device)  # fmt: skip
    q_view, scale_view = unpack_rows(packed_MC, x_MK.shape[1], block_k)
    q_view.copy_(q_MK)
    scale_view.copy_(scale)
    return packed_MC


def _fake_quantize_rows_packed(x_MK, block_k=0, pow2_scale=False, row_index_M=None):
    check_quantize_rows_args(x_MK, block_k)
    return _packed_output(x_MK, x_MK.shape[0] if row_index_M is None else row_index_M.shape[0], block_k)


quantize_rows_packed = kernel_op(
    "quantize_rows_packed", triton_quantize_rows_packed, _fake_quantize_rows_packed, torch_quantize_rows_packed
)
