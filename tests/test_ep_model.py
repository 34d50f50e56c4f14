"""Expert parallelism on CPU over gloo, the whole model: EP against EP=1 on the same global batch
(loss, every gradient, the clipped norm; BF16 experts), and FP8 experts with BF16 rows on the wire
against EP=1 FP8 (and which dispatcher and timer each layer gets).

Every test spawns 2 or 4 processes (tests/ep_helpers.py); every rank computes the EP=1 reference
itself and compares its own shard, so failures name the rank.
"""

import pytest
import torch
import torch.distributed as dist

from ep_helpers import _build, _close, _env, _spawn, _tiny_cfg

pytestmark = pytest.mark.slow


# ---- whole model: EP against EP=1 on the same global batch --------------------------------------


def _model_grads(rank, world, ep):
    from torch.distributed.tensor import DTensor

    from trainer.parallel import apply_expert_parallel, clip_grad_norm_, reduce_gradients

    env = _env(world, ep)
    cfg = _tiny_cfg()
    tokens = torch.randint(0, 97, (world * 2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, 1)

    ref = _build(cfg)
    ref_loss = 0.0
    for r in range(world):  # EP=1: the global batch as `world` micro-batches
        out = ref(tokens[2 * r : 2 * r + 2], labels[2 * r : 2 * r + 2])
        ((out.loss + out.aux_loss) / world).backward()
        ref_loss += out.loss.item() / world
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))

    model = apply_expert_parallel(_build(cfg), env)
    out = model(tokens[2 * rank : 2 * rank + 2], labels[2 * rank : 2 * rank + 2])
    (out.loss + out.aux_loss).backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    _close(loss / world, torch.tensor(ref_loss), "loss")
    reduce_gradients(model, env)
    norm = clip_grad_norm_(model, float("inf"), env)
    _close(norm, ref_norm, "grad norm")

    ref_params = dict(ref.named_parameters())
    L = cfg.moe.num_experts // ep
    ep_rank = env.mesh.get_local_rank("ep")
    n_expert = 0
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        if isinstance(p, DTensor):
            n_expert += 1
            _close(p.grad.to_local(), g_ref[ep_rank * L : (ep_rank + 1) * L], name)
            _close(p.grad.full_tensor(), g_ref, name + " (gathered)")
        else:
            _close(p.grad, g_ref, name)
    assert n_expert == 2 * cfg.n_layers


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 2)])
def test_ep_gradients_match_single_process(world, ep):
    _spawn(_model_grads, world, ep)


def _fp8_bf16_wire(rank, world):
    """FP8 experts, BF16 rows on the wire (parallel.fp8_dispatch=false), against EP=1 FP8."""
    from moe.comm_timer import CommTimer
    from moe.fp8.convert import convert_experts_to_fp8
    from moe.fp8.recipe import Fp8Recipe
    from trainer.parallel import apply_expert_parallel

    env = _env(world, world)
    cfg = _tiny_cfg()
    cfg.dim, cfg.moe.ffn_dim = 128, 128  # FP8 GEMM operand widths
    tokens = torch.randint(0, 97, (world * 2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, 1)

    def fp8_model():
        model = _build(cfg)
        convert_experts_to_fp8(model, "rowwise")
        return model

    ref = fp8_model()
    ref_loss = sum(ref(tokens[2 * r : 2 * r + 2], labels[2 * r : 2 * r + 2]).loss.item() for r in range(world)) / world

    timer = CommTimer(torch.device("cpu"))
    model = apply_expert_parallel(fp8_model(), env, fp8_recipe=None, timer=timer)
    layers = list(model.moe_layers())
    assert all(l.experts.recipe.name == "rowwise" and l.dispatcher.fp8_recipe is None for l in layers)
    assert all(l.dispatcher.timer is timer for l in layers)  # one timer sums the whole model
    out = model(tokens[2 * rank : 2 * rank + 2], labels[2 * rank : 2 * rank + 2])
    (out.loss + out.aux_loss).backward()
    assert timer.spans == 5 * len(layers), timer.spans  # BF16 rows: no scales all-to-all
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    # The tolerance of test_torchrun_ep2_fp8_tracks_single_process_fp8; the receiver quantizes the
    # same rows the EP=1 experts do, so the forward differs by accumulation order at most.
    assert (loss / world).item() == pytest.approx(ref_loss, rel=5e-4), (rank, loss.item() / world, ref_loss)

    print(f"rank {rank}: EP=2 bf16-wire loss {loss.item() / world:.8f}, EP=1 fp8 {ref_loss:.8f}")
    # E4M3 rows on the wire (the trainer's default: parallel.fp8_dispatch=true, the experts' recipe)
    fp8_wire = apply_expert_parallel(fp8_model(), env, fp8_recipe=Fp8Recipe("rowwise"))
    assert all(l.dispatcher.fp8_recipe == l.experts.recipe for l in fp8_wire.moe_layers())
    assert all(l.dispatcher.timer is None for l in fp8_wire.moe_layers())


def test_fp8_experts_with_bf16_dispatch_match_single_process():
    _spawn(_fp8_bf16_wire, 2)
