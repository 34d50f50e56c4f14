"""kernels/cast.py against torch's `.to`: the same bits for every value, any size, clear errors."""

from __future__ import annotations

import pytest
import torch

from kernels.cast import _BLOCK, cast, triton_cast
from kernels.reference import torch_cast

SIZES = [0, 1, 17, _BLOCK - 1, _BLOCK, _BLOCK + 1, 3 * _BLOCK + 129]


def _special_fp32(n: int, device) -> torch.Tensor:
    """n values covering what a cast can get wrong: ties at bf16's rounding point (both parities),
    values that round up into the next binade and past bf16's max, subnormals, zeros, inf, NaN."""
    g = torch.Generator(device="cpu").manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-40, 38, n).clamp(max=3e38)
    bits = x.view(torch.int32)
    x = torch.where(torch.arange(n) % 7 == 3, (bits & ~0xFFFF | 0x8000).view(torch.float32), x)  # exact ties
    x = torch.where(torch.arange(n) % 11 == 5, (bits | 0x7FFF).view(torch.float32), x)  # round up a binade
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4028235e38,
                             -3.39e38, 1e-45, -1e-40, 1.1754942e-38])  # fmt: skip
    x[: min(n, specials.numel())] = specials[: min(n, specials.numel())]
    return x.to(device)


def _assert_same_bits(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan)  # NaN stays NaN (payload bits may differ)
    ints = torch.int16 if y.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(y.view(ints)[~nan], ref.view(ints)[~nan])


def _check_both_directions(n: int, device) -> None:
    x32 = _special_fp32(n, device)
    _assert_same_bits(cast(x32, torch.bfloat16), x32.to(torch.bfloat16))
    x16 = x32.to(torch.bfloat16)
    _assert_same_bits(cast(x16, torch.float32), x16.float())


@pytest.mark.parametrize("n", SIZES)
def test_cast_matches_torch_bitwise(n):
    """CPU: the interpreter's bit-moving path (module docstring of kernels/cast.py)."""
    _check_both_directions(n, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("n", SIZES)
def test_cast_matches_torch_bitwise_gpu(n):
    """GPU: the hardware conversion, subnormals and ties included."""
    _check_both_directions(n, "cuda")


def test_cast_keeps_shape_and_returns_same_dtype_unchanged(device):
    x = torch.randn(3, 5, 129, device=device)
    y = cast(x, torch.bfloat16)
    assert y.shape == (3, 5, 129) and y.is_contiguous()
    assert cast(x, torch.float32) is x


def test_cast_refuses_other_dtypes_and_strided_input(device):
    with pytest.raises(ValueError, match="fp32 <-> bf16 only"):
        cast(torch.zeros(4, device=device, dtype=torch.float16), torch.float32)
    with pytest.raises(ValueError, match="must be contiguous"):
        cast(torch.zeros(8, 4, device=device).t(), torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 <-> bf16 only"):
        torch_cast(torch.zeros(4, dtype=torch.float64), torch.float32)


def test_cast_under_compile_is_the_custom_op(device):
    x = torch.randn(257, device=device)
    fn = torch.compile(lambda t: cast(t, torch.bfloat16) * 2, backend="aot_eager", fullgraph=True)
    _assert_same_bits(fn(x), x.to(torch.bfloat16) * 2)
    _assert_same_bits(triton_cast(x, torch.bfloat16), x.to(torch.bfloat16))


@pytest.mark.gpu
def test_cast_on_gpu_large(device):
    x = torch.randn(8, 1024, 1000, device=device) * 1e3  # not a multiple of the block
    _assert_same_bits(cast(x, torch.bfloat16), x.to(torch.bfloat16))
    _assert_same_bits(cast(x.to(torch.bfloat16), torch.float32), x.to(torch.bfloat16).float())
