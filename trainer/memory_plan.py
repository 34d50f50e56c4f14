"""Per-GPU memory plan of a training run, from its config and a meta-device build of the model
(nothing allocated, no process group, no GPU): `plan_memory`, `format_plan` (what
`run.dry_run=true` prints), and `refuse_if_cannot_fit` (a real run's check before it allocates).

Layouts, N GPUs, W = parallel.ep, fp32 master weights and AdamW's two moments (fp32, or bf16 with
optim.state_dtype=bfloat16) everywhere:
    one process     every parameter, its gradient and state
    ddp, ep=1       the same on every rank, plus DDP's gradient buckets (one more fp32 copy)
    ddp, ep=W       dense parameters full on every rank, E / W experts a rank (gradients reduced
                    by hand, no buckets)
    fsdp, ep=1|W    FSDP2: every parameter, gradient and state / N (experts split over W, then
                    sharded over the N / W ranks holding the same ones); during a block its
                    parameters exist unsharded (bf16, its local experts only), counted for the
                    block and the one prefetched, plus one block's unsharded gradient (bf16 and
                    its fp32 reduce-scatter copy); the root (embedding, final norm, output) is
                    gathered in fp32 for the whole forward and backward, with the output and
                    norm gradients; with run.grad_accum > 1 every block's unsharded gradient is
                    kept in fp32 between micro-batches (no reduce-scatter until the last one).
Activations: trainer/memory_activations.py, for run.micro_batch_size x run.seq_len tokens a rank,
balanced routing assumed (an EP rank's experts receive T*A rows on average); with
run.activation_checkpointing each block's input is kept, plus one block's full activations during
its recompute.

Peak = parameters + optimizer state (+ buckets) + CONTEXT_BYTES + the larger of two phases:
    forward/backward  weight copies, FP8 copies, FSDP's unsharded blocks, and the largest of
                      (every saved activation + the cross-entropy's working set (plain:
                      backward's two fp32 T x V tensors) + the head's gradients) and each point of
                      backward, where block b's activations are traded for its gradients (all
                      gradients with grad_accum > 1);
                      with grad_accum > 1 and run.weight_cast=step every BF16 weight copy is kept
                      for the whole step; with run.defer_expert_wgrad the FP8 experts' stashed
                      operands, their gradients counted only from their last backward
    optimizer step    every gradient + foreach AdamW's temporary (optim.fused=false: sqrt of
                      exp_avg_sq, 4 bytes a parameter of its largest group; fused AdamW has none)
                      or EP's flattened gradient reduction
bench/memory_plan.py measures it against real steps on a GPU (bench/NOTES.md, Memory).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from moe.config import require
from moe.experts import GroupedMLP
from moe.fp8.float8_linear import Float8Linear
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.training import Fp8Training
from moe.model import MoETransformer
from trainer.config import TrainConfig, foreach_adamw
from trainer.memory_activations import (
    FP32,
    block_activation_bytes,
    block_input_bytes,
    cross_entropy_bytes,
    deferred_wgrad_bytes,
    experts_backward_bytes,
    head_activation_bytes,
    head_weight_copy_bytes,
    routed_rows,
    weight_copy_bytes,
)

log = logging.getLogger("fp8moe")

GIB = 1024**3
# The CUDA context and cuBLAS/NCCL workspaces (~0.75 GiB a process on Hopper with NCCL
# communicators) and the caching allocator's reserve over what tensors hold (~0.75 GiB with
# expandable segments): outside torch.cuda.max_memory_allocated, inside what the device has.
CONTEXT_BYTES = int(1.5 * GIB)
# A run is refused when the plan exceeds the device's memory by more than the plan's own error
# (bench/memory_plan.py checks it within 10% of the measured peak); above 1.0 it is warned about.
REFUSE_RATIO = 1.10
OPTIONAL_ENTRIES = ("DDP gradient buckets", "FSDP unsharded")  # printed where the layout has them


@dataclass(frozen=True)
class PlanEntry:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    layout: str  # e.g. "fsdp, ep=8 on 16 GPUs"
    num_gpus: int
    tokens: int  # T: tokens of one micro-batch on one rank
    activation_checkpointing: bool
    entries: tuple[PlanEntry, ...]
    phases: tuple[tuple[str, int], ...]  # (name, bytes above the persistent state), the peak's candidates
    peak_phase: str
    total_bytes: int

    @property
    def gib(self) -> float:
        return self.total_bytes / GIB

    def bytes_of(self, name: str) -> int:
        return next(e.bytes for e in self.entries if e.name == name)


def meta_model(cfg: TrainConfig) -> MoETransformer:
    """The configured model on the meta device, its FP8 modules swapped in as the trainer does."""
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
        Fp8Training(cfg.fp8, grad_accum=cfg.run.grad_accum).convert(model)
    return model


def _numel(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def _experts(module: nn.Module) -> list[GroupedMLP]:
    return [m for m in module.modules() if isinstance(m, GroupedMLP)]


def _expert_params(module: nn.Module) -> int:
    return sum(m.w1.numel() + m.w2.numel() for m in _experts(module))


def _fp8_expert_bytes(experts: Fp8GroupedMLP, ep: int) -> tuple[int, int, int]:
    """(bytes of one orientation, forward scales, transposed scales) of the E / W local experts."""
    Z, (X, H), F = experts.num_experts // ep, experts.w1.shape[1:], experts.ffn_dim
    n = Z * (X * H + H * F)
    b = experts.recipe.block
    if b:
        blocks = Z * ((X // b) * (H // b) + (H // b) * (F // b))
        return n, FP32 * blocks, FP32 * blocks
    return n, FP32 * Z * (X + H), FP32 * Z * (H + F)


def _fp8_dense_bytes(model: nn.Module) -> int:
    """Float8Linear's cached weights, both orientations and their scales, for the whole step."""
    total = 0
    for m in model.modules():
        if isinstance(m, Float8Linear):
            scales = FP32 * (m.in_features + m.out_features) if m.recipe.scaling == "rowwise" else 2 * FP32
            total += 2 * m.weight.numel() + scales
    return total


class _Layout:
    def __init__(self, cfg: TrainConfig, num_gpus: int) -> None:
        self.N, self.W, self.backend = num_gpus, cfg.parallel.ep, cfg.parallel.backend
        self.fsdp = self.backend == "fsdp" and num_gpus > 1
        self.buckets = self.backend == "ddp" and self.W == 1 and num_gpus > 1

    def local(self, dense: int, experts: int = 0) -> int:
        """Parameters (or gradients, or state entries) this rank holds of `dense` + `experts`."""
        if self.fsdp:
            return (dense + experts) // self.N
        return dense + experts // self.W

    def describe(self) -> str:
        if self.N == 1:
            return "one process on 1 GPU"
        return f"{self.backend}, ep={self.W} on {self.N} GPUs"


def plan_memory(cfg: TrainConfig, num_gpus: int, model: MoETransformer | None = None) -> MemoryPlan:
    """The per-GPU plan of `cfg` at its parallel layout on `num_gpus` GPUs. model: its
    `meta_model`, when the caller plans several layouts of one model."""
    require(num_gpus >= 1, f"the number of GPUs must be >= 1, got {num_gpus}")
    cfg.parallel.validate(num_experts=cfg.model.moe.num_experts, world_size=num_gpus)
    model = meta_model(cfg) if model is None else model
    lay, run = _Layout(cfg, num_gpus), cfg.run
    W, T = lay.W, run.micro_batch_size * run.seq_len
    c = 2 if run.dtype == "bfloat16" else FP32
    state = 2 if cfg.optim.state_dtype == "bfloat16" else FP32  # bytes of each AdamW moment
    blocks, accum, ac = list(model.layers), run.grad_accum > 1, run.activation_checkpointing

    # The persistent state, and what the optimizer step adds to the gradients.
    experts_total = _expert_params(model)
    dense_total = _numel(model.parameters()) - experts_total
    p_local = lay.local(dense_total, experts_total)
    grads_all = FP32 * p_local
    expert_ids = {id(p) for m in _experts(model) for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in expert_ids]
    groups = (_numel(p for p in dense if p.dim() >= 2), _numel(p for p in dense if p.dim() < 2))
    # Foreach AdamW's sqrt of exp_avg_sq over its largest group; the fused AdamW updates in place.
    step_temp = 0
    if foreach_adamw(cfg.optim):
        step_temp = FP32 * max(lay.local(groups[0]), lay.local(groups[1]), lay.local(0, experts_total))
    if W > 1 and not lay.fsdp:  # reduce_gradients flattens each kind into one buffer
        step_temp = max(step_temp, FP32 * max(dense_total, experts_total // W))
    # One rank per experts' FSDP group (EP = world size): nothing to gather, the knob does not apply.
    gather_shards = lay.N // W if lay.fsdp and cfg.fp8_all_gather() and lay.N // W > 1 else 0
    fp8 = _Fp8Copies(model, W, accum, gather_shards)
    fsdp_bytes = _fsdp_bytes(model, W, c, accum) if lay.fsdp else 0

    # Per block: saved activations, weight copies, gradients, backward's transients (the bf16 weight
    # gradient before its fp32 cast, the FP8 experts' working set).
    act = [block_activation_bytes(b, T, c, W, getattr(cfg.fp8, "intermediate", "fp8")) for b in blocks]
    wcopy = [weight_copy_bytes(b, c, W, lay.fsdp) for b in blocks]
    grads = [FP32 * lay.local(_numel(b.parameters()) - _expert_params(b), _expert_params(b)) for b in blocks]
    trans = [(0 if lay.fsdp or c == FP32 else c * _largest_bf16_weight(b, W))
             + (experts_backward_bytes(b.ffn.experts, routed_rows(b.ffn, T), c, W) if b.is_moe else 0)
             for b in blocks]  # fmt: skip
    head_grads = 0 if lay.fsdp else FP32 * lay.local(model.output.weight.numel() + model.norm.weight.numel())
    # run.weight_cast=step with micro-batches: every cast copy lives from the step's first forward
    # to its last backward (trainer/loop.py `Trainer._step_casts`).
    step_casts = accum and run.weight_cast == "step"
    head_copy = head_weight_copy_bytes(model, T, c)  # FSDP's root gathers fp32
    kept_copies = sum(wcopy) + head_copy if step_casts else 0
    head = head_activation_bytes(model, T, c) + (0 if step_casts else head_copy)
    ce_fwd, ce_bwd, ce_note = cross_entropy_bytes(model, T, c)
    # Autocast's casts of the Linears, cached until forward's end (checkpointing saves none).
    dense_cache = 0 if step_casts else sum(w - _bf16_expert_copy(b, c, W, lay.fsdp) for b, w in zip(blocks, wcopy))
    recast = [0 if step_casts else w for w in wcopy]  # a recompute's casts (step casts: the kept copies)
    kept = block_input_bytes(model, T)

    # run.defer_expert_wgrad: FP8 expert operands stashed, their gradients made in the last backward (deferred_wgrad.py)
    defer = accum and run.defer_expert_wgrad and not lay.fsdp and W == 1 and not run.compile
    stash = [deferred_wgrad_bytes(b.ffn.experts, routed_rows(b.ffn, T), run.grad_accum) if defer and b.is_moe else 0
             for b in blocks]  # fmt: skip
    late_grads = [FP32 * _expert_params(b) if s else 0 for b, s in zip(blocks, stash)]
    # The last forward drops the step's FP8 expert copies (moe/fp8/grouped_mlp.py): in the last
    # backward, at block b, only dgrad's orientation of the blocks before it is left.
    cache = [_fp8_expert_bytes(b.ffn.experts, W) if s else (0, 0, 0) for b, s in zip(blocks, stash)]

    def held(b: int) -> int:  # gradients made by the time block b's backward ends (less what is gone)
        if not accum:
            return sum(grads[b:])
        dropped = sum(2 * n + sc + st - (n + st if j < b else 0) for j, (n, sc, st) in enumerate(cache))
        return max(0, sum(late_grads[b:]) - dropped)

    # Forward/backward: the largest of backward's start and each block's backward.
    if not ac:
        saved = [a + (0 if step_casts else w) for a, w in zip(act, wcopy)]
        points = [sum(saved) + head + max(ce_fwd, ce_bwd) + head_grads]
        points += [sum(saved[: b + 1]) + head_grads + held(b) + trans[b] for b in range(len(blocks))]
    else:
        L = len(blocks)
        points = [L * kept + head + ce_fwd + dense_cache, L * kept + head + ce_bwd + head_grads]
        points += [(b + 1) * kept + act[b] + recast[b] + fp8.recompute + head_grads + held(b) + trans[b]
                   for b in range(L)]  # fmt: skip
    points.append(0 if accum else grads_all)  # backward's end
    grads_kept = grads_all - sum(late_grads) if accum else 0
    fixed = fp8.forward_backward + fsdp_bytes + grads_kept + kept_copies + sum(stash)
    phases = (("forward/backward", fixed + max(points)), ("optimizer step", grads_all + step_temp + fp8.step))
    peak_name, peak = max(phases, key=lambda p: p[1])

    buckets = FP32 * p_local if lay.buckets else 0
    head_act = head_activation_bytes(model, T, c)
    # Checkpointing without step casts: the forward's cache or one block's recompute.
    copies = max(dense_cache, max(wcopy)) if ac and not step_casts else sum(wcopy)
    entries = (
        PlanEntry("parameters", FP32 * p_local, "fp32 master weights, this rank's share"),
        PlanEntry("gradients", grads_all, "fp32"),
        PlanEntry("optimizer state", 2 * state * p_local, f"AdamW exp_avg + exp_avg_sq, {cfg.optim.state_dtype}"),
        PlanEntry("DDP gradient buckets", buckets, "one more fp32 copy of the gradients"),
        PlanEntry("FSDP unsharded", fsdp_bytes, "fp32 root + 2 bf16 blocks + one block's gradient"
                  + (" + fp32 gradient accumulation" if accum else "")),  # fmt: skip
        PlanEntry("FP8 weight copies", max(fp8.forward_backward, fp8.step), fp8.note),
        PlanEntry("BF16 weight copies", copies + head_copy,
                  "kept for the step" if step_casts else "saved for backward"),  # fmt: skip
        PlanEntry("activations, no checkpointing", sum(act) + head_act, "" if ac else "used"),
        PlanEntry("activations, checkpointing", len(blocks) * kept + head_act + max(act), "used" if ac else ""),
        PlanEntry("cross-entropy backward", ce_bwd, ce_note),
        PlanEntry("deferred expert wgrad operands", sum(stash), "FP8, every micro-batch's, until the last backward"),
        PlanEntry("optimizer step temporaries", step_temp, "foreach AdamW's sqrt / EP gradient flattening"),
        PlanEntry("CUDA context + allocator reserve", CONTEXT_BYTES, "fixed"),
    )
    total = (FP32 + 2 * state) * p_local + buckets + peak + CONTEXT_BYTES  # parameters and AdamW state
    return MemoryPlan(lay.describe(), num_gpus, T, ac, entries, phases, peak_name, total)


class _Fp8Copies:
    """The FP8 copies of the weights in each phase. Experts: under FSDP with
    parallel.fp8_all_gather (moe/fp8/fsdp_all_gather.py) each rank's shard quantized once for the
    step (rowwise both orientations, blockwise one) and dropped after the last backward, the
    gathered FP8 weight taking the place of the gathered bf16 one (FSDP's line) and freed with it; else with run.grad_accum > 1 both
    orientations of every MoE layer cached for the step; else each layer quantizes in its forward
    and keeps dgrad's orientation on its autograd context until its backward (also under
    checkpointing, plus the recomputed layer's own). Dense Float8Linear layers: both orientations
    cached for the step."""

    def __init__(self, model: MoETransformer, ep: int, accum: bool, gather_shards: int = 0) -> None:
        dense = _fp8_dense_bytes(model)
        fp8_experts = [m for m in _experts(model) if isinstance(m, Fp8GroupedMLP)]
        layers = [_fp8_expert_bytes(m, ep) for m in fp8_experts]
        self.forward_backward = self.step = dense
        self.recompute = 0
        if layers and gather_shards:  # gather_shards: the ranks sharing each rank's experts
            orientations = 1 if fp8_experts[0].recipe.block else 2
            shards = sum(orientations * n + s + (st if orientations == 2 else 0) for n, s, st in layers)
            self.forward_backward += shards // gather_shards  # dropped after backward (training.py)
            self.note = "this rank's shard, quantized for FSDP's FP8 all-gather"
            return
        if layers and accum:
            cached = sum(2 * n + s + st for n, s, st in layers)
            self.forward_backward += cached
            self.step += cached
        elif layers:
            self.forward_backward += sum(n + st for n, _, st in layers) + max(n + s for n, s, _ in layers)
            self.recompute = max(n + st for n, _, st in layers)
        if layers:
            self.note = "cached for the step" if accum else "dgrad's orientation of every MoE layer until backward"
        else:
            self.note = "dense layers' cache for the step" if dense else "none: BF16 experts and dense layers"


def _fsdp_bytes(model: MoETransformer, ep: int, c: int, accum: bool) -> int:
    """FSDP2's unsharded tensors (module docstring): the fp32 root and its output and norm
    gradients, two blocks gathered in the compute dtype, one block's gradient (compute dtype and
    its fp32 reduce-scatter input), and with gradient accumulation every block's fp32 gradient."""
    unsharded = [_numel(b.parameters()) - _expert_params(b) + _expert_params(b) // ep for b in model.layers]
    root = _numel([*model.tok_embeddings.parameters(), *model.norm.parameters(), *model.output.parameters()])
    head = model.output.weight.numel() + model.norm.weight.numel()
    total = FP32 * (root + head) + 2 * c * max(unsharded) + (c + FP32) * max(unsharded)
    return total + (FP32 * sum(unsharded) if accum else 0)


def _bf16_expert_copy(block: nn.Module, c: int, ep: int, fsdp: bool) -> int:
    """The BF16 experts' own cast of their weights (saved by the GEMM, not autocast's cache)."""
    if fsdp or c == FP32:
        return 0
    return sum(c * (m.w1.numel() + m.w2.numel()) // ep for m in block.modules() if type(m) is GroupedMLP)


def _largest_bf16_weight(block: nn.Module, ep: int) -> int:
    """Elements of the largest weight whose gradient comes out in bf16 before its fp32 cast."""
    sizes = [m.weight.numel() for m in block.modules() if type(m) is nn.Linear]
    sizes += [m.w1.numel() // ep for m in block.modules() if type(m) is GroupedMLP]
    return max(sizes, default=0)


def format_plan(plan: MemoryPlan) -> list[str]:
    """One line per component, the peak's phases, and last `memory_per_gpu_gib=<float>`."""
    ac = "on" if plan.activation_checkpointing else "off"
    lines = [f"memory plan per GPU: {plan.layout}; {plan.tokens} tokens a micro-batch a rank "
             f"(balanced routing assumed); activation checkpointing {ac}"]  # fmt: skip
    width = max(len(e.name) for e in plan.entries)
    for e in plan.entries:
        if e.bytes == 0 and e.name in OPTIONAL_ENTRIES:
            continue
        note = f"  ({e.note})" if e.note else ""
        lines.append(f"  {e.name:<{width}}  {e.bytes / GIB:9.2f} GiB{note}")
    phases = ", ".join(f"{name} {b / GIB:.2f} GiB" for name, b in plan.phases)
    lines.append(f"  peak = parameters + optimizer state + buckets + context + the larger of ({phases}): "
                 f"{plan.peak_phase}")  # fmt: skip
    lines.append(f"memory_per_gpu_gib={plan.gib:.2f}")
    return lines


def _changed(cfg: TrainConfig, **fields: object) -> TrainConfig:
    """A copy of cfg with `section__field=value` changes (run__micro_batch_size=1)."""
    new = copy.deepcopy(cfg)
    for key, value in fields.items():
        section, name = key.split("__")
        setattr(getattr(new, section), name, value)
    return new


def fitting_changes(
    cfg: TrainConfig, num_gpus: int, budget: int, model: MoETransformer | None = None
) -> list[tuple[str, float]]:
    """The single changes under which the plan fits `budget` bytes, each with its GiB:
    parallel.backend=fsdp, the smallest larger parallel.ep that fits, run.activation_checkpointing=true,
    the largest halved micro-batch that fits, optim.state_dtype=bfloat16, the fewest GPUs (a multiple
    of this count). When none fits alone: all of the first five together, on as few GPUs as that
    needs."""
    model = meta_model(cfg) if model is None else model
    E = cfg.model.moe.num_experts

    def gib(c: TrainConfig, n: int) -> float | None:
        try:
            plan = plan_memory(c, n, model)
        except ValueError:  # a layout this config refuses
            return None
        return plan.gib if plan.total_bytes <= budget else None

    found: list[tuple[str, float]] = []
    steps: dict[str, object] = {}
    if cfg.parallel.backend == "ddp" and num_gpus > 1:
        steps["parallel__backend"] = "fsdp"
    eps = [w for w in range(cfg.parallel.ep + 1, min(E, num_gpus) + 1) if E % w == 0 and num_gpus % w == 0]
    if eps:
        steps["parallel__ep"] = eps[-1]
    if not cfg.run.activation_checkpointing:
        steps["run__activation_checkpointing"] = True
    if cfg.run.micro_batch_size > 1:
        steps["run__micro_batch_size"] = 1
    if cfg.optim.state_dtype != "bfloat16":
        steps["optim__state_dtype"] = "bfloat16"
    halves = [cfg.run.micro_batch_size >> k for k in range(1, cfg.run.micro_batch_size.bit_length())]
    options = {"parallel__ep": eps, "run__micro_batch_size": halves}
    for key, value in steps.items():
        for option in options.get(key, [value]):
            g = gib(_changed(cfg, **{key: option}), num_gpus)
            if g is not None:
                found.append((f"{key.replace('__', '.')}={str(option).lower()}", g))
                break
    for factor in (2, 4, 8, 16, 32, 64):
        g = gib(cfg, num_gpus * factor)
        if g is not None:
            found.append((f"{num_gpus * factor} GPUs", g))
            break
    if not found and steps:
        for factor in (1, 2, 4, 8, 16, 32, 64):
            n = num_gpus * factor
            if "parallel__ep" in steps or (factor > 1 and n > 1):  # the largest EP these GPUs allow
                steps["parallel__ep"] = max(w for w in range(1, min(E, n) + 1) if E % w == 0 and n % w == 0)
            if n > 1 and cfg.parallel.backend == "ddp":
                steps["parallel__backend"] = "fsdp"
            g = gib(_changed(cfg, **steps), n)
            if g is not None:
                what = " ".join(f"{k.replace('__', '.')}={str(v).lower()}" for k, v in steps.items())
                found.append((what + (f" on {n} GPUs" if factor > 1 else ""), g))
                break
    return found


def refuse_if_cannot_fit(
    cfg: TrainConfig, num_gpus: int, device: torch.device, device_bytes: int | None = None
) -> None:
    """Before the model is allocated: ValueError when the plan clearly exceeds the device's memory
    (by more than REFUSE_RATIO), naming the estimate, the device's memory and what would fit; a
    warning when it exceeds it by less. No-op on a CPU (device_bytes: a device's memory, for tests)."""
    if device_bytes is None:
        if device.type != "cuda":
            return
        device_bytes = torch.cuda.get_device_properties(device).total_memory
    model = meta_model(cfg)
    plan = plan_memory(cfg, num_gpus, model)
    have = f"{device_bytes / GIB:.1f} GiB on {device}"
    if plan.total_bytes <= device_bytes:
        return
    if plan.total_bytes <= REFUSE_RATIO * device_bytes:
        log.warning("the memory plan needs %.1f GiB per GPU (%s), more than the %s: this run may run "
                    "out of memory", plan.gib, plan.layout, have)  # fmt: skip
        return
    fixes = fitting_changes(cfg, num_gpus, device_bytes, model)
    if fixes:
        advice = "It would fit with: " + "; ".join(f"{what} ({g:.1f} GiB)" for what, g in fixes)
    else:
        advice = ("Nothing tried brings it under (parallel.backend=fsdp, parallel.ep, run.activation_"
                  "checkpointing=true, a smaller run.micro_batch_size, optim.state_dtype=bfloat16, up to "
                  "64x the GPUs)")  # fmt: skip
    raise ValueError(
        f"this run cannot fit: the memory plan needs {plan.gib:.1f} GiB per GPU ({plan.layout}, "
        f"{plan.tokens} tokens a micro-batch a rank) and the device has {have}. {advice}. "
        f"`run.dry_run=true run.dry_run_gpus={num_gpus}` prints the plan."
    )
