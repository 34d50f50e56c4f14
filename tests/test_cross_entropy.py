"""The fused cross-entropy (kernels/cross_entropy.py) against its torch reference
(kernels/reference_loss.py), tight, and both against fp64, loose.

Kernel and reference compute lse = log(sum exp(x - max)) + max in fp32 and differ in (1) the
order of the V-term sum of exps (the kernel rescales its running sum when the max grows: each
rescale is one more rounding of each partial sum, within the same gamma bound), and (2) lse's
last roundings, m + log(s) against log_softmax's (x - max) - log(s). With u = 2^-24 and
gamma_n = n u / (1 - n u): each sum is within gamma_{V+1} of exact relatively (the +1 for the
rescale), so log(s) within 2 gamma_{V+1} + u absolutely of the other path's, and lse within
that plus 2 u |lse|. The loss lse - x_label adds u |loss|; the gradient p * scale = exp(x - lse)
* scale moves relatively by the lse error plus 2 u |x - lse| (the subtraction) and 2 u (exp and
the product), the label's "- scale" adds u |scale|. A bf16/fp16 gradient adds one ulp of its
format (two fp32 values that close can round to neighbours). Everything else is bit for bit:
ignored rows' losses (0) and gradients (0), and logits left alone without write_grad.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy import cross_entropy_grad_, triton_cross_entropy_grad_
from kernels.reference_loss import IGNORE_INDEX, torch_cross_entropy_grad_

U = 2.0**-24
ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one ulp of a rounded output
TINY = {torch.float32: 0.0, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}  # one ulp of its subnormals


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _problem(T, V, dtype, device, seed=0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, V, generator=g) * spread).to(dtype).to(device)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::5] = IGNORE_INDEX  # ignored rows, the first among them
    labels[1] = V - 1  # the label in the last column: the tail of the last block
    labelled = labels != IGNORE_INDEX
    n = max(1, int(labelled.sum()))
    scale = torch.where(labelled, 1.0 / n, 0.0).float()
    scale[2] = 3.5  # any scale (a summed loss, a loss scaled by the caller)
    return x, labels.to(device), scale.to(device)


def _lse64(x):
    return torch.logsumexp(x.double(), dim=-1)


def _bounds(x, labels, scale, dtype):
    """(loss bound, gradient bound), elementwise, of the kernel against the reference (docstring)."""
    T, V = x.shape
    lse = _lse64(x)
    d_lse = 2 * gamma(V + 1) + U + 2 * U * lse.abs()
    loss = lse - x.double().gather(1, labels.clamp_min(0)[:, None])[:, 0]
    loss_bound = (d_lse + U * loss.abs()) * (labels != IGNORE_INDEX)
    p = torch.exp(x.double() - lse[:, None])
    rel = d_lse[:, None] + 2 * U * (x.double() - lse[:, None]).abs() + 2 * U
    s = scale.double()[:, None].abs()
    g_bound = 1.01 * rel * p * s + U * s
    g = p * scale.double()[:, None] - s * F.one_hot(labels.clamp_min(0), V) * (labels != IGNORE_INDEX)[:, None]
    return loss_bound.cpu(), (g_bound + ULP[dtype] * g.abs() + TINY[dtype]).cpu(), g.cpu()


def _check(got, want, bound, name):
    err = (got.double().cpu() - want.double().cpu()).abs()
    assert (err <= bound).all(), (name, (err - bound).max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, V, block_v", [(7, 50, 64), (23, 300, 64), (11, 1000, 128), (3, 777, 4096)])
def test_kernel_matches_reference(T, V, block_v, dtype, device):
    x, labels, scale = _problem(T, V, dtype, device)
    x_k, x_r = x.clone(), x.clone()
    loss_k = triton_cross_entropy_grad_(x_k, labels, scale, True, block_v=block_v)
    loss_r = torch_cross_entropy_grad_(x_r, labels, scale, True)
    loss_bound, g_bound, _ = _bounds(x, labels, scale, dtype)
    assert loss_k.dtype == torch.float32 and x_k.dtype == dtype
    _check(loss_k, loss_r, loss_bound, "loss")
    _check(x_k, x_r, g_bound, "grad")
    ignored = labels == IGNORE_INDEX
    assert not loss_k[ignored].any() and not x_k[ignored].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_against_fp64(dtype, device):
    """Loose: the recipe (fp32 sums, the output's rounding) against exact arithmetic on the same
    inputs, within the two-path bounds above (each path is within about half of them of exact)."""
    x, labels, scale = _problem(19, 2000, dtype, device, seed=1, spread=8.0)
    x_k = x.clone()
    loss = cross_entropy_grad_(x_k, labels, scale, True, 256)
    exact = F.cross_entropy(x.double(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    loss_bound, g_bound, g = _bounds(x, labels, scale, dtype)
    _check(loss, exact, loss_bound, "loss")
    _check(x_k, g, g_bound, "grad")


def test_without_grad_leaves_logits_and_extremes(device):
    """write_grad=False writes only the losses; logits of +-1e4 spread (exp underflows to 0 in most
    columns) and a row of equal logits stay finite and exact where the answer is exact."""
    x, labels, scale = _problem(9, 300, torch.bfloat16, device)
    x[3] = 0.0  # uniform row: loss = log(V), p = 1 / V
    x[4, :] *= 2500.0
    before = x.clone()
    loss = cross_entropy_grad_(x, labels, scale, False, 64)
    assert torch.equal(x, before)
    assert torch.isfinite(loss).all()
    if labels[3] != IGNORE_INDEX:
        torch.testing.assert_close(loss[3].item(), torch.log(torch.tensor(300.0)).item(), rtol=1e-6, atol=0)
    loss_g = cross_entropy_grad_(x, labels, scale, True, 64)
    assert torch.equal(loss_g, loss) and torch.isfinite(x.float()).all()


def test_empty_and_bad_arguments(device):
    x = torch.zeros(0, 32, device=device, dtype=torch.bfloat16)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    assert cross_entropy_grad_(x, empty, empty.float(), True).shape == (0,)
    x, labels, scale = _problem(4, 32, torch.float32, device)
    with pytest.raises(ValueError, match=r"x_TV must be 2-D \(T, V\), got shape \(4, 32, 1\)"):
        cross_entropy_grad_(x[..., None], labels, scale, True)
    with pytest.raises(ValueError, match=r"labels_T must be int64 of shape \(4,\), got torch.int32"):
        cross_entropy_grad_(x, labels.int(), scale, True)
    with pytest.raises(ValueError, match=r"scale_T must be float32 of shape \(4,\), got torch.float32 \(3,\)"):
        cross_entropy_grad_(x, labels, scale[:3], True)
    with pytest.raises(ValueError, match=r"x_TV must have contiguous rows"):
        triton_cross_entropy_grad_(x.t().contiguous().t(), labels, scale, True)
    with pytest.raises(ValueError, match=r"x_TV must be one of .* got torch.int32"):
        cross_entropy_grad_(x.int(), labels, scale, True)


@pytest.mark.gpu
def test_qwen3_vocabulary_on_gpu():
    """A chunk at the Qwen3 vocabulary (151,936 columns, 37 blocks a row) on the GPU."""
    T, V = 64, 151936
    x, labels, scale = _problem(T, V, torch.bfloat16, "cuda", spread=6.0)
    x_k, x_r = x.clone(), x.clone()
    loss_k = cross_entropy_grad_(x_k, labels, scale, True)
    loss_r = torch_cross_entropy_grad_(x_r, labels, scale, True)
    loss_bound, g_bound, _ = _bounds(x, labels, scale, torch.bfloat16)
    _check(loss_k, loss_r, loss_bound, "loss")
    _check(x_k, x_r, g_bound, "grad")
