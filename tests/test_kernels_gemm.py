"""FP8 grouped GEMMs (kernels/grouped_gemm.py, kernels/grouped_gemm_wgrad.py: blockwise, and the
rowwise weight gradient) against their references (kernels/reference_gemm.py).

Shape letters (README.md): M routed rows, K reduction dim, N output dim, E experts, P padded rows.

CPU: Triton's interpreter at tiny odd shapes (groups of 0, 1, 15, 129, 155 rows; empty experts
first, in the middle and last), both memory paths (TMA descriptors and pointer loads), two tile
configs, outputs pre-filled with NaN so every row and block the kernel must write is checked.
FP8 inputs are made by torch's cast, never inside a kernel. Kernel vs reference differs only by
fp32 summation order: relative L2 < 1e-5. The reference itself is checked against an
independent fp64 computation.

GPU (`pytest -m gpu`): the four experts-block shapes of bench/common.py's SHAPES, forward GEMM1
and GEMM2 (2d x 3d) and both weight gradients (2d x 2d), uneven groups with empty experts,
through the autotuned entry points.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import grouped_gemm as gg
from kernels.common import FP8_DTYPE
from kernels.grouped_gemm import fp8_grouped_mm, launch_grouped_mm
from kernels.grouped_gemm_wgrad import fp8_grouped_mm_wgrad, fp8_grouped_mm_wgrad_rowwise, launch_grouped_mm_wgrad
from kernels.reference_gemm import torch_fp8_grouped_mm, torch_fp8_grouped_mm_wgrad, torch_fp8_grouped_mm_wgrad_rowwise

PATHS = [True, False]  # use_tma
CONFIGS = [None, dict(BLOCK_M=32, SPLIT_N=2, GROUP_M=3, num_warps=4)]  # autotuned / 2 halves


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def rand_fp8(*shape, device="cpu", gen=None) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, device=device) * 64
    return x.clamp(-448, 448).to(FP8_DTYPE)


def rand_scale(*shape, device="cpu", gen=None) -> torch.Tensor:
    """Positive fp32 scales spanning a factor 16, so a misplaced scale block shows up."""
    return torch.exp2(torch.rand(*shape, generator=gen, device=device) * 4 - 8)


def grouped_inputs(M, K, N, sizes, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    E = len(sizes)
    a_q, a_s = rand_fp8(M, K, device=device, gen=gen), rand_scale(M, K // 128, device=device, gen=gen)
    b_q = rand_fp8(E, N, K, device=device, gen=gen)
    b_s = rand_scale(E, N // 128, K // 128, device=device, gen=gen)
    group_end = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    return a_q, a_s, b_q, b_s, group_end


def wgrad_inputs(N, K, padded_sizes, device="cpu", seed=0, rowwise=False):
    """Blockwise scales (N, P/128), (K, P/128); rowwise: (N, E), (K, E), one per row and group."""
    gen = torch.Generator(device=device).manual_seed(seed)
    P, E = sum(padded_sizes), len(padded_sizes)
    per_scale = E if rowwise else P // 128
    a_q, a_s = rand_fp8(N, P, device=device, gen=gen), rand_scale(N, per_scale, device=device, gen=gen)
    b_q, b_s = rand_fp8(K, P, device=device, gen=gen), rand_scale(K, per_scale, device=device, gen=gen)
    padded_end = torch.tensor(padded_sizes, device=device).cumsum(0).to(torch.int32)
    return a_q, a_s, b_q, b_s, padded_end


SIZES = [0, 1, 15, 129, 155]  # M = 300: an empty expert first, sizes odd and around 128
M, K, N = 300, 256, 384
PADDED = [0, 256, 0, 384, 128, 0]  # P = 768: empty experts first, in the middle and last
WN, WK = 256, 384


# ---- CPU (interpreter) -----------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=["autotuned", "bm32_bn256"])
@pytest.mark.parametrize("use_tma", PATHS, ids=["tma", "pointer"])
def test_grouped_mm_matches_reference(use_tma, config):
    a_q, a_s, b_q, b_s, group_end = grouped_inputs(M, K, N, SIZES)
    out = torch.full((M, N), float("nan"))
    launch_grouped_mm(a_q, a_s, b_q, b_s, group_end, out, use_tma, config)
    ref = torch_fp8_grouped_mm(a_q, a_s, b_q, b_s, group_end, torch.float32)
    assert not out.isnan().any()
    assert rel_l2(out, ref) < 1e-5


def test_grouped_mm_rows_past_the_last_group_are_zero():
    sizes = [3, 0, 130, 40]  # 173 of 300 rows belong to experts
    a_q, a_s, b_q, b_s, group_end = grouped_inputs(M, K, N, sizes, seed=1)
    out = torch.full((M, N), float("nan"))
    launch_grouped_mm(a_q, a_s, b_q, b_s, group_end, out, True)
    ref = torch_fp8_grouped_mm(a_q, a_s, b_q, b_s, group_end, torch.float32)
    assert torch.equal(out[173:], torch.zeros(M - 173, N))
    assert rel_l2(out[:173], ref[:173]) < 1e-5


def within_one_bf16_ulp(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """The kernel's fp32 result (1e-5 from the reference) cast to bf16. On a GPU that cast rounds
    to nearest (half an ulp, <= 2**-8 relative); triton 3.9's interpreter truncates (measured:
    35.2373 -> 35.0), so the CPU bound is one ulp, 2**-7 relative, plus 1e-5 of the RMS."""
    err = (out.float() - ref).abs()
    return bool((err <= ref.abs() * 2**-7 + 1e-5 * ref.pow(2).mean().sqrt()).all())


def test_grouped_mm_public_op_bf16():
    a_q, a_s, b_q, b_s, group_end = grouped_inputs(M, K, N, SIZES, seed=2)
    out = fp8_grouped_mm.op(a_q, a_s, b_q, b_s, group_end)
    ref = torch_fp8_grouped_mm(a_q, a_s, b_q, b_s, group_end, torch.float32)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert within_one_bf16_ulp(out, ref)


@pytest.mark.parametrize("config", CONFIGS, ids=["autotuned", "bm32_bn256"])
@pytest.mark.parametrize("use_tma", PATHS, ids=["tma", "pointer"])
def test_wgrad_matches_reference_and_writes_zero_blocks(use_tma, config):
    a_q, a_s, b_q, b_s, padded_end = wgrad_inputs(WN, WK, PADDED)
    E = len(PADDED)
    out = torch.full((E, WN, WK), float("nan"))
    launch_grouped_mm_wgrad(a_q, a_s, b_q, b_s, padded_end, out, use_tma, config)
    ref = torch_fp8_grouped_mm_wgrad(a_q, a_s, b_q, b_s, padded_end, torch.float32)
    for e, size in enumerate(PADDED):
        if size == 0:  # written, and zero: not garbage, not NaN
            assert torch.equal(out[e], torch.zeros(WN, WK)), f"expert {e} has no tokens"
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize("config", CONFIGS, ids=["autotuned", "bm32_bn256"])
@pytest.mark.parametrize("use_tma", PATHS, ids=["tma", "pointer"])
def test_wgrad_rowwise_matches_reference_and_writes_zero_blocks(use_tma, config):
    """Per-group scales applied once, in the epilogue: the same sum as the reference's."""
    a_q, a_s, b_q, b_s, padded_end = wgrad_inputs(WN, WK, PADDED, rowwise=True)
    E = len(PADDED)
    out = torch.full((E, WN, WK), float("nan"))
    launch_grouped_mm_wgrad(a_q, a_s, b_q, b_s, padded_end, out, use_tma, config, rowwise=True)
    ref = torch_fp8_grouped_mm_wgrad_rowwise(a_q, a_s, b_q, b_s, padded_end, torch.float32)
    for e, size in enumerate(PADDED):
        if size == 0:
            assert torch.equal(out[e], torch.zeros(WN, WK)), f"expert {e} has no tokens"
    assert rel_l2(out, ref) < 1e-5


def test_wgrad_rowwise_public_op_fp32_and_non_128_features():
    """fp32 out (the fp32 master weights' gradient); N and K not multiples of 128 (the rowwise
    recipe's feature sizes need only 16): the tile edges are masked."""
    a_q, a_s, b_q, b_s, padded_end = wgrad_inputs(200, 144, [256, 0, 128], seed=6, rowwise=True)
    out = fp8_grouped_mm_wgrad_rowwise.op(a_q, a_s, b_q, b_s, padded_end, torch.float32)
    ref = torch_fp8_grouped_mm_wgrad_rowwise(a_q, a_s, b_q, b_s, padded_end, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (3, 200, 144)
    assert torch.equal(out[1], torch.zeros(200, 144))
    assert rel_l2(out, ref) < 1e-5


# persistent (4 programs in the interpreter: several tiles each), stores by TMA
PERSISTENT_TMA_STORE = dict(BLOCK_M=32, SPLIT_N=2, GROUP_M=3, num_warps=4, PROGRAMS_PER_SM=1, STORE_TMA=True)


@pytest.mark.parametrize("rowwise", [False, True], ids=["blockwise", "rowwise"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_tma", PATHS, ids=["tma", "pointer"])
def test_wgrad_persistent_tma_store_clips_its_edges_and_accumulates(use_tma, out_dtype, rowwise):
    """N = 200 and K = 144, neither a multiple of the 32x256 tile: the edge tiles' TMA stores are
    clipped to the output (a guard band after it stays untouched); an accumulating launch adds
    the product to what out held. Empty experts first, in the middle and last."""
    N, K, padded = 200, 144, [0, 256, 0, 128, 384, 0]
    a_q, a_s, b_q, b_s, padded_end = wgrad_inputs(N, K, padded, seed=8, rowwise=rowwise)
    ref_fn = torch_fp8_grouped_mm_wgrad_rowwise if rowwise else torch_fp8_grouped_mm_wgrad
    ref = ref_fn(a_q, a_s, b_q, b_s, padded_end, torch.float32)
    size = len(padded) * N * K
    storage = torch.full((size + 4096,), float("nan"), dtype=out_dtype)
    out = storage[:size].view(len(padded), N, K)
    launch_grouped_mm_wgrad(a_q, a_s, b_q, b_s, padded_end, out, use_tma, PERSISTENT_TMA_STORE, rowwise=rowwise)
    assert storage[size:].isnan().all(), "a store went past the output"
    for e in (0, 2, 5):
        assert torch.equal(out[e], torch.zeros(N, K, dtype=out_dtype)), f"expert {e} has no tokens"
    tol = 1e-5 if out_dtype == torch.float32 else 4e-3
    assert rel_l2(out, ref) < tol
    if out_dtype == torch.float32:
        before = torch.randn(len(padded), N, K, generator=torch.Generator().manual_seed(1))
        out.copy_(before)
        launch_grouped_mm_wgrad(a_q, a_s, b_q, b_s, padded_end, out, use_tma, PERSISTENT_TMA_STORE,
                                rowwise=rowwise, accumulate=True)  # fmt: skip
        assert storage[size:].isnan().all()
        assert rel_l2(out, before + ref) < 1e-5


def test_wgrad_public_op_bf16():
    a_q, a_s, b_q, b_s, padded_end = wgrad_inputs(WN, WK, [128, 0, 256], seed=3)
    out = fp8_grouped_mm_wgrad.op(a_q, a_s, b_q, b_s, padded_end)
    ref = torch_fp8_grouped_mm_wgrad(a_q, a_s, b_q, b_s, padded_end, torch.float32)
    assert out.dtype == torch.bfloat16 and out.shape == (3, WN, WK)
    assert torch.equal(out[1].float(), torch.zeros(WN, WK))
    assert within_one_bf16_ulp(out, ref)


def fp64_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantize by gathering each element's scale (no repeat_interleave, unlike the reference)."""
    blk = [torch.arange(n) // 128 for n in q.shape]
    if q.dim() == 2:
        return q.double() * scale.double()[:, blk[1]]
    return q.double() * scale.double()[:, blk[1][:, None], blk[2][None, :]]


@pytest.mark.parametrize("autocast", [False, True])
def test_references_against_fp64(autocast):
    """fp32 arithmetic, also inside a bf16 autocast region (a training step's forward)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _check_references_against_fp64()


def _check_references_against_fp64():
    a_q, a_s, b_q, b_s, group_end = grouped_inputs(M, K, N, SIZES, seed=4)
    a64, b64 = fp64_dequant(a_q, a_s), fp64_dequant(b_q, b_s)
    want = torch.zeros(M, N, dtype=torch.float64)
    row = 0
    for e, size in enumerate(SIZES):
        for r in range(row, row + size):
            want[r] = b64[e] @ a64[r]
        row += size
    got = torch_fp8_grouped_mm(a_q, a_s, b_q, b_s, group_end, torch.float32)
    assert rel_l2(got, want) < 1e-6

    a_q, a_s, b_q, b_s, padded_end = wgrad_inputs(WN, WK, PADDED, seed=5)
    a64, b64 = fp64_dequant(a_q, a_s), fp64_dequant(b_q, b_s)
    owner = torch.repeat_interleave(torch.arange(len(PADDED)), torch.tensor(PADDED))
    want = torch.stack([(a64 * (owner == e)) @ b64.T for e in range(len(PADDED))])
    got = torch_fp8_grouped_mm_wgrad(a_q, a_s, b_q, b_s, padded_end, torch.float32)
    assert rel_l2(got, want) < 1e-6

    a_q, a_s, b_q, b_s, padded_end = wgrad_inputs(WN, WK, PADDED, seed=7, rowwise=True)
    group_of_P = owner.tolist()  # each token's scale column is its group's
    a64, b64 = a_q.double() * a_s.double()[:, group_of_P], b_q.double() * b_s.double()[:, group_of_P]
    want = torch.stack([(a64 * (owner == e)) @ b64.T for e in range(len(PADDED))])
    got = torch_fp8_grouped_mm_wgrad_rowwise(a_q, a_s, b_q, b_s, padded_end, torch.float32)
    assert rel_l2(got, want) < 1e-6


def test_bad_arguments_raise():
    a_q, a_s, b_q, b_s, group_end = grouped_inputs(M, K, N, SIZES)
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_grouped_mm.op(a_q[:, :200], a_s, b_q[:, :, :200], b_s, group_end)
    with pytest.raises(ValueError, match="b_scale"):
        fp8_grouped_mm.op(a_q, a_s, b_q, b_s[:, :1], group_end)
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_grouped_mm.op(a_q, a_s, b_q, b_s, group_end, torch.int32)
    with pytest.raises(ValueError, match="group_end"):
        fp8_grouped_mm.op(a_q, a_s, b_q, b_s, group_end[:2])
    w = wgrad_inputs(WN, WK, [128, 256])
    with pytest.raises(ValueError, match="P"):
        fp8_grouped_mm_wgrad.op(w[0][:, :100], w[1], w[2][:, :100], w[3], w[4])
    with pytest.raises(ValueError, match="a_scale must be"):  # blockwise tiles given to the rowwise op
        fp8_grouped_mm_wgrad_rowwise.op(*wgrad_inputs(WN, WK, [128, 256, 128]))
    with pytest.raises(ValueError, match="a_q must be"):  # the reference checks alike
        torch_fp8_grouped_mm(a_q[:, :100], a_s, b_q, b_s, group_end)


def test_eager_entry_points_equal_the_custom_ops():
    """The layer's eager calls skip the op's dispatch (host time): same kernels, same bytes."""
    args = grouped_inputs(40, 128, 256, [0, 17, 23])
    assert torch.equal(fp8_grouped_mm(*args), fp8_grouped_mm.op(*args))
    w = wgrad_inputs(128, 256, [128, 0, 128])
    assert torch.equal(fp8_grouped_mm_wgrad(*w, torch.float32), fp8_grouped_mm_wgrad.op(*w, torch.float32))
    w = wgrad_inputs(128, 256, [128, 0, 128], rowwise=True)
    assert torch.equal(fp8_grouped_mm_wgrad_rowwise(*w), fp8_grouped_mm_wgrad_rowwise.op(*w))
    with pytest.raises(ValueError, match="a_q must be"):  # the same checks
        fp8_grouped_mm(args[0][:, :100], *args[1:])


def test_custom_ops_pass_opcheck():
    """Fake registration, autograd registration and AOT dispatch (torch.compile's view).
    test_schema is left out: its checker multiplies the fp8 inputs, which torch cannot."""
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fp8_grouped_mm.op, grouped_inputs(40, 128, 256, [0, 17, 23]), test_utils=utils)
    torch.library.opcheck(fp8_grouped_mm_wgrad.op, wgrad_inputs(128, 256, [128, 0, 128]), test_utils=utils)
    torch.library.opcheck(fp8_grouped_mm_wgrad_rowwise.op, wgrad_inputs(128, 256, [128, 0, 128], rowwise=True),
                          test_utils=utils)  # fmt: skip


# ---- GPU (real shapes) -----------------------------------------------------------------------
# Tolerances. fp32 output: Hopper's fp8 wgmma keeps ~14 mantissa bits while it sums one 128-wide
# K block (DeepSeek-V3 report); the kernel promotes every block into fp32, so its error stays
# ~1e-5..1e-4 relative at any K; 1e-3 leaves 10x margin while a wrong scale block or group is
# O(1). bf16 output: the result is then rounded to bf16, which alone costs about 2e-3 relative L2
# (measured on the reference itself as `round_err`); the kernel may add at most the fp32 bound.

SHAPES = {  # bench/common.py's four experts-block shapes: (M routed rows, H, F, E, act)
    "mixtral_8x7b": (16384, 4096, 14336, 8, "swiglu"),
    "deepseek_v3_ep8": (32768, 7168, 2048, 32, "swiglu"),
    "qwen3_30b_a3b": (65536, 2048, 768, 128, "swiglu"),
    "seed": (32768, 4096, 6400, 16, "gelu"),
}


def uneven_sizes(M: int, E: int, multiple: int = 1, seed: int = 0) -> list[int]:
    """Random group sizes summing to M, with two empty experts and odd sizes (unless padded)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(E, generator=gen) + 0.2
    weights[[0, E // 2]] = 0
    sizes = (weights / weights.sum() * (M // multiple)).floor().long() * multiple
    sizes[-1] += M - sizes.sum()
    return sizes.tolist()


@pytest.fixture
def exact_fp32_matmul(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def gemm_problem(shape: str, gemm: str):
    """Forward GEMM1/GEMM2: (rows, K, N, E); weight gradients W1/W2: (tokens, N, K, E)."""
    M, H, F, E, act = SHAPES[shape]
    X = 2 * F if act == "swiglu" else F
    return {"fwd1": (M, H, X, E), "fwd2": (M, F, H, E), "wgrad1": (M, X, H, E),
            "wgrad2": (M, H, F, E)}[gemm]


def check_bf16(out: torch.Tensor, ref: torch.Tensor) -> None:
    err, round_err = rel_l2(out, ref), rel_l2(ref.to(torch.bfloat16), ref)
    print(f"rel L2 {err:.2e} (bf16 rounding of the reference alone {round_err:.2e})")
    assert err < round_err + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["fwd1", "fwd2"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_grouped_mm_real_shapes(shape, gemm, exact_fp32_matmul):
    rows, K, N, E = gemm_problem(shape, gemm)
    a_q, a_s, b_q, b_s, ge = grouped_inputs(rows, K, N, uneven_sizes(rows, E), device="cuda")
    out = fp8_grouped_mm(a_q, a_s, b_q, b_s, ge)
    ref = torch_fp8_grouped_mm(a_q, a_s, b_q, b_s, ge, torch.float32)
    check_bf16(out, ref)
    if gemm == "fwd1":
        out32 = fp8_grouped_mm(a_q, a_s, b_q, b_s, ge, torch.float32)
        assert rel_l2(out32, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("rowwise", [False, True], ids=["blockwise", "rowwise"])
@pytest.mark.parametrize("gemm", ["wgrad1", "wgrad2"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_wgrad_real_shapes(shape, gemm, rowwise, exact_fp32_matmul):
    """Blockwise: bf16 out (and fp32 for wgrad1). Rowwise: fp32 out, as the module asks for fp32
    master weights, up to ~8k tokens per expert, within the same 1e-3 bound as the blockwise
    kernel's fp32 output (see the tolerances above)."""
    tokens, N, K, E = gemm_problem(shape, gemm)
    sizes = uneven_sizes(tokens, E, multiple=128)
    w = wgrad_inputs(N, K, sizes, device="cuda", rowwise=rowwise)
    op, torch_op = (fp8_grouped_mm_wgrad_rowwise, torch_fp8_grouped_mm_wgrad_rowwise) if rowwise else (
        fp8_grouped_mm_wgrad, torch_fp8_grouped_mm_wgrad)  # fmt: skip
    out = op(*w, torch.float32 if rowwise else torch.bfloat16)
    ref = torch_op(*w, torch.float32)
    for e in (e for e, s in enumerate(sizes) if s == 0):
        assert not out[e].any(), f"expert {e} has no tokens: its block must be zeros"
    if rowwise:
        err = rel_l2(out, ref)
        print(f"rel L2 {err:.2e}")
        assert err < 1e-3
        return
    check_bf16(out, ref)
    if gemm == "wgrad1":
        assert rel_l2(op(*w, torch.float32), ref) < 1e-3


@pytest.mark.gpu
def test_gpu_tma_path_selected_and_no_host_sync():
    """The fast path compiles here, and a tuned launch never synchronizes with the host."""
    a_q, a_s, b_q, b_s, ge = grouped_inputs(4096, 1024, 2048, uneven_sizes(4096, 8), "cuda")
    w = wgrad_inputs(1024, 512, uneven_sizes(4096, 8, multiple=128), "cuda")
    fp8_grouped_mm(a_q, a_s, b_q, b_s, ge)  # autotunes (syncs) once
    fp8_grouped_mm_wgrad(*w)
    print("paths:", gg._PATH)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp8_grouped_mm(a_q, a_s, b_q, b_s, ge)
        fp8_grouped_mm_wgrad(*w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gg._PATH == {"fp8_grouped_mm": "tma", "fp8_grouped_mm_wgrad": "tma"}, (
        "the TMA path failed to compile on this triton; see the logged warning"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("use_tma", PATHS, ids=["tma", "pointer"])
def test_gpu_both_paths_mid_shape(use_tma, exact_fp32_matmul):
    """Both memory paths, with 192 rows past the last group (must come back as zeros)."""
    a_q, a_s, b_q, b_s, ge = grouped_inputs(8192, 2048, 1536, uneven_sizes(8000, 16), "cuda")
    out = torch.full((8192, 1536), math.nan, device="cuda")
    launch_grouped_mm(a_q, a_s, b_q, b_s, ge, out, use_tma)
    assert not out[8000:].any()
    assert rel_l2(out, torch_fp8_grouped_mm(a_q, a_s, b_q, b_s, ge, torch.float32)) < 1e-3
    w = wgrad_inputs(1536, 2048, uneven_sizes(8192, 16, multiple=128), "cuda")
    out = torch.full((16, 1536, 2048), math.nan, device="cuda")
    launch_grouped_mm_wgrad(*w, out, use_tma)
    assert rel_l2(out, torch_fp8_grouped_mm_wgrad(*w, torch.float32)) < 1e-3


def config_meta(cfg) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@pytest.mark.gpu
@pytest.mark.parametrize("rowwise", [False, True], ids=["blockwise", "rowwise"])
def test_gpu_every_wgrad_config(rowwise, exact_fp32_matmul):
    """The autotuner picks a candidate by time alone, so each one (persistent or not, TMA stores or
    not) is checked here, written and accumulated, at N = 1200 and K = 2000: edge tiles on both
    sides, two empty experts."""
    from kernels.grouped_gemm_wgrad import tuned_grouped_mm_wgrad

    sizes = uneven_sizes(8192, 16, multiple=128)
    w = wgrad_inputs(1200, 2000, sizes, "cuda", rowwise=rowwise)
    ref = (torch_fp8_grouped_mm_wgrad_rowwise if rowwise else torch_fp8_grouped_mm_wgrad)(*w, torch.float32)
    before = torch.randn_like(ref)
    for cfg in tuned_grouped_mm_wgrad.configs:
        out = torch.full_like(ref, math.nan)
        launch_grouped_mm_wgrad(*w, out, True, config_meta(cfg), rowwise=rowwise)
        assert rel_l2(out, ref) < 1e-3, cfg
        assert all(not out[e].any() for e, n in enumerate(sizes) if n == 0), cfg
        out.copy_(before)
        launch_grouped_mm_wgrad(*w, out, True, config_meta(cfg), rowwise=rowwise, accumulate=True)
        assert rel_l2(out, before + ref) < 1e-3, cfg


@pytest.mark.gpu
def test_gpu_every_grouped_mm_config(exact_fp32_matmul):
    """Each forward candidate, with 192 rows past the last group (zeros) and two empty experts."""
    a_q, a_s, b_q, b_s, ge = grouped_inputs(8192, 2048, 1536, uneven_sizes(8000, 16), "cuda")
    ref = torch_fp8_grouped_mm(a_q, a_s, b_q, b_s, ge, torch.float32)
    for cfg in gg.tuned_grouped_mm.configs:
        out = torch.full((8192, 1536), math.nan, device="cuda")
        launch_grouped_mm(a_q, a_s, b_q, b_s, ge, out, True, config_meta(cfg))
        assert not out[8000:].any() and rel_l2(out, ref) < 1e-3, cfg

