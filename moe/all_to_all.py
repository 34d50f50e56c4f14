"""Expert-parallel dispatch: routed rows travel to the ranks owning their experts, and back.

Shape letters (README.md): T tokens, M routed rows entering dispatch (grouped by expert, see
moe/permute.py), H hidden, E experts (all of them: the router scores every expert), W ranks of the
expert-parallel group, Z = E / W experts local to a rank, U rows this rank sends (its kept rows),
R rows it receives, C bytes of a packed FP8 row.

`AllToAllDispatcher` implements moe/dispatch.py's `Dispatcher`; trainer/parallel.py installs it on a
built model, so the model code stays free of parallelism. Rank r owns experts [r*Z, (r+1)*Z):
    1. gather the permuted rows in the experts' compute dtype (`gather_rows`; FP8 rows are
       gathered by their quantizer instead, below);
    2. exchange the (E,) per-expert counts with one all_to_all_single (device tensors);
    3. ONE host synchronisation: `.tolist()` of the per-rank send and receive row counts, which
       all_to_all_single needs as Python ints (NCCL and gloo take split sizes on the host);
    4. all_to_all_single of the rows (expert order is rank order, so rows already lie in
       send order); received rows arrive grouped by source rank, then by local expert;
    5. a stable permutation regroups them by local expert (source-rank order inside an expert),
       computed on the device from the received counts.
`combine` undoes 5 with the inverse permutation and 4 with the reverse all-to-all, which writes
the kept rows straight into the (M, H) result; its dropped rows (past sum(tokens_per_expert),
never sent) are zeroed: `unpermute` ignores them. Both collectives are autograd Functions whose
backward is the reverse all-to-all.

Rows travel in the experts' compute dtype: under autocast the residual stream is fp32, and
sending it as such would put 4H bytes a row on the wire where the experts read 2H (bf16); the
experts cast to that dtype first anyway, so casting before the send changes no value.

FP8 on the wire (a recipe given: the experts are Fp8GroupedMLP of that recipe): the rows travel as
their E4M3 bytes and fp32 scales, quantized by the recipe's row quantization (a scale per row, or
per 1x128 tile for blockwise), in ONE buffer and ONE all_to_all_single. Wire format, a uint8
(U, C) buffer, one row per routed row (kernels/quantize_packed.py, `packed_row_layout`):

    bytes [0, H)                the row's E4M3 values (uint8 on the wire: gloo has no float8)
    [H, round_up(H, 4))         padding, so the scales start 4-byte aligned
    then 4 * n bytes            n fp32 scales: n = 1 (rowwise) or H / 128 (blockwise), row-major
    up to C                     padding: C = round_up(round_up(H, 4) + 4n, 16)

Padding bytes carry nothing (the kernel leaves them unwritten, the receiver never looks). At Mixtral-8x7B width (H = 4096) C is 4112 bytes rowwise
and 4224 blockwise, against 8192 for a BF16 row. The sender quantizes straight from the tokens
into that buffer (the gathering quantizer, `row_index_M` = the kept rows' tokens: no BF16 copy of
the routed rows is made); the receiver views the E4M3 bytes and the scales of what arrived as
fp8 and fp32 column slices (no copy) and reads them once more while regrouping by local expert,
which leaves both contiguous. The experts get those rows pre-quantized (`ExpertInput.fp8`), so
GEMM1 reads exactly the bytes the EP=1 path would have produced, and the dequantized rows: the
autograd handle for dx (straight-through, as in the EP=1 path, whose dx is taken as if
quantization were the identity) and the source of wgrad1's per-group column copy.
Backward (dx) and combine travel in BF16; the backward of the FP8 dispatch puts the gradient
back in arrival order with a gather (`ungroup_R`), sends it, and sums each token's rows straight
from what arrived (the gather's backward, kernels/combine.py). Without a recipe rows travel in
BF16 and the FP8 experts quantize them after receiving, as without EP.

All-to-alls per MoE layer and step: the counts (E int64), then one per direction and pass:
dispatch rows, combine rows forward; their reverses backward. The split sizes are read to the host
once, in dispatch, and kept in the handle for combine and both backwards.

Timing: given a `moe.comm_timer.CommTimer`, every all_to_all_single issued here (the counts
exchange, the dispatch payload, the combine, and the reverse all-to-alls in backward) runs
inside `timer.span()`; the trainer reports their share of step time (a2a_ms, a2a_share).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from kernels.combine import gather_sum
from kernels.quantize_packed import quantize_rows_packed, unpack_rows
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
    """Rows x[sum(in_splits[:j]) : ...] go to rank j and arrive as the first sum(out_splits) rows
    of an (out_rows, ...) result whose further rows are zero; backward is the reverse all-to-all
    of the gradient's first sum(out_splits) rows.

    Our own Function rather than torch.distributed.nn.functional.all_to_all_single (not tried with
    gloo and uneven splits): ten lines whose backward is plainly the transpose, tested on gloo
    with uneven and empty splits (tests/test_ep_dispatch.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], out_rows: int, group, timer) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timer = out_splits, in_splits, group, timer
        out = x.new_empty((out_rows, *x.shape[1:]))
        arrived = sum(out_splits)
        _all_to_all_single(out[:arrived], x.contiguous(), out_splits, in_splits, group, timer)
        out[arrived:].zero_()
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad = _all_to_all(grad_out[: sum(ctx.out_splits)], ctx.in_splits, ctx.out_splits, ctx.group, ctx.timer)
        return grad, None, None, None, None, None


@dataclass(frozen=True)
class AllToAllHandle:
    """What `combine` (and the backwards) need to undo `dispatch`."""

    num_rows: int  # M rows that entered dispatch
    send_splits: list[int]  # rows sent to each EP rank (host ints)
    recv_splits: list[int]  # rows received from each EP rank
    regroup_R: Tensor  # int64 (R,): x_local = x_received[regroup_R] (grouped by local expert)
    ungroup_R: Tensor  # int64 (R,): the inverse permutation, for combine


def _take_rows(t_RN: Tensor, idx_R: Tensor) -> Tensor:
    """t_RN[idx_R] (rows, or one value a row), contiguous. FP8 rows whose width allows it move as
    int64: the same bytes in an eighth of the elements a byte-wise index_select would address."""
    wide = t_RN.dim() == 2 and t_RN.element_size() == 1 and t_RN.shape[1] % 8 == 0
    if wide and t_RN.stride(0) % 8 == 0 and t_RN.storage_offset() % 8 == 0:
        return t_RN.view(torch.uint8).view(torch.int64).index_select(0, idx_R).view(torch.uint8).view(t_RN.dtype)
    return t_RN.index_select(0, idx_R)


def dequantize_rows(q_RH: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q * scale in `dtype` for E4M3 rows q_RH and their scales ((R,) or (R, H // 128)): bit for
    bit `kernels.common.dequantize(q_RH, scale).to(dtype)` (the reference), without its fp32
    intermediates: the cast to `dtype` is exact (E4M3 values are bf16 values), and the in-place
    multiply by fp32 scales computes in fp32 and rounds once to `dtype`."""
    R, H = q_RH.shape
    n = scale.shape[1] if scale.dim() == 2 else 1
    x_RH = q_RH.to(dtype)
    x_RH.view(R, n, H // n).mul_(scale.view(R, n, 1))
    return x_RH


class _Fp8Dispatch(torch.autograd.Function):
    """Forward: the kept rows x_TH[token_idx_M[:U]], in `dtype`, quantized into one packed buffer
    (the module docstring's wire format), sent in one all-to-all, regrouped by local expert.
    Returns their dequantized values in `dtype` (differentiable, straight-through), E4M3 bytes
    and scales (not differentiable). Backward: the gradient back in arrival order, the reverse
    all-to-all in `dtype`, then each token's kept rows summed in fp32 into x_TH's dtype (dropped
    rows, past U, are never read there: they stay unwritten)."""

    @staticmethod
    def forward(ctx, x_TH, perm: PermuteMeta, dtype, recipe: Fp8Recipe, handle: AllToAllHandle, group, timer):
        ctx.perm, ctx.handle, ctx.group, ctx.timer, ctx.x_dtype = perm, handle, group, timer, x_TH.dtype
        H, U = x_TH.shape[1], sum(handle.send_splits)
        packed_UC = quantize_rows_packed(x_TH.to(dtype), recipe.block, recipe.pow2_scales, perm.token_idx_M[:U])
        packed_RC = _all_to_all(packed_UC, handle.recv_splits, handle.send_splits, group, timer)
        del packed_UC
        q_RH, s_R = (_take_rows(t, handle.regroup_R) for t in unpack_rows(packed_RC, H, recipe.block))
        x_RH = dequantize_rows(q_RH, s_R, dtype)
        ctx.mark_non_differentiable(q_RH, s_R)
        return x_RH, q_RH, s_R

    @staticmethod
    def backward(ctx, grad_x_RH, _grad_q, _grad_s):
        perm, handle = ctx.perm, ctx.handle
        grad_RH = grad_x_RH.index_select(0, handle.ungroup_R)  # arrival order
        grad_MH = grad_RH.new_empty((handle.num_rows, grad_RH.shape[1]))
        U = sum(handle.send_splits)
        _all_to_all_single(grad_MH[:U], grad_RH, handle.send_splits, handle.recv_splits, ctx.group, ctx.timer)
        dx_TH = gather_sum(grad_MH, perm.row_of_TA, perm.kept_TA, ctx.x_dtype)
        return dx_TH, None, None, None, None, None, None


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
        dtype = compute_dtype(x_TH)
        x_MH = gather_rows(x_TH, perm, dtype) if self.fp8_recipe is None else None
        send_counts_WZ = tokens_per_expert_E.view(W, Z)
        recv_counts_WZ = torch.empty_like(send_counts_WZ)
        _all_to_all_single(recv_counts_WZ, send_counts_WZ, None, None, self.group, self.timer)
        # The one host synchronisation of the MoE layer: split sizes must be Python ints.
        splits = torch.cat([send_counts_WZ.sum(1), recv_counts_WZ.sum(1)]).tolist()
        send_splits, recv_splits = splits[:W], splits[W:]
        U, R = sum(send_splits), sum(recv_splits)

        # Received rows: source rank major, local expert minor; stable sort by local expert.
        device = x_TH.device
        expert_of_cell = torch.arange(Z, device=device).repeat(W)
        expert_R = torch.repeat_interleave(expert_of_cell, recv_counts_WZ.reshape(-1), output_size=R)
        regroup_R = torch.sort(expert_R, stable=True).indices
        ungroup_R = torch.empty_like(regroup_R).scatter_(0, regroup_R, torch.arange(R, device=device))
        handle = AllToAllHandle(perm.token_idx_M.shape[0], send_splits, recv_splits, regroup_R, ungroup_R)
        tokens_per_local_expert_Z = recv_counts_WZ.sum(0)

        if self.fp8_recipe is None:
            x_RH = _AllToAll.apply(x_MH[:U], recv_splits, send_splits, R, self.group, self.timer)
            return ExpertInput(x_RH.index_select(0, regroup_R), tokens_per_local_expert_Z), handle
        x_RH, q_RH, s_R = _Fp8Dispatch.apply(x_TH, perm, dtype, self.fp8_recipe, handle, self.group, self.timer)
        return ExpertInput(x_RH, tokens_per_local_expert_Z, fp8=Fp8Rows(q_RH, s_R)), handle

    def combine(self, y_local: Tensor, handle: AllToAllHandle) -> Tensor:
        y_RH = y_local.index_select(0, handle.ungroup_R)
        return _AllToAll.apply(
            y_RH, handle.send_splits, handle.recv_splits, handle.num_rows, self.group, self.timer
        )
