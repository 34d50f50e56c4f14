"""Run metrics: a console line per interval, `metrics.jsonl` always, wandb when it is there.

Only the logging rank builds a `MetricsLogger`; the others get `None` and log nothing.
wandb is optional: missing, disabled or failing to start, it never stops training.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import torch

log = logging.getLogger("fp8moe")

# Dense bf16 tensor-core peak per GPU (vendor datasheets, SXM parts) for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> Optional[float]:
    """The GPU's bf16 peak by name, or None (CPU, or a GPU we have no number for)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (GPU) or resident set size (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def load_imbalance(tokens_per_expert_YE: torch.Tensor) -> float:
    """Max over mean expert load, averaged over MoE layers (1.0 is perfectly balanced)."""
    load = tokens_per_expert_YE.double()
    return (load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)).mean().item()


class MetricsLogger:
    def __init__(
        self,
        run_dir: str,
        config: dict[str, Any],
        wandb_mode: str,
        project: str,
        name: str,
        group: str,
        job_type: str,
    ) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most a line
        self._wandb = None
        if wandb_mode != "disabled":
            self._wandb = self._start_wandb(run_dir, config, wandb_mode, project, name, group, job_type)

    @staticmethod
    def _start_wandb(run_dir, config, mode, project, name, group, job_type):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: logging to metrics.jsonl only")
            return None
        try:
            return wandb.init(
                project=project,
                name=name,
                group=group,
                job_type=job_type,
                config=config,
                dir=run_dir,
                mode=mode,
                settings=wandb.Settings(silent=True, x_disable_stats=True),
            )
        except Exception as err:  # a broken wandb must not stop training
            log.warning("wandb failed to start (%s): logging to metrics.jsonl only", err)
            return None

    def log(self, record: dict[str, Any], histograms: Optional[dict[str, list[float]]] = None) -> None:
        self._file.write(json.dumps(record | (histograms or {})) + "\n")
        if self._wandb is not None:
            payload = {k: v for k, v in record.items() if k != "step" and v is not None}
            if histograms:
                import wandb

                for key, values in histograms.items():
                    payload[key] = wandb.Histogram(values)
            try:
                self._wandb.log(payload, step=record["step"])
            except Exception as err:
                log.warning("wandb.log failed (%s); continuing", err)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as err:
                log.warning("wandb.finish failed (%s)", err)


def format_line(r: dict[str, Any]) -> str:
    """One Megatron/torchtitan-style line."""
    parts = [
        f"step {r['step']:>6d}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.2e}",
        f"grad_norm {r['grad_norm']:.3f}",
        f"tokens/s {r['tokens_per_s']:,.0f}",
        f"TFLOP/s/GPU {r['tflops_per_gpu']:.1f}",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("a2a_ms") is not None:  # expert parallelism only
        share = f" ({100 * r['a2a_share']:.0f}%)" if r.get("a2a_share") is not None else ""
        parts.append(f"a2a {r['a2a_ms']:.1f} ms{share}")
    parts.append(f"mem {r['memory_gib']:.2f}GiB")
    if r.get("load_imbalance") is not None:
        parts.append(f"load max/mean {r['load_imbalance']:.2f}")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return " | ".join(parts)
