"""The Trainer: build the model, resume, one optimizer step, validate, checkpoint
(trainer/run.py drives a whole run with it).

One step = `grad_accum` micro-batches of `micro_batch_size` sequences on every data-parallel
rank, then one optimizer step. The loss is the mean token cross-entropy plus the routers'
balancing losses (already weighted by their coefficients).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from omegaconf import OmegaConf
from torch.utils.checkpoint import checkpoint

from interop.trainer_hooks import init_from_hf
from moe.comm_timer import CommTimer
from moe.counting import count_params, training_flops_per_token
from moe.fp8.sqnr_probe import probe as sqnr_probe
from moe.fp8.training import Fp8Training
from moe.fp8.deferred_wgrad import deferring_expert_wgrad
from moe.grad_accumulation import adding_grads_in_place
from moe.model import MoETransformer
from moe.step_casts import weights_cast_once
from trainer.checkpoint import CheckpointManager
from trainer.config import TrainConfig
from trainer.data import build_train_valid
from trainer.optim import (build_optimizer, build_scheduler, clipped_step, resume_scheduler, schedule_steps,
                           set_hyperparameters)
from trainer.parallel import (DistEnv, all_reduce_, apply_expert_parallel, apply_fsdp, clip_coefficient, global_grad_norm,
                              reduce_gradients, wrap_ddp)
from trainer.resume import log_plan, plan_resume
from trainer.memory_plan import refuse_if_cannot_fit
from trainer.sharded_init import materialize

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
            block.compile(mode=cfg.run.compile_mode)


def _keep_grads(model: torch.nn.Module) -> None:
    """Zero gradients allocated up front: backward adds into them in place (see Trainer.train_step)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def build(cfg: TrainConfig, env: DistEnv, fp8: Fp8Training, comm_timer: CommTimer | None = None) -> MoETransformer:
    """The model of `cfg` on this rank, sharded from the start: built on the meta device,
    converted to FP8, its experts split over the EP group, FSDP applied (backend=fsdp), and only
    then this rank's shards allocated and initialised (the same full weights at every layout, from
    run.seed: trainer/sharded_init.py); last, its blocks wrapped."""
    _seed_everything(cfg.run.seed)
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
        fp8.convert(model)
    if env.device.type == "cpu" and (fp8.experts_recipe or fp8.dense_recipe) and env.is_main:
        log.warning("fp8.experts=%s fp8.dense=%s on a CPU: the FP8 GEMMs run as a torch emulation "
                    "(the same numbers, far slower; for tests); a Hopper GPU runs them on its tensor "
                    "cores", cfg.fp8.experts, cfg.fp8.dense)  # fmt: skip
    # After the FP8 swap: the dispatcher sends what the experts eat.
    dispatch_recipe = fp8.experts_recipe if cfg.parallel.fp8_dispatch else None
    apply_expert_parallel(model, env, fp8_recipe=dispatch_recipe, timer=comm_timer)
    if env.fsdp:
        if cfg.parallel.fp8_all_gather and cfg.logging.sqnr_interval and fp8.experts_recipe and env.is_main:
            log.warning("logging.sqnr_interval=%d: FSDP gathers the experts' weights in BF16, not FP8 "
                        "(parallel.fp8_all_gather), for the probe to compare with", cfg.logging.sqnr_interval)
        apply_fsdp(model, env, torch.bfloat16 if cfg.run.dtype == "bfloat16" else None, cfg.fp8_all_gather())
    refuse_if_cannot_fit(cfg, env.world_size, env.device)  # before the first byte is allocated
    materialize(model, env.device, cfg.run.seed)
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
            eval_steps=run.eval_steps if run.eval_interval else 0,  # no validation split to build
            dp_rank=env.rank,
            dp_size=env.world_size,
        )
        self.data.check_model_vocab(cfg.model.vocab_size)
        # EP only: with one EP rank nothing travels, and a2a_ms / a2a_share are logged as None.
        self.comm_timer = CommTimer(env.device) if env.ep > 1 else None
        self.fp8 = Fp8Training(cfg.fp8, grad_accum=run.grad_accum, stats_interval=cfg.logging.fp8_stats_interval)
        self.model = build(cfg, env, self.fp8, self.comm_timer)
        self.counts = count_params(self.model)
        self.flops_per_token = training_flops_per_token(self.model, run.seq_len)
        self.wrapped = wrap_ddp(self.model, env)
        self.optimizer = build_optimizer(self.wrapped, cfg.optim)
        self.graphs = run.compile and run.compile_mode == "reduce-overhead"
        if self.graphs:
            _keep_grads(self.model)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, schedule_steps(cfg.optim, run.steps))
        self.autocast_dtype = torch.bfloat16 if run.dtype == "bfloat16" else None
        self.step = 0
        self.consumed_samples = 0
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.protected_steps: list[int] = []  # checkpoints pruning must keep (the last before a streak)
        self.timed_save_due = False
        self.last_save_time = time.monotonic()
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
                "global_batch": self.global_batch,
                "protected_steps": self.protected_steps,
            },
        }

    @property
    def run_config(self) -> dict:
        """The resolved config this run uses: saved in every checkpoint, compared on resume."""
        return OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True)

    def resume(self) -> None:
        state = self.app_state()
        if self.ckpt.load(state) is None:
            init_from_hf(self)  # a fresh start: checkpoint.init_from_hf's weights, if it names any
            return
        meta = state["meta"]
        self.step = int(meta["step"])
        self.consumed_samples = int(meta["consumed_samples"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.protected_steps = list(meta.get("protected_steps", []))
        log.info("resumed from step %d (%d samples consumed)", self.step, self.consumed_samples)
        saved = self.ckpt.loaded.config
        if saved is None:
            log.warning("%s records no config (an older checkpoint): this run's config is not "
                        "compared with it", self.ckpt.loaded.path)  # fmt: skip
            return
        plan = plan_resume(saved, self.run_config, int(meta.get("global_batch", self.global_batch)),
                           self.global_batch, self.cfg.checkpoint.apply_changes)  # fmt: skip
        log_plan(plan, self.step)
        self.cfg.optim.schedule_steps = plan.schedule_steps  # what the run uses, as recorded
        if plan.applied:
            set_hyperparameters(self.optimizer, self.cfg.optim)
        self.scheduler = resume_scheduler(self.optimizer, self.scheduler.state_dict(), self.cfg.optim,
                                          plan.schedule_steps, reset_lr=bool(plan.applied))  # fmt: skip

    # ---- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _step_casts(self):
        """run.weight_cast=step with run.grad_accum > 1: the step's micro-batches compute with one
        cast of each fp32 weight (moe/step_casts.py), made by the first forward and let go after
        the last backward, before clipping and the optimizer step (no copy outlives the step).
        Otherwise every forward casts: one micro-batch casts once a step anyway, and frees each
        cast as its backward goes, off backward's end where every gradient is new. Memory: a
        backward that keeps the copies to its end stays below the start of the next backward (or
        its own, for the last), which holds every copy, every gradient and the activations.
        FSDP with run.dtype=bfloat16 gathers the blocks in bf16, leaving only its fp32 root's
        output layer to cast; a re-gather within the step brings the same values (weights change
        only in the optimizer step, after the scope), so no kept copy can be stale."""
        run = self.cfg.run
        if run.weight_cast == "step" and run.grad_accum > 1 and self.autocast_dtype is not None:
            return weights_cast_once(self.model)
        return contextlib.nullcontext()

    def _forward(self, batch: dict, model) -> tuple[torch.Tensor, torch.Tensor, object]:
        if self.graphs:
            # Each forward starts a new round of CUDA graph replays, which may overwrite the last
            # round's outputs: every value the step keeps from them is reduced outside the blocks.
            torch.compiler.cudagraph_mark_step_begin()
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
        layer_aux: dict[str, torch.Tensor] = {}  # per kind, (Y,): each MoE layer's balancing loss
        self.fp8.before_step(self.model, self.step + 1)  # logging.fp8_stats_interval's steps count
        defer = cfg.run.defer_expert_wgrad and not env.fsdp and not cfg.run.compile
        with self._step_casts(), deferring_expert_wgrad(self.model, accum, defer) as mark_last:
            for micro in range(accum):
                batch = next(train_iter)
                last = micro == accum - 1
                mark_last(last)
                sync = contextlib.nullcontext()
                ddp = env.distributed and hasattr(self.wrapped, "no_sync")
                if env.fsdp:  # reduce-scatter once, on the last micro-batch
                    self.model.set_requires_gradient_sync(last)
                elif ddp and not last:
                    sync = self.wrapped.no_sync()  # DDP: all-reduce gradients once, on the last micro-batch
                # Expert gradients add into .grad where they are made, except where hooks wait on
                # AccumulateGrad (DDP's all-reduce; FSDP keeps its own accumulation).
                in_place = cfg.run.fuse_grad_accumulation and not env.fsdp and not (ddp and last)
                with sync, adding_grads_in_place(self.model, in_place):
                    lm_loss, aux_loss, out = self._forward(batch, self.wrapped)
                    ((lm_loss + aux_loss) / accum).backward()
                lm_loss_sum += lm_loss.detach()
                aux_sum += aux_loss.detach()
                if out.tokens_per_expert_YE is not None:
                    counts_YE = out.tokens_per_expert_YE if counts_YE is None else counts_YE + out.tokens_per_expert_YE
                for name, value_Y in out.layer_aux_losses.items():
                    layer_aux[name] = layer_aux[name] + value_Y if name in layer_aux else value_Y
        self.consumed_samples += self.global_batch
        self.fp8.after_backward(self.model)

        # One host synchronisation per step: the loss decides whether the step is applied, the
        # gradient norm too, and rank 0's clock whether a timed checkpoint is due (every rank must
        # save at the same step). The norm is taken before the loss is known, the gradients clipped
        # after the read; a step with a non-finite loss is skipped and its gradients dropped.
        due = float(env.is_main and self._save_timer_due())
        stats = torch.stack([lm_loss_sum / accum, aux_sum / accum, torch.full_like(lm_loss_sum, due)]).float()
        all_reduce_(stats, env)
        if env.ep > 1 and not env.fsdp:
            reduce_gradients(self.model, env)  # EP replaces DDP's all-reduce (trainer/parallel.py)
        # max_norm=inf measures without clipping. The gradients are scaled only where the norm
        # exceeds max_norm, inside the optimizer's pass where it can (trainer/optim.py
        # `clipped_step`); the decision reads the same coefficient.
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = global_grad_norm(self.model, env)
        coef = clip_coefficient(norm, max_norm)
        lm_sum, aux_sum, due_sum, grad_norm, coef_value = torch.cat(
            [stats, norm.reshape(1).float(), coef.reshape(1).float()]).tolist()  # the one read
        lm_loss, aux_loss = lm_sum / env.world_size, aux_sum / env.world_size
        self.timed_save_due = due_sum > 0
        finite = math.isfinite(lm_loss) and math.isfinite(aux_loss)
        grad_norm = grad_norm if finite else float("nan")  # a skipped step's gradients mean nothing
        finite = finite and math.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            clipped_step(self.optimizer, self.model, coef if coef_value < 1.0 else None)
            self.fp8.after_optimizer_step(self.model)  # the next forward quantizes the new weights
            self.nonfinite_in_row = 0
            self._update_expert_bias()
        else:
            if self.nonfinite_in_row == 0 and self.ckpt.last_saved_step is not None:
                # The last checkpoint before the streak survives every later pruning.
                self.protected_steps = sorted({*self.protected_steps, self.ckpt.last_saved_step})
            self.nonfinite_in_row += 1
            self.skipped_steps += 1
            what = (f"non-finite loss {lm_loss:.4g}" if not math.isfinite(lm_loss + aux_loss)
                    else f"non-finite gradient norm {grad_norm:.4g} (loss {lm_loss:.4g})")  # fmt: skip
            log.warning(
                "step %d: %s; update skipped (%d in a row, limit %d)",
                self.step + 1, what, self.nonfinite_in_row, cfg.run.max_nonfinite_steps,
            )
            if self.nonfinite_in_row >= cfg.run.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_row} consecutive steps with a non-finite loss or gradient norm "
                    f"(run.max_nonfinite_steps={cfg.run.max_nonfinite_steps}) at step {self.step + 1}: "
                    f"stopping. The last complete checkpoint is in {self.ckpt.dir}"
                )
        # Replayed CUDA graphs own their outputs, and AccumulateGrad would keep a graph's first
        # gradient as .grad, to be overwritten by the next micro-batch's replay: the gradients
        # stay allocated (`_keep_grads`) and are zeroed in place, so every replay is added into them.
        self.optimizer.zero_grad(set_to_none=not self.graphs)
        self.scheduler.step()
        self.step += 1
        result = {"loss": lm_loss, "aux_loss": aux_loss, "grad_norm": grad_norm, "lr": lr, "counts_YE": counts_YE,
                  "layer_aux_Y": {name: v / accum for name, v in layer_aux.items()}}  # fmt: skip
        every = cfg.logging.sqnr_interval
        if every and self.step % every == 0:  # FP8 against BF16 experts on this step's last micro-batch
            result["sqnr"] = sqnr_probe(self.model, lambda: self._forward(batch, self.model))
        return result

    # ---- checkpoints -----------------------------------------------------------------------------
    def _save_timer_due(self) -> bool:
        minutes = self.cfg.checkpoint.interval_minutes
        return minutes > 0 and time.monotonic() - self.last_save_time >= 60 * minutes

    def checkpoint_due(self) -> bool:
        """After a step: the step interval, the timer (rank 0's clock, agreed in train_step), the end."""
        ck, step = self.cfg.checkpoint, self.step
        return (ck.interval > 0 and step % ck.interval == 0) or self.timed_save_due or (
            step == self.cfg.run.steps and ck.at_end
        )

    def save(self) -> None:
        """Checkpoint this step, unless the run is in a non-finite streak: a checkpoint made then
        could be the only one left after pruning, and resuming from it would resume the streak."""
        if self.nonfinite_in_row:
            log.warning("step %d: no checkpoint saved during a non-finite streak (%d in a row)",
                        self.step, self.nonfinite_in_row)  # fmt: skip
            return
        self.ckpt.save(self.step, self.app_state(), protect=self.protected_steps, config=self.run_config)
        self.last_save_time = time.monotonic()

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
