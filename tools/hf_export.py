"""Convert a saved training checkpoint into a Hugging Face model directory (safetensors shards, their
index, config.json), which transformers' `from_pretrained` loads.

    python -m tools.hf_export outputs/RUN/checkpoints/step_001000 hf/RUN [--dtype bfloat16]
    torchrun --nproc_per_node 8 -m tools.hf_export CKPT OUT     # 8 processes, each its share of files

Each process holds one output file (--max-shard-gb) and the whole tensors it is cut from (one
layer's stacked experts at most), never the model: a model larger than one process's memory
converts, and torchrun's ranks split the files (interop/hf_export.py). The model config is the
one the checkpoint's run saved. --base names the HF model the run started from (default: its
checkpoint.init_from_hf, when that directory exists): its token ids and tokenizer files are
carried over and its vocabulary size cuts a padded one. --check-logits loads the result with
transformers (installed separately) and compares its logits with ours on random tokens (needs the
whole model in memory: small models).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `interop` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from interop.checkpoint_tensors import CheckpointTensors
from interop.hf_export import HF_DTYPES, export_hf

log = logging.getLogger("fp8moe")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a complete step_NNNNNN checkpoint directory")
    parser.add_argument("out", help="the HF model directory to write")
    parser.add_argument("--dtype", choices=tuple(HF_DTYPES), default="bfloat16")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest file, GB (10**9 bytes)")
    parser.add_argument("--base", default=None, help="the HF model directory the run started from")
    parser.add_argument("--hf-vocab", type=int, default=None, help="vocabulary to cut a padded one to")
    parser.add_argument("--drop-expert-bias", action="store_true", help="export without a non-zero router bias")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    parser.add_argument("--no-verify", action="store_true", help="skip the checkpoint's checksums")
    parser.add_argument("--check-logits", action="store_true", help="compare with transformers afterwards")
    parser.add_argument("--check-tol", type=float, default=1e-4, help="largest relative logits error")
    args = parser.parse_args(argv)
    if args.max_shard_gb <= 0:
        parser.error(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    return args


def _base_dir(args: argparse.Namespace, source: CheckpointTensors) -> str | None:
    if args.base is not None:
        return args.base
    started_from = ((source.run_config or {}).get("checkpoint") or {}).get("init_from_hf") or ""
    if started_from and Path(started_from).is_dir():
        log.info("--base %s (the run's checkpoint.init_from_hf)", started_from)
        return started_from
    return None


def check_logits(source: CheckpointTensors, out: Path, dtype: str, tol: float) -> bool:
    """Our model with the checkpoint's weights rounded to `dtype` against transformers' load of `out`."""
    from interop.hf_check import compare_logits, load_hf_model
    from moe.model import build_model

    cfg = source.model_config()
    ours = build_model(cfg).eval()
    names = [n for n, _ in ours.named_parameters()]
    with torch.no_grad():
        for name, value in source.load(names).items():
            ours.get_parameter(name).copy_(value.to(HF_DTYPES[dtype]))
    tokens = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    theirs = load_hf_model(str(out))
    match = compare_logits(ours, theirs, tokens.clamp_max(theirs.config.vocab_size - 1))
    ok = match.rel_err <= tol
    log.info("logits against transformers: relative error %.3g (tolerance %.3g), argmax agreement %.4f: %s",
             match.rel_err, tol, match.argmax_agree, "ok" if ok else "MISMATCH")  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    if world > 1:
        dist.init_process_group("gloo")  # only barriers: files go through the filesystem
    try:
        source = CheckpointTensors(args.checkpoint, verify=not args.no_verify, rank=rank, world_size=world)
        if world > 1:
            dist.barrier()  # every share hashed before any rank writes
        out = export_hf(source.load, source.model_config(), args.out, dtype=args.dtype, hf_vocab=args.hf_vocab,
                        base_dir=_base_dir(args, source), max_shard_bytes=int(args.max_shard_gb * 1e9),
                        drop_expert_bias=args.drop_expert_bias, overwrite=args.overwrite, rank=rank,
                        world_size=world, barrier=dist.barrier if world > 1 else (lambda: None))  # fmt: skip
        if args.check_logits and rank == 0 and not check_logits(source, out, args.dtype, args.check_tol):
            return 1
        return 0
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
