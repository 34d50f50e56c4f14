"""What one micro-batch leaves for backward on one rank, block by block: the byte counts that
trainer/memory_plan.py adds up, read off the code that saves each tensor.

Shape letters (README.md): T tokens of the micro-batch on this rank, H hidden, V vocabulary,
Q query heads, J key/value heads, D head dim, A experts a token is routed to, E experts, Z experts
local to the rank, R rows its experts receive, F expert FFN, X = 2F (SwiGLU) or F, P padded rows.

c is the compute dtype's size: 2 under bf16 autocast, where the residual stream stays fp32 (4);
4 with run.dtype=float32 (nothing is cast). Saved for backward:
- RMSNorm (kernels/rmsnorm.py, the FFN norm fused with the attention's residual add): the fp32
  residual stream it normalises (its input, or the sum it makes) 4TH and the rsqrt 4T.
- nn.Linear: its input cast to c bytes (q, k and v each cast their own: 3cTH) and, unless FSDP
  gathers bf16 parameters, autocast's cast of the weight (c bytes a parameter: `weight_copy_bytes`).
  Float8Linear: its input as FP8 columns (T rounded up to 16, one byte each); its FP8 weights are
  a cache of the whole step (trainer/memory_plan.py counts them).
- SDPA: q and its output (Q heads), k and v (J heads: no GQA repeat), 2cT(Q+J)D, and the
  log-sum-exp 4TQ; its output, written (B, S, Q, D), is the storage an nn.Linear output
  projection saves as its input (counted there). qk_norm: each head norm's c-byte input
  cT(Q+J)D and rsqrt 4T(Q+J). RoPE saves nothing (its tables are buffers).
- SwiGLU MLPs (dense, shared experts): h cTX; a, the second Linear's input, is recomputed from h
  in backward (moe/swiglu_down.py). With an FP8 second Linear (plain ops) silu(gate) cTF too, and
  that Linear saves a; a GELU MLP saves h and a.
- Router: its fp32 input 4TH, the scores 4TE (and the logits for the z-loss, 4TE + 4T), the top-k
  weights and ids 12TA, 4T for the renormalisation.
- Permutation 9TA (row_of_TA, kept); unpermute the experts' output cTAH and the weights 4TA.
- BF16 experts: the rows cRH, h cRX, the group ends 4Z; a cRF for GELU only (SwiGLU recomputes it
  from h in backward, moe/swiglu_down.py).
- FP8 experts (moe/fp8/grouped_mlp.py): x's columns H x P bytes and their scales, h as R x X bytes
  (2RX with fp8.intermediate=bf16) and its scales, the group ends 8Z, the token index 8R (EP=1:
  the rows are gathered inside the quantization). Their transposed FP8 weights live on the
  autograd context (trainer/memory_plan.py: FP8 weight copies).
- Under EP, the regrouping permutation and its inverse, 16R.
- Head: the final norm 4TH + 4T and the token ids 8T; with 0 < model.loss_chunk_rows < T
  (moe/loss.py) the gradients made in forward, dh 4TH and dW 4VH, else the output projection's
  input cTH, cross-entropy's fp32 log-probabilities 4TV and the labels 8T.
R is T*A under balanced routing (an EP rank receives its group's rows for its experts: the same
mean); a skewed router gives some ranks more.
"""

from __future__ import annotations

from torch import nn

from kernels.common import round_up
from kernels.contracts import padded_size
from moe.experts import DenseMLP, GroupedMLP
from moe.fp8.float8_linear import GEMM_ALIGN, Float8Linear
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.model import Attention, Block, MoETransformer

FP32 = 4
INDEX = 8  # int64


def linear_input_bytes(linear: nn.Linear, T: int, c: int) -> int:
    """What an nn.Linear (or Float8Linear) saves of its input for T rows."""
    if isinstance(linear, Float8Linear):
        scales = FP32 * linear.in_features if linear.recipe.scaling == "rowwise" else FP32
        return round_up(T, GEMM_ALIGN) * linear.in_features + scales
    return c * T * linear.in_features


def _linears_bytes(module: nn.Module, T: int, c: int) -> int:
    return sum(linear_input_bytes(m, T, c) for m in module.modules() if isinstance(m, nn.Linear))


def _attention_bytes(attn: Attention, T: int, c: int) -> int:
    Q, J, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    out = c * T * Q * D if type(attn.wo) is not nn.Linear else 0  # else wo's input: the same storage
    saved = _linears_bytes(attn, T, c) + c * T * (Q + 2 * J) * D + out + FP32 * T * Q
    if c == FP32:  # nothing is cast: q, k and v save the one fp32 input they share
        saved -= sum(linear_input_bytes(m, T, c) for m in (attn.wk, attn.wv) if type(m) is nn.Linear)
    if attn.q_norm is not None:
        saved += c * T * (Q + J) * D + FP32 * T * (Q + J)
    return saved


def _mlp_bytes(mlp: DenseMLP, rows: int, c: int) -> int:
    """A DenseMLP over `rows` tokens: w1's input and h; through the plain ops also w2's input (a)
    and SwiGLU's silu(gate)."""
    X = mlp.w1.out_features
    if mlp.recomputes_activation:
        return linear_input_bytes(mlp.w1, rows, c) + c * rows * X
    inner = c * rows * X + (c * rows * (X // 2) if mlp.activation == "swiglu" else 0)
    return _linears_bytes(mlp, rows, c) + inner


def _router_bytes(layer, T: int) -> int:
    cfg = layer.router.cfg
    H, E, A = layer.router.weight.shape[1], cfg.num_experts, cfg.top_k
    saved = FP32 * T * H + FP32 * T * E + (FP32 + INDEX) * T * A + FP32 * T
    if cfg.z_loss_coeff > 0:
        saved += FP32 * T * E + FP32 * T
    return saved


def routed_rows(layer, T: int) -> int:
    """R: rows a rank's experts receive per MoE layer, under balanced routing."""
    return T * layer.top_k


def _experts_bytes(experts: GroupedMLP, R: int, c: int, ep: int, intermediate: str) -> int:
    H, F, Z = experts.dim, experts.ffn_dim, experts.num_experts // ep
    X = experts.w1.shape[1]
    if isinstance(experts, Fp8GroupedMLP):
        block = experts.recipe.block
        P = padded_size(R, Z, experts.recipe.align)
        xt_scales = FP32 * H * (P // block if block else Z)
        h_scales = FP32 * R * (X // block if block else 1)
        h = (2 if intermediate == "bf16" else 1) * R * X
        gather = INDEX * R if ep == 1 else 0
        return H * P + xt_scales + h + h_scales + 2 * FP32 * Z + gather
    a = c * R * F if experts.activation == "gelu" else 0  # SwiGLU's a is recomputed in backward
    return c * R * H + c * R * X + a + FP32 * Z


def experts_backward_bytes(experts: GroupedMLP, R: int, c: int, ep: int = 1) -> int:
    """The FP8 experts' backward working set beyond what they saved: dy (cRH) with its FP8 rows
    and columns (RH + HP), da (cRF), dh's rows and columns and a's recomputed columns
    (RX + XP + FP); 0 for the BF16 experts (their transient is the bf16 weight gradient)."""
    if not isinstance(experts, Fp8GroupedMLP):
        return 0
    H, F, Z = experts.dim, experts.ffn_dim, experts.num_experts // ep
    X = experts.w1.shape[1]
    P = padded_size(R, Z, experts.recipe.align)
    return c * R * H + R * H + H * P + c * R * F + R * X + X * P + F * P


def deferred_wgrad_bytes(experts: GroupedMLP, R: int, micro_batches: int) -> int:
    """What a step's micro-batches stash for the FP8 experts' deferred weight gradients
    (moe/fp8/deferred_wgrad.py): per micro-batch the columns dyt, at, dht and xt ((2H + F + X) P
    bytes), their scales and the padded ends; 0 for the BF16 experts."""
    if not isinstance(experts, Fp8GroupedMLP):
        return 0
    H, F, Z, X = experts.dim, experts.ffn_dim, experts.num_experts, experts.w1.shape[1]
    block = experts.recipe.block
    P = padded_size(R, Z, experts.recipe.align)
    rows = 2 * H + F + X
    return micro_batches * (rows * P + FP32 * rows * (P // block if block else Z) + 2 * FP32 * Z)


def block_activation_bytes(block: Block, T: int, c: int, ep: int = 1, intermediate: str = "fp8") -> int:
    """Bytes block `block` saves for backward over T tokens (not its weight copies)."""
    H = block.attn_norm.weight.numel()
    saved = 2 * (FP32 * T * H + FP32 * T) + _attention_bytes(block.attn, T, c)
    if not block.is_moe:
        return saved + _mlp_bytes(block.ffn, T, c)
    layer = block.ffn
    A, R = layer.top_k, routed_rows(layer, T)
    saved += _router_bytes(layer, T) + (INDEX + 1) * T * A + c * T * A * H + FP32 * T * A
    saved += _experts_bytes(layer.experts, R, c, ep, intermediate)
    if ep > 1:
        saved += 2 * INDEX * R
    if layer.shared_experts is not None:
        saved += _mlp_bytes(layer.shared_experts, T, c)
        if c == FP32 and type(layer.shared_experts.w1) is nn.Linear:
            saved -= FP32 * T * H  # its input is the router's, saved once
    return saved


def head_activation_bytes(model: MoETransformer, T: int, c: int) -> int:
    """The final norm, the output projection and cross-entropy, the embedding's token ids."""
    H, V = model.cfg.dim, model.cfg.vocab_size
    norm_and_ids = FP32 * T * H + FP32 * T + INDEX * T
    if _chunked_loss(model, T):
        return norm_and_ids + FP32 * T * H + FP32 * V * H
    return norm_and_ids + linear_input_bytes(model.output, T, c) + FP32 * T * V + INDEX * T


def _chunked_loss(model: MoETransformer, T: int) -> bool:
    return 0 < model.cfg.loss_chunk_rows < T


def cross_entropy_bytes(model: MoETransformer, T: int, c: int) -> tuple[int, int, str]:
    """(forward, backward, what) beyond the saved head: the working set of the loss. Plain: the
    logits and their fp32 copy, then backward's two fp32 T x V tensors. Chunked: the weight's
    cast, a chunk's logits (compute dtype; kernels/cross_entropy.py writes their gradient over
    them) and the chunk's dW product beside them (on a GPU with 16-bit logits the GEMM adds it
    into the fp32 sum instead, moe/loss.py `_add_dw`: there this term over-counts by c V H);
    backward scales dh and dW into new tensors."""
    H, V, rows = model.cfg.dim, model.cfg.vocab_size, model.cfg.loss_chunk_rows
    cast = c if c != FP32 else 0
    if not _chunked_loss(model, T):
        return (c + cast) * T * V, 2 * FP32 * T * V, "two fp32 T x V tensors"
    fwd = c * rows * V + c * V * H + cast * V * H
    return fwd, FP32 * (T + V) * H, "one chunk's logits; dh and dW scaled"


def head_weight_copy_bytes(model: MoETransformer, T: int, c: int) -> int:
    """Autocast's cast of the output head's weight, saved for backward by the plain loss only."""
    return 0 if _chunked_loss(model, T) else weight_copy_bytes(model.output, c)


def block_input_bytes(model: MoETransformer, T: int) -> int:
    """What activation checkpointing keeps of each block: its fp32 input."""
    return FP32 * T * model.cfg.dim


def weight_copy_bytes(module: nn.Module, c: int, ep: int = 1, fsdp: bool = False) -> int:
    """Casts of `module`'s weights to c bytes saved for backward: autocast's of every nn.Linear
    (not Float8Linear), and the BF16 experts' explicit cast of their E / W local experts. None
    under FSDP, whose all-gathered parameters are already bf16, nor without autocast (c = 4)."""
    if fsdp or c == FP32:
        return 0
    total = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            total += c * m.weight.numel()
        elif type(m) is GroupedMLP:
            total += c * (m.w1.numel() + m.w2.numel()) // ep
    return total
