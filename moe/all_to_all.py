"""Expert-parallel dispatch: routed rows travel to the ranks owning their experts, and back.

Shape letters (README.md): T tokens, M routed rows entering dispatch (grouped by expert, see
moe/permute.py), H hidden, E experts (all of them: the router scores every expert), W ranks of the
expert-parallel group, Z = E / W experts local to a rank, U rows this rank sends (its kept rows),
R rows it receives.

`AllToAllDispatcher` implements moe/dispatch.py's `Dispatcher`; trainer/parallel.py installs it on a
built model, so the model code stays free of parallelism. Rank r owns experts [r*Z, (r+1)*Z):
    1. gather the permuted rows in the experts' compute dtype (`gather_rows`);
    2. exchange the (E,) per-expert counts with one all_to_all_single (device tensors);
    3. ONE host synchronisation: `.tolist()` of the per-rank send and receive row counts, which
       all_to_all_single needs as Python ints (NCCL and gloo take split sizes on the host);
    4. all_to_all_single of the rows (expert order is rank order, so rows already lie in
       send order); received rows arrive grouped by source rank, then by local expert;
    5. a stable permutation regroups them by local expert (source-rank order inside an expert),
       computed on the device from the received counts.
`combine` undoes 5 with the inverse permutation and 4 with the reverse all-to-all, then pads the
dropped rows (past sum(tokens_per_expert), never sent) with zeros: `unpermute` ignores them.
Both collectives are autograd Functions whose backward is the reverse all-to-all.

Rows travel in the experts' compute dtype: under autocast the residual stream is fp32, and
sending it as such would put 4H bytes a row on the wire where the experts read 2H (bf16); the
experts cast to that dtype first anyway, so casting before the send changes no value.

FP8 on the wire (a recipe given: the experts are Fp8GroupedMLP of that recipe): the sender
quantizes its rows with the recipe's row quantization (a scale per row, or per 1x128 tile for
blockwise) and sends the E4M3 bytes (as uint8: gloo has no float8 dtypes) and the fp32 scales:
H + 4 bytes a row (rowwise) against 2H for BF16. The experts get those rows pre-quantized
(`ExpertInput.fp8`), so GEMM1 reads exactly the bytes the EP=1 path would have produced, and the
dequantized rows: the autograd handle for dx (straight-through, as in the EP=1 path, whose dx is
taken as if quantization were the identity) and the source of wgrad1's per-group column copy.
Backward (dx) and combine travel in BF16. Without a recipe rows travel in BF16 and the FP8
experts quantize them after receiving, as without EP.

Timing: given a `moe.comm_timer.CommTimer`, every all_to_all_single issued here (the counts
exchange, the payload and its scales, the combine, and the reverse all-to-alls in backward) runs
inside `timer.span()`; the trainer reports their share of step time (a2a_ms, a2a_share).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from kernels.quantize import quantize_rows
from moe.comm_timer import CommTimer
from moe.dispatch import ExpertInput, Fp8Rows, compute_dtype
from moe.fp8.recipe import Fp8Recipe
from moe.permute import PermuteMeta, gather_rows


def _all_to_all_single(out: Tensor, x: Tensor, out_splits, in_splits, group, timer) -> None:
    """dist.all_to_all_single, inside timer.span() when there is a timer (only the call is timed:
    buffers are allocated and made contiguous before it)."""
    with timer.span() if timer is not None else contextlib.nullcontext():
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group, timer) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    _all_to_all_single(out, x.contiguous(), out_splits, in_splits, group, timer)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows x[sum(in_splits[:j]) : ...] go to rank j; backward is the reverse all-to-all.

    Our own Function rather than torch.distributed.nn.functional.all_to_all_single (not tried with
    gloo and uneven splits): ten lines whose backward is plainly the transpose, tested on gloo
    with uneven and empty splits (tests/test_ep_dispatch.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group, timer) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timer = out_splits, in_splits, group, timer
        return _all_to_all(x, out_splits, in_splits, group, timer)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad = _all_to_all(grad_out, ctx.in_splits, ctx.out_splits, ctx.group, ctx.timer)
        return grad, None, None, None, None


class _Fp8AllToAll(torch.autograd.Function):
    """Forward sends E4M3 rows (as uint8) and their fp32 scales; returns the received rows
    dequantized to x's dtype (differentiable), their E4M3 bytes and scales (not differentiable).
    Backward: the reverse all-to-all of the gradient in x's dtype (straight-through quantization).
    """

    @staticmethod
    def forward(ctx, x_UH, q_UH, scale_U, out_splits, in_splits, group, timer):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timer = out_splits, in_splits, group, timer
        q_RH = _all_to_all(q_UH.view(torch.uint8), out_splits, in_splits, group, timer).view(q_UH.dtype)
        s_R = _all_to_all(scale_U, out_splits, in_splits, group, timer)
        R, H = q_RH.shape
        span = H // s_R.shape[1] if s_R.dim() == 2 else H
        x_RH = (q_RH.float().view(R, H // span, span) * s_R.view(R, H // span, 1)).view(R, H).to(x_UH.dtype)
        ctx.mark_non_differentiable(q_RH, s_R)
        return x_RH, q_RH, s_R

    @staticmethod
    def backward(ctx, grad_x_RH, _grad_q, _grad_s):
        grad = _all_to_all(grad_x_RH, ctx.in_splits, ctx.out_splits, ctx.group, ctx.timer)
        return grad, None, None, None, None, None, None


@dataclass(frozen=True)
class AllToAllHandle:
    """What `combine` needs to undo `dispatch`."""

    num_rows: int  # M rows that entered dispatch
    send_splits: list[int]  # rows sent to each EP rank (host ints)
    recv_splits: list[int]  # rows received from each EP rank
    regroup_R: Tensor  # int64 (R,): x_local = x_received[regroup_R] (grouped by local expert)
    ungroup_R: Tensor  # int64 (R,): the inverse permutation, for combine


class AllToAllDispatcher:
    """EP>1: send each kept row to the rank owning its expert and bring the results back.

    ep_group: the expert-parallel process group (W ranks); num_experts: E over the whole group,
    a multiple of W (checked once, by `ParallelConfig.validate`).
    fp8_recipe: send FP8 rows quantized by this recipe (the experts must be Fp8GroupedMLP of that
    recipe); None sends rows in the experts' compute dtype (BF16 under autocast).
    timer: times every all-to-all issued here, forward and backward; None times nothing.
    """

    def __init__(
        self, ep_group, num_experts: int, fp8_recipe: Optional[Fp8Recipe] = None, timer: Optional[CommTimer] = None
    ) -> None:
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group)
        assert num_experts % self.ep == 0, (num_experts, self.ep)
        self.num_experts, self.num_local = num_experts, num_experts // self.ep
        self.fp8_recipe = fp8_recipe
        self.timer = timer

    def dispatch(
        self, x_TH: Tensor, perm: PermuteMeta, tokens_per_expert_E: Tensor
    ) -> tuple[ExpertInput, AllToAllHandle]:
        W, Z = self.ep, self.num_local
        # The experts' compute dtype: what they would cast to (and the FP8 ones quantize) anyway.
        x_MH = gather_rows(x_TH, perm, compute_dtype(x_TH))
        send_counts_WZ = tokens_per_expert_E.view(W, Z)
        recv_counts_WZ = torch.empty_like(send_counts_WZ)
        _all_to_all_single(recv_counts_WZ, send_counts_WZ, None, None, self.group, self.timer)
        # The one host synchronisation of the MoE layer: split sizes must be Python ints.
        splits = torch.cat([send_counts_WZ.sum(1), recv_counts_WZ.sum(1)]).tolist()
        send_splits, recv_splits = splits[:W], splits[W:]
        U, R = sum(send_splits), sum(recv_splits)

        # Received rows: source rank major, local expert minor; stable sort by local expert.
        expert_of_cell = torch.arange(Z, device=x_MH.device).repeat(W)
        expert_R = torch.repeat_interleave(expert_of_cell, recv_counts_WZ.reshape(-1), output_size=R)
        regroup_R = torch.sort(expert_R, stable=True).indices
        ungroup_R = torch.empty_like(regroup_R).scatter_(0, regroup_R, torch.arange(R, device=x_MH.device))

        x_UH = x_MH[:U]
        x_fp8 = None
        if self.fp8_recipe is None:
            x_RH = _AllToAll.apply(x_UH, recv_splits, send_splits, self.group, self.timer)
        else:
            rec = self.fp8_recipe
            with torch.no_grad():
                q_UH, s_U = quantize_rows(x_UH.detach().contiguous(), rec.block, rec.pow2_scales)
            x_RH, q_RH, s_R = _Fp8AllToAll.apply(
                x_UH, q_UH, s_U, recv_splits, send_splits, self.group, self.timer
            )
            x_fp8 = Fp8Rows(q_RH.index_select(0, regroup_R), s_R.index_select(0, regroup_R))
        inp = ExpertInput(x_RH.index_select(0, regroup_R), recv_counts_WZ.sum(0), fp8=x_fp8)
        return inp, AllToAllHandle(x_MH.shape[0], send_splits, recv_splits, regroup_R, ungroup_R)

    def combine(self, y_local: Tensor, handle: AllToAllHandle) -> Tensor:
        y_RH = y_local.index_select(0, handle.ungroup_R)
        y_UH = _AllToAll.apply(y_RH, handle.send_splits, handle.recv_splits, self.group, self.timer)
        dropped = handle.num_rows - y_UH.shape[0]
        if dropped:
            y_UH = torch.cat([y_UH, y_UH.new_zeros(dropped, y_UH.shape[1])])
        return y_UH
