"""Our weights as a Hugging Face checkpoint: per-expert safetensors in shards, their index, and the
config.json of the architecture (MixtralForCausalLM or Qwen3MoeForCausalLM, interop/hf_config.py),
which transformers' `from_pretrained` loads.

`export_hf(load, cfg, out_dir, ...)` takes our tensors from `load(names) -> {name: whole tensor}`
(interop/checkpoint_tensors.py for a saved checkpoint, or a state dict) a bounded batch at a time:
a process holds one output file (at most `max_shard_bytes`) and the batch of our tensors it is cut
from (up to `max_shard_bytes` of them, or one larger tensor), never the model. With several
processes (torchrun) rank r writes files r, r + W, ...; `barrier` synchronises them (the caller's
process group). The directory appears complete or not at all: files go to `<out_dir>.tmp`, which
rank 0 renames once the index and config.json are written (replacing an earlier export only with
`overwrite`).

What HF cannot hold: the router's expert bias (aux-loss-free balancing changes which experts are
chosen): a non-zero one is refused unless `drop_expert_bias`, which drops it with a warning. The
balancing-loss coefficient is written as router_aux_loss_coef; z-loss and the capacity factor
(training-only) are dropped. A vocabulary padded above HF's is cut to `hf_vocab` rows.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from interop.hf_config import EXPORT_DTYPES, architecture_for, hf_config_for
from interop.hf_io import CONFIG, plan_shards, read_hf_config, shard_names, write_index, write_shard
from interop.hf_names import Piece, check_ours, param_shapes, pieces_for
from moe.config import ModelConfig, require

log = logging.getLogger("fp8moe")

HF_DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPES}
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
# Files of an HF model directory other than weights and config, carried over from the model a run
# started from, so the export loads with its tokenizer.
_CARRIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
            "generation_config.json", "vocab.json", "merges.txt")  # fmt: skip

Loader = Callable[[list[str]], dict[str, torch.Tensor]]


def meta_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameters' shapes for `cfg`, from a model built on the meta device (no memory)."""
    from moe.model import MoETransformer

    with torch.device("meta"):
        return param_shapes(MoETransformer(cfg))


def _check_expert_bias(load: Loader, cfg: ModelConfig, drop: bool) -> None:
    if not cfg.moe.expert_bias:
        return
    names = [f"layers.{i}.ffn.router.expert_bias" for i in range(cfg.first_k_dense, cfg.n_layers)]
    largest = max(float(t.abs().max()) for t in load(names).values())
    if largest == 0:
        return
    require(drop, f"the routers' expert bias (model.moe.expert_bias, aux-loss-free balancing) is non-zero "
                  f"(max |bias| {largest:.3g}) and HF's Mixtral / Qwen3-MoE routers have none: the export "
                  f"would choose other experts. Pass drop_expert_bias (tools/hf_export.py --drop-expert-bias) "
                  f"to export without it")  # fmt: skip
    log.warning("dropping the routers' expert bias (max |bias| %.3g): the HF model routes without it", largest)


def _batches(pieces: list[Piece], shapes: dict[str, tuple[int, ...]], budget: int) -> list[list[Piece]]:
    """A file's pieces grouped by source tensor, consecutive sources together up to `budget` bytes
    (fp32) of whole tensors."""
    batches: list[list[Piece]] = []
    used, seen = 0, set()
    for piece in sorted(pieces, key=lambda p: p.ours):
        if piece.ours not in seen:
            size = 4 * math.prod(shapes[piece.ours])
            if not batches or used + size > budget:
                batches.append([])
                used = 0
            used += size
            seen.add(piece.ours)
        batches[-1].append(piece)
    return batches


def export_hf(
    load: Loader,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    hf_vocab: int | None = None,
    base_dir: str | Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    drop_expert_bias: bool = False,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write the HF checkpoint of our tensors (`load`) of model `cfg` to `out_dir`; returns it.

    hf_vocab: the exported vocabulary (default: base_dir's config, else model.vocab_size).
    base_dir: the HF model a run started from: its config.json's other keys (token ids) and its
    tokenizer files are carried over."""
    require(dtype in HF_DTYPES, f"HF export dtype must be one of {tuple(HF_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    require(overwrite or not out_dir.exists() or not any(out_dir.iterdir()),
            f"{out_dir} exists and is not empty; choose another directory or overwrite it (--overwrite)")  # fmt: skip
    arch = architecture_for(cfg)
    base = read_hf_config(base_dir) if base_dir is not None else {}
    hf_vocab = hf_vocab or base.get("vocab_size") or cfg.vocab_size
    shapes = meta_shapes(cfg)
    pieces = pieces_for(cfg, arch, "per_expert", hf_vocab, shapes)
    check_ours(pieces, shapes)
    _check_expert_bias(load, cfg, drop_expert_bias)
    torch_dtype = HF_DTYPES[dtype]
    nbytes = {p.hf: math.prod(p.hf_shape) * torch_dtype.itemsize for p in pieces}
    shards = plan_shards([(p.hf, nbytes[p.hf]) for p in pieces], max_shard_bytes)
    files = shard_names(len(shards))
    by_hf = {p.hf: p for p in pieces}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    started = time.monotonic()
    for i in range(rank, len(shards), world_size):
        tensors: dict[str, torch.Tensor] = {}
        for batch in _batches([by_hf[n] for n in shards[i]], shapes, max_shard_bytes):
            ours = load(sorted({p.ours for p in batch}))
            for p in batch:  # a copy of its own: the whole tensor goes with the batch
                tensors[p.hf] = torch.empty(p.hf_shape, dtype=torch_dtype).copy_(ours[p.ours][p.index])
            del ours
        write_shard(tmp / files[i], {n: tensors[n] for n in shards[i]})
        log.info("HF export: %s (%d of %d), %d tensors, %.2f GiB, rank %d, %.1f s", files[i], i + 1, len(shards),
                 len(tensors), sum(nbytes[n] for n in shards[i]) / 2**30, rank, time.monotonic() - started)  # fmt: skip
        del tensors
    barrier()
    if rank == 0:
        write_index(tmp, shards, sum(nbytes.values()))
        config = hf_config_for(cfg, arch, dtype, hf_vocab, base)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        carried = [Path(base_dir) / name for name in _CARRIED] if base_dir is not None else []
        for file in carried:
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
        old = out_dir.with_name(out_dir.name + ".old.tmp")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        log.info("HF export: %s (%s, %s, %d files) written in %.1f s", out_dir, arch, dtype, len(files),
                 time.monotonic() - started)  # fmt: skip
    barrier()
    return out_dir
