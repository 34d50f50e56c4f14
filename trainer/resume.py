"""What a resumed run does with a config that differs from its checkpoint's.

A checkpoint holds the resolved config of the run that saved it (what that run actually used).
On resume the two are compared key by key and every difference is printed, then:

- free keys: how the run is launched, logged, evaluated and saved, its length (run.steps) and its
  parallel layout (a checkpoint loads at every layout) come from the new config;
- model.*: the architecture; the weights cannot load into another one, so a change is refused
  (model.loss_chunk_rows, how the loss is computed, is free);
- everything else (the optimizer's hyperparameters and lr schedule, the data and its order, the
  global batch, the FP8 recipe, the seed) is the checkpoint's trajectory: a change is refused
  unless `checkpoint.apply_changes=true`, which applies the new values deliberately (the
  optimizer's lr, betas, eps and weight decay are set from the new config, as Megatron's
  --override-opt_param-scheduler does). Without a change nothing is overridden: the state that
  loaded is the state the config describes.
The lr schedule's length (optim.schedule_steps, 0 = run.steps) is fixed by the run that started
it: a resume with a larger run.steps trains longer at the schedule's final lr instead of
stretching the cosine, unless it sets optim.schedule_steps (and apply_changes) itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

log = logging.getLogger("fp8moe")

# Prefixes of the keys a resume may change freely (a key matches a prefix ending in "." by
# prefix, any other prefix exactly).
FREE = (
    "run.name", "run.output_root", "run.dry_run", "run.dry_run_gpus", "run.steps", "run.device", "run.compile",
    "run.compile_mode", "run.activation_checkpointing", "run.eval_interval", "run.eval_steps",
    "run.max_nonfinite_steps",
    # how a step computes: the same update up to fp32 rounding
    "run.weight_cast", "run.fuse_grad_accumulation", "run.defer_expert_wgrad", "optim.fused",
    "run.micro_batch_size", "run.grad_accum", "run.profile.", "logging.", "checkpoint.", "parallel.",
    "data.num_workers", "data.cache_dir", "data.valid_seed",
    "model.loss_chunk_rows",  # the loss computed in chunks: the same gradients up to rounding
)  # fmt: skip
ARCHITECTURE = ("model.",)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in prefixes)


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.new!r}"


@dataclass(frozen=True)
class ResumePlan:
    changes: tuple[Change, ...]  # every difference, free ones included
    applied: tuple[Change, ...]  # trajectory changes applied by checkpoint.apply_changes
    schedule_steps: int  # the lr schedule's length this run uses


def schedule_steps(cfg: Mapping[str, Any]) -> int:
    """The lr schedule's length a resolved config describes."""
    return cfg["optim"]["schedule_steps"] or cfg["run"]["steps"]


def _schema_defaults() -> dict[str, Any]:
    from omegaconf import OmegaConf

    from trainer.config import TrainConfig

    return flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig()), resolve=False))


def plan_resume(saved: Mapping[str, Any], new: Mapping[str, Any], saved_global_batch: int,
                global_batch: int, apply_changes: bool) -> ResumePlan:
    """Compare the checkpoint's resolved config with this run's; ValueError when the difference
    cannot or may not be applied. Global batches are in sequences (they depend on the world size,
    which the config does not hold)."""
    old, cur = flatten(saved), flatten(new)
    # A key the checkpoint lacks was added to the schema after it was saved; at its default it
    # keeps the behaviour the checkpoint's run had, so it is no change.
    defaults = _schema_defaults()
    for key in cur.keys() - old.keys():
        if key in defaults and cur[key] == defaults[key]:
            old[key] = cur[key]
    changes = [Change(k, old.get(k), cur.get(k)) for k in sorted(old.keys() | cur.keys()) if old.get(k) != cur.get(k)]
    if saved_global_batch != global_batch:
        changes.append(Change("global batch (sequences: micro_batch_size x grad_accum x ranks)",
                              saved_global_batch, global_batch))  # fmt: skip
    # The schedule length compares by what each run uses, so that a longer run.steps is free.
    length = Change("optim.schedule_steps (effective)", schedule_steps(saved), schedule_steps(new))
    changes = [c for c in changes if c.key != "optim.schedule_steps"]
    explicit_length = length.saved != length.new and new["optim"]["schedule_steps"] != 0
    if explicit_length:
        changes.append(length)
    architecture = [c for c in changes if _matches(c.key, ARCHITECTURE) and not _matches(c.key, FREE)]
    trajectory = [c for c in changes if not _matches(c.key, FREE + ARCHITECTURE)]
    if architecture:
        raise ValueError(
            "the checkpoint was saved by another model; its weights cannot load into this one:\n  "
            + "\n  ".join(map(str, architecture)) + "\nresume with the checkpoint's model.* values, or "
            "start a new run (another run.name, or checkpoint.resume=none)"
        )
    if trajectory and not apply_changes:
        raise ValueError(
            "this run's config differs from its checkpoint's in what decides the trajectory:\n  "
            + "\n  ".join(map(str, trajectory)) + "\nresume with the checkpoint's values, or pass "
            "checkpoint.apply_changes=true to apply the new ones from this step on"
        )
    steps = length.new if explicit_length else length.saved  # (explicit: applied, or refused above)
    return ResumePlan(tuple(changes), tuple(trajectory), steps)


def log_plan(plan: ResumePlan, step: int) -> None:
    if not plan.changes:
        return
    lines = [f"  {c}" + ("  (applied: checkpoint.apply_changes)" if c in plan.applied else "") for c in plan.changes]
    log.warning("resuming at step %d with a config that differs from the checkpoint's:\n%s", step, "\n".join(lines))
