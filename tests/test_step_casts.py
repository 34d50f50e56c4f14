"""run.weight_cast=step: each fp32 weight cast to bf16 once per optimizer step (trainer/loop.py
`Trainer._step_casts`, moe/step_casts.py `weights_cast_once`), the same losses and gradients, bit
for bit, as casting in every forward, and no copy alive after the step."""

import contextlib
import gc
import weakref
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from moe.dispatch import ExpertInput
from moe.experts import GroupedMLP
from moe.step_casts import weights_cast_once
from trainer_helpers import cpu_trainer, tiny_train_config, token_batches

ACCUM = 3
STEPS = 3


class _Casts(TorchDispatchMode):
    """Every fp32 -> bf16 copy of a tensor in `params` (by storage): how many per weight, and a
    weak reference to each copy."""

    def __init__(self, params) -> None:
        super().__init__()
        self.ptrs = {p.data_ptr(): name for name, p in params}
        self.count: Counter = Counter()
        self.copies: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if (func is torch.ops.aten._to_copy.default and src.dtype == torch.float32
                and out.dtype == torch.bfloat16 and src.data_ptr() in self.ptrs):  # fmt: skip
            self.count[self.ptrs[src.data_ptr()]] += 1
            self.copies.append(weakref.ref(out))
        return out


# ---- nn.Linear under autocast -------------------------------------------------------------------


class _Net(nn.Module):
    """An embedding (never cast) ahead of Linears with and without bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 32)
        self.up = nn.Linear(32, 48, bias=False)
        self.down = nn.Linear(48, 8)

    def forward(self, tokens):
        return self.down(F.gelu(self.up(self.emb(tokens))))


def _accumulate(scoped: bool, ac: bool, micro: int = 8):
    """`micro` micro-batches' gradients under bf16 autocast, inside weights_cast_once or not;
    the order in which the parameters' gradients were accumulated in each backward."""
    model = _Net()
    run = (lambda t: checkpoint(model, t, use_reentrant=False)) if ac else model
    order: list[list[str]] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: order[-1].append(name))
    tokens = torch.randint(0, 11, (micro, 5), generator=torch.Generator().manual_seed(1))
    with _Casts(model.named_parameters()) as casts, weights_cast_once(model) if scoped else contextlib.nullcontext():
        for t in tokens:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = run(t)
            order.append([])
            y.float().square().mean().backward()
    return [p.grad for p in model.parameters()], casts, order


@pytest.mark.parametrize("ac", [False, True], ids=["plain", "checkpointed"])
def test_linears_cast_once_with_the_same_gradients_in_the_same_order(ac):
    """The 2nd..8th micro-batch compute with the first one's copies (a checkpointed recompute
    too) and get the same gradients, accumulated in the same order as casting in every forward:
    each forward's own cast node runs where the cast's would, so DDP's buckets fill as before
    (through one shared node, autocast's cache, they would all wait for backward's end)."""
    grads, casts, order = _accumulate(True, ac)
    ref_grads, ref_casts, ref_order = _accumulate(False, ac)
    weights = {"up.weight", "down.weight", "down.bias"}
    assert casts.count == {w: 1 for w in weights}
    assert ref_casts.count == {w: 8 * (2 if ac else 1) for w in weights}  # the recompute casts again
    for g, ref in zip(grads, ref_grads):
        assert torch.equal(g, ref)
    assert order == ref_order and order[-1][-1] == "emb.weight"


def test_outside_the_scope_the_linears_cast_in_every_forward():
    model = _Net()
    params = {n: id(p) for n, p in model.named_parameters()}
    tokens = torch.arange(5)
    with weights_cast_once(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens)
    assert {n: id(p) for n, p in model.named_parameters()} == params  # the Parameters themselves are back
    with _Casts(model.named_parameters()) as casts:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(tokens).float().sum().backward()
    assert casts.count == {"up.weight": 2, "down.weight": 2, "down.bias": 2}


# ---- the experts' own cast ----------------------------------------------------------------------


def _experts(impl: str) -> GroupedMLP:
    torch.manual_seed(0)
    m = GroupedMLP(24, 16, 3, "swiglu", impl)
    m.reset_parameters(0.1)
    return m


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_experts_cast_once_inside_the_scope_with_the_same_gradients(impl):
    counts_E = torch.tensor([5, 0, 6])  # an expert without rows, odd counts
    xs = torch.randn(ACCUM, 11, 24, generator=torch.Generator().manual_seed(2))
    results = []
    for scoped in (True, False):
        m = _experts(impl)
        scope = weights_cast_once(m) if scoped else contextlib.nullcontext()
        ys = []
        with _Casts(m.named_parameters()) as casts, scope:
            for x in xs:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = m(ExpertInput(x, counts_E))
                y.float().square().sum().backward()
                ys.append(y.detach())
        assert m._step_casts is None
        results.append((ys, m.w1.grad, m.w2.grad, casts))
    (ys, g1, g2, casts), (ref_ys, ref_g1, ref_g2, ref_casts) = results
    assert casts.count == {"w1": 1, "w2": 1} and ref_casts.count == {"w1": ACCUM, "w2": ACCUM}
    assert all(torch.equal(y, r) for y, r in zip(ys, ref_ys))
    assert torch.equal(g1, ref_g1) and torch.equal(g2, ref_g2)


def _fresh_views(module, args):
    """Expert parallelism's forward pre-hook hands the module a new `to_local()` view of each
    DTensor weight every forward (trainer/parallel.py): here a new view of each parameter."""
    module._saved = {n: module._parameters[n] for n in ("w1", "w2")}
    for name, param in module._saved.items():
        module._parameters[name] = param.view_as(param)


def _restore(module, args, output):
    module._parameters.update(module.__dict__.pop("_saved"))


def test_experts_fed_a_new_view_each_forward_cast_once_with_the_same_gradients():
    counts_E = torch.tensor([4, 3, 2])
    xs = torch.randn(ACCUM, 9, 24, generator=torch.Generator().manual_seed(4))
    grads = []
    for scoped in (True, False):
        m = _experts("grouped_mm")
        m.register_forward_pre_hook(_fresh_views)
        m.register_forward_hook(_restore)
        with _Casts(m.named_parameters()) as casts, weights_cast_once(m) if scoped else contextlib.nullcontext():
            for x in xs:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    m(ExpertInput(x, counts_E)).float().square().sum().backward()
        assert casts.count == ({"w1": 1, "w2": 1} if scoped else {"w1": ACCUM, "w2": ACCUM})
        grads.append((m.w1.grad, m.w2.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_weight_changed_inside_the_scope_is_cast_again():
    m = _experts("grouped_mm")
    inp = ExpertInput(torch.randn(4, 24), torch.tensor([1, 2, 1]))
    with weights_cast_once(m), _Casts(m.named_parameters()) as casts:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m(inp)
            with torch.no_grad():
                m.w1.mul_(2)  # bumps its version counter
    assert casts.count == {"w1": 2, "w2": 1}


# ---- the trainer --------------------------------------------------------------------------------


def _cfg(weight_cast: str, ac: bool):
    c = tiny_train_config(STEPS, ACCUM)
    c.run.dtype = "bfloat16"
    c.run.weight_cast, c.run.activation_checkpointing = weight_cast, ac
    c.validate()
    return c


def _train(weight_cast: str, ac: bool, run_dir, monkeypatch):
    trainer = cpu_trainer(_cfg(weight_cast, ac), run_dir, monkeypatch)
    grads, step = [], trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    order: list[str] = []  # every gradient accumulation of the run, in order
    for name, p in trainer.model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
    it, losses, counts, copies = token_batches(3), [], [], []
    for _ in range(STEPS):
        with _Casts(trainer.model.named_parameters()) as casts:
            stats = trainer.train_step(it)
        losses.append((stats["loss"], stats["aux_loss"], stats["grad_norm"]))
        counts.append(casts.count)
        copies += casts.copies
    return losses, grads, counts, copies, order, trainer


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("ac", [False, True], ids=["plain", "checkpointed"])
def test_trainer_step_casts_equal_per_forward_casts(tmp_path, monkeypatch, ac):
    """3 steps of 3 micro-batches: losses and gradients bit for bit, accumulated in the same
    order; step: one cast of each weight a step (the dense Linears, the experts); forward: one
    per micro-batch (twice under checkpointing: the recompute casts again); no copy outlives a
    step."""
    losses, grads, counts, copies, order, trainer = _train("step", ac, tmp_path / "step", monkeypatch)
    ref_losses, ref_grads, ref_counts, ref_copies, ref_order, _ = _train("forward", ac, tmp_path / "forward",
                                                                          monkeypatch)  # fmt: skip
    assert losses == ref_losses and order == ref_order
    assert len(grads) == len(ref_grads) == STEPS
    for g, ref in zip(grads, ref_grads):
        assert g.keys() == ref.keys()
        for name in ref:
            assert torch.equal(g[name], ref[name]), name
    cast = {n for n, p in trainer.model.named_parameters()
            if p.dim() >= 2 and "router" not in n and "embeddings" not in n}  # fmt: skip
    assert any("experts" in n for n in cast) and any("attn.wq" in n for n in cast)
    for count, ref in zip(counts, ref_counts):
        assert set(count) == set(ref) == cast
        assert set(count.values()) == {1}
        for name, n in ref.items():  # the blocks are checkpointed, the output layer is not
            assert n == ACCUM * (2 if ac and name.startswith("layers.") else 1), (name, n)
    gc.collect()
    assert copies and all(c() is None for c in copies + ref_copies)


def test_the_memory_plan_keeps_every_copy_for_the_step():
    """With micro-batches, step casts hold every BF16 weight copy from the first forward to the
    last backward: the plan's copies line says so and its peak is never below the per-forward one."""
    from moe.config import ModelConfig, MoEConfig
    from trainer.config import TrainConfig
    from trainer.memory_activations import weight_copy_bytes
    from trainer.memory_plan import meta_model, plan_memory

    plans = {}
    for cast in ("step", "forward"):
        for ac in (False, True):
            cfg = TrainConfig()
            cfg.model = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                    moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32))  # fmt: skip
            cfg.run.seq_len, cfg.run.micro_batch_size, cfg.run.grad_accum = 64, 2, 4
            cfg.run.weight_cast, cfg.run.activation_checkpointing = cast, ac
            plans[cast, ac] = plan_memory(cfg, 1)
    everything = weight_copy_bytes(meta_model(cfg), 2)
    for ac in (False, True):
        step, forward = plans["step", ac], plans["forward", ac]
        assert step.bytes_of("BF16 weight copies") == everything
        assert step.total_bytes >= forward.total_bytes
    assert plans["step", True].total_bytes > plans["forward", True].total_bytes  # checkpointing kept none


def test_an_unknown_weight_cast_is_a_clear_error():
    from trainer.config import TrainConfig

    cfg = TrainConfig()
    cfg.run.weight_cast = "sometimes"
    with pytest.raises(ValueError, match=r"run.weight_cast must be one of \('step', 'forward'\), got 'sometimes'"):
        cfg.validate()
