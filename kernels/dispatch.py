"""The one place that chooses, for every kernel entry point, between its Triton launcher and its
pure-torch reference.

    quantize_rows = kernel_op("quantize_rows", triton_quantize_rows, fake, torch_quantize_rows)
    quantize_rows(x_MK, ...)     what callers use
    quantize_rows.op             the registered torch.library custom op, fp8moe::quantize_rows

A call takes one of three paths:
- the reference (`torch_x`, kernels/reference*.py) where the kernel does not run: plain CPU
  tensors outside Triton's interpreter (`use_triton`: the documented CPU path of tests and the
  tiny CPU model, never a fallback from a GPU), or what an entry point's own `use_kernel`
  turns away (fp64 rows for gradcheck);
- the custom op while torch.compile traces: its fake implementation gives the graph the output
  shapes and dtypes without running anything;
- else the launcher (`triton_x`) itself: in eager mode the custom op's dispatch would cost
  ~15 us of host time a call, which a host-bound MoE layer feels (bench/NOTES.md).
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Generic, TypeVar

import torch

from kernels.common import use_triton

R = TypeVar("R")

# Names that torch's functionalization of a mutating op (auto_functionalized_v2, under
# torch.compile and export) takes as its own parameters beside the op's arguments, passed as
# keywords: an op argument of one of these names raises "got multiple values for argument".
FUNCTIONALIZE_RESERVED = ("mode", "ctx", "_mutable_op", "_all_bases", "_only_clone_these_bases",
                          "_only_clone_these_tensors")


def _first_on_triton(x: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
    return use_triton(x)


class KernelOp(Generic[R]):
    """A kernel entry point: `kernel_op`'s result, called like the launcher it wraps."""

    def __init__(
        self,
        name: str,
        launcher: Callable[..., Any],
        fake: Callable[..., Any],
        reference: Callable[..., Any],
        use_kernel: Callable[..., bool],
        result: Callable[[Any], R] | None,
        mutates_args: tuple[str, ...] = (),
    ) -> None:
        if mutates_args:
            taken = [p for p in inspect.signature(launcher).parameters if p in FUNCTIONALIZE_RESERVED]
            if taken:
                raise ValueError(f"fp8moe::{name} mutates {mutates_args} and has the argument(s) {taken}, names "
                                 f"torch's functionalization takes for its own: rename them (reserved: "
                                 f"{FUNCTIONALIZE_RESERVED})")
        impl = _without_defaults(launcher) if mutates_args else launcher
        self.op = torch.library.custom_op(f"fp8moe::{name}", impl, mutates_args=mutates_args)
        self._signature = inspect.signature(launcher)
        self.op.register_fake(fake)
        self.launcher, self.reference = launcher, reference
        self._use_kernel, self._result = use_kernel, result
        self.__name__, self.__doc__, self.__wrapped__ = name, launcher.__doc__, launcher

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        if not self._use_kernel(*args, **kwargs):
            out = self.reference(*args, **kwargs)
        elif torch.compiler.is_compiling():
            # Every argument, defaults filled in: a mutating op's schema has none (`_without_defaults`).
            every = self._signature.bind(*args, **kwargs)
            every.apply_defaults()
            out = self.op(*every.args, **every.kwargs)
        else:
            out = self.launcher(*args, **kwargs)
        return out if self._result is None else self._result(out)


def _without_defaults(launcher: Callable[..., Any]) -> Callable[..., Any]:
    """launcher, its signature (annotations resolved) with no default values, for the schema of an
    op that mutates an argument. The dispatcher drops trailing arguments equal to their schema
    defaults before it calls a Python kernel, and torch 2.11's in-place bookkeeping then looks the
    mutated optional argument (`stats`, last) up by its position and raises IndexError
    (pytorch/pytorch#176078): with no defaults every argument reaches every kernel.
    `KernelOp.__call__` fills them in; a direct call of such an op gives them all."""
    hints = typing.get_type_hints(launcher)
    sig = inspect.signature(launcher)
    params = [p.replace(default=inspect.Parameter.empty, annotation=hints.get(p.name, p.annotation))
              for p in sig.parameters.values()]  # fmt: skip

    def impl(*args: Any) -> Any:
        return launcher(*args)

    impl.__signature__ = sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation))
    impl.__name__, impl.__qualname__, impl.__module__ = launcher.__name__, launcher.__qualname__, launcher.__module__
    return impl


def kernel_op(
    name: str,
    launcher: Callable[..., Any],
    fake: Callable[..., Any],
    reference: Callable[..., Any],
    *,
    use_kernel: Callable[..., bool] = _first_on_triton,
    result: Callable[[Any], R] | None = None,
    mutates_args: tuple[str, ...] = (),
) -> KernelOp[R]:
    """Register `launcher` as the custom op fp8moe::<name> (`fake` its shape function) and return
    the entry point. launcher, fake and reference take the same arguments; launcher's type hints
    give the op's schema and its docstring is the entry point's. use_kernel(*args, **kwargs):
    whether the kernel takes this call (default: the first argument is on a GPU or under the
    interpreter). result: applied to every path's output (e.g. a NamedTuple's constructor: a
    custom op returns plain tuples). mutates_args: the arguments the op writes into (an FP8
    statistics buffer, kernels/fp8_stats.py)."""
    return KernelOp(name, launcher, fake, reference, use_kernel, result, mutates_args)
