"""Full training steps, BF16 vs FP8 experts, on one GPU: tokens/s, TFLOP/s per GPU, MFU, peak memory.

    python -m bench.train_step [--models mixtral_2layer,parity_300m,qwen3_slice]
        [--impls bf16,rowwise,blockwise,bf16_forward_cast]
        [--warmup 3] [--steps 10] [--micro-batch-size N] [--out PATH]

A step is exactly what train.py runs (trainer.loop.Trainer.train_step): forward (attention,
router, permutation, experts), backward, gradient clipping, AdamW, the scheduler, and the one host
synchronisation per step that decides whether the update is applied. The model, optimizer and
data come from the trainer itself, configured by the Hydra experiment files, with synthetic
tokens (data=mock) so no corpus is needed:
  mixtral_2layer  configs/experiment/mixtral_2layer_bench.yaml: Mixtral-8x7B width (dim 4096,
                  8 experts of ffn 14336, top-2), 2 layers, sequence 4096, 1 sequence per step
  mixtral_2layer_accum8  the same, 8 micro-batches of 1 sequence per optimizer step
  parity_300m     configs/experiment/parity_300m.yaml: the loss-parity model (311M total / 141M
                  active: dim 1024, 6 layers, 8 experts of ffn 1536, top-2), sequence 1024, its
                  batch of 8 sequences (8,192 tokens a step)
  qwen3_slice     configs/experiment/qwen3_slice_bench.yaml: Qwen3-30B-A3B width (dim 2048, 128
                  experts of ffn 768, top-8, vocabulary 151,936), 4 layers, sequence 4096, 10
                  sequences a step (what one 80 GB GPU holds: the file says why)
Impls (IMPLS: each one's Hydra overrides): bf16 | rowwise | blockwise are fp8.experts (the dense
layers stay BF16 in all three) on the default config, whose BF16 is the reference of every
ratio (speedup_vs_bf16); rowwise_all is fp8=rowwise_all (the dense layers' GEMMs in FP8 too,
configs/fp8/rowwise_all.yaml); bf16_forward_cast is the BF16 of before run.weight_cast and
optim.fused (weights cast in every forward, foreach AdamW), a second reference
(speedup_vs_bf16_forward_cast).
The 20 default rows take ~8-10 min on one H100 or H200 (per row: building the model and
optimizer, FP8 autotuning, 13 steps of 0.05-0.8 s).

Timing: `--warmup` steps untimed, then `--steps` steps with a CUDA event between consecutive steps
(the per-step host synchronisation is counted, as in training); the median step gives
tokens_per_s = tokens per step / median step time;
tflops_per_gpu uses the trainer's FLOP count (moe.counting.training_flops_per_token: 6 x active
matmul parameters + causal attention), tflops_per_gpu_megatron Megatron-LM's formula
(moe.counting.megatron_flops_per_token: the same less the router and the norms' weights); mfu
divides tflops_per_gpu by trainer.metrics.peak_tflops (dense BF16 peak, also for the FP8 rows,
so the MFU column compares like with like); peak_gib is the peak allocated memory over the
timed steps (weights, gradients and AdamW state included).
Writes bench/results/train_step.json after every row ("complete": false until the last one, so a
run cut short keeps the rows it finished) and prints a table last. Without a CUDA GPU it refuses
before writing anything, and a run whose rows all failed leaves the file as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import traceback

import torch

from bench.common import GIB, REPO, failed_row, print_table, require_gpu, run_info, write_results

MODELS = {  # name -> Hydra overrides
    "mixtral_2layer": ["experiment=mixtral_2layer_bench"],
    # The same with 8 micro-batches a step (32,768 tokens): the optimizer (AdamW over 2.8B fp32
    # expert parameters, ~25 ms) and the FP8 weight quantization (cached across micro-batches) are
    # paid once per 8 micro-batches as in real training, where steps hold millions of tokens,
    # instead of once per 4,096 tokens.
    "mixtral_2layer_accum8": ["experiment=mixtral_2layer_bench", "run.grad_accum=8"],
    "parity_300m": ["experiment=parity_300m", "data=mock", "data.mock_vocab_size=32000"],
    "qwen3_slice": ["experiment=qwen3_slice_bench"],
}
IMPLS = {  # name -> Hydra overrides; "bf16" is the reference of every speedup
    "bf16": ["fp8=bf16"],
    "rowwise": ["fp8=rowwise"],
    "blockwise": ["fp8=blockwise"],
    "rowwise_all": ["fp8=rowwise_all"],
    "bf16_forward_cast": ["fp8=bf16", "run.weight_cast=forward", "optim.fused=false"],
}
REFERENCES = ("bf16", "bf16_forward_cast")  # each row's tokens/s over theirs: speedup_vs_<name>
COLUMNS = ["model", "impl", "tokens_per_s", "tflops_per_gpu", "tflops_per_gpu_megatron", "mfu", "peak_gib",
           "step_ms"]  # fmt: skip


def compose_config(model: str, impl: str, steps: int, extra: list[str]):
    """The TrainConfig train.py would run for this model and recipe (validated)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    overrides = [*MODELS[model], *IMPLS[impl], f"run.steps={steps}", "run.eval_interval=0",
                 "logging.wandb=disabled", *extra]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    # A few timed steps of a long run: its warm-up may outlast them, which validate() refuses.
    # The learning rate's value does not change a step's time.
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, cfg.run.steps)
    cfg.validate()
    return cfg


def timed_steps_ms(trainer, train_iter, steps: int) -> list[float]:
    """Each of `steps` training steps' milliseconds: a CUDA event between consecutive steps (the
    step's host synchronisation counted, as in training)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        trainer.train_step(train_iter)
        events[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])]


@contextlib.contextmanager
def warm_trainer(model: str, impl: str, warmup: int, steps: int, extra: list[str], scratch: str, who: str):
    """(cfg, trainer, train_iter) of one bench row on the GPU, `warmup` steps run (compile,
    autotune) and the peak memory counter reset; `steps`: the steps the row runs after them.
    Everything is freed on exit, so the next row starts from an empty GPU."""
    from trainer.loop import Trainer
    from trainer.parallel import init_distributed

    cfg = compose_config(model, impl, warmup + steps, extra)
    env = init_distributed(cfg.run, cfg.parallel)
    if env.device.type != "cuda":
        raise RuntimeError(f"{who} measures CUDA steps: it needs a GPU")
    trainer = Trainer(cfg, run_dir=os.path.join(scratch, f"{model}-{impl}"), env=env)
    train_iter = trainer.data.train(0)
    try:
        for _ in range(warmup):
            trainer.train_step(train_iter)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield cfg, trainer, train_iter
    finally:
        del trainer, train_iter
        gc.collect()
        torch.cuda.empty_cache()


def measure(model: str, impl: str, warmup: int, steps: int, extra: list[str], scratch: str) -> dict:
    from moe.counting import megatron_flops_per_token
    from trainer.metrics import peak_tflops

    with warm_trainer(model, impl, warmup, steps, extra, scratch, "bench/train_step.py") as (cfg, trainer, train_iter):
        # The median step: one slow step (a GC pause, a host hiccup) moved the mean of 10
        # parity_300m steps (~50 ms each) by up to 25% between runs.
        ms_per_step = statistics.median(timed_steps_ms(trainer, train_iter, steps))
        tokens_per_s = trainer.global_batch * cfg.run.seq_len / (ms_per_step / 1e3)
        tflops = tokens_per_s * trainer.flops_per_token / 1e12
        megatron_flops = megatron_flops_per_token(cfg.model, cfg.run.seq_len)
        peak = peak_tflops(trainer.env.device)
        return {
            "model": model,
            "impl": impl,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": tflops,
            "tflops_per_gpu_megatron": tokens_per_s * megatron_flops / 1e12,
            "mfu": tflops / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "step_ms": ms_per_step,
            "tokens_per_step": trainer.global_batch * cfg.run.seq_len,
            "params_total": trainer.counts.total,
            "params_active": trainer.counts.active,
            "flops_per_token": trainer.flops_per_token,
            "flops_per_token_megatron": megatron_flops,
        }


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<ref> on every measured row: its tokens/s over those of its model's `ref` row,
    for each ref of REFERENCES that was measured."""
    for ref in REFERENCES:
        base = {r["model"]: r["tokens_per_s"] for r in rows if r["impl"] == ref and r.get("tokens_per_s")}
        for r in rows:
            if r.get("tokens_per_s") and r["model"] in base:
                r[f"speedup_vs_{ref}"] = r["tokens_per_s"] / base[r["model"]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {list(IMPLS)}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotune)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="override run.micro_batch_size")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every row")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    parser.add_argument("--scratch", default="/tmp/fp8moe_bench_train_step",
                        help="run directory the trainer is given (nothing is written unless it checkpoints)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    for name, allowed in (("--models", list(MODELS)), ("--impls", list(IMPLS))):
        bad = [v for v in (models if name == "--models" else impls) if v not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad}; allowed {allowed}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    extra = list(args.override)
    if args.micro_batch_size is not None:
        extra.append(f"run.micro_batch_size={args.micro_batch_size}")
    require_gpu("bench.train_step")

    info = {**run_info(), "warmup": args.warmup, "steps": args.steps, "overrides": extra}
    rows = []
    for model in models:
        for impl in impls:
            try:
                row = measure(model, impl, args.warmup, args.steps, extra, args.scratch)
            except torch.cuda.OutOfMemoryError as err:
                print(f"{model} {impl}: out of memory ({str(err).splitlines()[0]})")
                row = {**dict.fromkeys(COLUMNS), "model": model, "impl": impl, "error": "out of memory"}
                gc.collect()
                torch.cuda.empty_cache()
            except Exception as err:  # one broken recipe must not lose the other rows
                traceback.print_exc()
                row = failed_row({**dict.fromkeys(COLUMNS), "model": model, "impl": impl}, err)
            rows.append(row)
            print({k: row.get(k) for k in COLUMNS}, flush=True)
            add_speedups(rows)
            write_results(args.out, {**info, "complete": False, "rows": rows})
    path = write_results(args.out, {**info, "complete": True, "rows": rows})
    print(f"wrote {path}" if path else f"every row failed: {args.out} left as it was")
    print_table(rows, [*COLUMNS, *(f"speedup_vs_{ref}" for ref in REFERENCES)])
    failed = [f"{r['model']}/{r['impl']}" for r in rows if r.get("error")]
    if failed:
        sys.exit(f"rows that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
