"""AdamW over fp32 master weights in one kernel pass a parameter (kernels/adamw.py), its two moments
in fp32 (optim.state_dtype=float32, the default: torch's fused AdamW moves the same 28 bytes an
element) or in bfloat16 (optim.state_dtype=bfloat16). DeepSeek-V3 trains so ("the BF16 data format
instead of FP32 to track the first and second moments in the AdamW optimizer, without incurring
observable performance degradation"), and it is what lets a model the size of Mixtral-8x7B fit one
8-GPU node: the state takes 4 bytes a parameter instead of 8 (trainer/memory_plan.py).

The same hyperparameters, groups, step counter and state keys as torch.optim.AdamW (`step`,
`exp_avg`, `exp_avg_sq`), so a checkpoint of either loads into the other: into this one the moments
are cast to its state dtype one parameter at a time (`load_state_dict`: torch's own load would
first cast every moment to the parameter's fp32, a transient 8 bytes a parameter that a model sized
to fit cannot hold); into torch's they are widened to fp32. Parameters may be DTensors (FSDP2,
expert parallelism): the moments are DTensors laid out as their parameter, and the kernel updates
each rank's local shard, so one group may mix DTensors and plain tensors. The step counter is a CPU
tensor, as in torch's foreach AdamW: the bias corrections are host arithmetic, no device read. Like
torch's fused AdamW, `step` divides the gradients by the optimizer's `grad_scale` attribute where
one is set (a one-element float32 tensor: gradient clipping folded into the step, trainer/optim.py
`clipped_step`). Expert weights the rowwise FP8 recipe quantizes next (moe/fp8/step_amax.py marks
them) are updated by the kernel that also takes their row and column amaxes, so the quantizer skips
its own amax pass over the fp32 master. Why ours and not torch's fused AdamW: that amax, and it is
faster at the same bytes (bench/NOTES.md, bench.optim_step).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.distributed.tensor import DTensor

from kernels.adamw import adamw_step_
from kernels.reference_adamw import AdamWScalars
from moe.fp8 import step_amax

MOMENTS = ("exp_avg", "exp_avg_sq")
IMPLEMENTATION_KEYS = ("fused", "foreach")  # torch.optim.AdamW's, in the groups of its state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments, no amsgrad)
    with `state_dtype` moments (bf16 or fp32), one kernel launch a parameter (kernels/adamw.py),
    which also takes the amaxes of the expert weights marked by moe/fp8/step_amax.py."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2,
                 state_dtype: torch.dtype = torch.bfloat16) -> None:  # fmt: skip
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")  # fmt: skip
        # torch.optim.AdamW's group keys in this torch version, at its defaults (no amsgrad, no
        # maximize, ...: the update above), so that DCP finds the same keys in either's checkpoint.
        defaults = dict(torch.optim.AdamW([torch.zeros(1)]).defaults)
        defaults.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if state_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"state_dtype must be torch.bfloat16 or torch.float32, got {state_dtype}")
        self.state_dtype = state_dtype

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            for name in MOMENTS:
                state[name] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "found_inf", None) is not None:
            raise NotImplementedError("FusedAdamW takes grad_scale but not found_inf (torch.amp.GradScaler's "
                                      "inf check): scale losses with fp32 master weights instead")  # fmt: skip
        grad_scale = getattr(self, "grad_scale", None)
        scales: dict[torch.device, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not take sparse gradients")
                state = self._state(p)
                state["step"] += 1
                s = AdamWScalars.at(int(state["step"].item()), float(group["lr"]), group["betas"], group["eps"],
                                    group["weight_decay"])  # fmt: skip
                local = _local(p)
                if grad_scale is not None and local.device not in scales:  # one copy a device
                    scales[local.device] = grad_scale.to(local.device, torch.float32, non_blocking=True)
                amax = step_amax.amax_buffer(p)
                adamw_step_(local, _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]), s,
                            scales.get(local.device), amax)  # fmt: skip
                if amax is not None:
                    step_amax.record(p)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load for the groups and step counters; the moments set aside first and cast to
        the state dtype here, one parameter at a time, on the parameter's device (module docstring)."""
        moments, kept = {}, {}
        for key, entry in state_dict["state"].items():
            moments[key] = {name: entry[name] for name in MOMENTS if name in entry}
            kept[key] = {name: value for name, value in entry.items() if name not in MOMENTS}
        # torch.optim.AdamW's groups name its implementation (fused, foreach): ours stays.
        groups = [{**saved, **{k: own[k] for k in IMPLEMENTATION_KEYS if k in own}}
                  for saved, own in zip(state_dict["param_groups"], self.param_groups)]  # fmt: skip
        super().load_state_dict({**state_dict, "state": kept, "param_groups": groups})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for key, p in zip(saved_ids, params):
            if key not in moments:
                continue
            state = self.state[p]
            if "step" in state:  # a fused AdamW's counter lives on the device
                state["step"] = state["step"].detach().to("cpu", torch.float32)
            for name, value in moments[key].items():
                state[name] = value.to(device=p.device, dtype=self.state_dtype)
