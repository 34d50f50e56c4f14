"""MoE layer and decoder: gradcheck, overfitting, parameter counts, bad configs, dry run."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.counting import count_params, training_flops_per_token
from moe.layer import MoELayer
from moe.model import MoETransformer, build_model

ROOT = Path(__file__).resolve().parents[1]


def _tiny(**moe_overrides) -> ModelConfig:
    moe = dataclasses.replace(MoEConfig(num_experts=4, top_k=2, ffn_dim=16), **moe_overrides)
    return ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, moe=moe)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("shared", [0, 1])
def test_moe_layer_gradcheck_float64(activation, shared):
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=4, top_k=2, ffn_dim=6, activation=activation, expert_impl="loop",
        num_shared_experts=shared, aux_loss_coeff=0.1, z_loss_coeff=0.01,
    )
    layer = MoELayer(8, cfg).double()
    layer.reset_parameters(0.5, 0.5)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def f(x):
        out = layer(x)
        return out.out_BSH, sum(out.aux_losses.values())

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


def test_moe_layer_zero_token_expert_and_sums():
    """Routing everything to experts 0 and 1 leaves 2 and 3 idle: zero gradients for them."""
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=16))
    layer.reset_parameters(0.1, 0.1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
        layer.router.weight[1] = 0.5
    x = torch.rand(2, 5, 16) + 0.1  # positive: experts 0 and 1 always win
    out = layer(x)
    assert out.tokens_per_expert_E.tolist() == [10, 10, 0, 0]
    out.out_BSH.sum().backward()
    assert torch.count_nonzero(layer.experts.w1.grad[2:]) == 0
    assert torch.count_nonzero(layer.experts.w1.grad[:2]) > 0


@pytest.mark.parametrize("experts", ["bf16", "rowwise"])
def test_layer_token_path_equals_permuted_rows_path(experts, monkeypatch):
    """EP=1 hands the experts the tokens and the permutation (the FP8 ones gather inside their
    quantization); a dispatcher that moves rows gets them permuted first. Same numbers, bitwise,
    under bf16 autocast with an fp32 residual stream."""
    from moe.dispatch import ExpertInput, LocalDispatcher, compute_dtype
    from moe.fp8.convert import convert_experts_to_fp8
    from moe.permute import gather_rows

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' torch references: fast, same bytes

    class RowsDispatcher(LocalDispatcher):
        """Hands the experts the permuted rows, as a dispatcher that moves them does."""

        def dispatch(self, x_TH, perm, tokens_per_expert_E):
            return ExpertInput(gather_rows(x_TH, perm, compute_dtype(x_TH)), tokens_per_expert_E), None

    torch.manual_seed(0)
    layer = MoELayer(128, MoEConfig(num_experts=4, top_k=2, ffn_dim=64, capacity_factor=1.0))
    layer.reset_parameters(0.1, 0.1)
    if experts != "bf16":
        convert_experts_to_fp8(layer, experts)
    x = torch.randn(2, 24, 128)
    results = []
    for dispatcher in (LocalDispatcher(), RowsDispatcher()):
        layer.dispatcher = dispatcher
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xi)
        out.out_BSH.float().square().sum().backward()
        results.append([out.out_BSH, xi.grad, *(p.grad for p in layer.parameters())])
    assert (results[0][0] != 0).any() and layer.experts.w1.grad is not None
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


def _overfit_losses(device: str, dtype) -> list[float]:
    """50 AdamW steps on one fixed batch of the tiny model."""
    torch.manual_seed(0)
    model = build_model(_tiny(aux_loss_coeff=0.01), device=device)
    tokens = torch.randint(0, 97, (4, 17), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


def test_tiny_model_overfits_fixed_batch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # learning, not kernels: the torch references (3x faster)
    losses = _overfit_losses("cpu", None)
    assert losses[-1] < 0.5 * losses[0], losses


def test_tied_embeddings_survive_meta_build():
    cfg = dataclasses.replace(_tiny(), tie_embeddings=True)
    model = build_model(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    untied = count_params(build_model(_tiny())).total
    assert untied - count_params(model).total == 97 * 32


def test_counts_match_hand_computation():
    cfg = _tiny()
    with torch.device("meta"):
        model = MoETransformer(cfg)
    c = count_params(model)
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32  # wq, wk, wv (2 kv heads of 8), wo
    experts = 4 * (2 * 16 * 32 + 32 * 16)
    layer = attn + experts + 4 * 32 + 2 * 32  # + router + two norms
    assert c.total == 2 * 97 * 32 + 2 * layer + 32
    assert c.active == c.total - 2 * experts // 2  # top-2 of 4 experts per layer
    flops = training_flops_per_token(model, 16)
    assert flops == 6 * (c.active - 97 * 32) + 6 * 16 * 4 * 8 * 2


@pytest.mark.parametrize(
    "cfg, match",
    [
        (ModelConfig(moe=MoEConfig(num_experts=4, top_k=5)), "model.moe.top_k"),
        (ModelConfig(dim=130, n_heads=4), "model.dim=130 must be divisible by model.n_heads=4"),
        (ModelConfig(moe=MoEConfig(activation="relu")), r"model.moe.activation must be one of \('swiglu', 'gelu'\)"),
        (ModelConfig(moe=MoEConfig(score_func="tanh")), r"model.moe.score_func must be one of \('softmax', 'sigmoid'\)"),
        (ModelConfig(n_heads=4, n_kv_heads=3), "model.n_heads=4 must be a multiple of model.n_kv_heads=3"),
        (ModelConfig(moe=MoEConfig(num_experts=8, num_groups=3)), "model.moe.num_groups"),
    ],
)
def test_bad_config_raises_value_error_naming_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        MoETransformer(cfg)


def _dry_run(*overrides):
    proc = subprocess.run(
        [sys.executable, "train.py", "run.dry_run=true", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_dry_run_mixtral_matches_published_counts():
    out = _dry_run("model=mixtral_8x7b")
    assert "params total=46702792704 active=12879925248" in out
    assert "training FLOPs per token=" in out


def test_dry_run_qwen3_30b_within_published_counts():
    out = _dry_run("model=qwen3_30b_a3b")
    line = next(l for l in out.splitlines() if l.startswith("params total="))
    total, active = (int(part.split("=")[1]) for part in line.split()[1:3])
    assert abs(total - 30.5e9) / 30.5e9 < 0.01
    assert abs(active - 3.3e9) / 3.3e9 < 0.02


def test_dry_run_bad_top_k_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "train.py", "run.dry_run=true", "model.moe.top_k=9"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "model.moe.top_k must be in [1, num_experts=8], got 9" in proc.stderr


@pytest.mark.gpu
def test_tiny_model_trains_bf16_gpu():
    losses = _overfit_losses("cuda", torch.bfloat16)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_gpu_compiled_fp8_layer_matches_eager(recipe):
    """torch.compile (aot_eager: Dynamo and AOTAutograd around eager kernels) of the FP8 layer's
    EP=1 path, whole (fullgraph), gather-quantize and gather_sum as custom ops: bitwise the output
    and gradients of eager (H200 at 14143dd: every tensor equal)."""
    from moe.fp8.convert import convert_experts_to_fp8

    torch.manual_seed(0)
    layer = MoELayer(1024, MoEConfig(num_experts=8, top_k=2, ffn_dim=768)).cuda()
    layer.reset_parameters(0.02, 0.02)
    convert_experts_to_fp8(layer, recipe)
    x = torch.randn(2, 1000, 1024, device="cuda")

    def run(fn):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xi)
        (out.out_BSH.float().square().sum() + sum(out.aux_losses.values())).backward()
        return [out.out_BSH, xi.grad, *(p.grad for p in layer.parameters())]

    eager = run(layer)
    compiled = run(torch.compile(layer, backend="aot_eager", fullgraph=True))
    assert all(e is not None for e in eager) and eager[0].abs().sum() > 0
    for c, e in zip(compiled, eager):
        assert c is not None and c.dtype == e.dtype and torch.equal(c, e), tuple(e.shape)
