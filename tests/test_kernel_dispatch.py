"""kernels/dispatch.py: which path a kernel entry point's call takes, and what the custom op is
given while torch.compile traces."""

import torch

from kernels.quantize import quantize_rows


def test_traced_call_gives_the_op_every_argument_defaults_filled(monkeypatch):
    """torch 2.11 looks a mutated optional argument up among the arguments given and raises
    IndexError where the call left it to its default (pytorch/pytorch#176078, the compiled FP8
    linear's quantize_rows(x, 0, pow2) without stats): the op gets all five."""
    seen = []
    monkeypatch.setattr(quantize_rows, "_use_kernel", lambda *a, **k: True)
    monkeypatch.setattr(quantize_rows, "op", lambda *a, **k: seen.append((a, k)) or (a[0], a[0]))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(4, 32)
    quantize_rows(x, 0, True)
    quantize_rows(x, block_k=0, stats=None, pow2_scale=False)
    (a1, k1), (a2, k2) = seen
    assert k1 == k2 == {}
    assert a1[0] is x and a1[1:] == (0, True, None, None)
    assert a2[0] is x and a2[1:] == (0, False, None, None)


def test_eager_call_goes_to_the_launcher_or_the_reference_as_given(monkeypatch):
    calls = []
    monkeypatch.setattr(quantize_rows, "launcher", lambda *a, **k: calls.append("launcher") or (a[0], a[0]))
    monkeypatch.setattr(quantize_rows, "reference", lambda *a, **k: calls.append("reference") or (a[0], a[0]))
    x = torch.randn(4, 32)
    for use in (True, False):
        monkeypatch.setattr(quantize_rows, "_use_kernel", lambda *a, _use=use, **k: _use)
        quantize_rows(x, 0, False)
    assert calls == ["launcher", "reference"]
