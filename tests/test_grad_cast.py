"""kernels/grad_cast.py: a bf16 or fp16 weight gradient cast to fp32 (`grad_to_fp32`) or added into
an fp32 .grad (`add_grad_`) in one pass, against torch's `g.to(torch.float32)` and
`into.add_(g.to(torch.float32))`: the same bits (a cast is exact, the add is one fp32 rounding of
the same two values). CPU: Triton's interpreter; GPU (`pytest -m gpu`): a Mixtral-width gradient.
"""

import pytest
import torch

from kernels import grad_cast
from kernels.grad_cast import BLOCK, add_grad_, grad_to_fp32

SIZES = [0, 1, 15, BLOCK - 1, BLOCK + 1, 2 * BLOCK + 333]  # empty, partial and several programs


def _gradient(n: int, dtype: torch.dtype, device="cpu", seed=0) -> torch.Tensor:
    """Normal values over a wide range, with the specials a gradient can hold: zeros of both signs,
    the largest finite values and, on the GPU, subnormals (Triton's interpreter flushes those to
    zero in its bf16 loads, which the GPU does not)."""
    gen = torch.Generator(device).manual_seed(seed)
    exponent = torch.randint(-20, 20, (n,), generator=gen, device=device).float()
    g = torch.randn(n, generator=gen, device=device) * torch.exp2(exponent)
    tiny = torch.finfo(dtype).smallest_normal / 4 if device != "cpu" else 0.0
    special = torch.tensor([0.0, -0.0, tiny, -tiny, torch.finfo(dtype).max, -torch.finfo(dtype).max])
    g[: min(n, len(special))] = special[: min(n, len(special))]
    return g.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", SIZES)
def test_cast_and_add_are_torch_bit_for_bit(n, dtype, monkeypatch):
    launches = []
    launch = grad_cast._launch
    monkeypatch.setattr(grad_cast, "_launch", lambda *a: launches.append(1) or launch(*a))
    g = _gradient(n, dtype).view(-1, 1) if n else _gradient(n, dtype)  # any shape: 2-d here
    out = grad_to_fp32(g)
    assert out.dtype == torch.float32 and out.shape == g.shape and torch.equal(out, g.to(torch.float32))
    into = torch.randn(g.shape, generator=torch.Generator().manual_seed(1))
    want = into.clone().add_(g.to(torch.float32))
    add_grad_(into, g)
    assert torch.equal(into, want)
    assert len(launches) == 2, "the kernel ran both times"


def test_strided_operands_take_torch_ops_with_the_same_result(monkeypatch):
    monkeypatch.setattr(grad_cast, "_launch", lambda *a: pytest.fail("a strided operand reached the kernel"))
    g = _gradient(64 * 48, torch.bfloat16).view(64, 48).t()
    assert torch.equal(grad_to_fp32(g), g.to(torch.float32))
    into = torch.randn(64, 48).t()
    want = into + g.to(torch.float32)
    add_grad_(into, g)
    assert torch.equal(into, want)


def test_bad_arguments_are_clear_errors():
    g = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="the gradient must be one of"):
        grad_to_fp32(torch.zeros(4, dtype=torch.int32))
    for bad, what in [(torch.zeros(4, 8, dtype=torch.bfloat16), "bfloat16"), (torch.zeros(8, 4), "(8, 4)")]:
        with pytest.raises(ValueError, match="into must be a float32 tensor of the gradient's shape") as err:
            add_grad_(bad, g)
        assert what in str(err.value)


@pytest.mark.gpu
def test_gpu_mixtral_width_gradient_bit_for_bit():
    """One layer's w2 gradient at Mixtral width (8 x 4096 x 14336, 470M elements: 64-bit offsets)."""
    g = _gradient(8 * 4096 * 14336, torch.bfloat16, device="cuda").view(8, 4096, 14336)
    assert (g.float().abs() < torch.finfo(torch.bfloat16).smallest_normal).sum() > 2  # zeros and subnormals
    out = grad_to_fp32(g)
    assert torch.equal(out, g.to(torch.float32))
    want = out * 3 + g.to(torch.float32)
    out.mul_(3)
    add_grad_(out, g)
    assert torch.equal(out, want)
