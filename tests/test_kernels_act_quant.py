"""Activation + FP8 quantization kernels (kernels/act_quant*.py) against their references;
unpermute + combine: test_kernels_combine.py.

The act kernels compute with hardware exp2 / reciprocal and FMA contraction (kernels/act_math.py),
the references (kernels/reference_act.py) with fp32 polynomials accurate to a few ulp, so they are
compared within a derived bound instead of bitwise (`_assert_fp8_close_to_reference`):
- each fp32 value the kernel quantizes is within delta = eps * B (+ 1e-33 where the reference
  saturates) of the reference's: eps = (2|g| + 32) u for SwiGLU, (3 x^2 + 64) u for GELU,
  u = 2^-24, B the sum of the magnitudes of the formula's terms (`_act_error_bound`,
  tests/act_helpers.py; checked directly on the fp32 values by
  `test_kernel_activation_math_within_bound` in test_kernels_act_math.py);
- scales: the same rule on an amax that moved by at most max(delta) of its span, so
  |scale - ref| <= max(delta) / 448 + 1 ulp; power-of-two scales are equal, or a factor 2
  apart where the reference's amax sat within that distance below the power of two (its
  span then holds a 448);
- bytes: q * scale and the reference's each lie within half an E4M3 step of their own value
  (the kernel's x * inv is within 3 u of the reference's x * (1 / scale)), so they differ by at
  most one step plus delta;
- at most MAX_DIFFERING (3e-4) of the values differ at all, and the dequantized tensors'
  relative L2 difference is at most MAX_REL_L2 (3e-3): measured at most 7.8e-5 and 7.8e-4 on
  an H200, 3.1e-5 and 1.2e-5 in the interpreter.
On CPU the kernels run in Triton's interpreter, where they round to the target grid in fp32
before the interpreter's casts (test_kernels_act_math.py checks that rounding). GPU tests
(`-m gpu`) run the hardware instructions at real shapes under the same bounds. The references
are checked against independent definitions in test_kernels_act_reference.py.

Shape letters (README.md): M routed rows, F expert FFN hidden size, X = 2F (SwiGLU) or F (GELU),
E experts, P padded rows, K the row length of a layout.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import kernels.act_quant as act_quant
import kernels.act_quant_bwd as act_quant_bwd_mod
from act_helpers import DROPPED, _act_error_bound, bwd_inputs, group_ends, odd_h
from fp8_inputs import assert_same
import kernels.reference_act as ref
from kernels.act_quant import act_quant_fwd
from kernels.act_quant_bwd import act_quant_bwd
from kernels.common import FP8_DTYPE, tile_grid

# Under the interpreter exp2 overflows to inf for gates below -88, by design (sigmoid -> 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")


# ---- act kernels against the reference (interpreter on CPU): the numerics contract ---------------

# Fraction of FP8 values allowed to differ from the reference's at all (each by one E4M3 step at
# most), plus 2 for isolated flips in tiny outputs: 4x the most measured. On an H200 (every GPU
# test here) at most 7.8e-5, in the saved h: the kernel's rcp.approx inverse of a
# non-power-of-two scale is 1 ulp off RN(1 / scale) now and then, which flips values lying that
# close to an E4M3 rounding boundary; a and dh flip less (1.0e-5). In the interpreter, whose
# reciprocal is exact, at most 3.1e-5 (dh).
MAX_DIFFERING = 3e-4
# Relative L2 difference of the dequantized tensors: one step is 6-12% of a value, so a few flips
# show. Measured at most 7.8e-4 on an H200 (the saved h, above), 1.2e-5 in the interpreter; a
# systematic one-step error everywhere gives 6e-2 or more.
MAX_REL_L2 = 3e-3


def _e4m3_step(q: torch.Tensor) -> torch.Tensor:
    """Spacing of the E4M3 grid in q's binade: 2^(e - 3), and 2^-9 for subnormals and zero."""
    return torch.ldexp(torch.ones_like(q), torch.frexp(q.abs().clamp_min(2.0**-6))[1] - 4)


def _row_spans(C: int, block: int):
    """Scale index of each element of rows (R, C) with scales (R,) or (R, C // block)."""
    cols = torch.arange(C)
    return lambda r: r[:, None] * (C // block) + (cols // block).to(r.device) if block else r[:, None].expand(-1, C)


def _col_spans(padded_end: torch.Tensor, P: int, block: int):
    """Scale index of each element of (K, P) column layouts with scales (K, E) or (K, P // block)."""
    E = padded_end.numel()
    p = torch.arange(P, device=padded_end.device)
    col = p // block if block else torch.searchsorted(padded_end.long(), p, right=True).clamp(max=E - 1)
    return lambda r: r[:, None] * (P // block if block else E) + col


def _to_columns(v_MK: torch.Tensor, ends: torch.Tensor, padded_end: torch.Tensor, P: int) -> torch.Tensor:
    """(K, P): row m of group e in column padded_end[e - 1] + m - ends[e - 1], zeros elsewhere."""
    ends, pend = ends.long(), padded_end.long()
    m = torch.arange(int(ends[-1]), device=v_MK.device)
    e = torch.searchsorted(ends, m, right=True)
    start, pstart = torch.cat([ends.new_zeros(1), ends])[e], torch.cat([pend.new_zeros(1), pend])[e]
    out = v_MK.new_zeros(v_MK.shape[1], P)
    out[:, pstart + m - start] = v_MK[: m.numel()].t()
    return out


def _assert_fp8_close_to_reference(q, scale, q_ref, scale_ref, spans, delta, pow2, where):
    """The contract of the module docstring for one FP8 output: q (R, C) with scales `scale`,
    element (r, c) scaled by scale.flatten()[spans(r)[c]]; delta (R, C) bounds the fp32 values'
    difference (None: 0, the values are the same). Rows go in chunks to bound GPU memory."""
    assert q.shape == q_ref.shape and q.dtype == q_ref.dtype == FP8_DTYPE, (where, q.shape, q_ref.shape)
    assert scale.shape == scale_ref.shape and scale.dtype == scale_ref.dtype == torch.float32, where
    s, s_ref = scale.flatten().double(), scale_ref.flatten().double()
    dmax, qmax, qmax_ref = (torch.zeros_like(s) for _ in range(3))
    R, C = q.shape
    n_bad, bad_example, differing, sq_diff, sq_ref = 0, "", 0, 0.0, 0.0
    step = max(1, (1 << 22) // max(C, 1))
    for r0 in range(0, R, step):
        rows = torch.arange(r0, min(R, r0 + step), device=q.device)
        span = spans(rows).flatten()
        qk, qr = q[rows].double().flatten(), q_ref[rows].double().flatten()
        d = torch.zeros_like(qk) if delta is None else delta[rows].double().flatten()
        dmax.scatter_reduce_(0, span, d, "amax")
        qmax.scatter_reduce_(0, span, qk.abs(), "amax")
        qmax_ref.scatter_reduce_(0, span, qr.abs(), "amax")
        sk, sr = s[span], s_ref[span]
        deq, deq_ref = qk * sk, qr * sr
        tol = 0.5 * (_e4m3_step(qk) * sk + _e4m3_step(qr) * sr) + d + 2.0**-22 * torch.maximum(deq.abs(), deq_ref.abs())
        bad = ~((deq - deq_ref).abs() <= tol)
        if bad.any():
            n_bad += bad.sum().item()
            bad_example = bad_example or f"{deq[bad][:3].tolist()} vs {deq_ref[bad][:3].tolist()}"
        differing += (qk != qr).sum().item()
        sq_diff += (deq - deq_ref).square().sum().item()
        sq_ref += deq_ref.square().sum().item()
    if pow2:  # equal, or one power of two apart where the smaller scale's span reaches 448
        ok = (s == s_ref) | ((s == 2 * s_ref) & (qmax_ref == 448)) | ((2 * s == s_ref) & (qmax == 448))
    else:
        ok = (s - s_ref).abs() <= dmax / 448 * (1 + 2.0**-20) + 2.0**-23 * torch.maximum(s, s_ref)
    # Spans whose values all lie below 2^-100 (GELU's derivative at h ~ -12.7 is ~1e-34): the
    # hardware ex2/rcp run flush-to-zero and lose their relative accuracy next to the subnormal
    # range, so such a span's scale is only known to be tiny. Seen once on an H200: kernel
    # 1.2e-38 vs reference 7.5e-37 for one of 102,400 column scales (values below 3.4e-34).
    ok |= (s <= 2.0**-100 / 448) & (s_ref <= 2.0**-100 / 448)
    assert ok.all(), f"{where}: {(~ok).sum().item()} scales off, e.g. {s[~ok][:3].tolist()} vs {s_ref[~ok][:3]}"
    assert n_bad == 0, f"{where}: {n_bad} values more than one E4M3 step off, e.g. {bad_example}"
    assert differing <= MAX_DIFFERING * q.numel() + 2, f"{where}: {differing} of {q.numel()} values differ"
    assert sq_diff <= MAX_REL_L2**2 * sq_ref, f"{where}: relative L2 {(sq_diff / max(sq_ref, 1e-300)) ** 0.5:.2e}"


def _dequant(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 q * scale, as kernel and reference both form the backward's h."""
    return q.float() * (scale[:, None] if block == 0 else scale.repeat_interleave(block, dim=1))


def _check_fwd(h, activation, block, pow2, out, expected, where=""):
    """act_quant_fwd's outputs against the reference's, by `_assert_fp8_close_to_reference`."""
    assert [t.shape for t in out] == [t.shape for t in expected], where
    a_q, a_scale, h_q, h_scale = out
    M, F = a_q.shape
    d_a, _ = _act_error_bound(activation, h.double() if h.is_cpu else h.float())
    _assert_fp8_close_to_reference(a_q, a_scale, *expected[:2], _row_spans(F, block), d_a, pow2, f"{where} a")
    if h_q.numel():  # h is exact in fp32 on both sides
        _assert_fp8_close_to_reference(h_q, h_scale, *expected[2:], _row_spans(h.shape[1], block), None, pow2,
                                       f"{where} h")  # fmt: skip


def _check_bwd(da, h_q, h_scale, activation, ends, block, pow2, out, expected, where=""):
    """act_quant_bwd's outputs against the reference's: dh rows, dh^T and a^T within the bounds,
    padded ends exactly."""
    assert [t.shape for t in out] == [t.shape for t in expected], where
    dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end = out
    assert_same([padded_end], [expected[6]])
    M, X = h_q.shape
    P, kept = dht_q.shape[1], int(ends[-1])
    h = _dequant(h_q, h_scale, block)[:kept]
    wide = torch.float64 if h.is_cpu else torch.float32
    d_a, d_dh = _act_error_bound(activation, h.to(wide), da[:kept].to(wide))
    d_rows = torch.cat([d_dh, d_dh.new_zeros(M - kept, X)])  # rows in no group: zeros on both sides
    _assert_fp8_close_to_reference(dh_q, dh_scale, *expected[:2], _row_spans(X, block), d_rows, pow2, f"{where} dh")
    cols = _col_spans(padded_end, P, block)
    _assert_fp8_close_to_reference(dht_q, dht_scale, *expected[2:4], cols, _to_columns(d_dh, ends, padded_end, P),
                                   pow2, f"{where} dh^T")  # fmt: skip
    _assert_fp8_close_to_reference(at_q, at_scale, *expected[4:6], cols, _to_columns(d_a, ends, padded_end, P),
                                   pow2, f"{where} a^T")  # fmt: skip
    assert not dh_q.float().isnan().any() and not dht_q.float().isnan().any()  # dropped rows do not leak


def test_contract_rejects_wrong_outputs():
    """The comparison can fail: one byte two E4M3 steps off, a scale 1% off, one value in a
    hundred one step off, a power-of-two scale doubled without a 448 in its span."""
    h = odd_h(37, 256, seed=1)
    a_q, a_scale, _, _ = ref.torch_act_quant_fwd(h, "swiglu", 128, False, False)
    d_a, _ = _act_error_bound("swiglu", h.double())

    def check(q, scale=a_scale, pow2=False, q_ref=a_q, scale_ref=a_scale):
        _assert_fp8_close_to_reference(q, scale, q_ref, scale_ref, _row_spans(128, 128), d_a, pow2, "")

    check(a_q, a_scale)
    i = ((a_q.view(torch.uint8) > 0x40) & (a_q.view(torch.uint8) < 0x70)).flatten().nonzero()[0].item()
    for steps, fails in ((1, False), (2, True)):
        q = a_q.clone()
        q.view(torch.uint8).view(-1)[i] += steps
        with pytest.raises(AssertionError) if fails else contextlib.nullcontext():
            check(q)
    with pytest.raises(AssertionError, match="scales off"):
        check(a_q, a_scale * torch.where(torch.arange(a_scale.numel()) == 5, 1.01, 1.0).view_as(a_scale))
    q = a_q.clone()
    b = q.view(torch.uint8).view(-1)
    every_100th = torch.arange(0, b.numel(), 100)
    b[every_100th[(b[every_100th] & 0x7F) < 0x7E]] ^= 1  # the last mantissa bit: one step, never NaN
    with pytest.raises(AssertionError, match="values differ"):
        check(q)
    p_q, p_scale, _, _ = ref.torch_act_quant_fwd(h, "swiglu", 128, True, False)
    span = (p_q.float().abs().amax(dim=1) < 448).nonzero()[0].item()  # a row (one tile) without 448
    with pytest.raises(AssertionError, match="scales off"):
        check(p_q, p_scale * torch.where(torch.arange(37)[:, None] == span, 2.0, 1.0), True, p_q, p_scale)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize(
    "activation, F, block, chunked",
    [("swiglu", 96, 0, False), ("swiglu", 96, 0, True), ("gelu", 80, 0, True), ("swiglu", 128, 128, False),
     ("gelu", 384, 128, False)],
)  # fmt: skip
def test_fwd_kernel_matches_reference(activation, F, block, chunked, pow2, monkeypatch):
    monkeypatch.setattr(act_quant, "_F_FIRST", not pow2)  # both grid orders of the 1x128 tiles
    if chunked:  # rows longer than one chunk: the amax sweep then the quantize sweep
        monkeypatch.setattr(act_quant, "_fwd_config", lambda F, block_k: (2, 32, 4))
    X = 2 * F if activation == "swiglu" else F
    h = odd_h(37, X, seed=1)
    for save in (True, False):
        out = act_quant.triton_act_quant_fwd(h, activation, block, pow2, save)
        _check_fwd(h, activation, block, pow2, out, ref.torch_act_quant_fwd(h, activation, block, pow2, save))
    empty = h[:0]  # M = 0
    assert_same(act_quant_fwd(empty, activation, block, pow2), ref.torch_act_quant_fwd(empty, activation, block, pow2))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("activation, F, block, align", [("swiglu", 96, 0, 16), ("gelu", 80, 0, 32),
                                                         ("swiglu", 96, 0, 128), ("gelu", 80, 0, 128),
                                                         ("swiglu", 128, 128, 128), ("gelu", 384, 128, 128)])  # fmt: skip
def test_bwd_kernel_matches_reference(activation, F, block, align, pow2):
    da, h_q, h_scale, ends = bwd_inputs(activation, F, block, seed=2)
    out = act_quant_bwd_mod.triton_act_quant_bwd(da, h_q, h_scale, activation, ends, align, block, pow2)
    expected = ref.torch_act_quant_bwd(da, h_q, h_scale, activation, ends, align, block, pow2)
    _check_bwd(da, h_q, h_scale, activation, ends, block, pow2, out, expected)


@pytest.mark.parametrize("f_major", [False, True])
@pytest.mark.parametrize("block", [0, 128])
def test_bwd_kernel_grid_orders(block, f_major, monkeypatch):
    """Both grid orders of every pass give the reference's bytes (the launcher picks one per pass
    and falls back to token-major past CUDA's 65535 limit on the grid's second dimension)."""
    monkeypatch.setattr(act_quant_bwd_mod, "_F_MAJOR", dict.fromkeys(("amax", "quant", "blockwise"), f_major))
    da, h_q, h_scale, ends = bwd_inputs("swiglu", 256 if block else 96, block, seed=5)
    args = (da, h_q, h_scale, "swiglu", ends, 128 if block else 32, block, False)
    out = act_quant_bwd_mod.triton_act_quant_bwd(*args)
    _check_bwd(*args[:5], block, False, out, ref.torch_act_quant_bwd(*args))
    assert tile_grid(70000, 3, True) == ((70000, 3), False)
    assert tile_grid(700, 3, True) == ((3, 700), True)


@pytest.mark.parametrize("sizes", [[0, 0, 0], [40], [7, 0]])
def test_bwd_kernel_edge_groups(sizes):
    """No rows in any group (everything dropped), one group holding every row, a trailing empty group."""
    da, h_q, h_scale, ends = bwd_inputs("swiglu", 32, 0, sizes=sizes, seed=4, zero_last=False)
    no_rows = (da[:0], h_q[:0], h_scale[:0], "swiglu", ends * 0, 16, 0, False)
    for args in [(da, h_q, h_scale, "swiglu", ends, 16, 0, False), no_rows]:
        out = act_quant_bwd_mod.triton_act_quant_bwd(*args)
        _check_bwd(*args[:5], 0, False, out, ref.torch_act_quant_bwd(*args))


def test_custom_ops_trace_with_fake_tensors():
    """The registered ops have fake implementations (what torch.compile traces) with the real shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    da, h_q, h_scale, ends = bwd_inputs("swiglu", 128, 128)
    h = odd_h(9, 256)
    real = [t.shape for t in act_quant_fwd(h, "swiglu", 128)] + [
        t.shape for t in act_quant_bwd(da, h_q, h_scale, "swiglu", ends, 128, 128)
    ]
    with FakeTensorMode() as mode:
        fake = [t.shape for t in act_quant_fwd.op(mode.from_tensor(h), "swiglu", 128, False, True, None)] + [
            t.shape
            for t in act_quant_bwd.op(*(mode.from_tensor(t) for t in (da, h_q, h_scale)), "swiglu",
                                          mode.from_tensor(ends), 128, 128, False)  # fmt: skip
        ]
    assert fake == real


# ---- GPU: real shapes; act kernels within the contract ---------------------------------------

GPU_SHAPES = [  # (activation, M, F, E): Mixtral 8x7B, Qwen3-30B-A3B, the GELU seed shape
    ("swiglu", 16384, 14336, 8),
    ("swiglu", 65536, 768, 128),
    ("gelu", 32768, 6400, 16),
]


def _gpu_sizes(M: int, E: int, seed: int) -> list[int]:
    """Random group sizes with the odd ones forced in: 0, 1, 15, 17, 129; a few rows dropped."""
    g = torch.Generator().manual_seed(seed)
    odd = [0, 1, 15, 17, 129, 0]
    rest = M - DROPPED - sum(odd)
    counts = torch.bincount(torch.randint(0, E - len(odd), (rest,), generator=g), minlength=E - len(odd))
    return odd + counts.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("block, pow2, align", [(0, False, 16), (0, False, 128), (128, False, 128), (0, True, 128)])
@pytest.mark.parametrize("activation, M, F, E", GPU_SHAPES)
def test_gpu_act_kernels_match_reference(activation, M, F, E, block, pow2, align, device):
    X = 2 * F if activation == "swiglu" else F
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(M, X, device=device, generator=g) * 3).bfloat16()
    h[1], h[2, ::3] = 0, 448.0  # an all-zero row; values at the E4M3 limit
    fwd = act_quant_fwd(h, activation, block, pow2)
    _check_fwd(h, activation, block, pow2, fwd, ref.torch_act_quant_fwd(h, activation, block, pow2), "fwd")
    # The backward from the reference's FP8 h, so that both sides start from the same bytes.
    _, _, h_q, h_scale = ref.torch_act_quant_fwd(h, activation, block, pow2)
    del fwd, h
    sizes = _gpu_sizes(M, E, seed=1)
    ends = group_ends(sizes).to(device)
    da = torch.randn(M, F, device=device, generator=g).bfloat16()
    da[sum(sizes) :] = float("nan")
    out = act_quant_bwd(da, h_q, h_scale, activation, ends, align, block, pow2)
    expected = ref.torch_act_quant_bwd(da, h_q, h_scale, activation, ends, align, block, pow2)
    _check_bwd(da, h_q, h_scale, activation, ends, block, pow2, out, expected, "bwd")
