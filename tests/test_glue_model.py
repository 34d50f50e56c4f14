"""The model with its glue paths (fused residual add + norm, RoPE of q and k in one call, GQA without
K/V copies, the chunked loss) against the same architecture written with plain torch ops: the
norm's ops, RoPE's ops on (B, Q, S, D), K and V repeated to Q heads, F.cross_entropy over all logits."""

import torch
import torch.nn.functional as F

from kernels.reference_norm import torch_add_rms_norm
from kernels.rope import torch_rope_qk
from moe.config import MoEConfig, ModelConfig
from moe.model import build_model


def _norm(norm, x):
    return torch_add_rms_norm(x, None, norm.weight, norm.eps)[0]


def _attention(attn, x_BSH, cos, sin):
    B, S, _ = x_BSH.shape
    q = attn.wq(x_BSH).view(B, S, attn.n_heads, attn.head_dim)
    k = attn.wk(x_BSH).view(B, S, attn.n_kv_heads, attn.head_dim)
    v = attn.wv(x_BSH).view(B, S, attn.n_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
    q, k = torch_rope_qk(q, k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.wo(o.transpose(1, 2).reshape(B, S, -1))


def _plain_loss(model, tokens, labels):
    x = model.tok_embeddings(tokens)
    aux = torch.zeros(())
    for block in model.layers:
        x = x + _attention(block.attn, _norm(block.attn_norm, x), model.rope_cos, model.rope_sin)
        out = block.ffn(_norm(block.ffn_norm, x))
        if block.is_moe:
            out, aux = out.out_BSH, aux + sum(out.aux_losses.values())
        x = x + out
    logits = model.output(_norm(model.norm, x))
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100), aux


def _model(dtype, chunk_rows):
    moe = MoEConfig(num_experts=4, top_k=2, ffn_dim=32, aux_loss_coeff=0.01, expert_impl="loop")
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, qk_norm=True,
                      first_k_dense=1, dense_ffn_dim=48, loss_chunk_rows=chunk_rows, moe=moe)
    torch.manual_seed(0)
    return build_model(cfg).to(dtype)


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    labels = tokens.roll(-1, 1)
    labels[0, :5] = -100
    return tokens, labels


def test_model_equals_plain_ops():
    """fp32, plain loss: the same loss bit for bit; fp64, chunked loss: the same gradients (the
    glue's backwards are formulas where the reference's are autograd's)."""
    tokens, labels = _batch()
    model = _model(torch.float32, 0)
    loss, aux = _plain_loss(model, tokens, labels)
    out = model(tokens, labels)
    assert torch.equal(out.loss, loss) and torch.equal(out.aux_loss, aux)

    model = _model(torch.float64, 7)
    params = list(model.parameters())
    loss, aux = _plain_loss(model, tokens, labels)
    want = torch.autograd.grad(loss + aux, params)
    out = model(tokens, labels)
    got = torch.autograd.grad(out.loss + out.aux_loss, params)
    torch.testing.assert_close(out.loss, loss)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, b, msg=name)


def test_kernel_paths_compile_through_the_custom_ops(monkeypatch):
    """torch.compile (fullgraph) of the kernel paths traces the fp8moe:: custom ops by their fake
    implementations and runs the launchers (on a CPU under Triton's interpreter, which the tests'
    conftest turns on there): as eager, both ways."""
    import kernels.rmsnorm
    import kernels.rope
    from kernels.rmsnorm import add_rms_norm, rms_norm
    from kernels.rope import rope_qk
    from moe.model import rope_tables

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(kernels.rmsnorm, "_kernel_ok", lambda x, *others: True)
    monkeypatch.setattr(kernels.rope, "_kernel_ok", lambda *args: True)
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 5, 48, generator=g), torch.randn(2, 5, 48, generator=g).bfloat16()
    q, k = torch.randn(2, 5, 4, 12, generator=g).bfloat16(), torch.randn(2, 5, 2, 12, generator=g).bfloat16()
    w, wq = 1 + torch.rand(48, generator=g), 1 + torch.rand(12, generator=g)
    cos, sin = rope_tables(12, 8, 10000.0)
    inputs = [t.to(device).requires_grad_() for t in (x, r, q, k, w, wq)]
    cos, sin = cos.to(device), sin.to(device)

    def glue(x, r, q, k, w, wq):
        y, z = add_rms_norm(x, r, w, 1e-5)
        qr, kr = rope_qk(rms_norm(q, wq, 1e-5), k, cos, sin)
        return y.sum() + z.square().sum() + qr.float().square().sum() + kr.float().sum()

    def grads(fn):
        return torch.autograd.grad(fn(*inputs), inputs)

    torch._dynamo.reset()
    eager, compiled = grads(glue), grads(torch.compile(glue, backend="aot_eager", fullgraph=True))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
