"""The memory plan (trainer/memory_plan.py) against the peak of real training steps on one GPU.

    python -m bench.memory_plan [--models mixtral_2layer,parity_300m,qwen3_30b_slice]
        [--impls bf16,rowwise] [--checkpointing off,on] [--steps 2] [--out PATH]

Each row builds the trainer in this process as train.py would (one process: the layout is one
GPU, no DDP, ep=1; synthetic tokens, data=mock), runs one warm-up step (FP8 autotuning and the
first AdamW step allocate there), resets the peak counters, runs `--steps` steps and records:
  plan_gib             memory_per_gpu_gib of the plan (CONTEXT_BYTES included)
  plan_tensors_gib     the plan less its fixed context line: what torch's allocator should see
  allocated_gib        torch.cuda.max_memory_allocated over the measured steps
  reserved_gib         torch.cuda.max_memory_reserved over them
  context_gib          the device memory in use before this process allocated anything
                       (mem_get_info; the CUDA context and workspaces)
  ratio_allocated      plan_tensors_gib / allocated_gib
  ratio_device         plan_gib / (reserved_gib + context_gib): the plan against what the device holds
Models: mixtral_2layer (configs/experiment/mixtral_2layer_bench.yaml: Mixtral-8x7B width, 2
layers, 1 x 4096 tokens), parity_300m (configs/experiment/parity_300m.yaml, 8 x 1024 tokens),
qwen3_30b_slice (Qwen3-30B-A3B's width, 128 experts top-8 and 151,936-word vocabulary, 2
layers, 1 x 4096 tokens). Impls: fp8.experts; checkpointing: run.activation_checkpointing.
Twelve rows by default, each freed before the next (~1.5 min on an H100, most of it the FP8
rows' first step). Writes bench/results/memory_plan.json after every row ("complete": false
until the last) and prints a table; without a CUDA GPU it refuses before writing anything, and
a run whose rows all failed leaves the file as it was.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback

import torch

from bench.common import GIB, REPO, failed_row, print_table, require_gpu, run_info, write_results

MODELS = {  # name -> Hydra overrides
    "mixtral_2layer": ["experiment=mixtral_2layer_bench"],
    "parity_300m": ["experiment=parity_300m", "data=mock", "data.mock_vocab_size=32000"],
    "qwen3_30b_slice": ["model=qwen3_30b_a3b", "model.n_layers=2", "data=mock", "data.mock_vocab_size=32000",
                        "run.seq_len=4096", "run.micro_batch_size=1", "run.grad_accum=1"],  # fmt: skip
}
IMPLS = ("bf16", "rowwise")
CHECKPOINTING = {"off": False, "on": True}
COLUMNS = ["model", "impl", "checkpointing", "plan_gib", "allocated_gib", "reserved_gib", "ratio_allocated",
           "ratio_device", "peak_phase"]  # fmt: skip


def compose_config(model: str, impl: str, checkpointing: bool, steps: int):
    """The TrainConfig train.py would run for this row (validated)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    overrides = [*MODELS[model], f"fp8={impl}", f"run.activation_checkpointing={str(checkpointing).lower()}",
                 f"run.steps={steps}", "run.eval_interval=0", "logging.wandb=disabled",
                 "checkpoint.interval=0", "checkpoint.interval_minutes=0", "checkpoint.at_end=false"]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, cfg.run.steps)  # a few steps of a long run
    cfg.validate()
    return cfg


def measure(model: str, impl: str, checkpointing: bool, steps: int, scratch: str, context: int) -> dict:
    from trainer.loop import Trainer
    from trainer.memory_plan import CONTEXT_BYTES, plan_memory
    from trainer.parallel import init_distributed

    cfg = compose_config(model, impl, checkpointing, 1 + steps)
    plan = plan_memory(cfg, 1)
    env = init_distributed(cfg.run, cfg.parallel)
    trainer = Trainer(cfg, run_dir=os.path.join(scratch, f"{model}-{impl}-{checkpointing}"), env=env)
    train_iter = trainer.data.train(0)
    try:
        trainer.train_step(train_iter)  # autotuning and AdamW's state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            trainer.train_step(train_iter)
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated() / GIB
        reserved = torch.cuda.max_memory_reserved() / GIB
        tensors = (plan.total_bytes - CONTEXT_BYTES) / GIB
        return {
            "model": model, "impl": impl, "checkpointing": "on" if checkpointing else "off",
            "plan_gib": plan.gib, "plan_tensors_gib": tensors, "peak_phase": plan.peak_phase,
            "plan_entries_gib": {e.name: e.bytes / GIB for e in plan.entries},
            "allocated_gib": allocated, "reserved_gib": reserved, "context_gib": context / GIB,
            "ratio_allocated": tensors / allocated, "ratio_device": plan.gib / (reserved + context / GIB),
            "tokens_per_micro_batch": plan.tokens, "steps": steps,
        }  # fmt: skip
    finally:
        del trainer, train_iter
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _context_bytes() -> int:
    """Device memory in use before any tensor: the CUDA context (and anything else on the GPU)."""
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated fp8.experts recipes")
    parser.add_argument("--checkpointing", default="off,on", help="comma-separated, of off,on")
    parser.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up step")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_plan.json"))
    parser.add_argument("--scratch", default="/tmp/fp8moe_bench_memory_plan",
                        help="run directory the trainer is given (nothing is written there)")  # fmt: skip
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    checks = [c for c in args.checkpointing.split(",") if c]
    choices = (("--models", models, list(MODELS)), ("--impls", impls, ["bf16", "rowwise", "blockwise"]),
               ("--checkpointing", checks, list(CHECKPOINTING)))
    for name, picked, allowed in choices:
        bad = [v for v in picked if v not in allowed]
        if bad or not picked:
            parser.error(f"{name}: unknown {bad or picked}; allowed {allowed}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    require_gpu("bench.memory_plan")

    context = _context_bytes()
    device_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    info = {**run_info(), "steps": args.steps, "device_gib": device_gib}
    rows = []
    for model in models:
        for impl in impls:
            for check in checks:
                try:
                    row = measure(model, impl, CHECKPOINTING[check], args.steps, args.scratch, context)
                except Exception as err:  # one failing row (an OOM included) must not lose the others
                    traceback.print_exc()
                    row = failed_row({"model": model, "impl": impl, "checkpointing": check}, err)
                rows.append(row)
                print({k: row.get(k) for k in COLUMNS}, flush=True)
                write_results(args.out, {**info, "complete": False, "rows": rows})
    path = write_results(args.out, {**info, "complete": True, "rows": rows})
    print(f"wrote {path}" if path else f"every row failed: {args.out} left as it was")
    print_table(rows, COLUMNS)
    failed = [f"{r['model']}/{r['impl']}/{r['checkpointing']}" for r in rows if r.get("error")]
    if failed:
        sys.exit(f"rows that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
