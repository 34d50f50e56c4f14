"""A whole training run: the run directory's lock and record, the step loop with its log windows,
validation, checkpoints and preemption (trainer/loop.py holds the Trainer: one step, its state).

What a run writes into `outputs/<run.name>/`, and when: rank 0 takes the directory's lock first
(trainer/run_lock.py), then opens `train.log`; after the resume, `.hydra/config.yaml` records the
config the run actually uses (a resume keeps the checkpoint's lr schedule length, for instance)
and `.hydra/overrides.yaml` the command line's overrides; Hydra itself writes nothing there
(train.py). `profile/` holds the traces and memory snapshots of the steps run.profile.steps names
(trainer/profiling.py).

Under expert parallelism one CommTimer (moe/comm_timer.py) times every all-to-all of every MoE
layer, forward and backward; each log window reports a2a_ms (their milliseconds per optimizer
step, as rank 0 saw them) and a2a_share (a2a_ms over the window's wall-clock milliseconds per
step). Validation's all-to-alls are left out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from interop.trainer_hooks import export_at_end
from trainer.config import TrainConfig
from trainer.layer_metrics import layer_metrics
from trainer.loop import Trainer
from trainer.metrics import MetricsLogger, format_line, load_imbalance, memory_gib, peak_tflops
from trainer.parallel import DistEnv, all_reduce_, barrier, init_distributed, shutdown
from trainer.preemption import PreemptionHandler
from trainer.profiling import build_step_profiler, profiled
from trainer.run_lock import acquire_run_lock

log = logging.getLogger("fp8moe")

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def train(cfg: TrainConfig, run_dir: str, overrides: Sequence[str] = ()) -> None:
    env = init_distributed(cfg.run, cfg.parallel)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builders are chatty
    try:
        with acquire_run_lock(run_dir, is_main=env.is_main, distributed=env.distributed):
            if env.is_main:
                _log_to_file(Path(run_dir) / "train.log")
            _train(cfg, run_dir, env, overrides)
            barrier(env)  # ranks leave together (gloo aborts a process whose peer tears down
            # first), and inside the lock: no rank still writes when rank 0 releases it
    finally:
        shutdown(env)


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


def write_run_record(run_dir: str, config: dict, overrides: Sequence[str]) -> None:
    """The config this run uses and the overrides it was launched with, where tools read them
    (tools/parity_report.py reads `.hydra/config.yaml`)."""
    record = Path(run_dir) / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), record / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), record / "overrides.yaml")


def _train(cfg: TrainConfig, run_dir: str, env: DistEnv, overrides: Sequence[str]) -> None:
    trainer = Trainer(cfg, run_dir, env)
    trainer.resume()
    if env.is_main:
        write_run_record(run_dir, trainer.run_config, overrides)
    run = cfg.run
    if trainer.step >= run.steps:
        log.info("checkpoint is at step %d >= run.steps=%d: nothing to train", trainer.step, run.steps)
        return
    metrics = None
    if env.is_main:
        log.info(
            "model %s: params total=%d active=%d, %.3f GFLOP/token; global batch %d x %d tokens; "
            "%d rank(s) on %s; fp8.experts=%s",
            cfg.model.name, trainer.counts.total, trainer.counts.active, trainer.flops_per_token / 1e9,
            trainer.global_batch, run.seq_len, env.world_size, env.device, cfg.fp8.experts,
        )
        metrics = MetricsLogger(
            run_dir,
            trainer.run_config,
            cfg.logging.wandb,
            cfg.logging.project,
            name=run.name,
            group=cfg.logging.group or run.name,
            job_type=cfg.logging.job_type or cfg.fp8.experts,
            wandb_id=cfg.logging.wandb_id,
        )
    train_iter = trainer.data.train(trainer.consumed_samples)
    profiler = build_step_profiler(run.profile, run_dir, env.rank, env.device, start_step=trainer.step)
    peak = peak_tflops(env.device)
    tokens_per_step = trainer.global_batch * run.seq_len
    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0, "counts": None, "a2a_ms": 0.0,
              "layer_aux": {}}  # fmt: skip
    try:
        with PreemptionHandler() as preempt:
            while trainer.step < run.steps:
                with profiled(profiler, trainer.step + 1):  # run.profile: the steps it names
                    out = trainer.train_step(train_iter)
                if out.get("sqnr") and metrics is not None:
                    metrics.log({"step": trainer.step, **out["sqnr"]})
                window["loss"] += out["loss"] if math.isfinite(out["loss"]) else 0.0
                window["n"] += int(math.isfinite(out["loss"]))
                window["steps"] += 1
                if out["counts_YE"] is not None:
                    c = out["counts_YE"].detach()
                    window["counts"] = c if window["counts"] is None else window["counts"] + c
                for name, value_Y in out["layer_aux_Y"].items():  # summed over the window's steps
                    window["layer_aux"][name] = window["layer_aux"].get(name, 0.0) + value_Y
                step = trainer.step
                if step % cfg.logging.interval == 0 or step == run.steps:
                    _log_window(trainer, metrics, window, out, tokens_per_step, peak)
                if run.eval_interval and (step % run.eval_interval == 0 or step == run.steps):
                    window["a2a_ms"] += _drain_a2a_ms(trainer)  # the window's training all-to-alls
                    val = trainer.evaluate()
                    _drain_a2a_ms(trainer)  # validation's: no training step's cost
                    if val is not None and metrics is not None:
                        log.info("step %6d | validation loss %.4f", step, val)
                        metrics.log({"step": step, "val_loss": val})
                if trainer.checkpoint_due():
                    trainer.save()
                if preempt.should_stop():
                    trainer.save()  # a no-op where the step was just saved
                    log.warning("preemption signal received: stopping at step %d", step)
                    return
        export_at_end(trainer)  # checkpoint.export_hf_at_end: the last checkpoint as an HF model
    finally:
        if metrics is not None:
            metrics.close()


def _drain_a2a_ms(trainer: Trainer) -> float:
    """All-to-all milliseconds since the last drain (0 without EP). Every rank drains, so no
    rank's span list grows; on CUDA this waits for the last span (call it where the step syncs)."""
    return trainer.comm_timer.drain_ms() if trainer.comm_timer is not None else 0.0


def _log_window(trainer: Trainer, metrics, window: dict, out: dict, tokens_per_step: int, peak) -> None:
    env = trainer.env
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    elapsed = time.perf_counter() - window["t0"]
    tokens_per_s = tokens_per_step * window["steps"] / max(elapsed, 1e-9)
    tflops = tokens_per_s * trainer.flops_per_token / env.world_size / 1e12
    # Drained at every log, the first included: warm-up steps stay in the first window.
    a2a_ms = a2a_share = None
    if trainer.comm_timer is not None:
        a2a_ms = (window["a2a_ms"] + _drain_a2a_ms(trainer)) / window["steps"]
        a2a_share = a2a_ms / max(1e3 * elapsed / window["steps"], 1e-9)
    counts = window["counts"]
    if counts is not None:
        all_reduce_(counts, env)
    record = {
        "step": trainer.step,
        "loss": window["loss"] / max(window["n"], 1) if window["n"] else float("nan"),
        "aux_loss": out["aux_loss"],
        "lr": out["lr"],
        "grad_norm": out["grad_norm"],
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * elapsed / window["steps"],
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "a2a_ms": a2a_ms,
        "a2a_share": a2a_share,
        "memory_gib": memory_gib(env.device),
        "load_imbalance": load_imbalance(counts) if counts is not None else None,
        "skipped_steps": trainer.skipped_steps,
        "consumed_samples": trainer.consumed_samples,
    }
    # moe/layer{i}/... and fp8/layer{i}/... (trainer/layer_metrics.py): flat keys, after the above.
    record |= layer_metrics(trainer, counts, window["layer_aux"], window["steps"], tokens_per_step * window["steps"])
    hist = None
    hist_every = trainer.cfg.logging.expert_hist_interval
    if counts is not None and hist_every and trainer.step % hist_every == 0:
        hist = {f"expert_load/layer_{i}": row.tolist() for i, row in enumerate(counts.cpu())}
    if metrics is not None:
        log.info(format_line(record, trainer.cfg.run.steps))
        metrics.log(record, hist)
    window.update(loss=0.0, n=0, t0=time.perf_counter(), steps=0, counts=None, a2a_ms=0.0, layer_aux={})
