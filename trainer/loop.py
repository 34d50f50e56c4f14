"""The training loop: build, resume, step, log, validate, checkpoint, stop cleanly.

One step = `grad_accum` micro-batches of `micro_batch_size` sequences on every data-parallel
rank, then one optimizer step. The loss is the mean token cross-entropy plus the routers'
balancing losses (already weighted by their coefficients).

Under expert parallelism one CommTimer (moe/comm_timer.py) times every all-to-all of every MoE
layer, forward and backward; each log window reports a2a_ms (their milliseconds per optimizer
step, as rank 0 saw them) and a2a_share (a2a_ms over the window's wall-clock milliseconds per
step). Validation's all-to-alls are left out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from torch.utils.checkpoint import checkpoint

from moe.comm_timer import CommTimer
from moe.counting import count_params, training_flops_per_token
from moe.fp8.training import Fp8Training
from moe.model import MoETransformer, build_model
from trainer.checkpoint import CheckpointManager
from trainer.config import TrainConfig
from trainer.data import build_train_valid
from trainer.metrics import MetricsLogger, format_line, load_imbalance, memory_gib, peak_tflops
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel import (
    DistEnv,
    all_reduce_,
    apply_data_parallel,
    barrier,
    apply_expert_parallel,
    clip_grad_norm_ep,
    init_distributed,
    reduce_gradients,
    shutdown,
)
from trainer.preemption import PreemptionHandler

log = logging.getLogger("fp8moe")


class NonFiniteLossError(RuntimeError):
    pass


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _apply_block_wrappers(model: MoETransformer, cfg: TrainConfig) -> None:
    """Activation checkpointing and torch.compile, per block, applied to the built model."""
    for block in model.layers:
        if cfg.run.activation_checkpointing:
            inner = block.forward
            block.forward = lambda *a, _f=inner: checkpoint(_f, *a, use_reentrant=False)
        if cfg.run.compile:
            block.compile()


def build(
    cfg: TrainConfig, env: DistEnv, vocab_size: int, fp8: Fp8Training, comm_timer: CommTimer | None = None
) -> MoETransformer:
    """The model of `cfg` on this rank: built and initialised (the same weights on every rank, from
    run.seed), converted to FP8, its experts split over the EP group, its blocks wrapped."""
    if vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size >= {vocab_size}"
        )
    _seed_everything(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, env.device)
    fp8.convert(model)
    # After the FP8 swap: the dispatcher sends what the experts eat.
    dispatch_recipe = fp8.experts_recipe if cfg.parallel.fp8_dispatch else None
    apply_expert_parallel(model, env, fp8_recipe=dispatch_recipe, timer=comm_timer)
    _apply_block_wrappers(model, cfg)
    return model


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str, env: DistEnv) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        run = cfg.run
        self.global_batch = run.micro_batch_size * run.grad_accum * env.world_size
        self.data = build_train_valid(
            cfg.data,
            seq_len=run.seq_len,
            micro_batch_size=run.micro_batch_size,
            global_batch_size=self.global_batch,
            train_steps=run.steps,
            eval_steps=run.eval_steps,
            dp_rank=env.rank,
            dp_size=env.world_size,
        )
        # EP only: with one EP rank nothing travels, and a2a_ms / a2a_share are logged as None.
        self.comm_timer = CommTimer(env.device) if env.ep > 1 else None
        self.fp8 = Fp8Training(cfg.fp8, grad_accum=run.grad_accum)
        self.model = build(cfg, env, self.data.vocab_size, self.fp8, self.comm_timer)
        self.counts = count_params(self.model)
        self.flops_per_token = training_flops_per_token(self.model, run.seq_len)
        self.wrapped = apply_data_parallel(self.model, env, cfg.parallel)
        self.optimizer = build_optimizer(self.wrapped, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, run.steps)
        self.autocast_dtype = torch.bfloat16 if run.dtype == "bfloat16" else None
        self.step = 0
        self.consumed_samples = 0
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.ckpt = CheckpointManager(cfg.checkpoint, run_dir, env.rank, env.world_size)

    # ---- state for checkpoints ----------------------------------------------------------------
    def app_state(self) -> dict:
        return {
            "model": self.wrapped,
            "optim": self.optimizer,
            "sched": self.scheduler,
            "meta": {
                "step": self.step,
                "consumed_samples": self.consumed_samples,
                "skipped_steps": self.skipped_steps,
            },
        }

    def resume(self) -> None:
        state = self.app_state()
        loaded = self.ckpt.load(state)
        if loaded is None:
            return
        meta = state["meta"]
        self.step = int(meta["step"])
        self.consumed_samples = int(meta["consumed_samples"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        log.info("resumed from step %d (%d samples consumed)", self.step, self.consumed_samples)

    # ---- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _forward(self, batch: dict, model) -> tuple[torch.Tensor, torch.Tensor, object]:
        tokens = batch["tokens"].to(self.env.device, non_blocking=True)
        labels = batch["labels"].to(self.env.device, non_blocking=True)
        with self._autocast():
            out = model(tokens, labels)
        return out.loss, out.aux_loss, out

    def train_step(self, train_iter) -> dict:
        cfg, env = self.cfg, self.env
        accum = cfg.run.grad_accum
        lm_loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
        aux_sum = torch.zeros((), device=env.device, dtype=torch.float64)
        counts_YE = None
        for micro in range(accum):
            batch = next(train_iter)
            last = micro == accum - 1
            sync = contextlib.nullcontext()
            if env.distributed and not last and hasattr(self.wrapped, "no_sync"):
                sync = self.wrapped.no_sync()  # DDP: all-reduce gradients once, on the last micro-batch
            with sync:
                lm_loss, aux_loss, out = self._forward(batch, self.wrapped)
                ((lm_loss + aux_loss) / accum).backward()
            lm_loss_sum += lm_loss.detach()
            aux_sum += aux_loss.detach()
            if out.tokens_per_expert_YE is not None:
                counts_YE = out.tokens_per_expert_YE if counts_YE is None else counts_YE + out.tokens_per_expert_YE
        self.consumed_samples += self.global_batch
        self.fp8.after_backward(self.model)

        # One host synchronisation per step: the loss decides whether the step is applied.
        stats = torch.stack([lm_loss_sum / accum, aux_sum / accum]).float()
        all_reduce_(stats, env)
        stats /= env.world_size
        lm_loss, aux_loss = stats.tolist()
        finite = math.isfinite(lm_loss) and math.isfinite(aux_loss)
        grad_norm = float("nan")
        if env.ep > 1:
            reduce_gradients(self.model, env)  # EP replaces DDP's all-reduce (trainer/parallel.py)
        if finite:
            # max_norm=inf measures without clipping.
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            if env.ep > 1:
                norm = clip_grad_norm_ep(self.model, max_norm, env)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
            grad_norm = float(norm)
            finite = math.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
            self.fp8.after_optimizer_step(self.model)  # the next forward quantizes the new weights
            self.nonfinite_in_row = 0
            self._update_expert_bias()
        else:
            self.nonfinite_in_row += 1
            self.skipped_steps += 1
            log.warning(
                "step %d: non-finite loss %.4g / grad norm %.4g; update skipped (%d in a row, limit %d)",
                self.step + 1, lm_loss, grad_norm, self.nonfinite_in_row, cfg.run.max_nonfinite_steps,
            )
            if self.nonfinite_in_row >= cfg.run.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_row} consecutive non-finite losses (run.max_nonfinite_steps="
                    f"{cfg.run.max_nonfinite_steps}) at step {self.step + 1}: stopping. The last "
                    f"complete checkpoint is in {self.ckpt.dir}"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {"loss": lm_loss, "aux_loss": aux_loss, "grad_norm": grad_norm, "lr": lr, "counts_YE": counts_YE}

    def _update_expert_bias(self) -> None:
        for layer in self.model.moe_layers():
            router = layer.router
            if router.expert_bias is None:
                continue
            # Every rank must apply the same update: reduce the observed load first.
            all_reduce_(router.load_since_update, self.env)
            router.update_expert_bias()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.data.valid is None:
            return None
        self.wrapped.eval()
        total = torch.zeros((), device=self.env.device, dtype=torch.float64)
        n = 0
        for batch in self.data.valid():
            loss, _, _ = self._forward(batch, self.model)
            total += loss.double()
            n += 1
        self.wrapped.train()
        stats = torch.stack([total, torch.tensor(float(n), device=self.env.device, dtype=torch.float64)])
        all_reduce_(stats, self.env)
        return (stats[0] / stats[1].clamp_min(1)).item()


def train(cfg: TrainConfig, run_dir: str) -> None:
    env = init_distributed(cfg.run, cfg.parallel)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builders are chatty
    try:
        _train(cfg, run_dir, env)
        barrier(env)  # ranks leave together: gloo aborts a process whose peer tears down first
    finally:
        shutdown(env)


def _train(cfg: TrainConfig, run_dir: str, env: DistEnv) -> None:
    trainer = Trainer(cfg, run_dir, env)
    trainer.resume()
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
        from omegaconf import OmegaConf

        metrics = MetricsLogger(
            run_dir,
            OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            cfg.logging.wandb,
            cfg.logging.project,
            name=run.name,
            group=cfg.logging.group or run.name,
            job_type=cfg.logging.job_type or cfg.fp8.experts,
        )
    train_iter = trainer.data.train(trainer.consumed_samples)
    peak = peak_tflops(env.device)
    tokens_per_step = trainer.global_batch * run.seq_len
    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0, "counts": None, "a2a_ms": 0.0}
    try:
        with PreemptionHandler() as preempt:
            while trainer.step < run.steps:
                out = trainer.train_step(train_iter)
                window["loss"] += out["loss"] if math.isfinite(out["loss"]) else 0.0
                window["n"] += int(math.isfinite(out["loss"]))
                window["steps"] += 1
                if out["counts_YE"] is not None:
                    c = out["counts_YE"].detach()
                    window["counts"] = c if window["counts"] is None else window["counts"] + c
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
                interval = cfg.checkpoint.interval
                if (interval and step % interval == 0) or (step == run.steps and cfg.checkpoint.at_end):
                    trainer.ckpt.save(step, trainer.app_state())
                if preempt.should_stop():
                    if not (interval and step % interval == 0) and step != run.steps:
                        trainer.ckpt.save(step, trainer.app_state())
                    log.warning("preemption signal received: checkpoint saved at step %d, exiting", step)
                    return
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
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "a2a_ms": a2a_ms,
        "a2a_share": a2a_share,
        "memory_gib": memory_gib(env.device),
        "load_imbalance": load_imbalance(counts) if counts is not None else None,
        "skipped_steps": trainer.skipped_steps,
        "consumed_samples": trainer.consumed_samples,
    }
    hist = None
    hist_every = trainer.cfg.logging.expert_hist_interval
    if counts is not None and hist_every and trainer.step % hist_every == 0:
        hist = {f"expert_load/layer_{i}": row.tolist() for i, row in enumerate(counts.cpu())}
    if metrics is not None:
        log.info(format_line(record))
        metrics.log(record, hist)
    window.update(loss=0.0, n=0, t0=time.perf_counter(), steps=0, counts=None, a2a_ms=0.0)
