"""Expert parallelism on CPU over gloo, the dispatcher alone: the all-to-all round trip (uneven and
empty splits, gradients), FP8 rows on the wire against the non-EP FP8 experts, and what travels:
every all_to_all_single recorded (one packed FP8 buffer in dispatch, BF16 elsewhere, the timer
seeing each), the FP8 bytes and scales bit for bit, the wire dtype under autocast.

The multi-process tests spawn 2 or 4 processes (tests/ep_helpers.py); failures name the rank.
"""

import pytest
import torch

from ep_helpers import _close, _env, _spawn

pytestmark = pytest.mark.slow


def _grouped_rows_perm(counts, dropped: int):
    """The permutation of rows already grouped by expert (one assignment a row, the `dropped`
    last rows dropped): what plan_permute makes of ids sorted by expert, the identity."""
    from moe.permute import plan_permute

    E = len(counts)
    ids = torch.cat([torch.repeat_interleave(torch.arange(E), torch.tensor(counts)), torch.full((dropped,), E)])
    return plan_permute(ids.view(-1, 1), E)


# ---- dispatcher round trip ---------------------------------------------------------------------

E, H = 4, 8
# Rows each rank sends per expert (rank 1 sends nothing, expert 1 gets nothing anywhere) and dropped rows.
COUNTS = {0: ([3, 0, 2, 4], 1), 1: ([0, 0, 0, 0], 2)}


def _round_trip(rank, world):
    from moe.all_to_all import AllToAllDispatcher

    env = _env(world, world)
    counts, dropped = COUNTS[rank]
    M = sum(counts) + dropped
    expert_M = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    x = torch.randn(M, H, generator=torch.Generator().manual_seed(rank))
    x[: len(expert_M), 0] = expert_M.float()  # tag each row with its expert
    x.requires_grad_()
    disp = AllToAllDispatcher(env.ep_group, E)
    inp, handle = disp.dispatch(x, _grouped_rows_perm(counts, dropped), torch.tensor(counts))
    x_local, tpe_local = inp.x, inp.tokens_per_expert_E

    Z = E // world
    all_counts = torch.tensor([COUNTS[r][0] for r in range(world)])
    assert tpe_local.tolist() == all_counts[:, rank * Z : (rank + 1) * Z].sum(0).tolist()
    local_expert = torch.repeat_interleave(torch.arange(Z), tpe_local)
    assert x_local[:, 0].tolist() == (local_expert + rank * Z).float().tolist()  # grouped by expert

    y_local = x_local * (local_expert + rank * Z + 1).float()[:, None]  # expert e multiplies by e + 1
    y = disp.combine(y_local, handle)
    assert y.shape == (M, H)
    kept = len(expert_M)
    _close(y[:kept], x[:kept].detach() * (expert_M + 1).float()[:, None], "combine")
    assert (y[kept:] == 0).all()
    w = torch.randn(M, H, generator=torch.Generator().manual_seed(10 + rank))
    (y * w).sum().backward()
    _close(x.grad[:kept], w[:kept] * (expert_M + 1).float()[:, None], "dx")


def test_dispatch_combine_round_trip_with_zero_token_ranks():
    _spawn(_round_trip, 2)


# ---- FP8 on the wire -----------------------------------------------------------------------------

F8_COUNTS = {0: [5, 0, 17, 3], 1: [0, 9, 2, 0]}


def _fp8_dispatch(rank, world, recipe_name):
    from kernels.quantize import quantize_rows
    from moe.all_to_all import AllToAllDispatcher
    from moe.dispatch import ExpertInput
    from moe.fp8.grouped_mlp import Fp8GroupedMLP
    from moe.fp8.recipe import Fp8Recipe
    from moe.fp8.reference import fp64_grouped_mlp

    env = _env(world, world)
    recipe = Fp8Recipe(recipe_name)
    Hd, Fd, Z = 128, 128, E // world
    torch.manual_seed(0)
    full = Fp8GroupedMLP(Hd, Fd, E, "swiglu", recipe=recipe)
    full.reset_parameters(0.05)
    xs = {r: torch.randn(sum(c), Hd).bfloat16() for r, c in F8_COUNTS.items()}
    dys = {r: torch.randn(sum(c), Hd).bfloat16() for r, c in F8_COUNTS.items()}

    # Reference: every rank's rows of expert e together (source-rank order), as EP groups them.
    def chunks(r):
        return torch.split(torch.arange(sum(F8_COUNTS[r])), F8_COUNTS[r])

    order = torch.cat([chunks(r)[e] + (0 if r == 0 else sum(F8_COUNTS[0])) for e in range(E) for r in range(world)])
    x_all = torch.cat([xs[0], xs[1]])[order].requires_grad_()
    dy_all = torch.cat([dys[0], dys[1]])[order]
    counts_all = torch.tensor(F8_COUNTS[0]) + torch.tensor(F8_COUNTS[1])
    y_ref = full(ExpertInput(x_all, counts_all))
    y_ref.backward(dy_all)
    lo = 0 if rank == 0 else sum(F8_COUNTS[0])
    mine_idx = (order >= lo) & (order < lo + sum(F8_COUNTS[rank]))
    back = torch.argsort(order[mine_idx])  # reference rows of this rank, in this rank's order

    local = Fp8GroupedMLP(Hd, Fd, Z, "swiglu", recipe=recipe)
    with torch.no_grad():
        local.w1.copy_(full.w1[rank * Z : (rank + 1) * Z])
        local.w2.copy_(full.w2[rank * Z : (rank + 1) * Z])
    disp = AllToAllDispatcher(env.ep_group, E, recipe)
    x = xs[rank].clone().requires_grad_()
    inp, handle = disp.dispatch(x, _grouped_rows_perm(F8_COUNTS[rank], 0), torch.tensor(F8_COUNTS[rank]))
    tpe = inp.tokens_per_expert_E
    assert inp.fp8 is not None and inp.fp8.q_MH.dtype == torch.float8_e4m3fn
    # The wire carried the sender's own quantization: requantizing the received rows reproduces it.
    q_again, s_again = quantize_rows(inp.x, recipe.block)
    assert torch.equal(q_again.view(torch.uint8), inp.fp8.q_MH.view(torch.uint8))
    y = disp.combine(local(inp), handle)
    y.backward(dys[rank])

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    # GEMM1 reads the same bytes as the non-EP path: output, dx and dw2 agree to accumulation order.
    assert rel(y, y_ref[mine_idx][back]) < 1e-2, rel(y, y_ref[mine_idx][back])
    assert rel(x.grad, x_all.grad[mine_idx][back]) < 1e-2
    assert rel(local.w2.grad, full.w2.grad[rank * Z : (rank + 1) * Z]) < 1e-2
    # wgrad1's column copy comes from the dequantized rows (the bf16 rows stayed on the sender):
    # one more E4M3 rounding, so dw1 is compared loosely to the non-EP path and to fp64.
    dw1_ref = full.w1.grad[rank * Z : (rank + 1) * Z]
    err_vs_fp8 = rel(local.w1.grad, dw1_ref)
    assert err_vs_fp8 < 0.06, err_vs_fp8
    on_rank = torch.repeat_interleave(torch.arange(E), counts_all) // Z == rank  # rows of my experts
    _, _, dw1_64, _ = fp64_grouped_mlp(
        x_all.detach()[on_rank], full.w1.detach()[rank * Z : (rank + 1) * Z],
        full.w2.detach()[rank * Z : (rank + 1) * Z], tpe.tolist(), dy_all[on_rank], "swiglu",
    )
    err_vs_fp64 = rel(local.w1.grad, dw1_64)
    assert err_vs_fp64 < 0.08, err_vs_fp64
    print(f"rank {rank} {recipe_name}: dw1 vs non-EP fp8 {err_vs_fp8:.4f}, vs fp64 {err_vs_fp64:.4f} "
          f"(non-EP vs fp64 {rel(dw1_ref, dw1_64):.4f})")


@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_fp8_dispatch_sends_fp8_and_matches_non_ep(recipe):
    _spawn(_fp8_dispatch, 2, recipe)


# ---- what travels: one packed FP8 all-to-all per direction, bit for bit -------------------------

WIRE_E = 8
# Rows each rank sends per expert and its dropped rows. Expert 1 gets nothing anywhere; at 2
# ranks rank 0 gets rows of one expert from both (regrouping moves them); at 4 ranks rank 2 sends
# nothing and (experts 4, 5) receives nothing.
WIRE_COUNTS = {
    0: ([3, 0, 5, 1, 0, 0, 7, 0], 2),
    1: ([1, 0, 0, 4, 0, 0, 0, 3], 0),
    2: ([0, 0, 0, 0, 0, 0, 0, 0], 1),
    3: ([0, 0, 6, 0, 0, 0, 1, 2], 0),
}
# (recipe, H, bytes of a packed row, x dtype, autocast): C written out from moe/all_to_all.py's
# wire format, H = 70 (not a multiple of 4, 8 or 128) pads the E4M3 bytes before the scale.
WIRE_CASES = [("rowwise", 70, 80, torch.float32, True), ("blockwise", 256, 272, torch.bfloat16, False)]


def _wire_inputs(rank, H, x_dtype):
    """Rank `rank`'s tokens (top-2, routed in shuffled order) and permutation: any rank can make
    any rank's, so each checks what it received against what the senders quantized."""
    from moe.permute import plan_permute

    counts, dropped = WIRE_COUNTS[rank]
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.cat([torch.repeat_interleave(torch.arange(WIRE_E), torch.tensor(counts)),
                     torch.full((dropped + (sum(counts) + dropped) % 2,), WIRE_E)])  # fmt: skip
    ids = ids[torch.randperm(len(ids), generator=g)].view(-1, 2)
    x_TH = torch.randn(ids.shape[0], H, generator=g) * torch.logspace(-3, 3, ids.shape[0])[:, None]
    if ids.shape[0] > 1:
        x_TH[1] = 0.0  # an all-zero token: scale and bytes of a zero row travel too
    return x_TH.to(x_dtype), plan_permute(ids, WIRE_E), torch.tensor(counts)


def _record_all_to_alls(calls):
    """Wrap dist.all_to_all_single (which moe.all_to_all calls through the module): record each
    call's (dtype, shape, input split sizes)."""
    import torch.distributed as dist

    original = dist.all_to_all_single

    def recording(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        calls.append((input.dtype, tuple(input.shape), input_split_sizes))
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = recording
    return original


def _wire(rank, world):
    import torch.distributed as dist

    from kernels.common import dequantize
    from kernels.quantize import quantize_rows
    from moe.all_to_all import AllToAllDispatcher
    from moe.comm_timer import CommTimer
    from moe.fp8.recipe import Fp8Recipe

    env = _env(world, world)
    Z = WIRE_E // world
    calls = []
    original = _record_all_to_alls(calls)
    try:
        for name, H, C, x_dtype, autocast in WIRE_CASES:
            recipe = Fp8Recipe(name)
            x0, perm, counts = _wire_inputs(rank, H, x_dtype)
            U = int(counts.sum())
            dy = torch.randn(perm.token_idx_M.shape[0], H, generator=torch.Generator().manual_seed(rank))
            results = {}
            for wire in ("bf16", "fp8"):
                calls.clear()
                timer = CommTimer("cpu")
                disp = AllToAllDispatcher(env.ep_group, WIRE_E, recipe if wire == "fp8" else None, timer)
                x = x0.clone().requires_grad_()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    inp, handle = disp.dispatch(x, perm, counts)
                    n_dispatch = len(calls)
                    y = disp.combine(inp.x * 2, handle)  # identity experts, times 2 (exact)
                n_combine = len(calls) - n_dispatch
                y.backward(dy.to(y.dtype))
                n_forward = n_dispatch + n_combine
                phases = calls[:n_dispatch], calls[n_dispatch:n_forward], calls[n_forward:]
                results[wire] = inp, handle, y.detach(), x.grad, phases, timer.spans
            inp, handle, y, dx, (fwd_disp, fwd_comb, bwd), spans = results["fp8"]
            R, dtype = inp.x.shape[0], inp.x.dtype
            assert dtype == torch.bfloat16
            where = f"rank {rank}/{world} {name}"

            # One all-to-all per direction and pass after the counts; dispatch moves only packed
            # FP8 rows (payload + scales, no bf16): U rows of C bytes, split as sent.
            payload = (torch.uint8, (U, C), handle.send_splits)
            assert fwd_disp == [(torch.int64, (world, Z), None), payload], (where, fwd_disp)
            assert fwd_comb == [(dtype, (R, H), handle.recv_splits)], (where, fwd_comb)
            assert bwd == [(dtype, (U, H), handle.send_splits), (dtype, (R, H), handle.recv_splits)], (where, bwd)
            assert spans == len(fwd_disp) + len(fwd_comb) + len(bwd) == 5, where  # the timer saw each
            assert results["bf16"][4][0][1] == (dtype, (U, H), handle.send_splits)  # against 2H bytes a row

            # Bit for bit: each sender's own quantization of its rows, grouped by local expert then
            # source rank, and the dequantized rows are exactly q * scale in the compute dtype.
            expected_q, expected_s = [], []
            for e in range(rank * Z, (rank + 1) * Z):
                for src in range(world):
                    x_src, perm_src, counts_src = _wire_inputs(src, H, x_dtype)
                    q_src, s_src = quantize_rows(
                        x_src.to(dtype), recipe.block, recipe.pow2_scales, perm_src.token_idx_M
                    )
                    lo = int(counts_src[:e].sum())
                    expected_q.append(q_src[lo : lo + int(counts_src[e])])
                    expected_s.append(s_src[lo : lo + int(counts_src[e])])
            q, s = inp.fp8.q_MH, inp.fp8.scale
            assert q.dtype == torch.float8_e4m3fn and q.is_contiguous() and s.is_contiguous(), where
            assert torch.equal(q.view(torch.uint8), torch.cat(expected_q).view(torch.uint8)), where
            assert torch.equal(s, torch.cat(expected_s)), where
            assert torch.equal(inp.x, dequantize(q, s).to(dtype)), where
            tpe = torch.stack([torch.tensor(WIRE_COUNTS[r][0]) for r in range(world)]).sum(0)
            assert inp.tokens_per_expert_E.tolist() == tpe[rank * Z : (rank + 1) * Z].tolist(), where

            # Round trip: this rank's kept rows come back as 2 * their dequantized values, dropped
            # rows as zeros; the gradient is the BF16 wire's bit for bit (straight-through).
            q_mine, s_mine = quantize_rows(x0.to(dtype), recipe.block, recipe.pow2_scales, perm.token_idx_M[:U])
            assert torch.equal(y[:U], dequantize(q_mine, s_mine).to(dtype) * 2), where
            assert (y[U:] == 0).all(), where
            assert dx.dtype == x_dtype and torch.equal(dx, results["bf16"][3]), where
    finally:
        dist.all_to_all_single = original


@pytest.mark.parametrize("world", [2, 4])
def test_fp8_dispatch_one_packed_all_to_all_bit_exact(world):
    _spawn(_wire, world)


def test_dequantize_rows_is_the_reference():
    """moe.all_to_all.dequantize_rows against kernels.common.dequantize: every E4M3 byte (NaN
    included), scales that push products past bf16's range and into its subnormals, both scale
    shapes, three dtypes."""
    from kernels.common import dequantize
    from moe.all_to_all import dequantize_rows

    g = torch.Generator().manual_seed(0)
    q = torch.arange(256, dtype=torch.uint8).repeat(6, 2)[:, torch.randperm(512, generator=g)]
    q = q.view(torch.float8_e4m3fn)  # (6, 512): each row holds every byte twice
    for scale in (torch.tensor([1.0, 3e-3, 7.1e35, 1e-38, 0.0, 1.7]),
                  torch.exp(torch.randn(6, 4, generator=g) * 20)):  # fmt: skip
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            torch.testing.assert_close(
                dequantize_rows(q, scale, dtype), dequantize(q, scale).to(dtype), rtol=0, atol=0, equal_nan=True
            )
