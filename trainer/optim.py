"""AdamW over fp32 master parameters (moments in fp32, or bf16: optim.state_dtype) with linear
warm-up and cosine decay: our fused kernel (optim.fused, the default) or torch's foreach AdamW."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe.experts import GroupedMLP
from trainer import fused_adamw
from trainer.config import OptimConfig, foreach_adamw
from trainer.parallel import scale_grads_

# The parameter groups, in this order, whatever the layout: a checkpoint's optimizer and scheduler
# state (one entry per group) then loads at every other layout (one process, DDP, FSDP, expert
# parallelism, where the expert weights are DTensors that AdamW's fused and foreach paths cannot
# mix with plain tensors in one group).
PARAM_GROUPS = ("decay", "no_decay", "experts")
# The group keys that name AdamW's implementation rather than its hyperparameters.
IMPLEMENTATION_KEYS = fused_adamw.IMPLEMENTATION_KEYS


def _weight_decays(cfg: OptimConfig) -> list[float]:
    decay = {"decay": cfg.weight_decay, "no_decay": 0.0, "experts": cfg.weight_decay}
    return [decay[name] for name in PARAM_GROUPS]


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Matrices (and the embedding table) decay; norms and 1-D parameters do not, as in LLaMa.
    The routed experts' weights decay in a group of their own (it may be empty)."""
    experts = {id(p) for m in model.modules() if isinstance(m, GroupedMLP) for p in m.parameters()}
    by_group: dict[str, list[nn.Parameter]] = {name: [] for name in PARAM_GROUPS}
    for p in model.parameters():
        if p.requires_grad:
            by_group["experts" if id(p) in experts else "decay" if p.dim() >= 2 else "no_decay"].append(p)
    return [{"params": by_group[name], "weight_decay": wd} for name, wd in zip(PARAM_GROUPS, _weight_decays(cfg))]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`: our fused kernel with optim.state_dtype moments
    (trainer/fused_adamw.py), or with optim.fused=false torch's foreach AdamW (fp32 moments only:
    there is no foreach path for bf16 ones, which always take ours). Its state loads whichever of
    them, or torch's fused AdamW, saved it: `_keep_implementation`, `FusedAdamW.load_state_dict`."""
    groups, hyper = param_groups(model, cfg), dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if not foreach_adamw(cfg):
        return fused_adamw.FusedAdamW(groups, **hyper, state_dtype=getattr(torch, cfg.state_dtype))
    opt = torch.optim.AdamW(groups, **hyper, foreach=True)
    opt.register_load_state_dict_pre_hook(_keep_implementation)
    return opt


def takes_grad_scale(opt: torch.optim.Optimizer) -> bool:
    """Whether opt.step divides the gradients by `opt.grad_scale` itself: FusedAdamW and torch's
    fused AdamW (the attribute torch.amp.GradScaler sets) do; torch's foreach AdamW does not."""
    return isinstance(opt, fused_adamw.FusedAdamW) or all(group.get("fused") for group in opt.param_groups)


def clipped_step(opt: torch.optim.Optimizer, model: nn.Module, coef: torch.Tensor | None) -> None:
    """opt.step on the gradients times coef (a float32 device scalar below 1: gradient clipping;
    None: as they are). Where the step takes a gradient scale it divides by 1 / coef in its own pass,
    which saves a read and a write of every gradient (9 ms of a 100 ms Mixtral-width step,
    bench/NOTES.md) at the price of one rounding: g / (1 / coef) for g * coef. Else the gradients are
    scaled first (trainer/parallel.py `scale_grads_`)."""
    if coef is None:
        opt.step()
    elif takes_grad_scale(opt):
        opt.grad_scale = coef.float().reciprocal()
        try:
            opt.step()
        finally:
            del opt.grad_scale
    else:
        scale_grads_(model, coef)
        opt.step()


def _keep_implementation(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A loaded state's groups name the implementation of the run that saved it, and
    `load_state_dict` would adopt it with the hyperparameters: this run's stays. Set before the
    state is cast, so each `step` counter lands where this implementation keeps it (fused: on the
    parameter's device). The moments are the same tensors in both."""
    if len(state_dict["param_groups"]) != len(opt.param_groups):
        return state_dict  # load_state_dict refuses it, naming the mismatch
    groups = [{**saved, **{k: own[k] for k in IMPLEMENTATION_KEYS if k in own}}
              for saved, own in zip(state_dict["param_groups"], opt.param_groups)]  # fmt: skip
    return {**state_dict, "param_groups": groups}


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of optim.lr at a step: linear warm-up, then cosine down to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))


def schedule_steps(cfg: OptimConfig, run_steps: int) -> int:
    """The lr schedule's length: optim.schedule_steps, or run.steps where it is 0."""
    return cfg.schedule_steps or run_steps


def set_hyperparameters(opt: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """The config's betas, eps and weight decay replace those an optimizer state brought (a resume
    with checkpoint.apply_changes; the lr goes through `resume_scheduler`)."""
    for group, wd in zip(opt.param_groups, _weight_decays(cfg)):
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=wd)


def resume_scheduler(opt: torch.optim.Optimizer, loaded: dict, cfg: OptimConfig, total_steps: int,
                     reset_lr: bool) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler of a resumed run: the loaded state's step on a schedule of `total_steps`
    (the checkpoint's own length unless a resume changes it deliberately); reset_lr: optim.lr
    replaces the checkpoint's base lr. The groups' lr is set for the current step."""
    sched = build_scheduler(opt, cfg, total_steps)
    sched.load_state_dict(loaded)
    if reset_lr:
        sched.base_lrs = [cfg.lr] * len(opt.param_groups)
    factor = sched.lr_lambdas[0](sched.last_epoch)
    for group, base in zip(opt.param_groups, sched.base_lrs):
        group["initial_lr"], group["lr"] = base, base * factor
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    return sched
