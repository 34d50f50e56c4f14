"""kernels/transpose_bytes.py: the tiled byte transpose (Triton's interpreter on CPU, `-m gpu` on a
GPU) against torch's strided copy, bitwise, on shapes that are not multiples of the 64 x 64 tile.

Shape letters (README.md): B batch, N and K the transposed dims.
"""

import pytest
import torch

from kernels.transpose_bytes import torch_transpose_bytes, transpose_bytes, triton_transpose_bytes

SHAPES = [(1, 64, 64), (3, 70, 129), (2, 1, 200), (4, 130, 1), (0, 16, 16), (2, 0, 5)]


def _bytes(shape, device):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_on_odd_shapes(shape):
    x = _bytes(shape, "cpu")
    y = triton_transpose_bytes(x)  # the interpreter runs the kernel itself on CPU
    assert y.shape == (shape[0], shape[2], shape[1]) and y.is_contiguous()
    assert torch.equal(y, torch_transpose_bytes(x))
    assert torch.equal(y, x.transpose(1, 2))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="contiguous uint8 \\(B, N, K\\)"):
        transpose_bytes(torch.zeros(2, 3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous=False"):
        transpose_bytes(torch.zeros(2, 4, 3, dtype=torch.uint8).transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 70, 129), (1, 28672, 4096), (16, 1536, 2048)])
def test_gpu_matches_torch(shape):
    x = _bytes(shape, "cuda")
    assert torch.equal(transpose_bytes(x), x.transpose(1, 2).contiguous())
