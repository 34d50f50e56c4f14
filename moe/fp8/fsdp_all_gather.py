"""FP8 expert weights on FSDP's all-gather: each rank quantizes its own shard, the wire carries E4M3.

With backend=fsdp, FP8 experts (fp8.gemms=all) and parallel.fp8_all_gather=true, each expert
weight's sharded parameter holds its fp32 master shard in an `Fp8ShardedWeight`. FSDP2 asks such
a tensor what to all-gather (`fsdp_pre_all_gather`) and what the gathered parameter is
(`fsdp_post_all_gather`), so:

    pre-all-gather    this rank's experts quantized by the recipe the layer uses (both
                      orientations, from the masters' bf16 rounding: the bytes the bf16 path's
                      quantizer makes from the gathered bf16 weight), once per weight version,
                      i.e. once per optimizer step, shared by every gather of the step (forward,
                      backward's re-gather, each micro-batch) and dropped after its last backward
                      (moe/fp8/training.py)
    on the wire       rowwise    q_ENK + qt_EKN (1 + 1 bytes an element) + scales (E, N + K) fp32
                      blockwise  q_ENK (1 byte an element) + scales (E, N/128 * K/128) fp32
                      bf16 path  2 bytes an element
                      (E4M3 travels as uint8: gloo all-gathers no float8)
    post-all-gather   an `Fp8GatheredWeight`: the unsharded weight's shape and dtype, holding the
                      gathered QuantizedWeight, which the FP8 experts use as it is
                      (moe/fp8/grouped_mlp.py); blockwise builds qt_EKN by transposing the
                      gathered bytes and the scales (the same 128x128 blocks)

Rowwise sends both orientations, as many bytes as BF16: its transposed copy is scaled per input
channel, so it cannot be derived from q_ENK. Sending only q_ENK in forward and only qt_EKN in
backward's re-gather would halve that, but a gather does not know which of them it serves (a
checkpointed block recomputes its forward inside backward and needs both; with
reshard_after_forward=False backward re-gathers nothing). What rowwise gains is the quantization
(each rank quantizes its 1 / ranks of the weight) and memory: the gathered FP8 pair takes the place of a
gathered BF16 weight plus the FP8 pair quantized from it, and FSDP frees it between forward and
backward, where the bf16 path keeps dgrad's FP8 copy alive.

Scales stay local: FSDP shards dim 0, the experts, so a shard holds whole experts and every scale
(per expert row, column or 128x128 block) is computed from one rank's data; nothing needs an amax
reduced over the group. Where the experts do not divide evenly over the ranks of the group
(fewer experts than ranks included: FSDP pads dim 0, and trailing ranks hold fewer or no
experts), FSDP requires every all-gather input of a padded shard to have the parameter's padded
shard shape, which the scales do not: there they travel in one extra all-gather of their own
(E / ranks * (N + K) * 4 bytes rowwise), so the result is the same at every layout. A group of
one rank (EP over all ranks) gathers nothing and is left to the bf16 path (`shard_as_fp8`).

`gather_reference` is the pure-torch reference of the whole mechanism (the same packing and
unpacking, a concatenation where FSDP all-gathers); tests/test_fp8_all_gather.py checks both
against quantizing the whole weight.

Shape letters (README.md): E experts (of the tensor at hand: the whole weight, or a shard), N
output dim and K reduction dim of the forward GEMM (w_ENK is w1_EXH or w2_EHF).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from kernels.common import FP8_DTYPE
from kernels.quantize_weight import QuantizedWeight
from kernels.transpose_bytes import transpose_bytes
from moe.fp8.recipe import Fp8Recipe
from moe.fp8.weight_cache import WeightCache

aten = torch.ops.aten

# FSDP builds, pads, moves and views the sharded parameter with these; the results stay sharded
# FP8 weights (anything else, e.g. the optimizer's zeros_like for its state, is a plain tensor).
_KEEP_SHARDED = {
    aten.detach.default, aten.alias.default, aten.view.default, aten.as_strided.default,
    aten.slice.Tensor, aten.split.Tensor, aten.copy_.default, aten.clone.default,
    aten.empty_like.default, aten.new_zeros.default, aten.new_empty.default,
    aten._to_copy.default, aten._pin_memory.default,
}  # fmt: skip
# What FSDP and autograd do with the gathered parameter: alias it, or make a tensor of its shape.
_ALIASES = {aten.detach.default, aten.alias.default, aten.view.default, aten.as_strided.default}
_LIKE = {aten.zeros_like.default, aten.empty_like.default}


def _quantize_shard(w_ENK: torch.Tensor, recipe: Fp8Recipe) -> QuantizedWeight:
    # Imported here: grouped_mlp.py imports this module for Fp8GatheredWeight.
    from moe.fp8.grouped_mlp import quantize_expert_weight

    return quantize_expert_weight(w_ENK, recipe)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with zero rows appended along dim 0 up to `rows` (t itself when it has them)."""
    if t.shape[0] == rows:
        return t
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def shard_inputs(wq: QuantizedWeight, rows: int, recipe: Fp8Recipe) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(FP8 bytes, packed scales) to all-gather for one rank's quantized shard, each padded to
    `rows` experts (FSDP's padded shard): uint8 (rows, N, K) tensors (q_ENK; rowwise also
    qt_EKN's bytes read as (N, K)), uint8 because not every backend all-gathers float8 (gloo);
    fp32 scales packed (rows, N + K) rowwise, (rows, N/128 * K/128) blockwise."""
    E, N, K = wq.q_ENK.shape
    fp8 = [wq.q_ENK] + ([wq.qt_EKN.view(E, N, K)] if recipe.name == "rowwise" else [])
    scales = [wq.scale.flatten(1)] + ([wq.scale_t] if recipe.name == "rowwise" else [])
    return [_padded(_bytes(t), rows) for t in fp8], _padded(torch.cat(scales, dim=1), rows)


def assemble(fp8: list[torch.Tensor], scales: torch.Tensor, E: int, recipe: Fp8Recipe,
             out: Optional[QuantizedWeight] = None) -> QuantizedWeight:  # fmt: skip
    """The gathered QuantizedWeight of E experts from the gathered inputs (`shard_inputs` of every
    rank, concatenated along dim 0; padding rows last, as FSDP's dim-0 chunks leave them).

    q_ENK (and rowwise qt_EKN) are views of the gathered bytes; the scales and blockwise's
    transposed copy are tensors of their own, written into `out`'s when given (FSDP refills a
    gathered parameter in place: its storage was freed after forward and is allocated again)."""
    fp8 = [t.view(FP8_DTYPE) for t in fp8]
    _, N, K = fp8[0].shape
    q_ENK = fp8[0][:E]
    rowwise = recipe.name == "rowwise"
    scale_shape = (E, N) if rowwise else (E, N // 128, K // 128)
    if out is None:
        scale = scales.new_empty(scale_shape)
        scale_t = scales.new_empty((E, K) if rowwise else (E, K // 128, N // 128))
        qt_EKN = None
    else:
        scale, scale_t, qt_EKN = out.scale, out.scale_t, None if rowwise else out.qt_EKN
    if rowwise:
        qt_EKN = fp8[1].view(-1, K, N)[:E]
        scale.copy_(scales[:E, :N])
        scale_t.copy_(scales[:E, N:])
    else:  # the same 128x128 blocks: bytes and scales transposed
        scale.copy_(scales[:E].view(scale_shape))
        scale_t.copy_(scale.transpose(1, 2))
        qt_bytes = transpose_bytes(_bytes(q_ENK))  # a tiled kernel: torch's strided copy is slow
        if qt_EKN is None:
            qt_EKN = qt_bytes.view(FP8_DTYPE)
        else:
            _bytes(qt_EKN).copy_(qt_bytes)
    return QuantizedWeight(q_ENK, scale, qt_EKN, scale_t)


def gather_reference(shards_ENK: list[torch.Tensor], recipe: Fp8Recipe) -> QuantizedWeight:
    """Pure torch: what the FP8 all-gather gives for these per-rank shards (FSDP's dim-0 chunks of
    the weight, in rank order), with concatenation in place of the collective."""
    E = sum(s.shape[0] for s in shards_ENK)
    rows = max(s.shape[0] for s in shards_ENK)
    parts = [shard_inputs(_quantize_shard(s, recipe), rows, recipe) for s in shards_ENK]
    fp8 = [torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0]))]
    return assemble(fp8, torch.cat([p[1] for p in parts]), E, recipe)


class Fp8ShardedWeight(torch.Tensor):
    """One rank's fp32 master shard of an FP8 expert weight under FSDP (module docstring). Every
    operation runs on the plain shard `_data`; pickling (checkpoints) writes `_data`."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, data: torch.Tensor, recipe: Fp8Recipe):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=data.device, layout=data.layout, requires_grad=data.requires_grad,
        )  # fmt: skip

    def __init__(self, data: torch.Tensor, recipe: Fp8Recipe) -> None:
        self._data = data
        self.recipe = recipe
        # This shard's all-gather inputs, keyed by its storage, version (which every update
        # moves: __torch_dispatch__) and padded row count.
        self._inputs = WeightCache(self._make_inputs)

    def __repr__(self) -> str:
        return f"Fp8ShardedWeight({self._data!r}, recipe={self.recipe.name})"

    def __reduce_ex__(self, protocol):
        return self._data.__reduce_ex__(protocol)

    def __tensor_flatten__(self):
        return ["_data"], self.recipe

    @staticmethod
    def __tensor_unflatten__(inner, recipe, outer_size, outer_stride):
        return Fp8ShardedWeight(inner["_data"], recipe)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        recipes, inner = [], []

        def unwrap(t: Fp8ShardedWeight) -> torch.Tensor:
            recipes.append(t.recipe)
            inner.append(t._data)
            return t._data

        args, kwargs = pytree.tree_map_only(Fp8ShardedWeight, unwrap, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func._schema.is_mutable:
            # Below autograd nothing moves a version counter, and the cached all-gather inputs
            # go by the shard's version: an update (the optimizer's, a checkpoint's copy_, through
            # any view of the shard) must move it.
            for t in inner:
                torch.autograd.graph.increment_version(t)
        if func not in _KEEP_SHARDED:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: Fp8ShardedWeight(t, recipes[0]), out)

    def clear_cache(self) -> None:
        self._inputs.clear()

    def _make_inputs(self, w_ENK: torch.Tensor, rows: int):
        return shard_inputs(_quantize_shard(w_ENK, self.recipe), rows, self.recipe)

    def fsdp_pre_all_gather(self, mesh, outer_size: torch.Size, outer_stride, module: nn.Module, mp_policy):
        """FSDP2's hook: (all-gather inputs, metadata). outer_size: the unsharded weight's shape."""
        ranks, E = mesh.size(), outer_size[0]
        rows = -(-E // ranks)  # FSDP's padded dim-0 chunk
        fp8, scales = self._inputs.get(self._data, rows)
        if E % ranks == 0:
            return (*fp8, scales), (E, None)
        # Uneven: a padded shard's every input must have the padded shard's shape (module docstring).
        gathered = scales.new_empty((ranks * rows, scales.shape[1]))
        dist.all_gather_into_tensor(gathered, scales, group=mesh.get_group())
        return tuple(fp8), (E, gathered)

    def fsdp_post_all_gather(self, outputs: tuple[torch.Tensor, ...], metadata: Any, param_dtype: torch.dtype,
                             *, out: Optional[torch.Tensor] = None):  # fmt: skip
        """FSDP2's hook: the gathered parameter and the tensors FSDP frees with it; with `out`, the
        parameter of an earlier gather, refilled in place."""
        E, scales = metadata
        fp8 = list(outputs) if scales is not None else list(outputs[:-1])
        scales = outputs[-1] if scales is None else scales
        if out is not None:
            gathered = out._local_tensor if hasattr(out, "_local_tensor") else out
            wq = assemble(fp8, scales, E, self.recipe, out=gathered.quantized)
            gathered.q_ENK, gathered.scale, gathered.qt_EKN, gathered.scale_t = wq
            return None
        wq = assemble(fp8, scales, E, self.recipe)
        own = [wq.scale, wq.scale_t] + ([wq.qt_EKN] if self.recipe.name != "rowwise" else [])
        return Fp8GatheredWeight(wq, (E, *self.shape[1:]), param_dtype), own


class Fp8GatheredWeight(torch.Tensor):
    """An expert weight that FSDP gathered as FP8: the unsharded weight's shape and dtype (its
    gradient is a plain tensor of that shape), holding only `quantized`. Anything that would read
    its values is refused."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, quantized: QuantizedWeight, shape, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=quantized.q_ENK.device)

    def __init__(self, quantized: QuantizedWeight, shape, dtype: torch.dtype) -> None:
        # Attributes of their own, for torch.compile (__tensor_flatten__ names them).
        self.q_ENK, self.scale, self.qt_EKN, self.scale_t = quantized

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.q_ENK, self.scale, self.qt_EKN, self.scale_t)

    def __repr__(self) -> str:
        return f"Fp8GatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype})"

    def __tensor_flatten__(self):
        return list(QuantizedWeight._fields), (tuple(self.shape), self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Fp8GatheredWeight(QuantizedWeight(**inner), *meta)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = args[0]
        if func in _ALIASES and isinstance(w, Fp8GatheredWeight):
            size = args[1] if len(args) > 1 else w.shape
            if func is aten.view.default or func is aten.as_strided.default:
                if tuple(size) != tuple(w.shape):
                    raise NotImplementedError(f"an FP8-gathered expert weight {tuple(w.shape)} viewed as {tuple(size)}")
            return cls(w.quantized, w.shape, w.dtype)
        if func in _LIKE:
            dtype = kwargs.get("dtype") or w.dtype
            return (torch.zeros if func is aten.zeros_like.default else torch.empty)(
                w.shape, dtype=dtype, device=kwargs.get("device") or w.device
            )
        raise NotImplementedError(
            f"{func} on an expert weight that FSDP all-gathered as FP8 (only its FP8 copies exist); "
            "set parallel.fp8_all_gather=false to gather the BF16 weight"
        )


def gathered_fp8(w: torch.Tensor) -> Optional[QuantizedWeight]:
    """The FP8 copies of an expert weight FSDP gathered as FP8 (None for any other weight)."""
    return w.quantized if isinstance(w, Fp8GatheredWeight) else None


def applies(experts: nn.Module) -> bool:
    """Whether an experts module can take FP8 all-gathered weights: FP8 experts whose GEMMs are
    all FP8 (an fp8.gemms ablation runs some GEMMs on the BF16 weight)."""
    recipe = getattr(experts, "recipe", None)
    return isinstance(recipe, Fp8Recipe) and recipe.gemms == "all"


def shard_as_fp8(experts: nn.Module, mesh) -> bool:
    """Before `fully_shard(..., mesh=mesh)`: hold the experts' w1 and w2 as Fp8ShardedWeight (a
    DTensor's local tensor under expert parallelism), so FSDP all-gathers them as FP8. False
    (nothing changed) where `applies` says no, and over a one-rank mesh (EP over all ranks): it
    gathers nothing, and FSDP hands a one-rank group's extension only its first input."""
    if not applies(experts) or mesh.size() == 1:
        return False
    from torch.distributed.tensor import DTensor

    for name in ("w1", "w2"):
        p = getattr(experts, name)
        if isinstance(p, DTensor):
            local = Fp8ShardedWeight(p._local_tensor, experts.recipe)
            data = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())  # fmt: skip
        else:
            data = Fp8ShardedWeight(p.detach(), experts.recipe)
        setattr(experts, name, nn.Parameter(data, requires_grad=p.requires_grad))
    return True


def clear_shard_caches(model: nn.Module) -> None:
    """Drop every sharded FP8 weight's cached all-gather inputs: the trainer does after a step's
    last backward (moe/fp8/training.py), so they are not held through the optimizer step."""
    for p in model.parameters():
        local = getattr(p, "_local_tensor", p)
        if isinstance(local, Fp8ShardedWeight):
            local.clear_cache()
