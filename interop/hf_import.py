"""Start a model from Hugging Face weights (checkpoint.init_from_hf): each rank copies into its own
shards only the blocks of the HF tensors they hold, read by slice (interop/hf_io.py), so no rank
ever holds a full tensor it does not own, and every layout (one process, DDP, FSDP2, expert
parallelism, FSDP2 x EP) starts from the same weights.

Call it on a materialized model (trainer/sharded_init.py), before the first step. The model config
must have the HF model's architecture (interop/hf_config.py `check_matches` names every override
that differs). What HF does not hold starts as the run's own init left it: the router's expert
bias at zero (aux-loss-free balancing then starts from the HF routing). A vocabulary padded above
HF's starts its extra embedding and output rows at zero: their logits are 0 until trained, so the
first losses count them in the softmax where transformers has no such tokens.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from interop.hf_config import check_matches, hf_architecture
from interop.hf_io import HfCheckpoint
from interop.hf_names import Index, Piece, check_hf, check_ours, detect_layout, param_shapes, pieces_for
from moe.config import ModelConfig, require
from trainer.sharded_init import local_slices, local_tensor

log = logging.getLogger("fp8moe")


def overlap(index: Index, region: tuple[slice, ...]) -> tuple[tuple[slice, ...], Index] | None:
    """Where a piece at `index` of the full tensor meets `region` (a rank's shard, one slice per
    dimension): (the slices of the HF tensor to read, where they go in the shard), or None."""
    read, dest = [], []
    for want, have in zip(index, region):
        if isinstance(want, int):  # a dimension the HF tensor lacks
            if not have.start <= want < have.stop:
                return None
            dest.append(want - have.start)
            continue
        lo, hi = max(want.start, have.start), min(want.stop, have.stop)
        if lo >= hi:
            return None
        read.append(slice(lo - want.start, hi - want.start))
        dest.append(slice(lo - have.start, hi - have.start))
    return tuple(read), tuple(dest)


def fill_shard(shard: torch.Tensor, region: tuple[slice, ...], pieces: list[Piece], ckpt: HfCheckpoint) -> int:
    """Write every piece's overlap with `region` into `shard`; returns the bytes read."""
    nbytes = 0
    for piece in pieces:
        where = overlap(piece.index, region)
        if where is None:
            continue
        block = ckpt.read(piece.hf, where[0])
        shard[where[1]] = block.to(shard.dtype)
        nbytes += block.numel() * block.element_size()
    return nbytes


@torch.no_grad()
def load_hf_weights(model: nn.Module, hf_dir: str, cfg: ModelConfig, what: str = "checkpoint.init_from_hf") -> None:
    """Overwrite every parameter of `model` (built from `cfg`, materialized, possibly sharded) with
    the weights of the HF model directory `hf_dir`. Refuses, before writing anything, a config of
    another architecture and a checkpoint with missing, unknown or mis-shaped tensors."""
    started = time.monotonic()
    source = f"{what}={hf_dir}"
    require(Path(hf_dir).is_dir(), f"{source}: no such directory (an HF model directory: config.json and safetensors)")
    with HfCheckpoint(hf_dir) as ckpt:
        hf_cfg = ckpt.config()
        hf_vocab = check_matches(cfg, hf_cfg, source)
        layout = detect_layout(ckpt.shapes)
        shapes = param_shapes(model)
        pieces = pieces_for(cfg, hf_architecture(hf_cfg), layout, hf_vocab, shapes)
        check_ours(pieces, shapes)
        check_hf(pieces, ckpt.shapes, source, cfg.tie_embeddings)
        by_param: dict[str, list[Piece]] = defaultdict(list)
        for piece in pieces:
            by_param[piece.ours].append(piece)
        nbytes = 0
        for name, param in model.named_parameters():
            local = local_tensor(param)
            shard = torch.zeros(local.shape, dtype=local.dtype)  # zero: rows past HF's vocabulary
            nbytes += fill_shard(shard, local_slices(param), by_param[name], ckpt)
            local.copy_(shard)
    log.info("%s: %d HF tensors (%s layout) read, %.2f GiB on this rank, in %.1f s", source, len(pieces),
             layout, nbytes / 2**30, time.monotonic() - started)  # fmt: skip
    if cfg.vocab_size > hf_vocab:
        log.warning("model.vocab_size=%d pads the HF vocabulary of %d: the extra embedding and output rows "
                    "start at zero, their logits at 0, which the softmax counts until they train down",
                    cfg.vocab_size, hf_vocab)  # fmt: skip
