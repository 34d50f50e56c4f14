"""Run metrics: a console line per interval, `metrics.jsonl` always, wandb when it is there.

Only the logging rank builds a `MetricsLogger`; the others get `None` and log nothing.
wandb is optional: missing, disabled or failing to start, it never stops training. Every launch
of one run directory writes into one wandb run (`wandb_run_id`, resume allowed), with the run's
config and wandb's system statistics; a resumed launch re-runs the steps after its checkpoint,
and those already in the run's metrics.jsonl go to the file only, so wandb's history keeps each
step once and in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("fp8moe")

WANDB_ID_NAME_CHARS = 55  # of run.name in a wandb run id; then "-" and 8 hex digits: 64 at most
# Seconds between wandb's writes of its run file (its default, 15 s, is what a killed launch
# loses): the next launch leaves out of wandb every step metrics.jsonl holds.
WANDB_FLUSH_S = 1.0

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


# wandb groups a run's charts by the text before a key's first "/": train/, val/, perf/, mem/,
# moe/, fp8/. metrics.jsonl keeps the flat names, which tools and tests read (tools/parity_report.py,
# tools/parity_sweep.py, bench/scaling.py); the per-layer keys (trainer/layer_metrics.py) are
# grouped already, in both.
WANDB_NAMES = {
    **{k: f"train/{k}" for k in ("loss", "aux_loss", "lr", "grad_norm", "skipped_steps", "consumed_samples")},
    "val_loss": "val/loss",
    **{k: f"perf/{k}" for k in ("tokens_per_s", "step_ms", "tflops_per_gpu", "mfu", "a2a_ms", "a2a_share")},
    "memory_gib": "mem/memory_gib",
    "load_imbalance": "moe/load_imbalance",
}
WANDB_PREFIXES = {"sqnr": "fp8", "expert_load": "moe"}  # first part of a nested key -> its group


def wandb_key(key: str) -> str:
    """A metrics.jsonl key's name in wandb: WANDB_NAMES's, or a nested key under its group
    (sqnr/L1/y -> fp8/sqnr/L1/y); any other key as it is."""
    if key in WANDB_NAMES:
        return WANDB_NAMES[key]
    head = key.split("/", 1)[0]
    return f"{WANDB_PREFIXES[head]}/{key}" if head in WANDB_PREFIXES else key


def wandb_run_id(name: str, run_dir: str) -> str:
    """The wandb run id of a run directory: run.name with characters other than letters, digits,
    '-' and '_' as '-' (its first WANDB_ID_NAME_CHARS), '-', and 8 hex digits of the directory's
    resolved path. Every launch of the directory (a resume, a requeue) gets the same id; two
    output roots holding the same run.name get two (wandb ids are unique per project). A
    directory reached by another path (moved, mounted elsewhere) starts a new wandb run:
    logging.wandb_id names the old one."""
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', name)[:WANDB_ID_NAME_CHARS]}-{digest}"


def last_logged_step(path: str, chunk: int = 1 << 20) -> int:
    """The step of the last complete record of a metrics.jsonl (0 when there is none): read
    backwards from the end, a histogram line may be longer than a chunk."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        read = 0
        while read < size:
            read = min(size, read + chunk)
            f.seek(size - read)
            lines = f.read(read).splitlines()
            for line in reversed(lines[1:] if read < size else lines):  # lines[0] may be cut
                try:
                    return int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash
            chunk *= 2
    return 0


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
        wandb_id: str = "",
    ) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        # Steps up to here are in the wandb run already (logged by an earlier launch).
        self._wandb_logged_through = last_logged_step(self.path)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most a line
        self._wandb = None
        if wandb_mode != "disabled":
            run_id = wandb_id or wandb_run_id(name, run_dir)
            self._wandb = self._start_wandb(run_dir, config, wandb_mode, project, name, group, job_type, run_id)

    @staticmethod
    def _start_wandb(run_dir, config, mode, project, name, group, job_type, run_id):
        """One wandb run per run directory: the same id at every launch, resumed when it exists
        (online: the server's run; offline: `wandb sync` uploads every launch's
        `wandb/offline-run-*-<id>` into it), config logged, system statistics sampled."""
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: logging to metrics.jsonl only")
            return None
        try:
            return wandb.init(
                project=project,
                name=name,
                id=run_id,
                resume="allow",
                group=group,
                job_type=job_type,
                config=config,
                dir=run_dir,
                mode=mode,
                settings=wandb.Settings(silent=True, x_disable_stats=False,
                                        x_transaction_log_flush_interval=WANDB_FLUSH_S),
            )
        except Exception as err:  # a broken wandb must not stop training
            log.warning("wandb failed to start (%s): logging to metrics.jsonl only", err)
            return None

    def log(self, record: dict[str, Any], histograms: Optional[dict[str, list[float]]] = None) -> None:
        self._file.write(json.dumps(record | (histograms or {})) + "\n")
        if self._wandb is not None and record["step"] > self._wandb_logged_through:
            payload = {wandb_key(k): v for k, v in record.items() if k != "step" and v is not None}
            if histograms:
                import wandb

                for key, values in histograms.items():
                    payload[wandb_key(key)] = wandb.Histogram(values)
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


def _compact(value: float) -> str:
    """412 -> 412, 19871 -> 19.9k, 1234567 -> 1.23M."""
    scale, unit = next(((sc, u) for sc, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(value) >= sc), (1, ""))
    v = value / scale
    return f"{v:.0f}{unit}" if abs(v) >= 100 or not unit else f"{v:.1f}{unit}" if abs(v) >= 10 else f"{v:.2f}{unit}"


def format_eta(seconds: float) -> str:
    """42s, 6m02s, 3h07m, 2d04h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_line(r: dict[str, Any], total_steps: int) -> str:
    """One Megatron/torchtitan-style console line; the ETA is the steps left at the log window's
    milliseconds per step (`step_ms`: evaluation and checkpoint time of the window included)."""
    parts = [
        f"step {r['step']:>{len(str(total_steps))}d}/{total_steps}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.2e}",
        f"grad_norm {r['grad_norm']:.3f}",
    ]
    if r.get("step_ms") is not None:
        parts.append(f"{r['step_ms']:.0f} ms/step")
    parts += [f"{_compact(r['tokens_per_s'])} tok/s", f"TFLOP/s/GPU {r['tflops_per_gpu']:.1f}"]
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
    if r.get("step_ms") is not None:
        parts.append(f"ETA {format_eta(r['step_ms'] / 1e3 * max(total_steps - r['step'], 0))}")
    return " | ".join(parts)
