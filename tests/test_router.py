"""moe.router against megatron-core's routing functions and against hand-worked cases.

Shape letters (README.md): T tokens (B sequences of S, batch-major), E experts, A experts a token
is routed to (top-k), H hidden.
Megatron's router orders tokens sequence-major ([S, B]); the adapters below reorder.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

from moe.config import MoEConfig
from moe.router import Router, RouterOutput

TIGHT = dict(rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- megatron adapter


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        return pytest.importorskip("megatron.core.transformer.moe.moe_utils")


def _call(fn, optional=(), **kwargs):
    """Call a megatron function by keyword; names in `optional` are passed only where the
    installed version has them (0.16.1 here, 0.17+ on Python 3.12 add parameters)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k not in optional or k in params})


def mcore_routing(mcore, logits_TE, cfg: MoEConfig, expert_bias_E=None):
    """Dense (T, E) probs and map from megatron's top-k, for the config's equivalent flags.

    norm_topk_prob for softmax is megatron's default post-softmax (softmax of the top-k logits);
    without it, megatron's pre-softmax. Both versions return dense (T, E) unless asked otherwise.
    """
    grouped = cfg.topk_groups < cfg.num_groups
    return _call(
        mcore.topk_routing_with_score_function, logits=logits_TE, topk=cfg.top_k,
        use_pre_softmax=not cfg.norm_topk_prob, score_function=cfg.score_func,
        num_groups=cfg.num_groups if grouped else None, group_topk=cfg.topk_groups if grouped else None,
        scaling_factor=cfg.routed_scaling_factor, expert_bias=expert_bias_E,
    )


def mcore_losses(mcore, logits_TE, cfg: MoEConfig, seq_len: int) -> dict:
    """aux, seq-aux and z losses as megatron's TopKRouter computes them (single rank)."""
    T, E, A = logits_TE.shape[0], cfg.num_experts, cfg.top_k
    B = T // seq_len
    map_TE, scores_TE = _call(
        mcore.compute_routing_scores_for_aux_loss, logits=logits_TE, topk=A, score_function=cfg.score_func
    )

    def switch(scores, routing_map, num_tokens, coeff):
        return _call(
            mcore.switch_load_balancing_loss_func, probs=scores, tokens_per_expert=routing_map.sum(0),
            total_num_tokens=num_tokens, topk=A, num_experts=E, moe_aux_loss_coeff=coeff,
        )

    # Megatron's seq-aux loss folds the batch into the expert dimension of [S, B*E] tensors.
    def seq_major(t_TE):
        return t_TE.view(B, seq_len, E).transpose(0, 1).reshape(seq_len, B * E)

    return {
        "aux_loss": switch(scores_TE, map_TE, T, cfg.aux_loss_coeff),
        "seq_aux_loss": switch(seq_major(scores_TE), seq_major(map_TE), seq_len, cfg.seq_aux_loss_coeff) / B,
        "z_loss": _call(mcore.z_loss_func, logits=logits_TE, z_loss_coeff=cfg.z_loss_coeff),
    }


def mcore_updated_bias(mcore, monkeypatch, tokens_per_expert_E, expert_bias_E, rate):
    """get_updated_expert_bias on one process: its all-reduce is the identity there."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: None)
    # 0.16.1 always asks parallel_state for the group; 0.17+ takes it as an argument.
    monkeypatch.setattr(mcore.parallel_state, "get_tensor_and_data_parallel_group", lambda **k: None)
    return _call(
        mcore.get_updated_expert_bias, optional=("tp_dp_cp_group",), tp_dp_cp_group=None,
        tokens_per_expert=tokens_per_expert_E.clone().float(), expert_bias=expert_bias_E.clone(),
        expert_bias_update_rate=rate,
    )


# ---------------------------------------------------------------- helpers


def make_router(cfg: MoEConfig, H: int = 32, seed: int = 0) -> Router:
    cfg.validate()
    torch.manual_seed(seed)
    return Router(H, cfg)


def logits_of(router: Router, x_TH: torch.Tensor) -> torch.Tensor:
    """The router's logits, recomputed by the same fp32 GEMM (bitwise equal on the CPU)."""
    return x_TH.float() @ router.weight.float().t()


def dense(out: RouterOutput, E: int):
    """(T, E) weights and map from the (T, A) output; dropped ids (== E) fall in a spare column."""
    T = out.topk_ids_TA.shape[0]
    w_TE = torch.zeros(T, E + 1, dtype=out.topk_weights_TA.dtype).scatter(1, out.topk_ids_TA, out.topk_weights_TA)
    map_TE = torch.zeros(T, E + 1, dtype=torch.bool).scatter(1, out.topk_ids_TA, True)
    return w_TE[:, :E], map_TE[:, :E]


def router_from_logits(logits_TE: torch.Tensor, cfg: MoEConfig) -> tuple[Router, torch.Tensor]:
    """A router and an x_TH whose logits are exactly `logits_TE` (x = identity, weight = logits.T)."""
    T, E = logits_TE.shape
    router = make_router(cfg, H=T)
    with torch.no_grad():
        router.weight.copy_(logits_TE.t())
    return router, torch.eye(T)


MEGATRON_CASES = {
    "softmax_post": dict(score_func="softmax", norm_topk_prob=True),
    "softmax_pre": dict(score_func="softmax", norm_topk_prob=False),
    "softmax_pre_groups": dict(score_func="softmax", norm_topk_prob=False, num_groups=4, topk_groups=2),
    "sigmoid_scaled": dict(score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5),
    "sigmoid_bias_groups": dict(
        score_func="sigmoid", norm_topk_prob=True, num_groups=4, topk_groups=2, expert_bias=True,
        routed_scaling_factor=2.5,
    ),
}


# ---------------------------------------------------------------- against megatron


@pytest.mark.parametrize("case", MEGATRON_CASES)
def test_routing_matches_megatron(mcore, case):
    cfg = MoEConfig(num_experts=16, top_k=4, **MEGATRON_CASES[case])
    router = make_router(cfg)
    if cfg.expert_bias:
        router.expert_bias.copy_(torch.randn(16) * 0.1)
    x_TH = torch.randn(64, 32)
    out = router(x_TH, seq_len=16)
    got_w_TE, got_map_TE = dense(out, 16)

    weight_ref = router.weight.detach().clone().requires_grad_()
    ref_w_TE, ref_map_TE = mcore_routing(
        mcore, x_TH @ weight_ref.t(), cfg, router.expert_bias if cfg.expert_bias else None
    )
    assert torch.equal(got_map_TE, ref_map_TE)
    torch.testing.assert_close(got_w_TE, ref_w_TE, **TIGHT)
    assert out.topk_weights_TA.dtype == torch.float32 and out.topk_ids_TA.dtype == torch.int64
    assert out.tokens_per_expert_E.tolist() == ref_map_TE.sum(0).tolist()
    assert out.aux_losses == {}

    # The router learns through the weights: same gradient w.r.t. the gate weight.
    r_TE = torch.randn(64, 16)
    (got_g,) = torch.autograd.grad((got_w_TE * r_TE).sum(), router.weight)
    (ref_g,) = torch.autograd.grad((ref_w_TE * r_TE).sum(), weight_ref)
    torch.testing.assert_close(got_g, ref_g, **TIGHT)


def test_softmax_post_with_groups_selects_by_probabilities(mcore):
    # Megatron's post-softmax path ranks groups by logits; we rank them by probabilities, which
    # is megatron's pre-softmax selection, then renormalise the selected probabilities.
    cfg = MoEConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2, norm_topk_prob=True)
    router = make_router(cfg)
    x_TH = torch.randn(64, 32)
    got_w_TE, got_map_TE = dense(router(x_TH, seq_len=64), 16)
    pre_cfg = MoEConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2, norm_topk_prob=False)
    ref_p_TE, ref_map_TE = mcore_routing(mcore, logits_of(router, x_TH), pre_cfg)
    assert torch.equal(got_map_TE, ref_map_TE)
    torch.testing.assert_close(got_w_TE, ref_p_TE / ref_p_TE.sum(-1, keepdim=True), **TIGHT)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_losses_match_megatron(mcore, score_func):
    cfg = MoEConfig(
        num_experts=8, top_k=2, score_func=score_func, aux_loss_coeff=1e-2, seq_aux_loss_coeff=3e-3,
        z_loss_coeff=1e-3, num_groups=2, topk_groups=1, expert_bias=True,  # neither changes the losses
    )
    router = make_router(cfg)
    router.expert_bias.copy_(torch.randn(8))
    x_TH = torch.randn(4 * 24, 32)  # B = 4 sequences of S = 24
    out = router(x_TH, seq_len=24)
    assert set(out.aux_losses) == {"aux_loss", "seq_aux_loss", "z_loss"}

    weight_ref = router.weight.detach().clone().requires_grad_()
    ref = mcore_losses(mcore, x_TH @ weight_ref.t(), cfg, seq_len=24)
    for name, loss in out.aux_losses.items():
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss, ref[name], **TIGHT, msg=name)
        (got_g,) = torch.autograd.grad(loss, router.weight, retain_graph=True)
        (ref_g,) = torch.autograd.grad(ref[name], weight_ref, retain_graph=True)
        torch.testing.assert_close(got_g, ref_g, **TIGHT, msg=name)


def test_only_enabled_losses_are_returned():
    router = make_router(MoEConfig(z_loss_coeff=1e-3))
    assert set(router(torch.randn(8, 32), seq_len=4).aux_losses) == {"z_loss"}


def test_capacity_dropping_matches_megatron(mcore):
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    router = make_router(cfg)
    x_TH = torch.randn(96, 32) + torch.randn(32) * 2  # a shared offset makes the load uneven
    out = router(x_TH, seq_len=96)
    got_w_TE, got_map_TE = dense(out, 8)
    dropless_p_TE, dropless_map_TE = mcore_routing(mcore, logits_of(router, x_TH), cfg)
    ref_p_TE, ref_map_TE = _call(
        mcore.apply_router_token_dropping, routing_probs=dropless_p_TE, routing_map=dropless_map_TE,
        router_topk=2, capacity_factor=1.0, drop_policy="probs",
    )
    capacity = math.ceil(96 * 2 / 8)
    assert (dropless_map_TE.sum(0) > capacity).any(), "the case must drop something"
    assert torch.equal(got_map_TE, ref_map_TE)
    torch.testing.assert_close(got_w_TE, ref_p_TE, **TIGHT)


def test_expert_bias_update_matches_megatron(mcore, monkeypatch):
    cfg = MoEConfig(num_experts=8, top_k=2, score_func="sigmoid", expert_bias=True, expert_bias_update_rate=1e-2)
    router = make_router(cfg)
    router.train()
    x_TH = torch.randn(64, 32) + torch.randn(32)
    total_E = torch.zeros(8, dtype=torch.int64)
    for _ in range(3):
        total_E += router(x_TH, seq_len=16).tokens_per_expert_E
    with torch.no_grad():
        router(x_TH, seq_len=16)  # no_grad passes (eval, recomputation) do not count
    router.eval()
    router(x_TH, seq_len=16)
    assert torch.equal(router.load_since_update, total_E)
    bias_before = router.expert_bias.clone()
    router.update_expert_bias()
    ref = mcore_updated_bias(mcore, monkeypatch, total_E, bias_before, 1e-2)
    torch.testing.assert_close(router.expert_bias, ref, rtol=0, atol=0)
    assert router.expert_bias.dtype == torch.float32
    assert not router.expert_bias.eq(bias_before).all()
    assert torch.all(router.load_since_update == 0)


# ---------------------------------------------------------------- hand-worked cases

# Rows of raw weights summing to 10: softmax(log w) = w / 10 and logsumexp = log 10 for each.
HAND_LOGITS = torch.tensor([[1.0, 2, 3, 4], [4, 3, 2, 1], [1, 6, 2, 1], [5, 1, 3, 1]]).log()


def test_hand_softmax_top2_and_losses():
    cfg = MoEConfig(num_experts=4, top_k=2, aux_loss_coeff=0.01, seq_aux_loss_coeff=0.1, z_loss_coeff=1.0)
    router, x_TH = router_from_logits(HAND_LOGITS, cfg)
    out = router(x_TH, seq_len=2)
    assert out.topk_ids_TA.tolist() == [[3, 2], [0, 1], [1, 2], [0, 2]]
    expected_w = torch.tensor([[4 / 7, 3 / 7], [4 / 7, 3 / 7], [6 / 8, 2 / 8], [5 / 8, 3 / 8]])
    torch.testing.assert_close(out.topk_weights_TA, expected_w)
    assert out.tokens_per_expert_E.tolist() == [2, 2, 3, 1]
    # Batch: counts (2, 2, 3, 1), summed probs (1.1, 1.2, 1.0, 0.7): E / (A T^2) * 8.3 = 1.0375.
    torch.testing.assert_close(out.aux_losses["aux_loss"], torch.tensor(0.01 * 1.0375))
    # Sequence 0 (t0, t1) is balanced: 1.0; sequence 1: counts (1, 1, 2, 0), probs (.6, .7, .5, .2)
    # gives 4 / (2 * 4) * 2.3 = 1.15; mean 1.075.
    torch.testing.assert_close(out.aux_losses["seq_aux_loss"], torch.tensor(0.1 * 1.075))
    torch.testing.assert_close(out.aux_losses["z_loss"], torch.tensor(math.log(10) ** 2))


def test_hand_softmax_unnormalised():
    cfg = MoEConfig(num_experts=4, top_k=2, norm_topk_prob=False, routed_scaling_factor=2.0)
    router, x_TH = router_from_logits(HAND_LOGITS, cfg)
    out = router(x_TH, seq_len=4)
    torch.testing.assert_close(out.topk_weights_TA, 2.0 * torch.tensor([[0.4, 0.3], [0.4, 0.3], [0.6, 0.2], [0.5, 0.3]]))


def test_hand_capacity_drops_the_lowest_weight():
    # capacity = ceil(4 * 2 / 4 * 1.0) = 2; expert 2 is picked by t0 (3/7), t2 (2/8) and t3 (3/8):
    # megatron's default policy drops the lowest weight, t2's (position order would drop t3's).
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0)
    router, x_TH = router_from_logits(HAND_LOGITS, cfg)
    out = router(x_TH, seq_len=4)
    assert out.topk_ids_TA.tolist() == [[3, 2], [0, 1], [1, 4], [0, 2]]
    torch.testing.assert_close(out.topk_weights_TA[2], torch.tensor([0.75, 0.0]))
    assert out.topk_weights_TA[2, 1] == 0
    assert out.tokens_per_expert_E.tolist() == [2, 2, 2, 1]


# Sigmoid of these logits: (.8, .5, .2, .75) and (.8, .2, .75, .5).
SIG_LOGITS = torch.tensor([[math.log(4), 0.0, -math.log(4), math.log(3)], [math.log(4), -math.log(4), math.log(3), 0.0]])


def test_hand_sigmoid_bias_selects_but_does_not_weight():
    cfg = MoEConfig(num_experts=4, top_k=2, score_func="sigmoid", expert_bias=True, routed_scaling_factor=2.5)
    router, x_TH = router_from_logits(SIG_LOGITS, cfg)
    out = router(x_TH, seq_len=2)
    torch.testing.assert_close(out.topk_weights_TA[0], 2.5 * torch.tensor([0.8 / 1.55, 0.75 / 1.55]))
    router.expert_bias.copy_(torch.tensor([0.0, 0.4, 0.0, 0.0]))  # expert 1 now scores .9 for t0
    out = router(x_TH, seq_len=2)
    assert out.topk_ids_TA[0].tolist() == [1, 0]
    torch.testing.assert_close(out.topk_weights_TA[0], 2.5 * torch.tensor([0.5 / 1.3, 0.8 / 1.3]))


def test_hand_group_limited_topk():
    # Groups {0, 1} and {2, 3}, one group kept, scored by the sum of its top A // 1 = 2 scores:
    # t1 has the best expert (0: .8) in group 0 (1.0), but group 1 scores 1.25.
    cfg = MoEConfig(num_experts=4, top_k=2, score_func="sigmoid", num_groups=2, topk_groups=1)
    router, x_TH = router_from_logits(SIG_LOGITS, cfg)
    out = router(x_TH, seq_len=2)
    assert out.topk_ids_TA[1].tolist() == [2, 3]
    torch.testing.assert_close(out.topk_weights_TA[1], torch.tensor([0.75 / 1.25, 0.5 / 1.25]))
    assert out.topk_ids_TA[0].tolist() == [0, 1]  # t0: group 0 = 1.3 beats group 1 = 0.95


def test_hand_expert_bias_update():
    cfg = MoEConfig(num_experts=4, top_k=1, expert_bias=True, expert_bias_update_rate=0.1)
    router = make_router(cfg)
    router.load_since_update.copy_(torch.tensor([5, 1, 3, 3]))  # mean 3
    router.update_expert_bias()
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert router.load_since_update.tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------- capacity, buffers, errors


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_capacity_is_respected(capacity_factor, score_func):
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=capacity_factor, score_func=score_func)
    router = make_router(cfg)
    x_TH = torch.randn(80, 32) + torch.randn(32) * 2
    out = router(x_TH, seq_len=40)
    capacity = math.ceil(80 * 2 / 8 * capacity_factor)
    dropped_TA = out.topk_ids_TA == 8
    assert dropped_TA.any()
    assert (out.tokens_per_expert_E <= capacity).all()
    assert out.tokens_per_expert_E.sum() == (~dropped_TA).sum()
    assert torch.all(out.topk_weights_TA[dropped_TA] == 0)
    # Kept assignments are the dropless ones, unchanged.
    dropless = make_router(MoEConfig(num_experts=8, top_k=2, score_func=score_func))
    dropless.load_state_dict(router.state_dict())
    ref = dropless(x_TH, seq_len=40)
    assert torch.equal(out.topk_ids_TA[~dropped_TA], ref.topk_ids_TA[~dropped_TA])
    torch.testing.assert_close(out.topk_weights_TA[~dropped_TA], ref.topk_weights_TA[~dropped_TA])


def test_dropless_default_and_large_capacity_drop_nothing():
    for capacity_factor in (None, 4.0):
        router = make_router(MoEConfig(num_experts=8, top_k=2, capacity_factor=capacity_factor))
        out = router(torch.randn(50, 32) + torch.randn(32) * 3, seq_len=25)
        assert (out.topk_ids_TA < 8).all()
        assert out.tokens_per_expert_E.sum() == 100


def test_buffers_and_state_dict():
    plain = make_router(MoEConfig())
    assert set(plain.state_dict()) == {"weight"}
    plain.update_expert_bias()  # a no-op without expert_bias
    biased = make_router(MoEConfig(expert_bias=True))
    assert set(biased.state_dict()) == {"weight", "expert_bias"}  # the load is not checkpointed
    biased.to(torch.bfloat16)  # a blanket cast; the update restores a fp32 bias
    biased.load_since_update.fill_(1)
    biased.update_expert_bias()
    assert biased.expert_bias.dtype == torch.float32
    out = biased(torch.randn(4, 32, dtype=torch.bfloat16), seq_len=4)
    assert out.topk_weights_TA.dtype == torch.float32
    biased.expert_bias.fill_(3.0)
    biased.reset_parameters(init_std=0.02)
    assert torch.all(biased.expert_bias == 0)
    assert abs(float(biased.weight.detach().float().std()) - 0.02) < 0.01


@pytest.mark.parametrize("seq_len", [0, 5, 7])
def test_seq_len_must_divide_tokens(seq_len):
    router = make_router(MoEConfig())
    with pytest.raises(ValueError, match="seq_len"):
        router(torch.randn(12, 32), seq_len=seq_len)


def test_gate_gradient_and_fp32_logits_for_bf16_input():
    router = make_router(MoEConfig(num_experts=8, top_k=2, z_loss_coeff=1.0))
    x_bf16 = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    loss = router(x_bf16, seq_len=8).aux_losses["z_loss"]
    gx, gw = torch.autograd.grad(loss, (x_bf16, router.weight))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    x32 = x_bf16.detach().float().requires_grad_()
    ref = torch.logsumexp(x32 @ router.weight.t(), -1).square().mean()
    torch.testing.assert_close(loss, ref, **TIGHT)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x32, router.weight))
    torch.testing.assert_close(gw, ref_gw, **TIGHT)
    torch.testing.assert_close(gx, ref_gx.bfloat16())


# ---------------------------------------------------------------- GPU copies (bf16 on CUDA)

GPU_CASES = {
    "softmax_aux": dict(score_func="softmax", aux_loss_coeff=1e-2, seq_aux_loss_coeff=1e-3, z_loss_coeff=1e-3),
    "sigmoid_bias_groups": dict(
        score_func="sigmoid", num_groups=4, topk_groups=2, expert_bias=True, routed_scaling_factor=2.5,
        aux_loss_coeff=1e-2,
    ),
    "capacity": dict(score_func="softmax", capacity_factor=1.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_matches_cpu_fp32(device, dtype, case):
    cfg = MoEConfig(num_experts=16, top_k=4, **GPU_CASES[case])
    ref_router = make_router(cfg, H=64)
    if cfg.expert_bias:
        ref_router.expert_bias.copy_(torch.randn(16) * 0.05)
    x_TH = (torch.randn(256, 64) + torch.randn(64)).to(dtype)
    ref = ref_router(x_TH.float(), seq_len=64)
    router = make_router(cfg, H=64).to(device)
    router.load_state_dict(ref_router.state_dict())
    out = router(x_TH.to(device), seq_len=64)
    got_w, got_map = dense(RouterOutput(out.topk_ids_TA.cpu(), out.topk_weights_TA.cpu(), None, {}), 16)
    ref_w, ref_map = dense(ref, 16)
    assert out.topk_weights_TA.dtype == torch.float32
    assert torch.equal(got_map, ref_map)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.tokens_per_expert_E.cpu(), ref.tokens_per_expert_E)
    assert set(out.aux_losses) == set(ref.aux_losses)
    for name in ref.aux_losses:
        torch.testing.assert_close(out.aux_losses[name].cpu(), ref.aux_losses[name], rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_dropless_forward_backward_has_no_host_sync(device, dtype):
    cfg = MoEConfig(
        num_experts=16, top_k=4, score_func="sigmoid", num_groups=4, topk_groups=2, expert_bias=True,
        aux_loss_coeff=1e-2, seq_aux_loss_coeff=1e-3, z_loss_coeff=1e-3,
    )
    router = make_router(cfg, H=64).to(device).train()
    x_TH = torch.randn(256, 64, device=device, dtype=dtype, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = router(x_TH, seq_len=64)
        loss = (out.topk_weights_TA * 1.5).sum() + sum(out.aux_losses.values())
        loss.backward()
        router.update_expert_bias()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x_TH.grad is not None and router.weight.grad is not None
