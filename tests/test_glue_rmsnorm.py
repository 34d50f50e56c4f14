"""The fused residual add + RMSNorm (kernels/rmsnorm.py) against its reference (kernels/reference_norm.py).

The kernels round every product and sum as the reference does (FMA contraction off); what differs
is the order of three sums: sum z^2 over a row (rstd), sum g * xhat over a row (the backward's
projection c) and sum dy * xhat over rows (dw). For n terms summed in any order the computed sum is
within gamma_n * sum|terms| of the exact one, gamma_n = n u / (1 - n u), u = 2^-24; two orders are
within twice that of each other. The bounds below carry that through the few roundings that follow
each sum, and add one unit in the last place of the output format where a result is rounded to
bf16/fp16 (two fp32 values that close can round to neighbours). Everything that is not a sum is
compared bit for bit: z, and y recomputed from the kernel's own rstd.
"""

import pytest
import torch

from kernels.reference_norm import torch_add_rms_norm, torch_add_rms_norm_bwd, torch_add_rms_norm_fwd
from kernels.rmsnorm import (
    AddRMSNorm,
    add_rms_norm_bwd,
    add_rms_norm_fwd,
    rms_norm,
    triton_add_rms_norm_bwd,
    triton_add_rms_norm_fwd,
)

U = 2.0**-24
EPS = 1e-5
# ulp(v) <= 2^-(p-1) |v| for a format with p significant bits
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _inputs(M, H, x_dtype, r_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, H, generator=g) * 3).to(x_dtype)
    r = (torch.randn(M, H, generator=g) * 2).to(r_dtype) if r_dtype is not None else None
    w = 1 + 0.3 * torch.randn(H, generator=g)
    if M > 2:
        x[1] = 0  # an all-zero row (with r: z = r)
    return x.to(device), (r.to(device) if r is not None else None), w.to(device)


def _check_fwd(x, r, w, out):
    y_k, z_k, rstd_k = out
    y_r, z_r, rstd_r = torch_add_rms_norm_fwd(x, r, w, EPS)
    assert torch.equal(z_k, z_r)  # the add is one rounding either way
    z = (z_r if r is not None else x).float()
    H = z.shape[1]
    # mean(z^2) + eps: the sum, 1/H and eps each round; rsqrt: within 2 ulp on every backend
    rel = 2 * (gamma(H + 2) / 2 + 2 * U)
    assert ((rstd_k - rstd_r).abs() <= rel * rstd_r).all(), ((rstd_k - rstd_r).abs() / rstd_r).max()
    assert torch.equal(y_k, ((z * rstd_k[:, None]) * w.float()).to(y_k.dtype))


CASES = [  # (M, H, x dtype, r dtype): the model's fp32 stream + bf16 branch output, bf16 rows, no residual
    (37, 200, torch.float32, torch.bfloat16),
    (5, 1000, torch.float32, torch.float32),
    (70, 200, torch.bfloat16, torch.bfloat16),
    (9, 1000, torch.float16, None),
    (130, 24, torch.bfloat16, None),  # the per-head q/k norm: many short rows
]


@pytest.mark.parametrize("M, H, x_dtype, r_dtype", CASES)
def test_forward_kernel_matches_reference(M, H, x_dtype, r_dtype, device):
    x, r, w = _inputs(M, H, x_dtype, r_dtype, device)
    _check_fwd(x, r, w, triton_add_rms_norm_fwd(x, r, w, EPS))


def _bwd_bounds(dy, z, w, rstd, out_dtype):
    """|kernel - reference| allowed for dz (M, H) and dw (H,), from the same saved z and rstd."""
    H, M = z.shape[1], z.shape[0]
    xhat = z.float() * rstd[:, None]
    g = dy.float() * w.float()
    c = (g * xhat).sum(1, keepdim=True) / H
    dc = 2 * gamma(H) * (g * xhat).abs().sum(1, keepdim=True) / H + 2 * U * c.abs()
    # (g - xhat * c) * rstd: c's difference, then three roundings on each side
    dz = rstd[:, None] * (xhat.abs() * dc + 6 * U * (g.abs() + 2 * (xhat * c).abs()))
    dw = 2 * gamma(M) * (dy.float() * xhat).abs().sum(0) + 2 * U * (dy.float() * xhat).sum(0).abs()
    return dz, dw


def _close(got, want, bound, dtype):
    err = (got.double() - want.double()).abs()
    allowed = bound.double() + ULP[dtype] * want.double().abs()
    assert (err <= allowed).all(), (err - allowed).max()


@pytest.mark.parametrize("M, H, x_dtype, r_dtype", CASES)
@pytest.mark.parametrize("with_dz", [False, True])
def test_backward_kernel_matches_reference(M, H, x_dtype, r_dtype, with_dz, device):
    x, r, w = _inputs(M, H, x_dtype, r_dtype, device)
    _, z, rstd = torch_add_rms_norm_fwd(x, r, w, EPS)
    z = z if r is not None else x
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(M, H, generator=g).to(z.dtype).to(device)
    dz = torch.randn(M, H, generator=g).to(z.dtype).to(device) if with_dz else None
    args = (dy, dz, z, w, rstd, x.dtype, r.dtype if r is not None else None)
    dx_k, dr_k, dw_k = triton_add_rms_norm_bwd(*args)
    dx_r, dr_r, dw_r = torch_add_rms_norm_bwd(*args)
    bound_dz, bound_dw = _bwd_bounds(dy, z, w, rstd, x.dtype)
    if with_dz:
        bound_dz = bound_dz + U * (dx_r.float().abs() + dz.float().abs())
    _close(dx_k, dx_r, bound_dz, x.dtype)
    if r is not None:
        _close(dr_k, dr_r, bound_dz, r.dtype)
    else:
        assert dr_k.numel() == 0 and dr_r.numel() == 0
    _close(dw_k, dw_r, bound_dw, torch.float32)


def test_backward_formula_gradcheck_float64():
    """The reference backward (the formula the kernel computes) is the derivative of the forward:
    fp64 rows take the reference on every device."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    # both outputs, so that the residual path's gradient (dz) is checked too
    assert torch.autograd.gradcheck(lambda x, r, w: AddRMSNorm.apply(x, r, w, EPS), (x, r, w))
    assert torch.autograd.gradcheck(lambda x, w: AddRMSNorm.apply(x, None, w, EPS), (x, w))


def test_cpu_path_is_the_plain_norm():
    """On a CPU the entry points run the reference: the forward is the plain ops' bit for bit, and
    in fp64 the gradients are autograd's through them."""
    x, r, w = _inputs(11, 200, torch.float32, torch.bfloat16, "cpu")
    y, z = AddRMSNorm.apply(x, r, w, EPS)
    y_p, z_p = torch_add_rms_norm(x, r, w, EPS)
    assert torch.equal(y, y_p) and torch.equal(z, z_p)
    x, r, w = (t.double().requires_grad_() for t in (x, r, w))
    dy, dz = torch.randn(2, 11, 200, dtype=torch.float64)
    grads = torch.autograd.grad(AddRMSNorm.apply(x, r, w, EPS), (x, r, w), (dy, dz))
    grads_p = torch.autograd.grad(torch_add_rms_norm(x, r, w, EPS), (x, r, w), (dy, dz))
    for a, b in zip(grads, grads_p):
        torch.testing.assert_close(a, b)
    assert rms_norm(x.detach()[None], w.detach(), EPS).shape == (1, 11, 200)


def test_bad_input_is_a_clear_error():
    x, r, w = _inputs(4, 16, torch.float32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"x_MH must be 2-D"):
        add_rms_norm_fwd(x[None], None, w, EPS)
    with pytest.raises(ValueError, match=r"w_H must have shape \(16,\)"):
        add_rms_norm_fwd(x, r, w[:8], EPS)
    with pytest.raises(ValueError, match=r"r_MH must have x_MH's shape"):
        add_rms_norm_fwd(x, r[:2], w, EPS)
    with pytest.raises(ValueError, match=r"x_MH must be one of .* got torch.int32"):
        add_rms_norm_fwd(x.int(), None, w, EPS)


def test_custom_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, r, w = _inputs(6, 40, torch.float32, torch.bfloat16, "cpu")
    fwd = torch_add_rms_norm_fwd(x, r, w, EPS)
    bwd = torch_add_rms_norm_bwd(x, None, fwd[1], w, fwd[2], torch.float32, torch.bfloat16)
    with FakeTensorMode() as mode:
        f = [mode.from_tensor(t) for t in (x, r, w)]
        fake_fwd = add_rms_norm_fwd.op(*f, EPS)
        fake_bwd = add_rms_norm_bwd.op(f[0], None, f[0], f[2], mode.from_tensor(fwd[2]), torch.float32, torch.bfloat16)
    for real, fake in zip([*fwd, *bwd], [*fake_fwd, *fake_bwd]):
        assert (real.shape, real.dtype) == (fake.shape, fake.dtype)


# ---- GPU: the model's shapes, through the autograd Function ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("M, H, x_dtype, r_dtype", [
    (8192, 4096, torch.float32, torch.bfloat16),  # Mixtral-8x7B width, fp32 stream + bf16 attention output
    (8192, 1024, torch.float32, torch.bfloat16),  # parity_300m width
    (8192 * 32, 128, torch.bfloat16, None),  # the per-head q norm at Mixtral width
])  # fmt: skip
def test_gpu_kernels_match_reference(M, H, x_dtype, r_dtype, device):
    x, r, w = _inputs(M, H, x_dtype, r_dtype, device)
    out = add_rms_norm_fwd(x, r, w, EPS)  # the entry point takes the kernel on a GPU
    _check_fwd(x, r, w, out)
    z = out[1] if r is not None else x
    dy, dz = torch.randn_like(z), torch.randn_like(z)
    args = (dy, dz, z, w, out[2], x.dtype, r.dtype if r is not None else None)
    dx_k, _, dw_k = add_rms_norm_bwd(*args)
    dx_r, _, dw_r = torch_add_rms_norm_bwd(*args)
    bound_dz, bound_dw = _bwd_bounds(dy, z, w, out[2], x.dtype)
    _close(dx_k, dx_r, bound_dz + U * (dx_r.float().abs() + dz.float().abs()), x.dtype)
    _close(dw_k, dw_r, bound_dw, torch.float32)
