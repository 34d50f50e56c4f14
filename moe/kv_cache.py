"""Keys and values of one attention layer kept between decoding steps, and the causal mask of a
step whose queries follow cached positions.

Shape letters (README.md): B batch, J key/value heads, S positions (the new tokens' in `append`'s
arguments and in the mask's rows, the held ones in the buffers and the mask's columns), D head dim.

Generation (moe/generate.py) feeds the prompt once, then one token a step; each layer's cache
holds the keys (already rotated by RoPE at their positions) and values of every earlier token, so
a step computes the projections of its new tokens only.
"""

from __future__ import annotations

import torch

from moe.config import require


class KVCache:
    """The first `pos` positions' keys and values of one layer, in buffers of `max_len` positions.

    The buffers are allocated by the first `append`, in the dtype and on the device of the keys
    it gets: under autocast the projections' output dtype, whatever the weights' dtype.
    """

    def __init__(self, max_len: int) -> None:
        require(max_len >= 1, f"KVCache max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.pos = 0
        self.k_BJSD: torch.Tensor | None = None
        self.v_BJSD: torch.Tensor | None = None

    def append(self, k_BJSD: torch.Tensor, v_BJSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values of S new positions after the held ones; returns views of all
        pos + S held keys and values, (B, J, pos + S, D)."""
        B, J, S, D = k_BJSD.shape
        require(v_BJSD.shape == k_BJSD.shape,
                f"KVCache: keys {tuple(k_BJSD.shape)} and values {tuple(v_BJSD.shape)} differ in shape")  # fmt: skip
        require(self.pos + S <= self.max_len,
                f"KVCache: {S} new positions after {self.pos} exceed its max_len={self.max_len}")  # fmt: skip
        if self.k_BJSD is None:
            self.k_BJSD = k_BJSD.new_empty((B, J, self.max_len, D))
            self.v_BJSD = v_BJSD.new_empty((B, J, self.max_len, D))
        require(self.k_BJSD.shape[:2] == (B, J) and self.k_BJSD.shape[3] == D and self.k_BJSD.dtype == k_BJSD.dtype,
                f"KVCache holds (B, J, D) = {(self.k_BJSD.shape[0], self.k_BJSD.shape[1], self.k_BJSD.shape[3])} "
                f"{self.k_BJSD.dtype}, got keys {(B, J, D)} {k_BJSD.dtype}")  # fmt: skip
        end = self.pos + S
        self.k_BJSD[:, :, self.pos : end] = k_BJSD
        self.v_BJSD[:, :, self.pos : end] = v_BJSD
        self.pos = end
        return self.k_BJSD[:, :, :end], self.v_BJSD[:, :, :end]


def causal_sdpa_args(n_queries: int, n_keys: int, device: torch.device) -> dict:
    """`F.scaled_dot_product_attention`'s masking arguments for queries at the last `n_queries` of
    `n_keys` positions, each attending to its own position and every earlier one.

    SDPA's `is_causal` aligns its mask to the top-left corner (query i sees keys 0..i): right only
    when queries and keys start at the same position. One query (a decode step) sees every key:
    no mask. Several queries after cached keys (a prefill continued at position p > 0) need the
    bottom-right-aligned boolean mask: query i sees keys 0..p + i.
    """
    require(1 <= n_queries <= n_keys,
            f"causal attention of {n_queries} queries over {n_keys} keys: need 1 <= queries <= keys")
    if n_queries == 1:
        return {"is_causal": False}
    if n_queries == n_keys:
        return {"is_causal": True}
    first = n_keys - n_queries
    allowed_SS = torch.arange(n_keys, device=device)[None, :] <= torch.arange(first, n_keys, device=device)[:, None]
    return {"attn_mask": allowed_SS}
