"""Shared by the kernel tests: bf16 rows with special rows planted among random ones,
cumulative group ends, and a bitwise comparison of kernel outputs."""

from __future__ import annotations

import torch

from kernels.common import FP8_DTYPE


def rows_with_specials(M: int, K: int, patterns: list[list[float]], seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """bf16 (M, K): randn * scale, then rows 0, 1, 8, 15, ... (one every 7 from row 1) replaced
    by a zero row, then each pattern tiled along K, then a constant row of -2.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * scale
    specials = [torch.zeros(K), *(torch.tensor(p).repeat(K)[:K] for p in patterns), torch.full((K,), -2.5)]
    for i, row in zip(range(1, M, 7), specials):
        x[i] = row
    return x.bfloat16()


def group_ends(sizes, device="cpu", dtype=torch.int32) -> torch.Tensor:
    """Cumulative row ends of groups of the given sizes."""
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(dtype=dtype, device=device)


def assert_same(out, expected) -> None:
    """Every output equal bit for bit (FP8 compared as bytes), with the first differing places."""
    assert len(out) == len(expected)
    for i, (a, b) in enumerate(zip(out, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype == FP8_DTYPE:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a.cpu(), b.cpu()), f"output {i} differs at {(a != b).nonzero()[:5].tolist()}"
