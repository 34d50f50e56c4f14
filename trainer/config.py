"""The trainer's typed configuration: dataclasses registered in Hydra's ConfigStore.

YAML files under configs/ fill these in; a key the schema lacks or a value of the wrong type is
refused by Hydra when it merges them (it names the key). `TrainConfig.validate()` checks what
types cannot: ranges, choices and relations between fields, with errors that name the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from moe.config import ModelConfig, _check
from moe.fp8.recipe import DENSE_SCALINGS, RECIPES
from trainer.checkpoint import CheckpointConfig
from trainer.data import DataConfig

FP8_EXPERT_RECIPES = ("bf16", *RECIPES)
FP8_DENSE_RECIPES = ("bf16", *DENSE_SCALINGS)
FP8_GRAD_DTYPES = ("e4m3", "e5m2")
DP_BACKENDS = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("bfloat16", "float32")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class RunConfig:
    name: str = "${model.name}-${oc.env:FP8MOE_RUN_ID,local}"  # same on every rank (train.py sets the id)
    output_root: str = "outputs"
    dry_run: bool = False  # build on the meta device, print sizes and FLOPs, exit
    steps: int = 200
    micro_batch_size: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1  # global batch = micro_batch_size * grad_accum * data-parallel size
    seq_len: int = 256
    seed: int = 1234
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "bfloat16"  # compute dtype under autocast; parameters stay fp32
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in backward
    eval_interval: int = 100  # steps between validation passes (0 disables)
    eval_steps: int = 10  # micro-batches per validation pass
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops


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


@dataclass
class ParallelConfig:
    backend: str = "ddp"  # data parallelism: one of DP_BACKENDS
    ep: int = 1  # expert-parallel size
    # When the experts are FP8 and ep > 1: true sends E4M3 rows + their scales on the wire
    # (H + 4 bytes a row rowwise, against 2H); false sends BF16 and the experts quantize after
    # receiving, as without EP. A comparison knob (all-to-all share of step time, a2a_share).
    fp8_dispatch: bool = True


@dataclass
class FP8Config:
    experts: str = "bf16"  # one of FP8_EXPERT_RECIPES
    dense: str = "bf16"  # one of FP8_DENSE_RECIPES (attention, dense FFNs, shared experts)
    dense_grad_dtype: str = "e4m3"  # one of FP8_GRAD_DTYPES: dense layers' output-gradient format
    amax_history_len: int = 16  # dense=tensorwise_delayed: amaxes kept per operand
    amax_margin: int = 0  # dense=tensorwise_delayed: scale = max(history) * 2**margin / fmax
    pow2_scales: bool = False  # round scales to powers of two


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between log lines
    wandb: str = "offline"  # one of WANDB_MODES
    project: str = "fp8moe"
    group: str = ""  # pairs runs (a bf16 and an fp8 run of one experiment); default: run.name
    job_type: str = ""  # default: fp8.experts ("bf16", "rowwise", ...)
    expert_hist_interval: int = 50  # steps between per-expert load histograms (0 disables)


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

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.checkpoint.validate()
        run, opt = self.run, self.optim
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_len"):
            _check(getattr(run, name) >= 1, f"run.{name} must be >= 1, got {getattr(run, name)}")
        _check(
            run.seq_len <= self.model.max_seq_len,
            f"run.seq_len={run.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        _check(run.device in DEVICES, f"run.device must be one of {DEVICES}, got {run.device!r}")
        _check(run.dtype in DTYPES, f"run.dtype must be one of {DTYPES}, got {run.dtype!r}")
        _check(run.max_nonfinite_steps >= 1, "run.max_nonfinite_steps must be >= 1")
        _check(opt.lr > 0, f"optim.lr must be > 0, got {opt.lr}")
        _check(0 <= opt.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}")
        _check(opt.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {opt.warmup_steps}")
        _check(opt.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {opt.grad_clip}")
        _check(
            self.parallel.backend in DP_BACKENDS,
            f"parallel.backend must be one of {DP_BACKENDS}, got {self.parallel.backend!r}",
        )
        _check(self.parallel.ep >= 1, f"parallel.ep must be >= 1, got {self.parallel.ep}")
        _check(
            self.model.moe.num_experts % self.parallel.ep == 0,
            f"parallel.ep={self.parallel.ep} must divide model.moe.num_experts={self.model.moe.num_experts}",
        )
        _check(
            self.parallel.ep == 1 or self.parallel.backend == "ddp",
            f"parallel.ep={self.parallel.ep} works with parallel.backend=ddp only, got {self.parallel.backend!r}",
        )
        _check(
            self.fp8.experts in FP8_EXPERT_RECIPES,
            f"fp8.experts must be one of {FP8_EXPERT_RECIPES}, got {self.fp8.experts!r}",
        )
        _check(
            self.fp8.dense in FP8_DENSE_RECIPES,
            f"fp8.dense must be one of {FP8_DENSE_RECIPES}, got {self.fp8.dense!r}",
        )
        _check(
            self.fp8.dense_grad_dtype in FP8_GRAD_DTYPES,
            f"fp8.dense_grad_dtype must be one of {FP8_GRAD_DTYPES}, got {self.fp8.dense_grad_dtype!r}",
        )
        _check(
            self.fp8.dense != "rowwise" or self.fp8.dense_grad_dtype == "e4m3",
            f"fp8.dense=rowwise takes fp8.dense_grad_dtype=e4m3 only, got {self.fp8.dense_grad_dtype!r}",
        )
        _check(self.fp8.amax_history_len >= 1, f"fp8.amax_history_len must be >= 1, got {self.fp8.amax_history_len}")
        _check(self.fp8.amax_margin >= 0, f"fp8.amax_margin must be >= 0, got {self.fp8.amax_margin}")
        _check(
            self.logging.wandb in WANDB_MODES,
            f"logging.wandb must be one of {WANDB_MODES}, got {self.logging.wandb!r}",
        )
        _check(self.logging.interval >= 1, f"logging.interval must be >= 1, got {self.logging.interval}")


def register_configs() -> None:
    """Register the schema so configs/config.yaml and every group file are checked against it."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
