"""Expert parallelism on CPU over gloo, the dispatcher alone: the all-to-all round trip (uneven and
empty splits, gradients), FP8 rows on the wire against the non-EP FP8 experts, and the all-to-all
timer and the wire dtype under autocast.

Every test spawns 2 processes (tests/ep_helpers.py); failures name the rank.
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


# ---- all-to-all timing and the wire dtype ------------------------------------------------------


def _timed_dispatch(rank, world):
    from moe.all_to_all import AllToAllDispatcher
    from moe.comm_timer import CommTimer
    from moe.fp8.recipe import Fp8Recipe

    env = _env(world, world)
    Hd, dropped = 128, 2
    counts = torch.tensor(F8_COUNTS[rank])
    perm = _grouped_rows_perm(F8_COUNTS[rank], dropped)
    x0 = torch.randn(int(counts.sum()) + dropped, Hd, generator=torch.Generator().manual_seed(rank))
    dy = torch.randn(x0.shape, generator=torch.Generator().manual_seed(10 + rank))

    def step(disp):  # identity experts: dispatch, combine, backward
        x = x0.clone().requires_grad_()
        inp, handle = disp.dispatch(x, perm, counts)
        y = disp.combine(inp.x * 2, handle)
        spans_fwd = disp.timer.spans if disp.timer is not None else None
        y.backward(dy)
        return y.detach(), x.grad, spans_fwd

    # Forward: counts + rows (+ scales for FP8) + combine; backward: combine's and dispatch's reverse.
    for recipe, fwd_spans in ((None, 3), (Fp8Recipe("rowwise"), 4)):
        timer = CommTimer(torch.device("cpu"))
        y_ref, dx_ref, _ = step(AllToAllDispatcher(env.ep_group, E, recipe))
        y, dx, spans_fwd = step(AllToAllDispatcher(env.ep_group, E, recipe, timer))
        assert (spans_fwd, timer.spans) == (fwd_spans, fwd_spans + 2), (recipe, spans_fwd, timer.spans)
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref), f"rank {rank}: the timer changed results"
        assert timer.drain_ms() > 0 and timer.spans == 0

    # Under autocast the permuted rows are fp32; they travel in bf16 (the experts' dtype), and the
    # gradient comes back to fp32.
    disp = AllToAllDispatcher(env.ep_group, E)
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inp, handle = disp.dispatch(x, perm, counts)
        assert inp.x.dtype == torch.bfloat16
        y = disp.combine(inp.x * 2, handle)
    y.float().backward(dy)
    assert x.grad.dtype == torch.float32
    kept = int(counts.sum())
    assert torch.equal(y[:kept], (x0[:kept].bfloat16() * 2))


def test_dispatcher_timer_counts_every_all_to_all_and_changes_nothing():
    _spawn(_timed_dispatch, 2)
