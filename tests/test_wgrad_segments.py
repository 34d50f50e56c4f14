"""The weight gradient summed over segments (micro-batches) in one GEMM
(kernels/grouped_gemm_wgrad_segments.py) against its reference (the sum of each segment's
reference, kernels/reference_gemm.py), and that reference against fp64.

CPU: Triton's interpreter at tiny odd shapes: N and K not multiples of the tile (so a tile's edge
rows read the next segment's operands, which must not reach the output), experts empty in some
segments, in every segment, and tokens past the last group; rowwise scales that jump by 2**20
and 2**-24 between segments (the accumulator is rescaled at each boundary); both memory paths,
two tile configs, outputs pre-filled with NaN; adding into an existing gradient.
GPU (`pytest -m gpu`): Mixtral-width weight gradients over 4 micro-batches, rowwise and blockwise.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_gemm import CONFIGS, PATHS, rand_fp8, rand_scale, rel_l2, uneven_sizes

from kernels.grouped_gemm_wgrad_segments import fp8_grouped_mm_wgrad_segments
from kernels.grouped_gemm_wgrad import launch_grouped_mm_wgrad
from kernels.reference_gemm import torch_fp8_grouped_mm_wgrad_segments

# P = 768 a segment, E = 6: expert 5 has no tokens anywhere, 2 only in segment 1, the third
# segment leaves its last 256 padded tokens to no expert.
SEGMENT_SIZES = [[0, 256, 0, 384, 128, 0], [384, 0, 128, 0, 256, 0], [128, 128, 0, 128, 128, 0]]
N, K = 200, 144


def segment_inputs(sizes: list[list[int]], N: int, K: int, rowwise: bool, device="cpu", seed=0, P=None):
    """(S, N, P) and (S, K, P) FP8 operands, their scales (rowwise (S, N, E), (S, K, E), scaled by
    2**20 on a in segment 1 and 2**-24 on b in segment 2; blockwise (S, ., P/128)) and (S, E) ends."""
    gen = torch.Generator(device=device).manual_seed(seed)
    S, E = len(sizes), len(sizes[0])
    P = P or max(sum(s) for s in sizes)
    per_scale = E if rowwise else P // 128
    a_q, b_q = rand_fp8(S, N, P, device=device, gen=gen), rand_fp8(S, K, P, device=device, gen=gen)
    a_s, b_s = rand_scale(S, N, per_scale, device=device, gen=gen), rand_scale(S, K, per_scale, device=device, gen=gen)
    if rowwise and S > 2:
        a_s[1] *= 2.0**20
        b_s[2] *= 2.0**-24
    ends = torch.tensor(sizes, device=device).cumsum(1).to(torch.int32)
    return a_q, a_s, b_q, b_s, ends


@pytest.mark.parametrize("rowwise", [False, True], ids=["blockwise", "rowwise"])
@pytest.mark.parametrize("config", CONFIGS, ids=["autotuned", "bm32_bn256"])
@pytest.mark.parametrize("use_tma", PATHS, ids=["tma", "pointer"])
def test_segments_match_the_sum_of_segment_references(use_tma, config, rowwise):
    args = segment_inputs(SEGMENT_SIZES, N, K, rowwise, seed=1)
    out = torch.full((6, N, K), float("nan"))
    launch_grouped_mm_wgrad(*args, out, use_tma, config, rowwise=rowwise)
    ref = torch_fp8_grouped_mm_wgrad_segments(*args, rowwise=rowwise)
    assert torch.equal(out[5], torch.zeros(N, K)), "expert 5 has no tokens in any segment"
    assert rel_l2(out, ref) < 1e-5
    for e in range(5):  # each expert's block on its own: a wrong segment's scale shows in its block
        assert rel_l2(out[e], ref[e]) < 1e-5, f"expert {e}"


@pytest.mark.parametrize("rowwise", [False, True], ids=["blockwise", "rowwise"])
def test_public_entry_adds_into_and_equals_the_one_segment_kernel(rowwise):
    """With `into`: into + the product. One segment: the unsegmented kernel's bytes."""
    args = segment_inputs(SEGMENT_SIZES, N, K, rowwise, seed=2)
    ref = torch_fp8_grouped_mm_wgrad_segments(*args, rowwise=rowwise)
    before = torch.randn(6, N, K, generator=torch.Generator().manual_seed(3))
    into = before.clone()
    assert fp8_grouped_mm_wgrad_segments(*args, rowwise=rowwise, into=into) is into
    assert rel_l2(into, before + ref) < 1e-5
    assert torch.equal(into[5], before[5])
    one = [t[:1] for t in args]
    plain = torch.empty(6, N, K)
    launch_grouped_mm_wgrad(*(t[0] for t in one), plain, True, rowwise=rowwise)
    assert torch.equal(fp8_grouped_mm_wgrad_segments(*one, rowwise=rowwise), plain)


def test_reference_against_fp64():
    for rowwise in (False, True):
        a_q, a_s, b_q, b_s, ends = segment_inputs(SEGMENT_SIZES, N, K, rowwise, seed=4)
        want = torch.zeros(6, N, K, dtype=torch.float64)
        for s, sizes in enumerate(SEGMENT_SIZES):
            owner = torch.repeat_interleave(torch.arange(7), torch.tensor([*sizes, 768 - sum(sizes)]))
            cols = owner.clamp_max(5) if rowwise else torch.arange(768) // 128
            a64, b64 = a_q[s].double() * a_s[s].double()[:, cols], b_q[s].double() * b_s[s].double()[:, cols]
            for e in range(6):
                want[e] += (a64 * (owner == e)) @ b64.T
        got = torch_fp8_grouped_mm_wgrad_segments(a_q, a_s, b_q, b_s, ends, rowwise=rowwise)
        assert rel_l2(got, want) < 1e-6


def test_bad_arguments_raise():
    a_q, a_s, b_q, b_s, ends = segment_inputs(SEGMENT_SIZES, N, K, rowwise=True)
    with pytest.raises(ValueError, match="same number S"):
        fp8_grouped_mm_wgrad_segments(a_q, a_s, b_q[:2], b_s[:2], ends, rowwise=True)
    with pytest.raises(ValueError, match="segmented operands"):
        fp8_grouped_mm_wgrad_segments(a_q[0], a_s[0], b_q[0], b_s[0], ends[0], rowwise=True)
    with pytest.raises(ValueError, match="a_scale must be"):  # one scale column short of E
        fp8_grouped_mm_wgrad_segments(a_q, a_s[..., :5], b_q, b_s, ends, rowwise=True)
    with pytest.raises(ValueError, match="into must be a contiguous float32"):
        fp8_grouped_mm_wgrad_segments(a_q, a_s, b_q, b_s, ends, rowwise=True, into=torch.zeros(6, K, N))


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rowwise", [False, True], ids=["blockwise", "rowwise"])
@pytest.mark.parametrize("gemm", ["wgrad1", "wgrad2"])
def test_mixtral_width_segments_on_the_gpu(gemm, rowwise):
    """4 micro-batches of 8192 routed rows at Mixtral width (E = 8, two experts empty in each, a
    different pair each time): against the reference within the fp32 GEMM bound of
    tests/test_kernels_gemm.py (1e-3), accumulating too."""
    H, F, E = 4096, 14336, 8
    n, k = (2 * F, H) if gemm == "wgrad1" else (H, F)
    sizes = [[-(-c // 128) * 128 for c in uneven_sizes(8192, E, seed=s)] for s in range(4)]
    P = max(sum(s) for s in sizes)
    args = segment_inputs(sizes, n, k, rowwise, device="cuda", seed=5, P=P)
    ref = torch_fp8_grouped_mm_wgrad_segments(*args, rowwise=rowwise)
    out = fp8_grouped_mm_wgrad_segments(*args, rowwise=rowwise)
    assert rel_l2(out, ref) < 1e-3
    into = ref.clone()
    fp8_grouped_mm_wgrad_segments(*args, rowwise=rowwise, into=into)
    assert rel_l2(into, 2 * ref) < 1e-3
