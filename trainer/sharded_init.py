"""Initialise a model built on the meta device, whatever its layout, to the same full weights.

The model's `init_weights` says how each parameter starts (its torch.nn.init calls); this module
decides where the random numbers come from. Under `ReplayOnShards` each such call on a parameter
is run on a full-size scratch tensor, from a generator seeded by (run.seed, the parameter's name),
and the rank copies its own shard out of it. So one process, DDP, EP and FSDP x EP start from
identical full weights (runs of different layouts can be compared step by step), and the build's
peak memory is this rank's shards plus one full parameter. Buffers (rope tables, router bias)
are written by `init_weights` as usual; modules whose buffers it does not know (FP8 scaling
state) reset them in their own `reset_buffers`.

The random stream differs from torch's global one, so weights from here differ from a model
initialised by `moe.model.build_model` with the same torch.manual_seed (tests and benchmarks use
that; the trainer uses this).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# The calls `init_weights` may make on a parameter, and whether each draws random numbers.
_RANDOM = {nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, torch.Tensor.normal_, torch.Tensor.uniform_}
_FIXED = {torch.Tensor.fill_, torch.Tensor.zero_}


def param_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run seed and a parameter's name (stable across processes,
    unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def local_slices(param: torch.Tensor) -> tuple[slice, ...]:
    """Where this rank's shard of `param` sits in the full tensor (all of it when not a DTensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of `param`: a DTensor's local shard, a plain tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


class ReplayOnShards(TorchFunctionMode):
    """While active, an init call on a model parameter runs on a full-size tensor and the rank
    keeps its shard; every other call (buffers included) runs as it would."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.done: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        target = args[0] if args else kwargs.get("tensor")
        name = self.names.get(id(target))
        replayed = func in _RANDOM or func in _FIXED
        fname = getattr(func, "__name__", "")
        in_place = fname.endswith("_") and not fname.startswith("__")  # not __get__ (re-tying a weight)
        if name is None or not (replayed or in_place):
            return func(*args, **kwargs)  # buffers, and reads of a parameter (its shape, ...)
        if not replayed:  # another in-place write: its values would not be layout-independent
            raise TypeError(f"init_weights initialises parameter {name!r} with {func.__name__}; "
                            f"a sharded build replays only {sorted({f.__name__ for f in _RANDOM | _FIXED})}")
        rest = args[1:] if args else ()
        kwargs.pop("tensor", None)
        full = torch.empty(target.shape, dtype=target.dtype, device=local_tensor(target).device)
        if func in _RANDOM:
            kwargs["generator"] = torch.Generator(device=full.device).manual_seed(param_seed(self.seed, name))
        func(full, *rest, **kwargs)
        with torch.no_grad():
            local_tensor(target).copy_(full[local_slices(target)])
        self.done.add(name)
        return target


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta-built model's (possibly sharded) parameters and buffers on `device` and
    initialise them through `model.init_weights()` with layout-independent values."""
    model.to_empty(device=device)
    replay = ReplayOnShards(model, seed)
    with replay:
        model.init_weights()
    # The parameters after init: re-tying an output head to the embedding drops one of them.
    missed = sorted({name for name, _ in model.named_parameters()} - replay.done)
    if missed:
        raise RuntimeError(f"init_weights left parameters {missed} uninitialised (a sharded build "
                           f"allocates them empty): initialise them there through torch.nn.init")
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
    return model
