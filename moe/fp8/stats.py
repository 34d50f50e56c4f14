"""Per-layer statistics of the FP8 experts' operands (logging.fp8_stats_interval): the amax, the
share of values that underflow to zero and the share that saturate at 448, counted by the
quantization kernels in the pass that casts the values (kernels/fp8_stats.py says what each count
is, and why saturation is zero under the experts' current scaling).

    collector = Fp8StatsCollector(interval)   # moe/fp8/training.py's Fp8Training holds it
    collector.attach(model, step)             # every interval-th step, before its first forward
    ... the step's forwards and backwards: each Fp8GroupedMLP adds to its layer's buffer ...
    collector.detach()                        # after the step's last backward: nothing else counts
    metrics, warnings = collector.read(reduce, saturation_warn, underflow_warn)  # at log time

The buffers live on the device and only grow (atomics, no host sync) until `read`, which takes
them to the host once, resets them and returns, per layer i (the block's index in model.layers)
and operand, `fp8/layer{i}/{operand}/amax` (max |value| over the counted steps),
`.../underflow` (the share of the operand's values that are nonzero and cast to zero) and
`.../saturation` (the share clipped at 448 beyond the cast's rounding). Under data or expert
parallelism `reduce` sums the counts and takes the largest amax over ranks. A warning names
layer and operand when a share passes its threshold, and again only after it fell back below.

Operands (OPERANDS), each the FP8 copy a GEMM reads (moe/fp8/grouped_mlp.py):
    x    the routed rows, GEMM1's input; not counted for rows an FP8 dispatch brought quantized
    w1   GEMM1's weight (the forward copy; dgrad's transposed copy holds the same values)
    a    act(h), GEMM2's input
    h    GEMM1's output, kept in FP8 for the backward (not under fp8.intermediate=bf16)
    w2   GEMM2's weight
    dy   the output gradient, dgrad2's input
Not counted: the weight-gradient GEMMs' column copies (xt, dyt, dht, at), dh (dgrad1's input,
kernels/act_quant_bwd.py), the fp8.gemms ablations' path, weights that FSDP all-gathers in FP8
(parallel.fp8_all_gather) and the dense Float8Linear layers. An operand with nothing counted in
a window has no keys.

Shape letters (README.md): Y MoE layers, O operands.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from kernels.fp8_stats import amax_of, new_stats
from moe.config import require
from moe.fp8.grouped_mlp import Fp8GroupedMLP

# a and h next to each other: act_quant_fwd counts both into one two-operand view.
OPERANDS = ("x", "w1", "a", "h", "w2", "dy")
KINDS = ("underflow", "saturation")

Reduce = Callable[[torch.Tensor, str], None]  # (tensor, "sum" | "max"): in place, over the ranks


class Fp8Stats:
    """One layer's buffer, counts_O: int64 (O, STATS_FIELDS) on its device, which the kernels add to."""

    def __init__(self, layer: int, device: torch.device | str) -> None:
        self.layer = layer
        self.counts_O = new_stats(len(OPERANDS), device)

    def of(self, operand: str, n: int = 1) -> torch.Tensor:
        """The rows of `operand` and of the n - 1 operands after it: the contiguous view a kernel takes."""
        i = OPERANDS.index(operand)
        return self.counts_O[i : i + n]


def fp8_expert_layers(model: nn.Module) -> dict[Fp8GroupedMLP, int]:
    """Each FP8 experts module's block index in model.layers (else its order in the model)."""
    blocks = getattr(model, "layers", None)
    if blocks is None:
        return {m: i for i, m in enumerate(m for m in model.modules() if isinstance(m, Fp8GroupedMLP))}
    return {m: i for i, block in enumerate(blocks) for m in block.modules() if isinstance(m, Fp8GroupedMLP)}


class Fp8StatsCollector:
    """The statistics of a run (module docstring); `interval`: every how many steps (0: never)."""

    def __init__(self, interval: int) -> None:
        require(interval >= 0, f"logging.fp8_stats_interval must be >= 0 (0 disables), got {interval}")
        self.interval = interval
        self._stats: dict[int, Fp8Stats] = {}
        self._attached: list[Fp8GroupedMLP] = []  # what `detach` resets: nothing on other steps
        self._above: set[tuple[int, str, str]] = set()  # (layer, operand, kind) past its threshold

    def attach(self, model: nn.Module, step: int) -> None:
        """Before `step`'s first forward: on every interval-th step each FP8 experts module gets
        its layer's buffer."""
        if not self.interval or step % self.interval:
            return
        for module, layer in fp8_expert_layers(model).items():
            if layer not in self._stats:
                self._stats[layer] = Fp8Stats(layer, module.w1.device)
            module.stats = self._stats[layer]
            self._attached.append(module)

    def detach(self) -> None:
        """After the step's last backward: the modules `attach` gave a buffer count no more."""
        for module in self._attached:
            module.stats = None
        self._attached.clear()

    def read(
        self, reduce: Optional[Reduce] = None, saturation_warn: float = 1.0, underflow_warn: float = 1.0
    ) -> tuple[dict[str, float], list[str]]:
        """(metrics, warnings) since the last read (module docstring), and the buffers reset. Every
        rank calls it together when `reduce` runs collectives."""
        if not self._stats:
            return {}, []
        layers = sorted(self._stats)
        stats_YO = torch.stack([self._stats[i].counts_O for i in layers])  # (Y, O, STATS_FIELDS)
        amax_YO = amax_of(stats_YO).clone()
        counts_YO = stats_YO[..., 1:].clone()  # (Y, O, 3): underflows, saturations, values
        for s in self._stats.values():
            s.counts_O.zero_()
        if reduce is not None:
            reduce(amax_YO, "max")
            reduce(counts_YO, "sum")
        # One read to the host; counts stay exact in fp64 below 2**53.
        host = torch.cat([amax_YO.double().flatten(), counts_YO.double().flatten()]).tolist()
        n_amax = len(layers) * len(OPERANDS)
        metrics: dict[str, float] = {}
        warnings: list[str] = []
        thresholds = {"underflow": underflow_warn, "saturation": saturation_warn}
        for y, layer in enumerate(layers):
            for o, operand in enumerate(OPERANDS):
                j = y * len(OPERANDS) + o
                under, sat, n = host[n_amax + 3 * j : n_amax + 3 * j + 3]
                if n == 0:
                    continue
                key = f"fp8/layer{layer}/{operand}"
                metrics[f"{key}/amax"] = host[j]
                for kind, count in zip(KINDS, (under, sat)):
                    share = count / n
                    metrics[f"{key}/{kind}"] = share
                    flag = (layer, operand, kind)
                    if share <= thresholds[kind]:
                        self._above.discard(flag)
                    elif flag not in self._above:
                        self._above.add(flag)
                        warnings.append(_warning(layer, operand, kind, share, thresholds[kind]))
        return metrics, warnings


def _warning(layer: int, operand: str, kind: str, share: float, threshold: float) -> str:
    what = "saturate at 448" if kind == "saturation" else "underflow to zero"
    return (f"layer {layer} experts {operand}: {100 * share:.2g}% of values {what} "
            f"(above logging.fp8_{kind}_warn={threshold:g})")  # fmt: skip
