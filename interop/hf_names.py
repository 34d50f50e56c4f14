"""Our parameter names <-> the tensors of a Hugging Face checkpoint, per architecture.

Shape letters (README.md): V vocabulary, H hidden, E experts, F expert (or dense) FFN size.

Every HF tensor is one block of one of our parameters, a `Piece`: `ours[index] == hf`, where an
int in `index` is a dimension the HF tensor lacks (the expert of a per-expert tensor) and a slice
the range it covers. One list of pieces serves both directions: an import fills each block from
its HF tensor (each rank only the blocks that meet its shard), an export cuts each HF tensor out.

HF layouts, both read:
- "per_expert": what published checkpoints hold and transformers' `save_pretrained` writes by
  default (each release; transformers 5 converts back to it on save): one tensor per expert and
  projection, Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down), Qwen3-MoE's
  `mlp.experts.{e}.gate_proj/up_proj/down_proj`. The only one written.
- "fused": transformers 5's in-memory layout (`save_pretrained(save_original_format=False)`):
  `mlp.experts.gate_up_proj` (E, 2F, H) gate rows first and `mlp.experts.down_proj` (E, H, F),
  which are exactly our w1 and w2.
Our w1 (E, 2F, H) is [gate; up] per expert, w2 (E, H, F); the dense layers' w1 (2F, H) the same.
Vocabulary: an HF tensor of V_hf rows is rows [0, V_hf) of ours (ours may be padded above it).
Tied embeddings: the output head is the embedding; HF then stores no `lm_head.weight` (one saved
anyway is ignored).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

from interop.hf_config import MIXTRAL, QWEN3_MOE
from moe.config import ModelConfig, require

Index = tuple[Union[int, slice], ...]
LAYOUTS = ("per_expert", "fused")
# Tensors older checkpoints carry that are not weights (RoPE frequencies, derived from the config).
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
_EXPERT_NAMES = {MIXTRAL: ("w1", "w3", "w2"), QWEN3_MOE: ("gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class Piece:
    hf: str  # the HF tensor's name
    ours: str  # our parameter's name (model.named_parameters())
    index: Index  # where it sits in ours: ints drop a dimension, slices are explicit [start, stop)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index if isinstance(s, slice))


def param_shapes(model) -> dict[str, tuple[int, ...]]:
    """Full shapes of a model's parameters by name (a DTensor's is the whole tensor's), tied ones once."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _whole(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, n) for n in shape)


def detect_layout(hf_names) -> str:
    """'fused' when the checkpoint holds transformers 5's stacked experts, else 'per_expert'."""
    return "fused" if any(n.endswith(".experts.gate_up_proj") for n in hf_names) else "per_expert"


def pieces_for(cfg: ModelConfig, arch: str, layout: str, hf_vocab: int,
               our_shapes: Mapping[str, tuple[int, ...]]) -> list[Piece]:
    """Every HF tensor of `cfg` as architecture `arch` in `layout`, in checkpoint order (by layer).

    our_shapes: our parameters' full shapes by name (`param_shapes`)."""
    require(layout in LAYOUTS, f"HF layout must be one of {LAYOUTS}, got {layout!r}")
    require(our_shapes.get("tok_embeddings.weight", (0,))[0] >= hf_vocab,
            f"model.vocab_size={cfg.vocab_size} is below the HF vocabulary {hf_vocab}")  # fmt: skip
    gate, up, down = _EXPERT_NAMES[arch]
    moe_block = "block_sparse_moe" if arch == MIXTRAL and layout == "per_expert" else "mlp"
    F = cfg.moe.ffn_dim

    def whole(hf: str, ours: str) -> Piece:
        return Piece(hf, ours, _whole(our_shapes[ours]))

    def vocab(hf: str, ours: str) -> Piece:
        return Piece(hf, ours, (slice(0, hf_vocab), slice(0, our_shapes[ours][1])))

    pieces = [vocab("model.embed_tokens.weight", "tok_embeddings.weight")]
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}", f"layers.{i}"
        pieces.append(whole(f"{hf}.input_layernorm.weight", f"{us}.attn_norm.weight"))
        for proj in "qkvo":
            pieces.append(whole(f"{hf}.self_attn.{proj}_proj.weight", f"{us}.attn.w{proj}.weight"))
        if cfg.qk_norm:
            for proj in "qk":
                pieces.append(whole(f"{hf}.self_attn.{proj}_norm.weight", f"{us}.attn.{proj}_norm.weight"))
        pieces.append(whole(f"{hf}.post_attention_layernorm.weight", f"{us}.ffn_norm.weight"))
        if i < cfg.first_k_dense:
            w1, Fd = f"{us}.ffn.w1.weight", cfg.dense_ffn_dim
            H = our_shapes[w1][1]
            pieces += [Piece(f"{hf}.mlp.gate_proj.weight", w1, (slice(0, Fd), slice(0, H))),
                       Piece(f"{hf}.mlp.up_proj.weight", w1, (slice(Fd, 2 * Fd), slice(0, H))),
                       whole(f"{hf}.mlp.down_proj.weight", f"{us}.ffn.w2.weight")]  # fmt: skip
            continue
        pieces.append(whole(f"{hf}.{moe_block}.gate.weight", f"{us}.ffn.router.weight"))
        w1, w2 = f"{us}.ffn.experts.w1", f"{us}.ffn.experts.w2"
        if layout == "fused":
            pieces += [whole(f"{hf}.mlp.experts.gate_up_proj", w1), whole(f"{hf}.mlp.experts.down_proj", w2)]
            continue
        E, _, H = our_shapes[w1]
        for e in range(E):
            ex = f"{hf}.{moe_block}.experts.{e}"
            pieces += [Piece(f"{ex}.{gate}.weight", w1, (e, slice(0, F), slice(0, H))),
                       Piece(f"{ex}.{up}.weight", w1, (e, slice(F, 2 * F), slice(0, H))),
                       Piece(f"{ex}.{down}.weight", w2, (e, slice(0, H), slice(0, F)))]  # fmt: skip
    pieces.append(whole("model.norm.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        pieces.append(vocab("lm_head.weight", "output.weight"))
    return pieces


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_ours(pieces: list[Piece], our_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every parameter of ours is some HF tensor's destination, and every destination exists."""
    targets = {p.ours for p in pieces}
    missing = sorted(set(our_shapes) - targets)
    require(not missing, f"our parameters without an HF counterpart: {_listing(missing)}")
    unknown = sorted(targets - set(our_shapes))
    require(not unknown, f"the HF name map names parameters our model lacks: {_listing(unknown)}")


def check_hf(pieces: list[Piece], hf_shapes: Mapping[str, tuple[int, ...]], source: str, tied: bool) -> None:
    """The HF checkpoint at `source` holds exactly the tensors `pieces` read, at their shapes."""
    wanted = {p.hf: p.hf_shape for p in pieces}
    missing = [n for n in wanted if n not in hf_shapes]
    require(not missing, f"{source} lacks {len(missing)} tensor(s) the model needs: {_listing(missing)}")
    unknown = sorted(n for n in hf_shapes if n not in wanted and not _IGNORED.search(n)
                     and not (tied and n == "lm_head.weight"))  # fmt: skip
    require(not unknown, f"{source} holds {len(unknown)} tensor(s) no parameter of ours takes (a feature our "
                         f"decoder lacks, or another architecture): {_listing(unknown)}")  # fmt: skip
    shapes = [f"{n} {tuple(hf_shapes[n])} (expected {s})" for n, s in wanted.items() if tuple(hf_shapes[n]) != s]
    require(not shapes, f"{source}: tensors of the wrong shape: {_listing(shapes)}")
