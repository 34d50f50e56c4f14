"""FP8 rows packed with their scales (kernels/quantize_packed.py): the layout, the views, and the
kernel (Triton's interpreter on CPU, `-m gpu` on a GPU) against its reference and against
`quantize_rows`, bitwise.

Shape letters (README.md): M rows, K the row length, C bytes of a packed row.
"""

from __future__ import annotations

import pytest
import torch

from kernels.quantize import quantize_rows
from kernels.quantize_packed import (
    packed_row_layout,
    quantize_rows_packed,
    torch_quantize_rows_packed,
    unpack_rows,
)

from fp8_inputs import assert_same
from test_kernels_quantize import odd_x

# (K, block_k) -> (scale_offset, n_scales, C), written out by hand from the documented layout.
LAYOUTS = {
    (70, 0): (72, 1, 80),  # K padded to 4, then the row to 16
    (128, 0): (128, 1, 144),
    (4096, 0): (4096, 1, 4112),
    (7168, 0): (7168, 1, 7184),
    (256, 128): (256, 2, 272),
    (4096, 128): (4096, 32, 4224),  # already a multiple of 16: no tail padding
    (7168, 128): (7168, 56, 7392),
    (1, 0): (4, 1, 16),
}


@pytest.mark.parametrize("K, block_k", list(LAYOUTS))
def test_layout(K, block_k):
    assert packed_row_layout(K, block_k) == LAYOUTS[K, block_k]


def _check(x, block_k, pow2, idx):
    K = x.shape[1]
    packed = quantize_rows_packed(x, block_k, pow2, idx)
    ref = torch_quantize_rows_packed(x, block_k, pow2, idx)
    M = x.shape[0] if idx is None else idx.shape[0]
    assert packed.dtype == torch.uint8 and packed.shape == (M, LAYOUTS[K, block_k][2])
    q, s = unpack_rows(packed, K, block_k)
    if M:  # views, not copies (an empty tensor has no storage to point into)
        assert q.data_ptr() == packed.data_ptr() and s.data_ptr() == packed.data_ptr() + LAYOUTS[K, block_k][0]
    assert_same((q, s), unpack_rows(ref, K, block_k))
    assert_same((q, s), quantize_rows(x, block_k, pow2, idx))  # the same bytes as the unpacked kernel


@pytest.mark.parametrize(
    "M, K, block_k, pow2, gather",
    [(9, 70, 0, False, False), (13, 70, 0, True, True), (7, 256, 128, False, True), (0, 128, 0, False, False),
     (5, 1, 0, False, False)],
)  # fmt: skip
def test_packed_matches_reference(M, K, block_k, pow2, gather):
    x = odd_x(M + 3, K) if K > 6 else torch.randn(M + 3, K).bfloat16()
    idx = torch.randint(0, M + 3, (M,), generator=torch.Generator().manual_seed(M)) if gather else None
    _check(x if gather else x[:M], block_k, pow2, idx)


def test_unpack_refuses_bad_buffers():
    with pytest.raises(ValueError, match=r"uint8 \(M, 80\)"):
        unpack_rows(torch.zeros(3, 76, dtype=torch.uint8), 70, 0)
    with pytest.raises(ValueError, match="aligned"):
        unpack_rows(torch.zeros(3 * 80 + 1, dtype=torch.uint8)[1:].view(3, 80), 70, 0)


def test_custom_op_traces():
    x = odd_x(20, 128)
    torch.library.opcheck(
        quantize_rows_packed.op, (x, 128, False, None), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.gpu
@pytest.mark.parametrize("K", [4096, 7168])
@pytest.mark.parametrize("block_k", [0, 128])
def test_packed_gpu(K, block_k):
    M = 16384
    x = odd_x(M, K, device="cuda")
    idx = torch.randperm(M, device="cuda")
    _check(x, block_k, False, None)
    _check(x, block_k, True, idx)
