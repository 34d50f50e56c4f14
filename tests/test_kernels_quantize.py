"""Quantization kernels (kernels/quantize*.py) against their references (kernels/reference.py).

Kernel vs reference is bitwise: FP8 bytes via .view(torch.uint8), scales, padded offsets, on
every element, on the GPU (`-m gpu`) and on CPU, where the kernels run in Triton's interpreter.
The interpreter's own float32 -> float8e4nv cast is not the hardware's (it rounds ties away from
zero and drops a carry into the next binade: 7.935 -> 4.0 where torch and the GPU give 8.0), so
under the interpreter `tl_fp8_quantize_by` rounds to the E4M3 grid first (kernels/common.py);
tests/test_kernels_scale_rule.py pins down what that rounding works around.
The references themselves are checked against an independent definition (fp64 scales,
dequantized values within E4M3 rounding of x), so a wrong reference cannot hide.

Shape letters (README.md): M rows, K reduction dim (the row length), N output dim, E experts,
P padded rows.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels.reference as reference
from kernels.common import round_up, torch_fp8_quantize
from kernels.quantize import quantize_rows
from kernels.quantize_grouped import quantize_cols_grouped, quantize_rows_and_cols_grouped
from kernels.quantize_weight import quantize_weight

from fp8_inputs import assert_same, group_ends, rows_with_specials

SIZES = [0, 1, 15, 17, 0, 129, 3]  # group sizes: empty groups, 1, odd, one past a multiple of 128


def odd_x(M: int, K: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """bf16 rows with the awkward cases: zeros, values at and past the E4M3 limit, huge dynamic
    range (E4M3 subnormals and underflow to zero), signed zeros, a constant row."""
    patterns = [[448.0, -448.0, 1000.0, -3e5, 449.0, 0.5], [1e4, -1e-3, 2e-2, 7.0, -1e-6, 0.0, -0.0]]
    return rows_with_specials(M, K, patterns, seed).to(device)


# ---- references against an independent definition ---------------------------------------------


def _scale64(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """The scale rule in float64 (independent of kernels.common), rounded to fp32 at the end."""
    s = amax.double() / 448.0
    if pow2:
        s = torch.tensor([2.0 ** math.ceil(math.log2(v)) if v > 0 else 1.0 for v in s.flatten().tolist()]).view(s.shape)
    return torch.where(amax == 0, 1.0, s).float()


def _assert_dequantizes(q, scale, x):
    """q * scale within E4M3 rounding of x: relative error <= 2^-4, or half an E4M3 subnormal step."""
    deq, x = q.double() * scale.double(), x.double()
    assert torch.all((deq - x).abs() <= 2.0**-4 * x.abs() + 2.0**-10 * scale.double())
    assert not torch.isnan(deq).any()


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("block_k", [0, 128])
def test_reference_rows_definition(block_k, pow2):
    x = odd_x(29, 384)
    q, scale = reference.torch_quantize_rows(x, block_k, pow2)
    spans = x.float().view(29, -1, block_k or 384)  # (M, Kb, span): each row's scale spans
    expected = _scale64(spans.abs().amax(-1), pow2)
    assert torch.equal(scale.view(expected.shape), expected)
    _assert_dequantizes(q.float().view(spans.shape), scale.view(29, -1, 1), spans)
    assert torch.equal(q[1].float(), torch.zeros(384)) and torch.all(scale[1] == 1)  # zero row
    saturated = torch_fp8_quantize(torch.tensor([500.0, -1e9, 448.0]), torch.tensor(1.0))
    assert saturated.float().tolist() == [448, -448, 448]  # saturating, never NaN


@pytest.mark.parametrize("block_m, align", [(0, 16), (128, 128)])
def test_reference_cols_grouped_definition(block_m, align):
    sizes = SIZES + [2]
    x, ends = odd_x(sum(sizes) + 4, 128), group_ends(sizes)  # 4 rows past the last group
    x[1:16] = 0  # the group of 15 is all zeros
    qt, scale, padded_end = reference.torch_quantize_cols_grouped(x, ends, align, block_m, False, None)
    P = round_up(x.shape[0], align) + len(sizes) * align
    assert qt.shape == (128, P) and padded_end.dtype == torch.int32
    assert padded_end.tolist() == torch.tensor([round_up(s, align) for s in sizes]).cumsum(0).tolist()
    scale_KP = scale.repeat_interleave(block_m, 1) if block_m else torch.ones(128, P)
    written = torch.zeros(P, dtype=torch.bool)
    for e, (size, pend) in enumerate(zip(sizes, padded_end.tolist())):
        start, pstart = sum(sizes[:e]), pend - round_up(size, align)
        x_g = x[start : start + size].float().t()
        if block_m == 0:
            assert torch.equal(scale[:, e], _scale64(x_g.abs().amax(1) if size else torch.zeros(128), False))
            scale_KP[:, pstart : pstart + size] = scale[:, e : e + 1]
        _assert_dequantizes(qt[:, pstart : pstart + size].float(), scale_KP[:, pstart : pstart + size], x_g)
        written[pstart : pstart + size] = True
    assert torch.all(qt.view(torch.uint8)[:, ~written] == 0)  # padding and the tail: exact zeros


@pytest.mark.parametrize("mode", ["rowwise", "blockwise", "tensorwise"])
def test_reference_weight_definition(mode):
    w = odd_x(256, 384).view(2, 128, 384)
    q, s, qt, st = reference.torch_quantize_weight(w, mode, False)
    if mode == "rowwise":
        s_full, st_full = s[:, :, None], st[:, :, None]
        assert torch.equal(s, _scale64(w.float().abs().amax(2), False))
    elif mode == "blockwise":
        s_full = s.repeat_interleave(128, 1).repeat_interleave(128, 2)
        st_full = s_full.transpose(1, 2)
        assert torch.equal(st, s.transpose(1, 2))
        assert torch.equal(s, _scale64(w.float().view(2, 1, 128, 3, 128).abs().amax((2, 4)), False))
    else:
        s_full = st_full = s[:, None, None]
        assert torch.equal(s, _scale64(w.float().abs().amax((1, 2)), False))
    _assert_dequantizes(q.float(), s_full, w.float())
    _assert_dequantizes(qt.float(), st_full, w.float().transpose(1, 2))
    if mode != "rowwise":
        assert torch.equal(qt.view(torch.uint8), q.view(torch.uint8).transpose(1, 2))


# ---- kernels against references, CPU (interpreter) and GPU --------------------------------------


@pytest.mark.parametrize(
    "M, K, block_k, pow2, gather",
    [
        (0, 128, 0, False, False),
        (0, 256, 128, True, True),
        (1, 128, 128, False, False),
        (37, 640, 128, False, True),
        (37, 640, 128, True, False),
        (30, 384, 0, True, True),
        (30, 200, 0, False, False),  # rowwise takes any K
        (5, 9000, 0, True, False),  # longer than _MAX_ROW_IN_REGISTERS: two passes over the row
    ],
)
def test_quantize_rows(monkeypatch, M, K, block_k, pow2, gather):
    import kernels.quantize as kq

    monkeypatch.setattr(kq, "_SPAN_FIRST", not pow2)  # both grid orders of the 1x128 tiles
    x = odd_x(M + 3, K)
    idx = torch.randint(0, M + 3, (M,), generator=torch.Generator().manual_seed(M)) if gather else None
    if not gather:
        x = x[:M]
    assert_same(quantize_rows(x, block_k, pow2, idx), reference.torch_quantize_rows(x, block_k, pow2, idx))


@pytest.mark.parametrize(
    "block, align, pow2, gather, tail, K",
    [
        (0, 16, False, False, 0, 384),
        (0, 32, True, True, 3, 200),
        (128, 128, False, True, 0, 256),
        (128, 128, True, False, 5, 128),
    ],
)
def test_quantize_cols_grouped(block, align, pow2, gather, tail, K):
    x = odd_x(sum(SIZES) + tail, K)
    x[1:16] = 0  # an all-zero group
    ends = group_ends(SIZES, dtype=torch.int64 if gather else torch.int32)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3)) if gather else None
    args = (x, ends, align, block, pow2, idx)
    assert_same(tuple(quantize_cols_grouped(*args)), reference.torch_quantize_cols_grouped(*args))
    assert_same(tuple(quantize_rows_and_cols_grouped(*args)), reference.torch_quantize_rows_and_cols_grouped(*args))


@pytest.mark.parametrize("strip", [(16, 32, 1, 2), (32, 64, 2, 3), None])
@pytest.mark.parametrize(
    "align, pow2, gather, tail, K",
    [(16, False, False, 3, 200), (32, True, True, 0, 96), (128, False, True, 5, 384), (16, True, False, 0, 32)],
)
def test_quantize_cols_grouped_rowwise_paths(monkeypatch, strip, align, pow2, gather, tail, K):
    """Rowwise columns only, both kernels: the strip kernel (a program per group x column block,
    sweeping the group's rows twice; tiles taller and shorter than some groups, column blocks
    past K) and the two passes, chosen by the mean group size (`_STRIP_CONFIGS`)."""
    import kernels.quantize_grouped as kg

    monkeypatch.setattr(kg, "_STRIP_CONFIGS", ((10**9, strip),) if strip else ())
    assert (kg._strip_config(4, 2) is None) == (strip is None)
    x = odd_x(sum(SIZES) + tail, K, seed=K)
    x[1:16] = 0  # an all-zero group
    ends = group_ends(SIZES)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(5)) if gather else None
    args = (x, ends, align, 0, pow2, idx)
    assert_same(tuple(quantize_cols_grouped(*args)), reference.torch_quantize_cols_grouped(*args))


def test_strip_config_by_mean_group():
    """The strip kernel where the mean group is small, the two passes past the last threshold."""
    import kernels.quantize_grouped as kg

    for max_rows, cfg in kg._STRIP_CONFIGS:
        assert kg._strip_config(max_rows * 8, 8) == cfg
    last = kg._STRIP_CONFIGS[-1][0]
    assert kg._strip_config(last * 8 + 1, 8) is None
    assert kg._strip_config(0, 8) == kg._STRIP_CONFIGS[0][1]  # no rows: the zero columns only


@pytest.mark.parametrize(
    "tile, k_major",
    [((128, 128, 32, 1, 4), True), ((128, 128, 128, 1, 4), False), ((128, 128, 128, 2, 8), True),
     ((128, 64, 128, 1, 2), True)],
)  # fmt: skip
def test_quantize_grouped_blockwise_tiles(monkeypatch, tile, k_major):
    """The blockwise programs' two forms: 32-row slices swept twice, and the whole 128-token tile
    kept in registers (ONE_SLICE), with several column blocks per program, in both grid orders;
    the tail rows and the gather included."""
    import kernels.quantize_grouped as kg

    monkeypatch.setitem(kg._LAUNCH_CONFIGS, (True, False), ((0, 0, 0), tile))
    monkeypatch.setitem(kg._K_MAJOR, (True, False), k_major)
    x = odd_x(sum(SIZES) + 5, 384)
    ends = group_ends(SIZES)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(4))
    for gather in (None, idx):
        args = (x, ends, 128, 128, False, gather)
        assert_same(tuple(quantize_cols_grouped(*args)), reference.torch_quantize_cols_grouped(*args))
        expected = reference.torch_quantize_rows_and_cols_grouped(*args)
        assert_same(tuple(quantize_rows_and_cols_grouped(*args)), expected)


@pytest.mark.parametrize("block", [0, 128])
def test_quantize_grouped_empty_and_single(block):
    align = 128 if block else 16
    for sizes, M in [([0, 0, 0], 0), ([1], 1), ([0, 0], 2)]:  # M=0; one row; every row past the groups
        x = odd_x(M, 128)
        args = (x, group_ends(sizes), align, block, False, None)
        out = quantize_rows_and_cols_grouped(*args)
        assert_same(tuple(out), reference.torch_quantize_rows_and_cols_grouped(*args))
        assert_same(tuple(quantize_cols_grouped(*args)), reference.torch_quantize_cols_grouped(*args))


@pytest.mark.parametrize("mode", ["rowwise", "blockwise", "tensorwise"])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_weight(mode, pow2, dtype):
    E, N, K = (3, 256, 384) if mode == "blockwise" else (2, 72, 200)
    w = odd_x(E * N, K).view(E, N, K).to(dtype)
    if dtype == torch.float32:  # values between the bf16 grid points, on either side of the midpoint
        w = w * (1 + 2e-2 * torch.rand(w.shape, generator=torch.Generator().manual_seed(1)))
    w[1] = 0  # an all-zero expert
    assert_same(tuple(quantize_weight(w, mode, pow2)), reference.torch_quantize_weight(w, mode, pow2))
    # round_bf16: an fp32 master quantizes exactly as its bf16 copy (a no-op on bf16 input)
    rounded = tuple(quantize_weight(w, mode, pow2, round_bf16=True))
    assert_same(rounded, reference.torch_quantize_weight(w, mode, pow2, round_bf16=True))
    assert_same(rounded, reference.torch_quantize_weight(w.to(torch.bfloat16), mode, pow2))


def test_quantize_weight_amax_steps(monkeypatch):
    """The amax pass's multi-block programs (KSTEPS > 1, a ragged last one), at a tiny size."""
    import kernels.quantize_weight as kw

    monkeypatch.setattr(kw, "_AMAX_BLOCKS", ((16, 16, 1), (16, 32, 1)))  # bf16, fp32 input
    monkeypatch.setattr(kw, "_AMAX_MIN_PROGRAMS", {"rowwise": 8, "tensorwise": 8})
    w = odd_x(2 * 72, 200).view(2, 72, 200)
    w32 = w.float() * (1 + 2e-2 * torch.rand(w.shape, generator=torch.Generator().manual_seed(2)))
    for mode in ("rowwise", "tensorwise"):
        assert_same(tuple(quantize_weight(w, mode, True)), reference.torch_quantize_weight(w, mode, True))
        got = tuple(quantize_weight(w32, mode, True, round_bf16=True))
        assert_same(got, reference.torch_quantize_weight(w32, mode, True, round_bf16=True))


def test_bad_arguments():
    x = torch.zeros(4, 200, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="block_k"):
        quantize_rows(x, block_k=128)
    with pytest.raises(ValueError, match="block_k"):
        quantize_rows(x, block_k=64)
    with pytest.raises(ValueError, match="align"):
        quantize_cols_grouped(x, group_ends([4]), align=16, block_m=128)
    with pytest.raises(ValueError, match="align"):
        quantize_cols_grouped(x, group_ends([4]), align=24)
    with pytest.raises(ValueError, match="group_end_E"):
        quantize_cols_grouped(x, torch.zeros(0, dtype=torch.int32))
    with pytest.raises(ValueError, match="scaling"):
        quantize_weight(x.view(1, 4, 200), scaling="colwise")
    with pytest.raises(ValueError, match="multiples of 128"):
        quantize_weight(x.view(1, 4, 200), scaling="blockwise")


def test_cpu_path_without_interpreter_is_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = odd_x(20, 128)
    assert_same(quantize_rows(x, 128, True), reference.torch_quantize_rows(x, 128, True))
    w = x.view(1, 20, 128)
    assert_same(tuple(quantize_weight(w, "rowwise")), reference.torch_quantize_weight(w))


def test_custom_ops_trace():
    """register_fake matches the kernels (opcheck), and torch.compile traces the public API."""
    x, ends = odd_x(20, 128), group_ends([5, 0, 15])
    torch.library.opcheck(quantize_rows.op, (x, 128, False, None, None), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(quantize_cols_grouped.op, (x, ends, 16, 0, True, None),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    torch.library.opcheck(quantize_rows_and_cols_grouped.op, (x, ends, 16, 0, True, None, None),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    w = x.view(1, 20, 128)
    torch.library.opcheck(quantize_weight.op, (w, "rowwise", False, False, None, None), test_utils=("test_faketensor",))
    amax = w.abs().to(torch.bfloat16).float()  # given amaxes (kernels/adamw.py writes them so)
    amax = torch.cat([amax.amax(dim=2).flatten(), amax.amax(dim=1).flatten()]).view(torch.int32)
    torch.library.opcheck(quantize_weight.op, (w, "rowwise", False, True, None, amax), test_utils=("test_faketensor",))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fwd_input(x, ends):
        return quantize_rows_and_cols_grouped(x, ends, 128, 128, True).qt_KP

    assert fwd_input(x, ends).shape == (128, round_up(20, 128) + 3 * 128)


# ---- GPU: real shapes, bitwise on every element ------------------------------------------------


def _routed_sizes(M: int, E: int, seed: int) -> list[int]:
    """Skewed group sizes summing to M, with empty and odd groups."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(E, generator=g) ** 3
    w[:: max(E // 4, 1)] = 0  # some experts get no tokens
    sizes = (w / w.sum() * M).floor().long()
    if E > 2:
        sizes[1], sizes[2] = 1, 17
    sizes[int(torch.argmax(sizes))] += M - int(sizes.sum())
    return sizes.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("K", [4096, 7168, 2048])
@pytest.mark.parametrize("block_k", [0, 128])
def test_quantize_rows_gpu(K, block_k):
    M = 16384
    x = odd_x(M, K, device="cuda")
    idx = torch.randperm(M, device="cuda")
    for pow2 in (False, True):
        assert_same(quantize_rows(x, block_k, pow2), reference.torch_quantize_rows(x, block_k, pow2))
    assert_same(quantize_rows(x, block_k, True, idx), reference.torch_quantize_rows(x, block_k, True, idx))


@pytest.mark.gpu
@pytest.mark.parametrize("K, E", [(4096, 8), (4096, 16), (7168, 32), (2048, 128)])
@pytest.mark.parametrize("block", [0, 128])
def test_quantize_grouped_gpu(K, E, block):
    M = 16384
    x = odd_x(M, K, device="cuda")
    ends = group_ends(_routed_sizes(M, E, seed=K), device="cuda")
    idx = torch.randperm(M, device="cuda")
    align = 128 if block else 16
    for pow2, gather in [(False, False), (True, True)]:
        args = (x, ends, align, block, pow2, idx if gather else None)
        assert_same(tuple(quantize_cols_grouped(*args)), reference.torch_quantize_cols_grouped(*args))
        expected = reference.torch_quantize_rows_and_cols_grouped(*args)
        assert_same(tuple(quantize_rows_and_cols_grouped(*args)), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["rowwise", "blockwise", "tensorwise"])
@pytest.mark.parametrize("E, N, K", [(8, 2 * 1536, 2048), (128, 768, 2048), (4, 4096, 7168)])
def test_quantize_weight_gpu(mode, E, N, K):
    w = odd_x(E * N, K, device="cuda").view(E, N, K) * 0.02
    # fp32 master weights off the bf16 grid: the input that once broke the transposed store
    w32 = w.float() * (1 + 1e-3 * torch.rand(w.shape, device="cuda"))
    for pow2 in (False, True):
        assert_same(tuple(quantize_weight(w, mode, pow2)), reference.torch_quantize_weight(w, mode, pow2))
        # the layer's path: fp32 masters rounded to bf16 in registers, bitwise their bf16 copy's bytes
        rounded = tuple(quantize_weight(w32, mode, pow2, round_bf16=True))
        assert_same(rounded, reference.torch_quantize_weight(w32, mode, pow2, round_bf16=True))
        assert_same(rounded, tuple(quantize_weight(w32.to(torch.bfloat16), mode, pow2)))
        if mode == "rowwise":
            assert_same(tuple(quantize_weight(w32, mode, pow2)), reference.torch_quantize_weight(w32, mode, pow2))
        else:  # refused until triton's miscompile of the transposed store is found
            with pytest.raises(ValueError, match="round_bf16"):
                quantize_weight(w32, mode, pow2)
