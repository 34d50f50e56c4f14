"""RoPE of q and k in one launch (kernels/rope.py) against its torch reference: bit for bit, forward
and backward (the kernel with -sin), since both round each product and sum once in fp32."""

import pytest
import torch

from kernels.rope import RopeQK, rope_qk, rope_qk_op, torch_rope_qk, triton_rope_qk
from moe.model import rope_tables


def _qk(B, S, Q, J, D, dtype, device, seed=0, layout="projection"):
    """q and k as the model makes them: views (B, S, heads, D) of the projections' (B, S, heads * D)
    outputs; "transposed": views of (B, heads, S, D) tensors, as SDPA's gradients may come back."""
    g = torch.Generator().manual_seed(seed)
    if layout == "projection":
        q = torch.randn(B, S, Q * D, generator=g).to(dtype).view(B, S, Q, D)
        k = torch.randn(B, S, J * D, generator=g).to(dtype).view(B, S, J, D)
    else:
        q = torch.randn(B, Q, S, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, J, S, D, generator=g).to(dtype).transpose(1, 2)
    return q.to(device), k.to(device)


def _tables(D, S_max, device):
    cos, sin = rope_tables(D, S_max, 10000.0)
    return cos.to(device), sin.to(device)


# (B, S, Q, J, D): GQA with an odd half dim, multi-head (J = Q), more heads than a program takes
SHAPES = [(2, 5, 6, 2, 24), (1, 7, 4, 4, 16), (2, 3, 70, 10, 64)]
CASES = [(shape, dtype, layout, inverse)
         for shape in SHAPES for dtype in (torch.float32, torch.bfloat16)
         for layout, inverse in (("projection", False), ("transposed", True))]  # fmt: skip
CASES.append((SHAPES[0], torch.float16, "projection", False))


@pytest.mark.parametrize("shape, dtype, layout, inverse", CASES)
def test_kernel_matches_reference_bitwise(shape, dtype, layout, inverse, device):
    B, S, Q, J, D = shape
    q, k = _qk(B, S, Q, J, D, dtype, device, layout=layout)
    cos, sin = _tables(D, S + 3, device)  # the tables are longer than the sequence
    q_k, k_k = triton_rope_qk(q, k, cos, sin, inverse)
    q_r, k_r = torch_rope_qk(q, k, cos, sin, inverse)
    assert q_k.is_contiguous() and k_k.is_contiguous() and q_k.dtype == dtype
    assert torch.equal(q_k, q_r) and torch.equal(k_k, k_r)


def test_backward_is_autograd_through_the_reference_bitwise():
    """The inverse rotation of the output gradient is exactly autograd's gradient of the torch ops."""
    q, k = _qk(2, 5, 6, 2, 24, torch.bfloat16, "cpu")
    cos, sin = _tables(24, 9, "cpu")
    q.requires_grad_(), k.requires_grad_()
    outs = torch_rope_qk(q, k, cos, sin)
    grads_out = [torch.randn_like(o) for o in outs]
    want = torch.autograd.grad(outs, (q, k), grads_out)
    assert all(torch.equal(a, b) for a, b in zip(triton_rope_qk(*grads_out, cos, sin, True), want))
    got = torch.autograd.grad(rope_qk(q, k, cos, sin), (q, k), grads_out)  # the CPU path: the reference
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_rotation_then_inverse_is_identity_float64():
    q, k = _qk(1, 6, 4, 2, 8, torch.float64, "cpu")
    cos, sin = _tables(8, 6, "cpu")
    q2, k2 = torch_rope_qk(*torch_rope_qk(q, k, cos, sin), cos, sin, inverse=True)
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(k2, k)
    assert torch.autograd.gradcheck(lambda q, k: RopeQK.apply(q, k, cos, sin),
                                    (q.requires_grad_(), k.requires_grad_()))  # fmt: skip


def test_bad_input_is_a_clear_error():
    q, k = _qk(1, 4, 2, 1, 8, torch.float32, "cpu")
    cos, sin = _tables(8, 4, "cpu")
    with pytest.raises(ValueError, match="q and k must be"):
        rope_qk_op(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="even head dim"):
        rope_qk_op(q[..., :7], k[..., :7], cos, sin)
    with pytest.raises(ValueError, match=r"cos_SD must be an fp32 \(or fp64\) table of at least S=4 rows and D/2=4"):
        rope_qk_op(q, k, cos[:3], sin)
    with pytest.raises(ValueError, match=r"sin_SD must be an fp32 \(or fp64\) table"):
        rope_qk_op(q, k, cos, sin.bfloat16())


def test_custom_op_traces_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k = _qk(1, 4, 2, 1, 8, torch.bfloat16, "cpu", layout="transposed")
    cos, sin = _tables(8, 4, "cpu")
    real = torch_rope_qk(q, k, cos, sin)
    with FakeTensorMode() as mode:
        fake = rope_qk_op.op(*(mode.from_tensor(t) for t in (q, k, cos, sin)), False)
    assert [(t.shape, t.stride(), t.dtype) for t in real] == [(t.shape, t.stride(), t.dtype) for t in fake]


@pytest.mark.gpu
@pytest.mark.parametrize("B, S, Q, J, D", [(1, 4096, 32, 8, 128), (8, 1024, 16, 8, 64)])
def test_gpu_forward_and_backward_bitwise(B, S, Q, J, D, device):
    q, k = _qk(B, S, Q, J, D, torch.bfloat16, device)
    cos, sin = _tables(D, S, device)
    q.requires_grad_(), k.requires_grad_()
    outs = rope_qk(q, k, cos, sin)  # the kernel, both ways
    outs_r = torch_rope_qk(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(outs, outs_r))
    grads_out = [torch.randn_like(o).transpose(1, 2).contiguous().transpose(1, 2) for o in outs]
    got = torch.autograd.grad(outs, (q, k), grads_out)
    want = torch.autograd.grad(outs_r, (q, k), grads_out)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
