"""This project's FP8 experts as transformers experts implementations (interop/hf_experts.py), on a
tiny Qwen3-MoE built locally (no download).

Tolerances, those of tests/test_fp8_grouped_mlp.py for the same computation:
- vs the recipe's emulation (moe/fp8/reference.py), 1% relative L2: the same recipe, differing by
  fp32 accumulation order and the FP8/bf16 rounding flips it causes. The weighted combine around
  the experts adds fp32 sums, no quantization.
- vs transformers' own implementations (grouped_mm, eager: no FP8), 8%: E4M3 keeps 3 mantissa bits,
  a two-GEMM SwiGLU block of random data lands at 6-7.5%, and the combine's convex sum of a
  token's top-k rows does not raise the relative error. That FP8 really ran: its error exceeds
  the one between transformers' two unquantized implementations (bf16 against fp32 GEMMs).
- training: the FP8 run's loss curve is closer to grouped_mm's (same init, same data) than a
  grouped_mm run from another init seed is: within the seed-to-seed noise, the project's parity
  criterion (README, "Loss parity").
"""

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason='pip install ".[dev]"')

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

import moe.fp8.grouped_mlp as fp8_mlp  # noqa: E402
from interop.hf_experts import register_fp8_experts, use_fp8_experts  # noqa: E402
from moe.fp8.recipe import Fp8Recipe  # noqa: E402
from moe.fp8.reference import fp8_grouped_mlp_reference  # noqa: E402

RECIPES = ["rowwise", "blockwise"]
V = 64  # vocabulary of the tiny model


@pytest.fixture(autouse=True)
def kernels_by_reference_on_cpu(monkeypatch):
    """As tests/test_fp8_grouped_mlp.py: the kernels' pure-torch references on a CPU, not Triton's
    interpreter, whose float32 -> E4M3 cast mis-rounds ties (kernels/common.py)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation (the training
    runs take 2-3x the CPU time with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _block_config(H=256, F=128, E=8, A=2) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=A,
                          norm_topk_prob=True)  # fmt: skip


def _block(impl: str, seed: int = 0, device: str = "cpu", dtype=torch.float32, **dims) -> Qwen3MoeSparseMoeBlock:
    """A Qwen3-MoE block (router + experts) with random weights, its experts set to `impl`."""
    torch.manual_seed(seed)
    cfg = _block_config(**dims)
    block = Qwen3MoeSparseMoeBlock(cfg).to(device=device, dtype=dtype)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02 if p.dim() == 3 else 0.05)
    if impl.startswith("fp8_"):
        assert use_fp8_experts(block, impl.removeprefix("fp8_")) == 1
    else:
        cfg._experts_implementation = impl
    return block


def _block_fwd_bwd(block, x_BSH, dout_BSH, autocast: bool):
    """(out, dx, d gate_up_proj, d down_proj, d router weight), under bf16 autocast when asked."""
    x = x_BSH.clone().requires_grad_()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        out = block(x)
    out.float().backward(dout_BSH.float())
    e = block.experts
    return out.detach().float(), x.grad, e.gate_up_proj.grad, e.down_proj.grad, block.gate.weight.grad


@pytest.mark.parametrize("recipe", RECIPES)
def test_experts_match_the_recipe_emulation(recipe):
    """The experts module called as transformers calls it, against the recipe's emulation of the
    permuted rows folded back with the routing weights: checks the wiring (gate_up_proj's [gate; up]
    rows, down_proj's orientation, the weighting, the router's gradient through the weights).
    bf16 hidden states, no autocast, as tests/test_fp8_grouped_mlp.py runs the emulation: on a CPU
    the FP8 GEMMs are emulated by torch matmuls, which bf16 autocast would run in bf16, not fp32."""
    T, A, E, H, F = 96, 2, 6, 256, 128
    block = _block(f"fp8_{recipe}", E=E, A=A, H=H, F=F)
    experts = block.experts
    g = torch.Generator().manual_seed(1)
    ids_TA = torch.multinomial(torch.tensor([3.0, 1, 0, 2, 5, 1]), T * A, replacement=True, generator=g)
    ids_TA = ids_TA.view(T, A)  # expert 2 idle, the others' counts uneven and not multiples of 16
    w_TA = torch.rand(T, A, generator=g).requires_grad_()
    x_TH = torch.randn(T, H, generator=g).bfloat16().requires_grad_()
    dout_TH = torch.randn(T, H, generator=g).bfloat16()
    out_TH = experts(x_TH, ids_TA, w_TA)
    assert out_TH.dtype == torch.bfloat16  # hidden_states' dtype, as transformers' implementations return
    out_TH.backward(dout_TH)
    dout_TH = dout_TH.float()

    order_M = torch.sort(ids_TA.reshape(-1), stable=True).indices
    tok_M, w_M = order_M // A, w_TA.detach().reshape(-1)[order_M, None]
    counts = torch.bincount(ids_TA.reshape(-1), minlength=E).tolist()
    dy_MH = (w_M * dout_TH[tok_M]).bfloat16()  # the combine's backward writes the rows in bf16
    w1, w2 = experts.gate_up_proj.detach(), experts.down_proj.detach()
    y_MH, dx_MH, dw1, dw2 = fp8_grouped_mlp_reference(
        x_TH.detach()[tok_M], w1, w2, counts, dy_MH, "swiglu", Fp8Recipe(recipe)
    )
    want_out = torch.zeros(T, H).index_add_(0, tok_M, w_M * y_MH)
    want_dx = torch.zeros(T, H).index_add_(0, tok_M, dx_MH)
    want_dw_TA = torch.empty(T * A).index_copy_(0, order_M, (dout_TH[tok_M] * y_MH).sum(-1)).view(T, A)
    got = (out_TH, x_TH.grad, experts.gate_up_proj.grad, experts.down_proj.grad, w_TA.grad)
    want = (want_out, want_dx, dw1, dw2, want_dw_TA)
    for name, g_, w_ in zip(("out", "dx", "d gate_up_proj", "d down_proj", "d top_k_weights"), got, want):
        assert torch.isfinite(g_).all(), name
        assert _rel(g_, w_) < 1e-2, (name, _rel(g_, w_))
    assert torch.count_nonzero(experts.gate_up_proj.grad[2]) == 0  # the idle expert


@pytest.mark.parametrize("recipe", RECIPES)
def test_block_matches_grouped_mm_and_eager_within_fp8_error(recipe):
    """A whole Qwen3-MoE block, fp32 weights under bf16 autocast as a training step runs it: output
    and every gradient (input, both expert weights, the router) against transformers' own."""
    T, H = 192, 256
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, T, H, generator=g)
    dout = torch.randn(1, T, H, generator=g).bfloat16().float()
    names = ("out", "dx", "d gate_up_proj", "d down_proj", "d router")
    ref = _block_fwd_bwd(_block("grouped_mm"), x, dout, autocast=True)
    eager = _block_fwd_bwd(_block("eager"), x, dout, autocast=True)
    got = _block_fwd_bwd(_block(f"fp8_{recipe}"), x, dout, autocast=True)
    for name, g_, r, e in zip(names, got, ref, eager):
        assert torch.isfinite(g_).all(), name
        for other in (r, e):
            assert _rel(g_, other) < 0.08, (name, _rel(g_, other))
        assert _rel(g_, r) > _rel(e, r), (name, _rel(g_, r), _rel(e, r))  # FP8 ran: more than bf16's error


# ---- training ----------------------------------------------------------------------------------


def _tiny_config(**kw) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(vocab_size=V, hidden_size=128, intermediate_size=128, moe_intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          num_experts=8, num_experts_per_tok=2, max_position_embeddings=64, **kw)  # fmt: skip


def _batches(steps: int, B: int = 4, S: int = 33, seed: int = 123) -> list[torch.Tensor]:
    """A learnable stream: each next token is a fixed permutation of the last one (3 times in 4)
    or uniform, so the loss falls from log(V) towards ~1.6 without memorising a batch."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randperm(V, generator=g)
    out = []
    for _ in range(steps):
        t = torch.empty(B, S, dtype=torch.long)
        t[:, 0] = torch.randint(0, V, (B,), generator=g)
        for i in range(1, S):
            follow = torch.rand(B, generator=g) < 0.75
            t[:, i] = torch.where(follow, nxt[t[:, i - 1]], torch.randint(0, V, (B,), generator=g))
        out.append(t)
    return out


def _train(impl: str, seed: int = 0, steps: int = 30):
    """Losses of `steps` AdamW steps; for FP8 the switch comes after the optimizer is built.
    Returns (losses, model, optimizer, the expert parameters before training)."""
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(_tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    if impl.startswith("fp8_"):
        assert use_fp8_experts(model, impl.removeprefix("fp8_")) == 2
    else:
        model.set_experts_implementation(impl)
    losses = []
    for tokens in _batches(steps):
        with torch.autocast("cpu", torch.bfloat16):
            out = model(tokens[:, :-1], labels=tokens[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return torch.tensor(losses), model, opt, before


@pytest.fixture(scope="module")
def grouped_mm_runs():
    """grouped_mm's losses from the FP8 runs' init, and from another init seed (the noise)."""
    return _train("grouped_mm", seed=0)[0], _train("grouped_mm", seed=1)[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_qwen3_moe_trains_like_grouped_mm(recipe, grouped_mm_runs):
    ref, other_seed = grouped_mm_runs
    losses, model, opt, before = _train(f"fp8_{recipe}")
    assert torch.isfinite(losses).all()
    for run in (ref, losses):
        assert run[-5:].mean() < 0.75 * run[0], run  # log(64) = 4.16 -> ~2.7 in 30 steps
    fp8_gap = (losses - ref).abs().mean()
    seed_gap = (other_seed - ref).abs().mean()
    assert fp8_gap < seed_gap, (fp8_gap, seed_gap, losses, ref)
    # The optimizer built before the switch trained the module's own tensors.
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if name in before:
            assert id(p) in in_opt and opt.state[p]["step"] == 30, name
            assert not torch.equal(p.detach(), before[name]), name


# ---- selection, options, refusals -------------------------------------------------------------


def test_selectable_by_name_like_any_transformers_implementation():
    names = register_fp8_experts()
    assert names == ("fp8_rowwise", "fp8_blockwise") and register_fp8_experts() == names  # idempotent
    tokens = _batches(1)[0]
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(_tiny_config(experts_implementation="fp8_blockwise"))
    assert model.get_experts_implementation() == {"": "fp8_blockwise"}
    logits = {}
    for impl in ("fp8_blockwise", "grouped_mm", "fp8_rowwise"):
        model.set_experts_implementation(impl)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            logits[impl] = model(tokens).logits.float()
    use_fp8_experts(model, "rowwise")  # the same default recipe: the same bytes
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(model(tokens).logits.float(), logits["fp8_rowwise"])
    assert not torch.equal(logits["fp8_rowwise"], logits["fp8_blockwise"])
    assert _rel(logits["fp8_rowwise"], logits["grouped_mm"]) < 0.08
    with pytest.raises(ValueError, match='experts_implementation="fp8_int4"` is not supported'):
        model.set_experts_implementation("fp8_int4")


def test_recipe_options_and_weights_quantized_once_per_step(monkeypatch):
    """use_fp8_experts' recipe reaches the GEMMs (pow2 scales change the bytes), and with
    cache_weights the two weights of each layer are quantized once per optimizer step."""
    tokens = _batches(1)[0]
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(_tiny_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def logits():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            return model(tokens).logits

    use_fp8_experts(model, "rowwise")
    plain = logits()
    calls = []
    real = fp8_mlp.quantize_weight
    monkeypatch.setattr(fp8_mlp, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    use_fp8_experts(model, Fp8Recipe("rowwise", pow2_scales=True), cache_weights=True)
    assert not torch.equal(logits(), plain)
    assert len(calls) == 4  # 2 layers x (gate_up_proj, down_proj)
    for _ in range(3):  # three gradient-accumulation micro-batches
        with torch.autocast("cpu", torch.bfloat16):
            model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
    assert len(calls) == 4  # the weights have not changed: no micro-batch quantized them again
    opt.step()
    logits()
    assert len(calls) == 8  # the step changed the weights: quantized again


def test_unsupported_experts_are_refused_naming_the_attribute():
    with pytest.raises(ValueError, match="recipe must be an Fp8Recipe or one of"):
        use_fp8_experts(_block("grouped_mm"), "int4")
    with pytest.raises(ValueError, match="Linear holds no transformers experts module"):
        use_fp8_experts(nn.Linear(4, 4), "rowwise")
    for attr, value, match in [
        ("has_bias", True, "has_bias=True"),
        ("is_transposed", True, "is_transposed=True"),
        ("is_concatenated", False, "is_concatenated=False"),
        ("has_gate", False, "has_gate=False"),
        ("_is_expert_parallel", True, "_is_expert_parallel=True"),
        ("act_fn", nn.GELU(), "act_fn is GELU"),
    ]:
        block = _block("grouped_mm")
        setattr(block.experts, attr, value)
        with pytest.raises(ValueError, match=match):
            use_fp8_experts(block, "rowwise")
    block = _block("fp8_rowwise")
    block.experts.has_bias = True  # changed after the switch: refused at the next forward
    with pytest.raises(ValueError, match="has_bias=True"):
        block(torch.randn(1, 4, 256))


def test_experts_of_a_release_without_the_newer_flags_are_taken(monkeypatch):
    """transformers 5.17's experts have no has_post_expert_norm or _is_expert_parallel attribute,
    and a class may lack _apply_gate: the features those name do not exist there, so they are
    off (the check raised AttributeError on 5.17)."""
    block = _block("grouped_mm")
    del block.experts.has_post_expert_norm, block.experts._is_expert_parallel
    if "_apply_gate" in vars(type(block.experts)):
        monkeypatch.delattr(type(block.experts), "_apply_gate")
    assert use_fp8_experts(block, "rowwise") == 1
    out = block(torch.randn(1, 4, 256))
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


def test_benchmark_refuses_without_a_gpu_before_writing(monkeypatch, tmp_path):
    from bench import hf_experts

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "hf_experts.json"
    monkeypatch.setattr("sys.argv", ["hf_experts", "--out", str(out)])
    with pytest.raises(SystemExit, match="bench.hf_experts needs a CUDA GPU .*nothing was run or written"):
        hf_experts.main()
    assert not out.exists()


# ---- GPU: the Triton and CUTLASS kernels at a larger shape --------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_block_matches_grouped_mm(recipe):
    """bf16 parameters, no autocast (transformers' usual bf16 training): against grouped_mm."""
    T, H = 4096, 1024
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
    dims = dict(H=H, F=768, E=16, A=4)
    ref = _block_fwd_bwd(_block("grouped_mm", device="cuda", dtype=torch.bfloat16, **dims), x, dout, autocast=False)
    got = _block_fwd_bwd(_block(f"fp8_{recipe}", device="cuda", dtype=torch.bfloat16, **dims), x, dout, autocast=False)
    for name, g_, r in zip(("out", "dx", "d gate_up_proj", "d down_proj", "d router"), got, ref):
        assert torch.isfinite(g_).all(), name
        assert 1e-2 < _rel(g_, r) < 0.08, (name, _rel(g_, r))
