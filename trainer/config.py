"""The trainer's typed configuration: dataclasses registered in Hydra's ConfigStore.

YAML files under configs/ fill these in; a key the schema lacks or a value of the wrong type is
refused by Hydra when it merges them (it names the key), except keys added with `+key=value`,
which `reject_unknown_keys` refuses. `TrainConfig.validate()` checks what types cannot: ranges,
choices and relations between fields, with errors that name the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from interop.hf_config import check_exportable_at_end
from moe.config import ModelConfig, require
from moe.fp8.recipe import FP8Config
from trainer.checkpoint import CheckpointConfig
from trainer.data import DataConfig
from trainer.profiling import ProfileConfig

DP_BACKENDS = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("bfloat16", "float32")
WEIGHT_CASTS = ("step", "forward")
COMPILE_MODES = ("default", "reduce-overhead")  # run.compile_mode: torch.compile's mode
STATE_DTYPES = ("float32", "bfloat16")  # optim.state_dtype: AdamW's moments
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class RunConfig:
    name: str = "${model.name}-${oc.env:FP8MOE_RUN_ID,local}"  # same on every rank (train.py sets the id)
    output_root: str = "outputs"
    dry_run: bool = False  # build on the meta device, print sizes, FLOPs and the memory plan, exit
    dry_run_gpus: int = 0  # GPUs the dry run's memory plan lays the run out on; 0: this launch's world size
    steps: int = 200
    micro_batch_size: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1  # global batch = micro_batch_size * grad_accum * data-parallel size
    seq_len: int = 256
    seed: int = 1234
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "bfloat16"  # compute dtype under autocast; parameters stay fp32
    # When the fp32 weights are cast to run.dtype (one of WEIGHT_CASTS): "step", once per optimizer
    # step, every micro-batch computing with those copies (the same numbers); "forward", in every
    # forward (a reference for benchmarks). trainer/loop.py `Trainer._step_casts` says how.
    weight_cast: str = "step"
    # From a step's second micro-batch on, the experts add their weight gradients into .grad where
    # they are made: FP8 in the weight-gradient GEMMs' epilogue (where run.defer_expert_wgrad does
    # not apply), BF16 in the weight cast's backward (moe/grad_accumulation.py); false: each writes
    # its product for autograd to add (the same sums, up to the FP8 GEMM epilogue's FMA rounding).
    fuse_grad_accumulation: bool = True
    # With run.grad_accum > 1, the FP8 experts keep each micro-batch's weight-gradient operands
    # (FP8 bytes) and make their weight gradients once, in the step's last backward, over every
    # micro-batch's tokens (moe/fp8/deferred_wgrad.py): one fp32 write of those gradients a step
    # instead of a read and a write a micro-batch. Eager mode, not under FSDP or for EP's shards;
    # false: per micro-batch (the same sums up to fp32 rounding).
    defer_expert_wgrad: bool = True
    compile: bool = False  # torch.compile each block
    # With run.compile: one of COMPILE_MODES. "reduce-overhead" also records each block's forward
    # and backward as CUDA graphs and replays them, one launch a graph instead of one a kernel, for
    # models too small to keep the GPU busy between launches (trainer/loop.py says what it needs).
    compile_mode: str = "default"
    activation_checkpointing: bool = False  # recompute each block in backward
    eval_interval: int = 100  # steps between validation passes (0 disables)
    eval_steps: int = 10  # micro-batches per validation pass
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops
    # A torch.profiler trace (+ a CUDA memory snapshot) of chosen steps (trainer/profiling.py).
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    # Our fused AdamW (trainer/fused_adamw.py: one kernel pass a parameter, which also takes the
    # rowwise FP8 experts' weight amaxes); false: torch's foreach AdamW. The same update up to fp32
    # rounding; a checkpoint saved with either (or torch's fused AdamW) resumes with the other.
    fused: bool = True
    # AdamW's two moments: float32, or bfloat16 (DeepSeek-V3's recipe): 4 bytes of state a
    # parameter instead of 8, what a Mixtral-8x7B needs to fit one 8-GPU node. The fp32 master
    # weights and gradients stay. bfloat16 moments always take the fused AdamW (optim.fused=false
    # applies to float32 only).
    state_dtype: str = "float32"  # one of STATE_DTYPES
    # The lr schedule's length in steps; 0: run.steps of the run that starts it. A resume keeps
    # the checkpoint's length (trainer/resume.py), so a longer run.steps does not re-stretch it.
    schedule_steps: int = 0


@dataclass
class ParallelConfig:
    backend: str = "ddp"  # data parallelism: one of DP_BACKENDS
    ep: int = 1  # expert-parallel size
    # When the experts are FP8 and ep > 1: true sends E4M3 rows + their scales on the wire (H + 4
    # bytes a row rowwise, padded to 16: moe/all_to_all.py; against 2H); false sends BF16 and the
    # experts quantize after receiving, as without EP. A comparison knob (a2a_share).
    fp8_dispatch: bool = True
    # backend=fsdp with FP8 experts: true all-gathers the expert weights as E4M3 + scales, each
    # rank quantizing its own shard once per step (moe/fp8/fsdp_all_gather.py: bytes, exactness);
    # false all-gathers BF16 and the experts quantize the gathered weight. Ignored elsewhere: BF16
    # experts, experts whose FSDP group is one rank (ep = world size), and where the BF16 expert
    # weights are read (an fp8.gemms ablation, logging.sqnr_interval > 0).
    fp8_all_gather: bool = True

    def validate(self, num_experts: int | None = None, world_size: int | None = None) -> None:
        """Each relation is checked once its other side is known: the experts from the model
        config, the world size once the processes exist (trainer/parallel.py)."""
        require(self.backend in DP_BACKENDS, f"parallel.backend must be one of {DP_BACKENDS}, got {self.backend!r}")
        require(self.ep >= 1, f"parallel.ep must be >= 1, got {self.ep}")
        if num_experts is not None:
            require(num_experts % self.ep == 0, f"parallel.ep={self.ep} must divide model.moe.num_experts={num_experts}")
        if world_size is not None:
            require(
                world_size % self.ep == 0,
                f"parallel.ep={self.ep} must divide the world size {world_size} (the number of processes); "
                f"allowed: a divisor of {world_size}",
            )


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between log lines
    wandb: str = "offline"  # one of WANDB_MODES
    project: str = "fp8moe"
    group: str = ""  # pairs runs (a bf16 and an fp8 run of one experiment); default: run.name
    job_type: str = ""  # default: fp8.experts ("bf16", "rowwise", ...)
    # The wandb run every launch of this run directory writes into; "": derived from run.name and
    # the directory (trainer/metrics.py wandb_run_id). Set it to continue a run from a moved directory.
    wandb_id: str = ""
    expert_hist_interval: int = 50  # steps between per-expert load histograms (0 disables)
    # Steps between SQNR probes of the FP8 experts (moe/fp8/sqnr_probe.py: FP8 against BF16 on
    # one micro-batch, sqnr/L{i}/{y,dx,dw1,dw2} in dB; 0 disables).
    sqnr_interval: int = 0
    # Every N-th step the FP8 experts count amax, underflow and saturation per operand
    # (moe/fp8/stats.py: fp8/layer{i}/{operand}/... in each log window; 0 disables, at no cost),
    # and the shares past which a warning names the layer and operand.
    fp8_stats_interval: int = 0
    fp8_saturation_warn: float = 1e-3  # share of an operand's values clipped at 448
    fp8_underflow_warn: float = 0.1  # share of an operand's values, nonzero, cast to zero


def foreach_adamw(opt: OptimConfig) -> bool:
    """Whether the optimizer is torch's foreach AdamW: optim.fused=false with fp32 moments (bf16
    moments always take the fused AdamW). trainer/optim.py builds it; trainer/memory_plan.py counts
    its temporaries."""
    return not opt.fused and opt.state_dtype == "float32"


def check_fp8_stats(lg: LoggingConfig, compile_blocks: bool) -> None:
    """The logging.fp8_* fields; the statistics are counted in eager mode only (their buffers are
    set on the modules between steps, which a compiled graph does not see)."""
    require(lg.fp8_stats_interval >= 0,
            f"logging.fp8_stats_interval must be >= 0 (0 disables), got {lg.fp8_stats_interval}")  # fmt: skip
    for name in ("fp8_saturation_warn", "fp8_underflow_warn"):
        value = getattr(lg, name)
        require(0.0 <= value <= 1.0, f"logging.{name} must be a share in [0, 1], got {value}")
    require(not (lg.fp8_stats_interval and compile_blocks),
            f"logging.fp8_stats_interval={lg.fp8_stats_interval} counts FP8 statistics in eager mode only; "
            "with run.compile=true set logging.fp8_stats_interval=0")  # fmt: skip


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def fp8_all_gather(self) -> bool:
        """Whether FSDP all-gathers the FP8 experts' weights as E4M3 + scales (parallel.fp8_all_gather,
        moe/fp8/fsdp_all_gather.py): FP8 experts on the fused path (fp8.gemms=all), and no SQNR
        probe, which compares against the BF16 expert weights an FP8 all-gather never brings."""
        return (self.parallel.fp8_all_gather and self.fp8.experts != "bf16" and self.fp8.gemms == "all"
                and self.logging.sqnr_interval == 0)  # fmt: skip

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.checkpoint.validate()
        run, opt = self.run, self.optim
        require(bool(run.name.strip()), f"run.name must not be empty, got {run.name!r}")
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_len"):
            require(getattr(run, name) >= 1, f"run.{name} must be >= 1, got {getattr(run, name)}")
        require(
            run.seq_len <= self.model.max_seq_len,
            f"run.seq_len={run.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        require(run.device in DEVICES, f"run.device must be one of {DEVICES}, got {run.device!r}")
        require(run.dtype in DTYPES, f"run.dtype must be one of {DTYPES}, got {run.dtype!r}")
        require(run.weight_cast in WEIGHT_CASTS,
                f"run.weight_cast must be one of {WEIGHT_CASTS}, got {run.weight_cast!r}")  # fmt: skip
        require(run.compile_mode in COMPILE_MODES,
                f"run.compile_mode must be one of {COMPILE_MODES}, got {run.compile_mode!r}")  # fmt: skip
        require(run.compile or run.compile_mode == "default",
                f"run.compile_mode={run.compile_mode} applies to compiled blocks: set run.compile=true")  # fmt: skip
        require(run.dry_run_gpus >= 0,
                f"run.dry_run_gpus must be >= 0 (0: the launch's world size), got {run.dry_run_gpus}")  # fmt: skip
        require(run.max_nonfinite_steps >= 1,
                f"run.max_nonfinite_steps must be >= 1, got {run.max_nonfinite_steps}")
        run.profile.validate(run.steps)
        require(run.eval_interval >= 0,
                f"run.eval_interval must be >= 0 (0 disables validation), got {run.eval_interval}")
        least = 1 if run.eval_interval > 0 else 0
        require(
            run.eval_steps >= least,
            f"run.eval_steps must be >= {least}" + (" while run.eval_interval > 0" if least else "")
            + f", got {run.eval_steps}",
        )
        # NaN fails every comparison, so `x > 0` refuses it too; infinity needs its own check.
        require(math.isfinite(opt.lr) and opt.lr > 0, f"optim.lr must be finite and > 0, got {opt.lr}")
        require(0 <= opt.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}")
        require(opt.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {opt.warmup_steps}")
        require(
            math.isfinite(opt.weight_decay) and opt.weight_decay >= 0,
            f"optim.weight_decay must be finite and >= 0, got {opt.weight_decay}",
        )
        for name in ("beta1", "beta2"):
            require(0 <= getattr(opt, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(opt, name)}")
        require(math.isfinite(opt.eps) and opt.eps > 0, f"optim.eps must be finite and > 0, got {opt.eps}")
        require(opt.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {opt.grad_clip}")
        require(opt.state_dtype in STATE_DTYPES,
                f"optim.state_dtype must be one of {STATE_DTYPES}, got {opt.state_dtype!r}")  # fmt: skip
        self.parallel.validate(num_experts=self.model.moe.num_experts)
        self.fp8.validate()
        require(
            self.logging.wandb in WANDB_MODES,
            f"logging.wandb must be one of {WANDB_MODES}, got {self.logging.wandb!r}",
        )
        require(self.logging.interval >= 1, f"logging.interval must be >= 1, got {self.logging.interval}")
        require(re.fullmatch(r"[A-Za-z0-9_-]{0,64}", self.logging.wandb_id) is not None,
                f"logging.wandb_id must be at most 64 letters, digits, '-' or '_' (empty: derived from "
                f"run.name), got {self.logging.wandb_id!r}")  # fmt: skip
        require(
            self.logging.expert_hist_interval >= 0,
            f"logging.expert_hist_interval must be >= 0 (0 disables), got {self.logging.expert_hist_interval}",
        )
        require(self.logging.sqnr_interval >= 0,
                f"logging.sqnr_interval must be >= 0 (0 disables), got {self.logging.sqnr_interval}")  # fmt: skip
        check_fp8_stats(self.logging, self.run.compile)
        # Last: relations between groups, once each group is known to be sound on its own.
        if self.checkpoint.export_hf_at_end:
            check_exportable_at_end(self.model)  # before training, not after it
        par = self.parallel
        require(
            self.fp8.gemms == "all" or par.ep == 1 or not par.fp8_dispatch,
            f"fp8.gemms={self.fp8.gemms} runs some expert GEMMs in BF16, but parallel.ep={par.ep} with "
            "parallel.fp8_dispatch=true sends the experts FP8 rows: set parallel.fp8_dispatch=false "
            "(or fp8.gemms=all)",
        )
        # CUDA graphs replay fixed launches: EP's all-to-all sizes its buffers from counts read on the
        # host, and FSDP gathers and frees weights from hooks around each block.
        require(run.compile_mode != "reduce-overhead" or (par.ep == 1 and par.backend == "ddp"),
                f"run.compile_mode=reduce-overhead needs parallel.ep=1 and parallel.backend=ddp, got "
                f"parallel.ep={par.ep}, parallel.backend={par.backend} (use run.compile_mode=default)")  # fmt: skip
        require(opt.schedule_steps >= 0,
                f"optim.schedule_steps must be >= 0 (0: run.steps), got {opt.schedule_steps}")
        length = f"optim.schedule_steps={opt.schedule_steps}" if opt.schedule_steps else f"run.steps={run.steps}"
        require(
            opt.warmup_steps <= (opt.schedule_steps or run.steps),
            f"optim.warmup_steps must be <= {length} (a longer warm-up never reaches optim.lr), "
            f"got {opt.warmup_steps}",
        )


def reject_unknown_keys(cfg: DictConfig) -> None:
    """Refuse keys of the composed config that the TrainConfig schema lacks.

    Hydra refuses `run.stepz=5` but adds `+run.stepz=5` (and `+modle=tiny`, its own suggestion
    for an unknown group), and `OmegaConf.to_object` then drops the key: the run goes on without
    what the user asked for. Call this on the composed config, before `to_object`.
    """
    unknown: list[str] = []
    _collect_unknown(OmegaConf.to_container(cfg, resolve=False), TrainConfig, "", unknown)
    if unknown:
        raise ValueError("unknown config keys (the schema in trainer/config.py has no such field; "
                         "nothing would read them):\n  " + "\n  ".join(unknown))


def _collect_unknown(node: dict, schema: type, path: str, unknown: list[str]) -> None:
    hints = typing.get_type_hints(schema)
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key, value in node.items():
        name = f"{path}{key}"
        if key not in allowed:
            if not path and key == "hydra":  # Hydra's own node, when composed with it
                continue
            close = difflib.get_close_matches(str(key), allowed, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(path + c) for c in close)}? " if close else ""
            unknown.append(f"{name!r}: {hint}allowed under {path.rstrip('.') or 'the top level'}: "
                           f"{', '.join(sorted(allowed))}")
            continue
        inner = _dataclass_of(hints[key])
        if inner is not None and isinstance(value, dict):
            _collect_unknown(value, inner, f"{name}.", unknown)


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass an annotation names (Optional[X] included), or None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def register_configs() -> None:
    """Register the schema so configs/config.yaml and every group file are checked against it."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
