"""Our model against transformers on the same tokens: the logits of an HF model directory loaded by
`from_pretrained` (fp32) and our model's, over HF's vocabulary. Needs transformers (imported here
only); the export tool's --check-logits and the tests use it.

Shape letters (README.md): B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LogitsMatch:
    rel_err: float  # max |ours - theirs| / max |theirs|
    argmax_agree: float  # share of positions with the same most likely token


def load_hf_model(hf_dir: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@torch.no_grad()
def compare_logits(ours: nn.Module, theirs: nn.Module, tokens_BS: torch.Tensor) -> LogitsMatch:
    """Both models in eval mode on `tokens_BS`; ours may have a padded vocabulary."""
    theirs_BSV = theirs(tokens_BS).logits.float()
    ours_BSV = ours(tokens_BS).logits.float()[..., : theirs_BSV.shape[-1]]
    rel = float((ours_BSV - theirs_BSV).abs().max() / theirs_BSV.abs().max())
    agree = float((ours_BSV.argmax(-1) == theirs_BSV.argmax(-1)).float().mean())
    return LogitsMatch(rel, agree)
