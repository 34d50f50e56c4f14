"""FP8 copies of a weight, made once per optimizer step and shared by its micro-batches.

The key is the parameter's storage and version counter: the optimizer's in-place update bumps
the version, so gradient-accumulation micro-batches share one quantization and the first forward
after `optimizer.step()` quantizes again. The trainer also calls `clear()` after every step:
under expert parallelism the modules see `to_local()` views of DTensor parameters, whose
version counter does not move when the optimizer updates the DTensor.
"""

from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar

import torch

Q = TypeVar("Q")


class WeightCache(Generic[Q]):
    def __init__(self, quantize: Callable[..., Q]) -> None:
        self._quantize = quantize  # (weight, recipe, **kwargs) -> FP8 copies
        self._key: Optional[tuple] = None
        self._value: Optional[Q] = None

    def clear(self) -> None:
        self._key = self._value = None

    def get(self, w: torch.Tensor, recipe, **kwargs) -> Q:
        """The copies of w for recipe; kwargs go to `quantize` when it runs (they are no part of the
        key: an FP8 statistics buffer, say, which counts only the quantizations that happen)."""
        if torch.compiler.is_compiling():
            # The version counter is not traceable; a compiled graph fuses the cast anyway. Detached
            # as below: the copies carry no gradient (w's comes through the GEMMs' own backward), and
            # a quantizer op with no autograd formula on a tensor that requires grad fails to compile.
            return self._quantize(w.detach(), recipe, **kwargs)
        key = (w.data_ptr(), w._version, w.dtype, w.device, recipe)
        if self._key != key:
            with torch.no_grad():
                self._value = self._quantize(w.detach(), recipe, **kwargs)
            self._key = key
        return self._value
