"""Dispatch step of the MoE layer: where routed rows travel to the ranks owning their experts.

Legend: M routed rows entering dispatch (grouped by expert, see moe/permute.py), H hidden,
E experts (all of them: the router scores every expert), P expert-parallel ranks (the EP group),
L = E / P local experts per rank, S rows this rank sends (kept rows), R rows it receives.

The layer calls `dispatch` between permute and the experts and `combine` after them. With one
expert-parallel rank (EP=1) nothing travels: `LocalDispatcher` passes rows through unchanged.
`AllToAllDispatcher` (EP>1) implements the same two methods; trainer/parallel.py installs it on
a built model, so the model code stays free of parallelism.

All-to-all dispatch, rank r owning experts [r*L, (r+1)*L):
    1. exchange the (E,) per-expert counts with one all_to_all_single (device tensors);
    2. ONE host synchronisation: `.tolist()` of the per-rank send and receive row counts, which
       all_to_all_single needs as Python ints (NCCL and gloo take split sizes on the host);
    3. all_to_all_single of the rows (expert order is rank order, so rows already lie in
       send order); received rows arrive grouped by source rank, then by local expert;
    4. a stable permutation regroups them by local expert (source-rank order inside an expert),
       computed on the device from the received counts.
`combine` undoes 4 with the inverse permutation and 3 with the reverse all-to-all, then pads the
dropped rows (past sum(tokens_per_expert), never sent) with zeros: `unpermute` ignores them.
Both collectives are autograd Functions whose backward is the reverse all-to-all.

Rows travel in the experts' compute dtype: under autocast the residual stream is fp32, and
sending it as such would put 4H bytes a row on the wire where the experts read 2H (bf16); the
experts cast to that dtype first anyway, so casting before the send changes no value (the layer's
`gather_rows` already casts while it permutes; the cast here makes sure of it).

FP8 on the wire (experts are Fp8GroupedMLP, parallel.fp8_dispatch=true): the sender quantizes
its rows with the recipe's row quantization (a scale per row, or per 1x128 tile for blockwise)
and sends the E4M3 bytes (as uint8: gloo has no float8 dtypes) and the fp32 scales: H + 4 bytes
a row (rowwise) against 2H for BF16. The receiver hands the experts those rows pre-quantized
(`Fp8Rows`), so GEMM1 reads exactly the bytes the non-EP path would have produced. The experts
also get the dequantized rows: the autograd handle for dx (straight-through, as in the non-EP
path, whose dx is taken as if quantization were the identity) and the source of wgrad1's
per-group column copy. Backward (dx) and combine travel in BF16. With fp8_dispatch=false the
dispatcher gets no recipe: rows travel in BF16 and the FP8 experts quantize them after
receiving, as without EP.

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

from moe.comm_timer import CommTimer
from moe.experts import compute_dtype


@dataclass(frozen=True)
class Fp8Rows:
    """Rows already quantized for the experts' first GEMM: q_MH E4M3, scale (M,) or (M, H // 128)."""

    q_MH: Tensor
    scale: Tensor


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs to undo dispatch, and what the experts may use besides x."""

    num_rows: int  # M rows that entered dispatch
    extra: Optional[object] = None  # dispatcher-specific (split sizes, regrouping)
    x_fp8: Optional[Fp8Rows] = None  # the experts' input pre-quantized (FP8 dispatch), else None


class LocalDispatcher:
    """EP=1: every expert is local, so dispatch and combine are identities."""

    # No rows travel, so the layer may hand the experts the tokens and the permutation instead of
    # the permuted rows (the FP8 experts then gather inside their quantization).
    moves_rows = False

    def dispatch(
        self, x_MH: torch.Tensor, tokens_per_expert_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        return x_MH, tokens_per_expert_E, DispatchMeta(num_rows=x_MH.shape[0])

    def combine(self, y_MH: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return y_MH


# ---- differentiable all-to-all -------------------------------------------------------------------


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
    def forward(ctx, x_SH, q_SH, scale_S, out_splits, in_splits, group, timer):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timer = out_splits, in_splits, group, timer
        q_RH = _all_to_all(q_SH.view(torch.uint8), out_splits, in_splits, group, timer).view(q_SH.dtype)
        s_R = _all_to_all(scale_S, out_splits, in_splits, group, timer)
        R, H = q_RH.shape
        span = H // s_R.shape[1] if s_R.dim() == 2 else H
        x_RH = (q_RH.float().view(R, H // span, span) * s_R.view(R, H // span, 1)).view(R, H).to(x_SH.dtype)
        ctx.mark_non_differentiable(q_RH, s_R)
        return x_RH, q_RH, s_R

    @staticmethod
    def backward(ctx, grad_x_RH, _grad_q, _grad_s):
        grad = _all_to_all(grad_x_RH, ctx.in_splits, ctx.out_splits, ctx.group, ctx.timer)
        return grad, None, None, None, None, None, None


# ---- the expert-parallel dispatcher ----------------------------------------------------------


@dataclass(frozen=True)
class AllToAllMeta:
    send_splits: list[int]  # rows sent to each EP rank (host ints)
    recv_splits: list[int]  # rows received from each EP rank
    regroup_R: Tensor  # int64 (R,): x_local = x_received[regroup_R] (grouped by local expert)
    ungroup_R: Tensor  # int64 (R,): the inverse permutation, for combine


class AllToAllDispatcher:
    """EP>1: send each kept row to the rank owning its expert and bring the results back.

    ep_group: the expert-parallel process group (P ranks); num_experts: E over the whole group.
    fp8_recipe: an Fp8Recipe to send FP8 rows (the experts must be Fp8GroupedMLP of that recipe);
    None sends rows in the experts' compute dtype (BF16 under autocast).
    timer: a CommTimer that times every all-to-all issued here, forward and backward; None
    times nothing (and costs nothing).
    """

    moves_rows = True  # the layer must gather the permuted rows before dispatch

    def __init__(
        self, ep_group, num_experts: int, fp8_recipe=None, timer: Optional[CommTimer] = None
    ) -> None:
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts={num_experts} must be a multiple of the EP size {self.ep}")
        self.num_experts, self.num_local = num_experts, num_experts // self.ep
        self.fp8_recipe = fp8_recipe
        self.timer = timer

    def dispatch(
        self, x_MH: torch.Tensor, tokens_per_expert_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        P, L = self.ep, self.num_local
        send_counts_PL = tokens_per_expert_E.view(P, L)
        recv_counts_PL = torch.empty_like(send_counts_PL)
        _all_to_all_single(recv_counts_PL, send_counts_PL, None, None, self.group, self.timer)
        # The one host synchronisation of the MoE layer: split sizes must be Python ints.
        splits = torch.cat([send_counts_PL.sum(1), recv_counts_PL.sum(1)]).tolist()
        send_splits, recv_splits = splits[:P], splits[P:]
        S, R = sum(send_splits), sum(recv_splits)

        # Received rows: source rank major, local expert minor; stable sort by local expert.
        expert_of_cell = torch.arange(L, device=x_MH.device).repeat(P)
        expert_R = torch.repeat_interleave(expert_of_cell, recv_counts_PL.reshape(-1), output_size=R)
        regroup_R = torch.sort(expert_R, stable=True).indices
        ungroup_R = torch.empty_like(regroup_R).scatter_(0, regroup_R, torch.arange(R, device=x_MH.device))
        local_tokens_per_expert_L = recv_counts_PL.sum(0)

        # The experts' compute dtype: what they would cast to (and the FP8 ones quantize) anyway.
        x_SH = x_MH[:S].to(compute_dtype(x_MH))
        x_fp8 = None
        if self.fp8_recipe is None:
            x_RH = _AllToAll.apply(x_SH, recv_splits, send_splits, self.group, self.timer)
        else:
            from kernels.quantize import quantize_rows

            rec = self.fp8_recipe
            with torch.no_grad():
                q_SH, s_S = quantize_rows(x_SH.detach().contiguous(), rec.block, rec.pow2_scales)
            x_RH, q_RH, s_R = _Fp8AllToAll.apply(
                x_SH, q_SH, s_S, recv_splits, send_splits, self.group, self.timer
            )
            x_fp8 = Fp8Rows(q_RH.index_select(0, regroup_R), s_R.index_select(0, regroup_R))
        x_local = x_RH.index_select(0, regroup_R)
        meta = DispatchMeta(
            num_rows=x_MH.shape[0],
            extra=AllToAllMeta(send_splits, recv_splits, regroup_R, ungroup_R),
            x_fp8=x_fp8,
        )
        return x_local, local_tokens_per_expert_L, meta

    def combine(self, y_local: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        a2a: AllToAllMeta = meta.extra
        y_RH = y_local.index_select(0, a2a.ungroup_R)
        y_SH = _AllToAll.apply(y_RH, a2a.send_splits, a2a.recv_splits, self.group, self.timer)
        dropped = meta.num_rows - y_SH.shape[0]
        if dropped:
            y_SH = torch.cat([y_SH, y_SH.new_zeros(dropped, y_SH.shape[1])])
        return y_SH
