"""Text generation from a MoETransformer: greedy or nucleus (top-p) sampling, with a KV cache.

Shape letters (README.md): B batch, S sequence, V vocabulary.

`generate` feeds the prompt once, then one token a step, through the model's per-layer KV caches
(moe/kv_cache.py, `MoETransformer.forward_cached`); `use_cache=False` runs the whole sequence
through the training forward every step instead: the reference the cached path is tested against
(tests/test_sample.py). Tokens are drawn on the CPU from fp32 probabilities with a CPU generator
seeded by `seed`, so a seed and the same logits give the same tokens on any device.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from moe.config import require
from moe.model import MoETransformer


def top_p_probs(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """fp32 softmax(logits / temperature) with every token outside the nucleus set to 0 (not
    renormalised: `torch.multinomial` takes weights). The nucleus is the smallest set of the most
    likely tokens whose probabilities sum to at least `top_p`; it always holds the most likely one."""
    probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs_V
    sorted_V, order_V = probs_V.sort(descending=True)
    mass_before_V = sorted_V.cumsum(0) - sorted_V  # what the more likely tokens already hold
    sorted_V = sorted_V.masked_fill(mass_before_V >= top_p, 0.0)
    return torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)


def next_token(logits_V: torch.Tensor, greedy: bool, temperature: float, top_p: float,
               generator: torch.Generator) -> int:  # fmt: skip
    """The most likely token (greedy), else one drawn from the temperature-scaled nucleus."""
    logits_V = logits_V.float().cpu()
    if greedy:
        return int(logits_V.argmax())
    return int(torch.multinomial(top_p_probs(logits_V, temperature, top_p), 1, generator=generator))


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    stop_ids: Collection[int] = (),
    use_cache: bool = True,
) -> list[int]:
    """Up to `max_new_tokens` tokens after `prompt_ids`; stops after the first one in `stop_ids`
    (the tokenizer's end of text), which is returned too. One sequence (B = 1)."""
    cfg = model.cfg
    prompt = [int(t) for t in prompt_ids]
    require(len(prompt) >= 1, "generate: the prompt holds no tokens; give it some text")
    require(all(0 <= t < cfg.vocab_size for t in prompt),
            f"generate: prompt token ids must be in [0, model.vocab_size={cfg.vocab_size}), got "
            f"{[t for t in prompt if not 0 <= t < cfg.vocab_size][:5]}: is the tokenizer the model's?")  # fmt: skip
    require(max_new_tokens >= 0, f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    require(len(prompt) + max_new_tokens <= cfg.max_seq_len,
            f"generate: a prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceed "
            f"model.max_seq_len={cfg.max_seq_len}: shorten the prompt or generate fewer tokens")  # fmt: skip
    require(greedy or temperature > 0, f"generate: temperature must be > 0 (or greedy), got {temperature}")
    require(0 < top_p <= 1, f"generate: top_p must be in (0, 1], got {top_p}")

    device = model.tok_embeddings.weight.device
    generator = torch.Generator().manual_seed(seed)
    caches = model.new_kv_caches(len(prompt) + max_new_tokens) if use_cache else None
    tokens_1S = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        if caches is not None:
            logits_1V = model.forward_cached(tokens_1S, caches)
        else:
            logits_1V = model(tokens_1S).logits[:, -1]
        token = next_token(logits_1V[0], greedy, temperature, top_p, generator)
        new.append(token)
        if token in stop_ids:
            break
        step_1S = torch.tensor([[token]], dtype=torch.long, device=device)
        tokens_1S = step_1S if caches is not None else torch.cat([tokens_1S, step_1S], dim=1)
    return new
