"""Batched transpose of a 1-byte tensor: x_BNK uint8 (B, N, K) -> (B, K, N), contiguous.

    transpose_bytes(x_BNK) -> x_BKN

Why a kernel: torch's copy of a transposed uint8 view is a strided element-wise copy that moves
17 GB/s on an H100 (6.9 ms for Mixtral-8x7B's 117M-byte w1: bench/NOTES.md, "FP8 all-gather"),
slower than quantizing the weight again. Here each program loads a 64 x 64 tile with rows along
K (coalesced) and stores it with rows along N; Triton moves the tile between the two layouts
through shared memory, so both sides are whole lines. The user is the blockwise FP8 all-gather
(moe/fp8/fsdp_all_gather.py): dgrad's orientation of the gathered E4M3 weight, whose 128 x 128
scale blocks are the same blocks transposed.

Shape letters (README.md): B batch (experts, for the weights), N and K the two transposed dims.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import kernel_op

_TILE = 64


@triton.jit
def _transpose_bytes_kernel(x_ptr, y_ptr, N, K, TILE: tl.constexpr):
    pk, pn, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    base = b.to(tl.int64) * N * K  # a batch of experts can pass 2**31 bytes
    rn = pn * TILE + tl.arange(0, TILE)
    rk = pk * TILE + tl.arange(0, TILE)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    tile = tl.load(x_ptr + base + rn[:, None] * K + rk[None, :], mask=mask)
    tl.store(y_ptr + base + rk[None, :] * N + rn[:, None], tile, mask=mask)


def _check(x_BNK: torch.Tensor) -> None:
    if x_BNK.dtype != torch.uint8 or x_BNK.dim() != 3 or not x_BNK.is_contiguous():
        raise ValueError(f"transpose_bytes takes a contiguous uint8 (B, N, K) tensor, got {x_BNK.dtype} "
                         f"{tuple(x_BNK.shape)} (contiguous={x_BNK.is_contiguous()})")  # fmt: skip


def triton_transpose_bytes(x_BNK: torch.Tensor) -> torch.Tensor:
    """(B, K, N) contiguous: y[b, k, n] = x[b, n, k]."""
    _check(x_BNK)
    B, N, K = x_BNK.shape
    y_BKN = x_BNK.new_empty((B, K, N))
    if x_BNK.numel():
        grid = (triton.cdiv(K, _TILE), triton.cdiv(N, _TILE), B)
        _transpose_bytes_kernel[grid](x_BNK, y_BKN, N, K, TILE=_TILE, num_warps=4)
    return y_BKN


def torch_transpose_bytes(x_BNK: torch.Tensor) -> torch.Tensor:
    """The reference: torch's strided copy."""
    _check(x_BNK)
    return x_BNK.transpose(1, 2).contiguous()


def _fake_transpose_bytes(x_BNK: torch.Tensor) -> torch.Tensor:
    _check(x_BNK)
    B, N, K = x_BNK.shape
    return x_BNK.new_empty((B, K, N))


transpose_bytes = kernel_op("transpose_bytes", triton_transpose_bytes, _fake_transpose_bytes, torch_transpose_bytes)
