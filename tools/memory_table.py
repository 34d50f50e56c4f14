"""The README's memory-plan table: every LLaMa-scale model preset on 8, 64 and 256 GPUs.

    python tools/memory_table.py            # prints the markdown table
    python tools/memory_table.py --check    # exit 1 when README.md's table differs from it
    python tools/memory_table.py --write    # replace README.md's table with it

Each row is a model with its experiment preset's run settings (configs/experiment/<model>.yaml:
sequence length, micro-batch, activation checkpointing, FP8 recipe); each cell lays it out as
parallel.backend=fsdp with parallel.ep = min(E, N), or says why it cannot be laid out. The
numbers are trainer/memory_plan.py's memory_per_gpu_gib.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_COUNTS = (8, 64, 256)
BEGIN, END = "<!-- memory-table: begin (tools/memory_table.py) -->", "<!-- memory-table: end -->"


def compose(overrides: list[str]):
    """The TrainConfig train.py would run with these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))


def large_models() -> list[str]:
    """The model presets a real cluster trains: every configs/model/*.yaml but the tiny default."""
    return sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml") if p.stem != "tiny")


def cell(cfg, num_gpus: int, model) -> str:
    """memory_per_gpu_gib of `cfg` on num_gpus GPUs as fsdp with ep = min(E, N), or why not."""
    from trainer.memory_plan import plan_memory

    cfg = copy.deepcopy(cfg)
    ep = min(cfg.model.moe.num_experts, num_gpus)
    cfg.parallel.backend, cfg.parallel.ep = "fsdp", ep
    try:
        plan = plan_memory(cfg, num_gpus, model)
    except ValueError as err:
        return f"cannot be laid out: {err}"
    return f"{plan.gib:.1f} (ep={ep})"


def table() -> str:
    from trainer.memory_plan import meta_model

    header = "| model (its preset's run settings) | " + " | ".join(f"{n} GPUs" for n in GPU_COUNTS) + " |"
    lines = [header, "|---" * (len(GPU_COUNTS) + 1) + "|"]
    for name in large_models():
        preset = REPO / "configs" / "experiment" / f"{name}.yaml"
        cfg = compose([f"experiment={name}"] if preset.exists() else [f"model={name}"])
        model, run = meta_model(cfg), cfg.run
        bf16_gather = cfg.fp8.experts != "bf16" and not getattr(cfg.parallel, "fp8_all_gather", True)
        gather = ", bf16 all-gather" if bf16_gather else ""
        what = (f"{name} ({run.micro_batch_size} x {run.seq_len} tokens, checkpointing "
                f"{'on' if run.activation_checkpointing else 'off'}, fp8={cfg.fp8.experts}{gather})")  # fmt: skip
        lines.append(f"| {what} | " + " | ".join(cell(cfg, n, model) for n in GPU_COUNTS) + " |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """The table between the README's markers."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md has no {BEGIN!r} ... {END!r} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true", help="compare with README.md's table instead of printing")
    what.add_argument("--write", action="store_true", help="replace README.md's table")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    text = table()
    readme = REPO / "README.md"
    if args.write:
        old = readme.read_text()
        readme.write_text(old.replace(readme_table(old), text, 1))
    elif args.check and readme_table(readme.read_text()) != text:
        print("README.md's memory table is out of date: python tools/memory_table.py --write", file=sys.stderr)
        return 1
    elif not args.check:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
