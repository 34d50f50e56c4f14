"""kernels/dispatch.py: which path a kernel entry point's call takes, and what the custom op is
given while torch.compile traces."""

import importlib
import pkgutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from kernels.act_quant import act_quant_fwd
from kernels.cross_entropy import cross_entropy_grad_
from kernels.dispatch import FUNCTIONALIZE_RESERVED, KernelOp, kernel_op
from kernels.fp8_stats import new_stats
from kernels.quantize import quantize_rows
from kernels.quantize_grouped import quantize_rows_and_cols_grouped
from kernels.quantize_weight import quantize_weight


def _every_kernel_op() -> list[KernelOp]:
    ops = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        ops += [v for v in vars(module).values() if isinstance(v, KernelOp)]
    return list({id(op): op for op in ops}.values())


def test_no_mutating_op_schema_has_defaults():
    """The dispatcher drops trailing arguments equal to their schema defaults before a Python
    kernel sees them; torch 2.11 then fails to find a mutated optional argument (`stats`) by its
    position (IndexError while compiling). Every op that mutates has a defaults-free schema; the
    others keep theirs (callers of the public ops leave out_dtype, promotion_interval)."""
    schemas = [op.op._opoverload._schema for op in _every_kernel_op()]
    mutating = [s for s in schemas if s.is_mutable]
    assert len(mutating) >= 4, [str(s) for s in mutating]
    for schema in mutating:
        assert not any(a.has_default_value() for a in schema.arguments), str(schema)
    assert any(a.has_default_value() for s in schemas if not s.is_mutable for a in s.arguments)


def _group_ends() -> torch.Tensor:
    return torch.tensor([0, 40, 40, 100], dtype=torch.int32)  # an empty expert, counts not multiples of 16


# Each mutating op (a statistics buffer; the logits the loss kernel overwrites), at odd shapes:
# (entry point, arguments).
_MUTATING_CALLS = {
    "cross_entropy_grad_": (cross_entropy_grad_, lambda: (
        torch.randn(5, 300).bfloat16(), torch.tensor([3, -100, 299, 0, 7]), torch.full((5,), 0.25), True, 4096)),
    "quantize_weight": (quantize_weight, lambda: (torch.randn(2, 256, 128), "blockwise", False, True,
                                                  new_stats(1, "cpu"), None)),
    "quantize_rows": (quantize_rows, lambda: (torch.randn(100, 96).bfloat16(), 0, False, None, new_stats(1, "cpu"))),
    "act_quant_fwd": (act_quant_fwd, lambda: (torch.randn(100, 192).bfloat16(), "swiglu", 0, False, True,
                                              new_stats(2, "cpu"))),
    "quantize_rows_and_cols_grouped": (quantize_rows_and_cols_grouped, lambda: (
        torch.randn(100, 96).bfloat16(), _group_ends(), 16, 0, False, None, new_stats(1, "cpu"))),
}


def test_every_mutating_op_has_a_traced_call():
    mutating = {op.__name__ for op in _every_kernel_op() if op.op._opoverload._schema.is_mutable}
    assert mutating == set(_MUTATING_CALLS)


@pytest.mark.parametrize("name", sorted(_MUTATING_CALLS))
def test_mutating_op_functionalizes(name):
    """What torch.compile does to an op that writes its statistics buffer: export, then
    functionalization (auto_functionalized_v2), on fake tensors. An op argument named like one of
    the functionalization's own parameters (quantize_weight's `mode`, before) raised "got multiple
    values for argument" in compiled FP8 on the GPU; here it raises on the CPU."""
    entry, make_args = _MUTATING_CALLS[name]

    class Call(torch.nn.Module):
        def forward(self, *args):
            return entry.op(*args)

    graph = torch.export.export(Call(), make_args()).run_decompositions().graph_module.graph
    assert any("auto_functionalized" in str(n.target) for n in graph.nodes), graph


def test_a_mutating_op_with_a_reserved_argument_name_is_refused():
    def launcher(x: torch.Tensor, mode: str, stats: torch.Tensor | None = None) -> torch.Tensor:
        return x.clone()

    with pytest.raises(ValueError, match=r"fp8moe::reserved_name_probe mutates .*\['mode'\]"):
        kernel_op("reserved_name_probe", launcher, launcher, launcher, mutates_args=("stats",))
    assert "mode" in FUNCTIONALIZE_RESERVED


def test_a_traced_op_reaches_its_fake_with_every_argument():
    """quantize_weight under fake tensors, as Dynamo runs it: a parameter that requires grad
    (the in-place bookkeeping runs) and the mutated `stats` left None."""
    w = torch.nn.Parameter(torch.randn(2, 256, 128))
    with FakeTensorMode() as mode:
        q, scale, qt, scale_t = quantize_weight.op(mode.from_tensor(w), "blockwise", False, True, None, None)
    assert q.shape == (2, 256, 128) and q.dtype == torch.float8_e4m3fn and qt.shape == (2, 128, 256)


def test_traced_call_gives_the_op_every_argument_defaults_filled(monkeypatch):
    """quantize_rows mutates `stats`, so its schema has no defaults (below): a traced call gives it
    all five arguments, the caller's filled in (the compiled FP8 linear's quantize_rows(x, 0, pow2))."""
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
