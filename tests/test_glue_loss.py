"""The chunked cross-entropy over the output head (moe/loss.py) against the plain path, in fp32 and
under bf16 autocast, with ignored labels and rows that are not a multiple of the chunk.

The two paths compute the same functions of the same values; they differ in (1) the order of sums:
a GEMM's inner products (H for the logits, V for dh, T for dW, the last split over chunks), the
loss's sum over rows; (2) the softmax: the chunked path's kernel (kernels/cross_entropy.py, which
the CPU runs in Triton's interpreter here) sums each row's V exps in its own order (2 gamma_V
relatively, in lse and so in every softmax value) and writes (softmax - onehot) / n where the
plain path runs log_softmax's and nll_loss's backwards (a few ulp of each element); (3) under autocast, where a
value that differs in fp32 may round to the neighbouring bf16 value (one bf16 ulp), and each
chunk's dW rounded to bf16 before the fp32 sum where the plain path rounds the total once.
`_bounds` carries these through with the standard bounds: a sum of n terms in any order is within
gamma_n * sum|terms| of exact (gamma_n = n u / (1 - n u), u = 2^-24), so two orders are within
twice that; a logit error dx moves the softmax gradient by at most 2 max|dx| relatively.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.loss import IGNORE_INDEX, linear_cross_entropy

U = 2.0**-24
BF16_ULP = 2.0**-7  # ulp(v) <= 2^-7 |v| in bf16


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _problem(T=37, H=24, V=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g, dtype=dtype)
    head = nn.Linear(H, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=dtype) * H**-0.5 * 3)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[8:16] = IGNORE_INDEX  # a whole chunk of 8 with no labelled row
    labels[[0, T - 7]] = IGNORE_INDEX
    return h, head, labels


def _run(h, head, labels, chunk_rows, autocast, grad_scale=1.0):
    h = h.clone().requires_grad_()
    head.weight.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(h, head, labels, chunk_rows)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, head.weight.grad.clone()


def _bounds(h, W, labels, autocast, n_chunks):
    """Allowed |chunked - plain| for the loss, dh and dW (see the module docstring), in fp64."""
    c_dtype = torch.bfloat16 if autocast else torch.float32
    h_c, W_c = h.to(c_dtype).double(), W.to(c_dtype).double()
    T, H = h.shape
    V = W.shape[0]
    logits = h_c @ W_c.t()
    labelled = labels != IGNORE_INDEX
    n = labelled.sum()
    G = (logits.softmax(-1) - F.one_hot(labels.clamp_min(0), V)) * labelled[:, None] / n  # dloss/dlogits
    out_ulp = BF16_ULP if autocast else 0.0
    dx_T = 2 * gamma(H) * (h_c.abs() @ W_c.abs().t()).amax(1) + out_ulp * logits.abs().amax(1)
    rel_G = (2 * dx_T + 2 * gamma(V) + 8 * U + out_ulp)[:, None]  # per row, relative to |G|
    GW = G.abs() @ W_c.abs()
    Gh = G.abs().t() @ h_c.abs()
    dh = rel_G * GW + 2 * gamma(V) * GW + out_ulp * GW
    dW = (rel_G * G.abs()).t() @ h_c.abs() + 2 * gamma(T) * Gh + (n_chunks + 1) * out_ulp * Gh
    row_loss = torch.logsumexp(logits, -1) - logits.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    per_row = (2 * dx_T + 2 * gamma(V) + 8 * U * row_loss.abs()) * labelled
    loss = per_row.sum() / n + 2 * gamma(T) * (row_loss.abs() * labelled).sum() / n
    return loss, dh, dW


def _assert_within(got, want, bound, name):
    err = (got.double() - want.double()).abs()
    assert (err <= bound).all(), (name, (err - bound).max().item())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("chunk_rows", [8, 5, 64])
def test_chunked_matches_plain(autocast, chunk_rows):
    h, head, labels = _problem()
    plain = _run(h, head, labels, 0, autocast)
    chunked = _run(h, head, labels, chunk_rows, autocast)
    n_chunks = -(-h.shape[0] // chunk_rows)
    bounds = _bounds(h, head.weight.detach(), labels, autocast, n_chunks)
    for name, got, want, bound in zip(("loss", "dh", "dW"), chunked, plain, bounds):
        assert got.dtype == want.dtype, name
        _assert_within(got, want, bound, name)
    assert chunked[1][labels == IGNORE_INDEX].abs().sum() == 0  # ignored rows get no gradient
    if n_chunks == 1:
        assert torch.equal(chunked[0], plain[0])  # the same log_softmax and nll_loss over the same rows


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_matches_plain_on_gpu(autocast):
    """The GPU's chunked path: the kernel, and dW summed in the GEMMs' epilogues (moe/loss.py
    `_add_dw`), at a vocabulary of several kernel blocks and 5 chunks, the last one short."""
    h, head, labels = _problem(T=300, H=64, V=9000)
    h, head, labels = h.cuda(), head.cuda(), labels.cuda()
    plain = _run(h, head, labels, 0, autocast)
    chunked = _run(h, head, labels, 64, autocast)
    bounds = _bounds(h, head.weight.detach(), labels, autocast, n_chunks=5)
    for name, got, want, bound in zip(("loss", "dh", "dW"), chunked, plain, bounds):
        assert got.dtype == want.dtype, name
        _assert_within(got.cpu(), want.cpu(), bound.cpu(), name)


def test_exact_in_float64_and_scaled_by_the_loss_gradient():
    h, head, labels = _problem(dtype=torch.float64)
    plain = _run(h, head, labels, 0, autocast=False, grad_scale=0.25)
    chunked = _run(h, head, labels, 8, autocast=False, grad_scale=0.25)
    for got, want in zip(chunked, plain):
        torch.testing.assert_close(got, want)


def test_no_labelled_row_gives_nan_loss_and_zero_gradients():
    h, head, labels = _problem(T=17)
    labels[:] = IGNORE_INDEX
    plain = _run(h, head, labels, 0, autocast=False)
    chunked = _run(h, head, labels, 4, autocast=False)
    assert plain[0].isnan() and chunked[0].isnan()
    for got, want in zip(chunked[1:], plain[1:]):
        assert torch.equal(got, want) and not got.any()


def test_never_holds_the_whole_fp32_logits():
    """No fp32 tensor of T x V values (or more) is made in forward or backward, every GEMM runs in
    autocast's dtype, and without gradients no gradient work is done."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32, self.mm, self.mm_dtypes = 0, 0, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.mm += 1
                self.mm_dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.fp32 = max(self.fp32, t.numel())
            return out

    h, head, labels = _problem(T=64, H=16, V=300)
    with Largest() as seen:
        _run(h, head, labels, 0, autocast=True)
    assert seen.fp32 >= 64 * 300  # the plain path's fp32 logits are seen
    with Largest() as seen:
        _run(h, head, labels, 16, autocast=True)
    assert seen.fp32 < 64 * 300
    assert seen.mm == 12 and seen.mm_dtypes == {torch.bfloat16}  # logits, dh, dW of 4 chunks
    with Largest() as seen, torch.no_grad():
        loss = linear_cross_entropy(h, head, labels, 16)
    assert seen.mm == 4 and torch.equal(loss, _run(h, head, labels, 16, autocast=False)[0])


def test_bad_settings_are_clear_errors():
    h, _, labels = _problem()
    with pytest.raises(ValueError, match=r"model.loss_chunk_rows=8 .* needs a plain nn.Linear without bias"):
        linear_cross_entropy(h, nn.Linear(24, 50), labels, 8)
    with pytest.raises(ValueError, match=r"model.loss_chunk_rows must be >= 0 .* got -1"):
        ModelConfig(loss_chunk_rows=-1).validate()
