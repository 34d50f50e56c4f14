"""The FP8 experts' ablation knobs (moe/fp8/recipe.py): each changes what it claims, the defaults
stay the production path, and bad combinations are refused naming the field.

CPU: the kernels' pure-torch references compose the FP8 path (as in test_fp8_grouped_mlp.py).
- fp8.gemms, fp8.intermediate: against an independent fp32 emulation of the same recipe (1%
  relative L2, test_fp8_grouped_mlp.py's tolerance), and by where FP8 error appears: the BF16
  GEMMs' outputs equal the BF16 experts' bit for bit or within BF16 rounding (< 1%, measured
  0.36%), the FP8 ones sit at FP8's error (> 2%, measured 3-6%).
- fp8.fast_accum, fp8.promotion_interval change only what the tensor core rounds, which the CPU
  emulation does not model: here they reach the CUTLASS call and the Triton kernels (which run
  in the interpreter); what they change is checked on a GPU (`-m gpu`).
- fp8.pow2_scales: every scale of the experts and the dense layers is a power of two.
"""

import pytest
import torch

import kernels.grouped_gemm as gg
import moe.fp8.gemm as gemm
import moe.fp8.grouped_mlp as fp8_mlp
from kernels.common import FP8_DTYPE, dequantize
from kernels.reference_act import torch_act_quant_bwd
from kernels.reference_gemm import emulated_grouped_mm, emulated_grouped_mm_wgrad
from moe.config import ModelConfig, MoEConfig
from moe.dispatch import ExpertInput, Fp8Rows
from moe.experts import GroupedMLP, activation_fn
from moe.fp8.float8_linear import Float8Linear
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import PROMOTION_INTERVALS, FP8Config, Fp8Recipe
from moe.fp8.reference import _bf16, _per_expert, _wgrad  # the recipe emulation's building blocks
from moe.fp8.reference import fake_quant_groups_along_tokens, fake_quant_lastdim, fake_quant_weight
from moe.fp8.training import Fp8Training
from moe.model import build_model

COUNTS = [0, 17, 1, 129, 46, 0]  # empty experts, sizes off multiples of 16 and 128
H, F = 256, 128


@pytest.fixture(autouse=True)
def kernels_by_reference_on_cpu(monkeypatch):
    """As in test_fp8_grouped_mlp.py: on a CPU the kernels' references, not the interpreter."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _experts(recipe: Fp8Recipe | None, seed=0):
    """FP8 experts of `recipe` (or BF16 ones) with the same weights for every recipe, and inputs."""
    torch.manual_seed(seed)
    bf16 = GroupedMLP(H, F, len(COUNTS))
    bf16.reset_parameters(0.05)
    x = torch.randn(sum(COUNTS), H).to(torch.bfloat16)
    dy = torch.randn(sum(COUNTS), H).to(torch.bfloat16)
    if recipe is None:
        return bf16, x, dy
    mod = Fp8GroupedMLP(H, F, len(COUNTS), recipe=recipe)
    mod.w1, mod.w2 = bf16.w1, bf16.w2
    return mod, x, dy


def _run(mod, x, dy, counts=COUNTS):
    x = x.clone().requires_grad_()
    mod.zero_grad(set_to_none=True)
    y = mod(ExpertInput(x, torch.tensor(counts, device=x.device)))
    y.backward(dy)
    return y.detach(), x.grad, mod.w1.grad, mod.w2.grad


# ---- an independent emulation of a GEMM subset (moe/fp8/reference.py's pieces) ----------------


def subset_reference(x, w1, w2, dy, recipe: Fp8Recipe, activation="swiglu", counts=COUNTS):
    """(y, dx, dw1, dw2): each GEMM kind fake-quantized by the recipe where recipe.gemms names it,
    else on BF16-rounded operands; h kept as recipe.intermediate says."""
    blk, pow2 = recipe.block, recipe.pow2_scales
    on = {kind: recipe.gemms in ("all", kind) for kind in ("forward", "dgrad", "wgrad")}
    x, dy = x.float(), dy.float()

    def rows(t, kind):
        return fake_quant_lastdim(t, blk, pow2) if on[kind] else _bf16(t)

    def weight(w, along, kind):
        return fake_quant_weight(w, recipe, along) if on[kind] else _bf16(w)

    def groups(t):
        return fake_quant_groups_along_tokens(t, counts, recipe) if on["wgrad"] else _bf16(t)

    h = _bf16(_per_expert(rows(x, "forward"), weight(w1, "K", "forward"), counts))
    y = _bf16(_per_expert(rows(activation_fn(h, activation), "forward"), weight(w2, "K", "forward"), counts))
    h_saved = fake_quant_lastdim(h, blk, pow2) if recipe.intermediate == "fp8" else h
    da = _bf16(_per_expert(rows(dy, "dgrad"), weight(w2, "N", "dgrad").transpose(1, 2), counts))
    h_leaf = h_saved.clone().requires_grad_()
    a_re = activation_fn(h_leaf, activation)
    (dh,) = torch.autograd.grad(a_re, h_leaf, da)
    dx = _bf16(_per_expert(rows(dh, "dgrad"), weight(w1, "N", "dgrad").transpose(1, 2), counts))
    dw2 = _wgrad(groups(dy), groups(a_re.detach()), counts)
    dw1 = _wgrad(groups(dh), groups(x), counts)
    return y, dx, dw1, dw2


# ---- fp8.gemms -----------------------------------------------------------------------------


SUBSETS = [
    ("rowwise", "all", "bf16"), ("blockwise", "all", "bf16"),  # the fused path's BF16-h hook
    ("rowwise", "forward", "fp8"), ("blockwise", "forward", "bf16"),  # moe/fp8/ablation.py
    ("blockwise", "dgrad", "fp8"), ("rowwise", "dgrad", "bf16"),
    ("rowwise", "wgrad", "fp8"), ("blockwise", "wgrad", "bf16"),
]  # (gemms=all with the FP8 intermediate: tests/test_fp8_grouped_mlp.py)


@pytest.mark.parametrize("recipe, gemms, intermediate", SUBSETS)
@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["cpu", "gpu"])
def test_gemm_subset_matches_its_emulation(recipe, gemms, intermediate, on_gpu):
    """On a GPU: the Triton kernels (the activation backward on a BF16 h included), CUTLASS and
    torch._grouped_mm for real."""
    mod, x, dy = _experts(Fp8Recipe(recipe, gemms=gemms, intermediate=intermediate))
    want = subset_reference(x, mod.w1.detach(), mod.w2.detach(), dy, mod.recipe)
    if on_gpu:
        mod, x, dy = mod.cuda(), x.cuda(), dy.cuda()
    got = [t.cpu() for t in _run(mod, x, dy)]
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want):
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) < 1e-2, (name, _rel(g, w))


# With h in BF16, which outputs carry FP8 error: the GEMMs that made them, and what they feed.
FP8_AFFECTED = {"forward": {"y", "dx", "dw1", "dw2"}, "dgrad": {"dx", "dw1"}, "wgrad": {"dw1", "dw2"}}


@pytest.mark.parametrize("gemms", ["forward", "dgrad", "wgrad"])
def test_gemm_subset_puts_fp8_error_where_it_claims(gemms):
    bf16, x, dy = _experts(None)
    want = _run(bf16, x, dy)
    mod, _, _ = _experts(Fp8Recipe("rowwise", gemms=gemms, intermediate="bf16"))
    got = _run(mod, x, dy)
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want):
        err = _rel(g, w)
        if name in FP8_AFFECTED[gemms]:
            assert err > 2e-2, (name, err)  # FP8's error (E4M3: 3 mantissa bits)
        elif name == "y":
            assert torch.equal(g, w), name  # the BF16 experts' own forward
        else:
            assert err < 1e-2, (name, err)  # BF16 GEMMs; fp32 activation math against bf16 autograd's


def test_gemm_subset_takes_tokens_and_refuses_fp8_rows():
    """Tokens and their permutation give what the gathered rows give (gather_rows' autograd sums
    each token's dx rows); FP8 rows from an FP8 dispatch are refused, naming the fix."""
    from moe.permute import gather_rows, plan_permute
    from moe.router import count_tokens_per_expert

    torch.manual_seed(3)
    T, A, E = 40, 2, 4
    mod = Fp8GroupedMLP(H, F, E, recipe=Fp8Recipe("blockwise", gemms="dgrad"))
    mod.reset_parameters(0.05)
    ids_TA = torch.randint(0, E, (T, A))
    meta, counts_E = plan_permute(ids_TA, E), count_tokens_per_expert(ids_TA, E)
    x_TH = torch.randn(T, H).to(torch.bfloat16)
    dy = torch.randn(T * A, H).to(torch.bfloat16)
    grads = []
    for tokens in (True, False):
        x = x_TH.clone().requires_grad_()
        inp = ExpertInput(x, counts_E, perm=meta) if tokens else ExpertInput(gather_rows(x, meta, x.dtype), counts_E)
        mod(inp).backward(dy)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    rows = Fp8Rows(torch.zeros(T * A, H, dtype=FP8_DTYPE), torch.ones(T * A))
    with pytest.raises(ValueError, match="needs BF16 rows at the experts.*parallel.fp8_dispatch=false"):
        mod(ExpertInput(torch.zeros(T * A, H, dtype=torch.bfloat16), counts_E, fp8=rows))


def test_default_recipe_never_runs_the_ablation_path(monkeypatch):
    monkeypatch.setattr(fp8_mlp, "ablation_grouped_mlp", None)  # calling it would raise
    for recipe in ("rowwise", "blockwise"):
        mod, x, dy = _experts(Fp8Training(FP8Config(experts=recipe)).experts_recipe)
        assert mod.recipe == Fp8Recipe(recipe)
        _run(mod, x, dy)


# ---- fp8.intermediate ----------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_bf16_intermediate_feeds_the_activation_backward_the_bf16_h(recipe, monkeypatch):
    """The fused path with fp8.intermediate=bf16 hands act_quant_bwd GEMM1's BF16 output itself,
    with unit scales (the kernel and its reference read h * scale); the default, the FP8 h."""
    seen = {}
    real = fp8_mlp.act_quant_bwd
    monkeypatch.setattr(fp8_mlp, "act_quant_bwd", lambda da, h, h_scale, *a: seen.update(h=h, s=h_scale) or
                        real(da, h, h_scale, *a))  # fmt: skip
    mod, x, dy = _experts(Fp8Recipe(recipe, intermediate="bf16"))
    _run(mod, x, dy)
    ends = torch.tensor(COUNTS).cumsum(0).int()
    x_q, x_s = fp8_mlp.quantize_rows_and_cols_grouped(x, ends, 128, mod.recipe.block)[:2]
    w1q = fp8_mlp.quantize_expert_weight(mod.w1.detach(), mod.recipe)
    h_bf16 = gemm.grouped_mm(x_q, x_s, w1q.q_ENK, w1q.scale, ends, mod.recipe)
    assert seen["h"].dtype == torch.bfloat16 and torch.equal(seen["h"], h_bf16)
    assert torch.equal(seen["s"], torch.ones_like(seen["s"]))
    mod.recipe = Fp8Recipe(recipe)
    _run(mod, x, dy)
    assert seen["h"].dtype == FP8_DTYPE


@pytest.mark.parametrize("block", [0, 128])
def test_activation_backward_kernel_takes_a_bf16_h(block, monkeypatch):
    """The Triton kernel (interpreter) given BF16 h and unit scales computes what its reference
    does from that h, within test_kernels_act_quant.py's contract."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from act_helpers import bwd_inputs, odd_h
    from test_kernels_act_quant import _check_bwd

    import kernels.act_quant_bwd as act_quant_bwd_mod

    da, h_q, _, ends = bwd_inputs("swiglu", 128, block, sizes=[0, 9, 20], seed=7)
    h = odd_h(*h_q.shape, seed=7)
    h[int(ends[-1]):] = float("nan")  # rows past the last group: never read
    ones = torch.ones(h.shape[0], h.shape[1] // block) if block else torch.ones(h.shape[0])
    args = (da, h, ones, "swiglu", ends, 128, block, False)
    out = act_quant_bwd_mod.triton_act_quant_bwd(*args)
    _check_bwd(*args[:5], block, False, out, torch_act_quant_bwd(*args))


# ---- fp8.fast_accum, fp8.promotion_interval --------------------------------------------------


@pytest.mark.parametrize("fast_accum, gemms", [(False, "all"), (True, "all"), (True, "dgrad")])
def test_fast_accum_reaches_every_cutlass_gemm(fast_accum, gemms, monkeypatch):
    """The rowwise forward and dgrad GEMMs (four in the fused path, the two dgrads under
    gemms=dgrad) are the CUTLASS calls, each with use_fast_accum as configured."""
    calls = []

    def scaled_grouped_mm(a_q, b_q_t, a_scale, b_scale, offs, out_dtype, use_fast_accum):
        calls.append(use_fast_accum)
        b = b_q_t.transpose(-2, -1)
        return emulated_grouped_mm(dequantize(a_q, a_scale), dequantize(b, b_scale), offs).to(out_dtype)

    monkeypatch.setattr(gemm, "on_cutlass", lambda a_q: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", scaled_grouped_mm)
    mod, x, dy = _experts(Fp8Recipe("rowwise", fast_accum=fast_accum, gemms=gemms))
    _run(mod, x, dy)
    assert calls == [fast_accum] * (4 if gemms == "all" else 2)


def test_promotion_interval_reaches_every_blockwise_gemm(monkeypatch):
    seen, interval = [], 64
    mm, wgrad = gemm.fp8_grouped_mm, gemm.fp8_grouped_mm_wgrad
    monkeypatch.setattr(gemm, "fp8_grouped_mm", lambda *a: seen.append(("mm", a[-1])) or mm(*a))
    monkeypatch.setattr(gemm, "fp8_grouped_mm_wgrad", lambda *a: seen.append(("wgrad", a[-1])) or wgrad(*a))
    mod, x, dy = _experts(Fp8Recipe("blockwise", promotion_interval=interval))
    _run(mod, x, dy)
    assert sorted(seen) == [("mm", interval)] * 4 + [("wgrad", interval)] * 2


def test_promotion_interval_runs_in_the_kernels(monkeypatch):
    """Both blockwise kernels compile their PROMOTE_K branch (Triton's interpreter, which sums
    exactly: the same result as the default) and refuse an interval they cannot run."""
    from kernels.grouped_gemm_wgrad import launch_grouped_mm_wgrad, triton_fp8_grouped_mm_wgrad

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(0)
    a_q = (torch.randn(40, 256, generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
    b_q = (torch.randn(2, 128, 256, generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
    a_s, b_s = torch.rand(40, 2, generator=gen) + 0.5, torch.rand(2, 1, 2, generator=gen) + 0.5
    ends = torch.tensor([15, 40], dtype=torch.int32)
    config = dict(BLOCK_M=32, SPLIT_N=1, GROUP_M=1, num_warps=4)
    outs = []
    for interval in (32, 128):
        out = torch.full((40, 128), float("nan"))
        gg.launch_grouped_mm(a_q, a_s, b_q, b_s, ends, out, False, config, promotion_interval=interval)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and not outs[0].isnan().any()
    wa, wb = a_q.t().contiguous()[:128], a_q.t().contiguous()[128:]  # (128, 40): tokens along P
    pad = torch.zeros(128, 88, dtype=torch.uint8).view(FP8_DTYPE)
    wa, wb = torch.cat([wa, pad], 1), torch.cat([wb, pad], 1)  # P = 128: one expert's padded group
    ws = torch.rand(128, 1, generator=gen) + 0.5
    pend = torch.tensor([128], dtype=torch.int32)
    wouts = []
    for interval in (64, 128):
        out = torch.full((1, 128, 128), float("nan"))
        launch_grouped_mm_wgrad(wa, ws, wb, ws, pend, out, False, config, promotion_interval=interval)
        wouts.append(out)
    assert torch.equal(wouts[0], wouts[1]) and not wouts[0].isnan().any()
    with pytest.raises(ValueError, match="promotion_interval must be one of"):
        gg.triton_fp8_grouped_mm(a_q, a_s, b_q, b_s, ends, torch.float32, 48)
    with pytest.raises(ValueError, match="promotion_interval must be one of"):
        triton_fp8_grouped_mm_wgrad(wa, ws, wb, ws, pend, torch.float32, 256)


# ---- fp8.pow2_scales -----------------------------------------------------------------------


def _is_pow2(t):
    mantissa, _ = torch.frexp(t.float())
    return bool((mantissa == 0.5).all())


@pytest.mark.parametrize("dense", ["tensorwise", "tensorwise_delayed", "rowwise"])
def test_pow2_scales_reach_the_experts_and_the_dense_layers(dense, monkeypatch):
    """Every scale every FP8 GEMM of two training steps reads (the experts' six, the dense layers'
    three: weights, activations, gradients, delayed scales from the second step on) is a power of
    two with fp8.pow2_scales, and not all are without."""
    import moe.fp8.float8_linear as f8

    scales = []

    def spy(gemm_fn, operand_scales):
        def wrapped(*args):
            scales.extend(operand_scales(*args))
            return gemm_fn(*args)

        return wrapped

    for name in ("grouped_mm", "grouped_mm_wgrad"):  # (a_q, a_scale, b_q, b_scale, ...)
        monkeypatch.setattr(fp8_mlp, name, spy(getattr(fp8_mlp, name), lambda *a: (a[1], a[3])))
    monkeypatch.setattr(f8, "scaled_mm", spy(f8.scaled_mm, lambda a, b, *rest: (a.scale, b.scale)))
    cfg = ModelConfig(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=128))  # fmt: skip
    tokens = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(0))
    for pow2 in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg)
        fp8 = Fp8Training(FP8Config(experts="rowwise", dense=dense, pow2_scales=pow2))
        fp8.convert(model)
        fp8_modules = [m for m in model.modules() if isinstance(m, (Float8Linear, Fp8GroupedMLP))]
        assert all(m.recipe.pow2_scales == pow2 for m in fp8_modules)
        gemms = sum(6 if isinstance(m, Fp8GroupedMLP) else 3 for m in fp8_modules)
        scales.clear()
        for _ in range(2):  # delayed scaling uses its history from the second step on
            out = model(tokens[:, :-1], tokens[:, 1:])
            (out.loss + out.aux_loss).backward()
            fp8.after_backward(model)
            fp8.after_optimizer_step(model)
        assert len(scales) == 2 * 2 * gemms  # two steps, two operands a GEMM
        assert all(_is_pow2(s) for s in scales) == pow2


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(experts="rowwise", gemms="backward"), r"fp8\.gemms must be one of \('all', 'forward', 'dgrad', 'wgrad'\)"),
    (dict(experts="rowwise", intermediate="fp16"), r"fp8\.intermediate must be one of \('fp8', 'bf16'\)"),
    (dict(experts="blockwise", promotion_interval=256), r"fp8\.promotion_interval must be one of \(32, 64, 128\)"),
    (dict(experts="rowwise", promotion_interval=64), r"promotion_interval=64 sets the blockwise.*only 128"),
    (dict(experts="blockwise", fast_accum=True), r"fp8\.fast_accum=true sets the rowwise.*only false"),
    (dict(experts="bf16", gemms="wgrad", fast_accum=True), r"fp8\.gemms=wgrad, fp8\.fast_accum=true: an ablation"),
])  # fmt: skip
def test_bad_knobs_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        FP8Config(**fields).validate()
    if fields["experts"] != "bf16":
        with pytest.raises(ValueError, match=message):
            Fp8Recipe(fields.pop("experts"), **fields)


def test_fast_accum_is_refused_on_a_build_without_it(monkeypatch):
    import moe.fp8.recipe as recipe

    FP8Config(experts="rowwise", fast_accum=True).validate()  # this build has the argument
    monkeypatch.setattr(recipe, "scaled_grouped_mm_takes_fast_accum", lambda: False)
    with pytest.raises(ValueError, match=r"fp8\.fast_accum=true: torch\._scaled_grouped_mm of this torch build"):
        FP8Config(experts="rowwise", fast_accum=True).validate()
    FP8Config(experts="rowwise").validate()  # the default needs nothing from the build


def test_gemm_subset_with_fp8_dispatch_is_refused_by_the_trainer_config():
    from trainer.config import TrainConfig

    cfg = TrainConfig()
    cfg.fp8 = FP8Config(experts="rowwise", gemms="forward")
    cfg.parallel.ep = 2
    with pytest.raises(ValueError, match=r"fp8\.gemms=forward .* parallel\.ep=2 with parallel\.fp8_dispatch=true"):
        cfg.validate()
    cfg.parallel.fp8_dispatch = False
    cfg.validate()


def test_knobs_reach_the_experts_recipe():
    fields = dict(gemms="wgrad", intermediate="bf16", promotion_interval=64)
    fp8 = Fp8Training(FP8Config(experts="blockwise", pow2_scales=True, **fields))
    assert fp8.experts_recipe == Fp8Recipe("blockwise", True, **fields)
    assert Fp8Training(FP8Config(experts="rowwise", fast_accum=True)).experts_recipe.fast_accum
    assert gg.PROMOTION_INTERVALS == PROMOTION_INTERVALS  # the config's choices are the kernels' own


# ---- GPU: what the accumulation knobs change ---------------------------------------------------


def _positive_fp8(*shape, gen, device):
    """|N(0,1)| * 64 in E4M3: all products positive, so a truncating accumulator drifts one way."""
    return (torch.randn(*shape, generator=gen, device=device).abs() * 64).clamp(max=448).to(FP8_DTYPE)


@pytest.mark.gpu
def test_fast_accum_loosens_the_cutlass_sum(device):
    """K = 8192 of positive products: without promotion the tensor core's ~14-bit accumulator
    drifts (DeepSeek-V3: ~2% at K = 4096); with it the error is the bf16 output's rounding."""
    gen = torch.Generator(device=device).manual_seed(0)
    E, M, N, K = 2, 512, 256, 8192
    a_q, b_q = _positive_fp8(M, K, gen=gen, device=device), _positive_fp8(E, N, K, gen=gen, device=device)
    a_s = torch.full((M,), 2.0**-12, device=device)
    b_s = torch.full((E, N), 2.0**-12, device=device)
    ends = torch.tensor([200, M], dtype=torch.int32, device=device)
    exact = emulated_grouped_mm(dequantize(a_q, a_s), dequantize(b_q, b_s), ends)
    slow = gemm.cutlass_grouped_mm(a_q, a_s, b_q, b_s, ends, torch.bfloat16, False)
    fast = gemm.cutlass_grouped_mm(a_q, a_s, b_q, b_s, ends, torch.bfloat16, True)
    assert _rel(fast, exact) > 2 * _rel(slow, exact), (_rel(fast, exact), _rel(slow, exact))


@pytest.mark.gpu
def test_promotion_interval_32_tightens_the_blockwise_sums(device):
    """fp32 outputs, K = 8192 of positive products: promoting every 32 products leaves less to the
    tensor core's accumulator than every 128, in the 2d x 3d GEMM and the weight gradient."""
    from kernels.grouped_gemm_wgrad import fp8_grouped_mm_wgrad

    gen = torch.Generator(device=device).manual_seed(0)
    E, M, N, K = 2, 512, 256, 8192
    a_q, b_q = _positive_fp8(M, K, gen=gen, device=device), _positive_fp8(E, N, K, gen=gen, device=device)
    a_s = torch.full((M, K // 128), 2.0**-12, device=device)
    b_s = torch.full((E, N // 128, K // 128), 2.0**-12, device=device)
    ends = torch.tensor([200, M], dtype=torch.int32, device=device)
    exact = emulated_grouped_mm(dequantize(a_q, a_s), dequantize(b_q, b_s), ends)
    err = {i: _rel(gg.fp8_grouped_mm(a_q, a_s, b_q, b_s, ends, torch.float32, i), exact) for i in (32, 128)}
    assert err[32] < err[128], err
    wa, wb = _positive_fp8(N, K, gen=gen, device=device), _positive_fp8(N, K, gen=gen, device=device)
    ws = torch.full((N, K // 128), 2.0**-12, device=device)
    pend = torch.tensor([K // 2, K], dtype=torch.int32, device=device)
    wexact = emulated_grouped_mm_wgrad(dequantize(wa, ws), dequantize(wb, ws), pend)
    werr = {i: _rel(fp8_grouped_mm_wgrad(wa, ws, wb, ws, pend, torch.float32, i), wexact) for i in (32, 128)}
    assert werr[32] < werr[128], werr
