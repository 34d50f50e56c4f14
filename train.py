"""Entry point: `python train.py <hydra overrides>` or `torchrun ... train.py <overrides>`.

Examples:
    python train.py                                   # tiny MoE on the embedded corpus (CPU or GPU)
    python train.py model=mixtral_8x7b run.dry_run=true
    torchrun --nproc_per_node 8 train.py model=qwen3_30b_a3b fp8=rowwise data=megatron data.paths=[/data/corpus]
"""

from __future__ import annotations

import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.config import TrainConfig, register_configs, reject_unknown_keys
from trainer.run_lock import stop_with_launcher


def _same_run_id_on_every_rank() -> None:
    """Give all ranks of one launch the same run name, and keep Hydra's hands off the run directory.

    torchrun gives every rank the rendezvous id (a uuid with --standalone, the Slurm job id in
    launch/slurm.sbatch), so a requeued Slurm job finds its own run directory and resumes.
    Hydra writes nothing there (no .hydra/, no log file): the trainer first takes the run's lock,
    then writes the config it actually uses and its log (trainer/loop.py), so a second launch of a
    live run cannot overwrite them before it is refused.
    """
    if "FP8MOE_RUN_ID" not in os.environ:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id == "none":
            run_id = os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d-%H%M%S")
        os.environ["FP8MOE_RUN_ID"] = run_id
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    reject_unknown_keys(cfg)  # Hydra's `+key=value` adds keys the schema lacks; they would be ignored
    train_cfg: TrainConfig = OmegaConf.to_object(cfg)
    train_cfg.validate()
    if train_cfg.run.dry_run:
        from trainer.dry_run import dry_run

        dry_run(train_cfg)
        return
    from trainer.run import train

    hydra_cfg = HydraConfig.get()
    train(train_cfg, run_dir=hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    stop_with_launcher()  # under torchrun: die with the launcher (trainer/run_lock.py)
    register_configs()
    _same_run_id_on_every_rank()
    main()
