"""Expert parallelism on CPU over gloo: the all-to-all dispatcher and its timing, gradients against
EP=1, FP8 (or BF16) on the wire, configuration errors, and torchrun end to end.

Multi-process tests spawn 2 or 4 processes (torch.multiprocessing, gloo); every rank computes
the EP=1 reference itself (tiny sizes) and compares its own shard, so failures name the rank.
"""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.config import ModelConfig, MoEConfig
from trainer.config import ParallelConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ["TRITON_INTERPRET"] = "0"  # FP8 kernels by their pure-torch references on CPU
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # leave together: gloo aborts a process whose peer tears down first
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, *args):
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, start_method="spawn")


def _env(world, ep):
    from torch.distributed.device_mesh import init_device_mesh

    from trainer.parallel import DistEnv

    mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return DistEnv(dist.get_rank(), world, 0, torch.device("cpu"), ep, mesh)


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"rank {dist.get_rank()} {what}: {m}")


# ---- dispatcher round trip ---------------------------------------------------------------------

E, H = 4, 8
# Rows each rank sends per expert (rank 1 sends nothing, expert 1 gets nothing anywhere) and dropped rows.
COUNTS = {0: ([3, 0, 2, 4], 1), 1: ([0, 0, 0, 0], 2)}


def _round_trip(rank, world):
    from moe.dispatch import AllToAllDispatcher

    env = _env(world, world)
    counts, dropped = COUNTS[rank]
    M = sum(counts) + dropped
    expert_M = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    x = torch.randn(M, H, generator=torch.Generator().manual_seed(rank))
    x[: len(expert_M), 0] = expert_M.float()  # tag each row with its expert
    x.requires_grad_()
    disp = AllToAllDispatcher(env.ep_group, E)
    x_local, tpe_local, meta = disp.dispatch(x, torch.tensor(counts))

    L = E // world
    all_counts = torch.tensor([COUNTS[r][0] for r in range(world)])
    assert tpe_local.tolist() == all_counts[:, rank * L : (rank + 1) * L].sum(0).tolist()
    local_expert = torch.repeat_interleave(torch.arange(L), tpe_local)
    assert x_local[:, 0].tolist() == (local_expert + rank * L).float().tolist()  # grouped by expert

    y_local = x_local * (local_expert + rank * L + 1).float()[:, None]  # expert e multiplies by e + 1
    y = disp.combine(y_local, meta)
    assert y.shape == (M, H)
    kept = len(expert_M)
    _close(y[:kept], x[:kept].detach() * (expert_M + 1).float()[:, None], "combine")
    assert (y[kept:] == 0).all()
    w = torch.randn(M, H, generator=torch.Generator().manual_seed(10 + rank))
    (y * w).sum().backward()
    _close(x.grad[:kept], w[:kept] * (expert_M + 1).float()[:, None], "dx")


def test_dispatch_combine_round_trip_with_zero_token_ranks():
    _spawn(_round_trip, 2)


# ---- FP8 on the wire -----------------------------------------------------------------------------

F8_COUNTS = {0: [5, 0, 17, 3], 1: [0, 9, 2, 0]}


def _fp8_dispatch(rank, world, recipe_name):
    from kernels.quantize import quantize_rows
    from moe.dispatch import AllToAllDispatcher
    from moe.fp8.grouped_mlp import Fp8GroupedMLP
    from moe.fp8.recipe import Fp8Recipe
    from moe.fp8.reference import fp64_grouped_mlp

    env = _env(world, world)
    recipe = Fp8Recipe(recipe_name)
    Hd, Fd, L = 128, 128, E // world
    torch.manual_seed(0)
    full = Fp8GroupedMLP(Hd, Fd, E, "swiglu", recipe=recipe)
    full.reset_parameters(0.05)
    xs = {r: torch.randn(sum(c), Hd).bfloat16() for r, c in F8_COUNTS.items()}
    dys = {r: torch.randn(sum(c), Hd).bfloat16() for r, c in F8_COUNTS.items()}

    # Reference: every rank's rows of expert e together (source-rank order), as EP groups them.
    def chunks(r):
        return torch.split(torch.arange(sum(F8_COUNTS[r])), F8_COUNTS[r])

    order = torch.cat([chunks(r)[e] + (0 if r == 0 else sum(F8_COUNTS[0])) for e in range(E) for r in range(world)])
    x_all = torch.cat([xs[0], xs[1]])[order].requires_grad_()
    dy_all = torch.cat([dys[0], dys[1]])[order]
    counts_all = torch.tensor(F8_COUNTS[0]) + torch.tensor(F8_COUNTS[1])
    y_ref = full(x_all, counts_all)
    y_ref.backward(dy_all)
    lo = 0 if rank == 0 else sum(F8_COUNTS[0])
    mine_idx = (order >= lo) & (order < lo + sum(F8_COUNTS[rank]))
    back = torch.argsort(order[mine_idx])  # reference rows of this rank, in this rank's order

    local = Fp8GroupedMLP(Hd, Fd, L, "swiglu", recipe=recipe)
    with torch.no_grad():
        local.w1.copy_(full.w1[rank * L : (rank + 1) * L])
        local.w2.copy_(full.w2[rank * L : (rank + 1) * L])
    disp = AllToAllDispatcher(env.ep_group, E, recipe)
    x = xs[rank].clone().requires_grad_()
    x_local, tpe, meta = disp.dispatch(x, torch.tensor(F8_COUNTS[rank]))
    assert meta.x_fp8 is not None and meta.x_fp8.q_MH.dtype == torch.float8_e4m3fn
    # The wire carried the sender's own quantization: requantizing the received rows reproduces it.
    q_again, s_again = quantize_rows(x_local, recipe.block)
    assert torch.equal(q_again.view(torch.uint8), meta.x_fp8.q_MH.view(torch.uint8))
    y = disp.combine(local(x_local, tpe, x_fp8=meta.x_fp8), meta)
    y.backward(dys[rank])

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    # GEMM1 reads the same bytes as the non-EP path: output, dx and dw2 agree to accumulation order.
    assert rel(y, y_ref[mine_idx][back]) < 1e-2, rel(y, y_ref[mine_idx][back])
    assert rel(x.grad, x_all.grad[mine_idx][back]) < 1e-2
    assert rel(local.w2.grad, full.w2.grad[rank * L : (rank + 1) * L]) < 1e-2
    # wgrad1's column copy comes from the dequantized rows (the bf16 rows stayed on the sender):
    # one more E4M3 rounding, so dw1 is compared loosely to the non-EP path and to fp64.
    dw1_ref = full.w1.grad[rank * L : (rank + 1) * L]
    err_vs_fp8 = rel(local.w1.grad, dw1_ref)
    assert err_vs_fp8 < 0.06, err_vs_fp8
    on_rank = torch.repeat_interleave(torch.arange(E), counts_all) // L == rank  # rows of my experts
    _, _, dw1_64, _ = fp64_grouped_mlp(
        x_all.detach()[on_rank], full.w1.detach()[rank * L : (rank + 1) * L],
        full.w2.detach()[rank * L : (rank + 1) * L], tpe.tolist(), dy_all[on_rank], "swiglu",
    )
    err_vs_fp64 = rel(local.w1.grad, dw1_64)
    assert err_vs_fp64 < 0.08, err_vs_fp64
    print(f"rank {rank} {recipe_name}: dw1 vs non-EP fp8 {err_vs_fp8:.4f}, vs fp64 {err_vs_fp64:.4f} "
          f"(non-EP vs fp64 {rel(dw1_ref, dw1_64):.4f})")


@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_fp8_dispatch_sends_fp8_and_matches_non_ep(recipe):
    _spawn(_fp8_dispatch, 2, recipe)


# ---- all-to-all timing and the wire dtype ------------------------------------------------------


def _timed_dispatch(rank, world):
    from moe.comm_timer import CommTimer
    from moe.dispatch import AllToAllDispatcher
    from moe.fp8.recipe import Fp8Recipe

    env = _env(world, world)
    Hd, dropped = 128, 2
    counts = torch.tensor(F8_COUNTS[rank])
    x0 = torch.randn(int(counts.sum()) + dropped, Hd, generator=torch.Generator().manual_seed(rank))
    dy = torch.randn(x0.shape, generator=torch.Generator().manual_seed(10 + rank))

    def step(disp):  # identity experts: dispatch, combine, backward
        x = x0.clone().requires_grad_()
        x_local, tpe, meta = disp.dispatch(x, counts)
        y = disp.combine(x_local * 2, meta)
        spans_fwd = disp.timer.spans if disp.timer is not None else None
        y.backward(dy)
        return y.detach(), x.grad, spans_fwd

    # Forward: counts + rows (+ scales for FP8) + combine; backward: combine's and dispatch's reverse.
    for recipe, fwd_spans in ((None, 3), (Fp8Recipe("rowwise"), 4)):
        timer = CommTimer(torch.device("cpu"))
        y_ref, dx_ref, _ = step(AllToAllDispatcher(env.ep_group, E, recipe))
        y, dx, spans_fwd = step(AllToAllDispatcher(env.ep_group, E, recipe, timer))
        assert (spans_fwd, timer.spans) == (fwd_spans, fwd_spans + 2), (recipe, spans_fwd, timer.spans)
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref), f"rank {rank}: the timer changed results"
        assert timer.drain_ms() > 0 and timer.spans == 0

    # Under autocast the permuted rows are fp32; they travel in bf16 (the experts' dtype), and the
    # gradient comes back to fp32.
    disp = AllToAllDispatcher(env.ep_group, E)
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_local, _, meta = disp.dispatch(x, counts)
        assert x_local.dtype == torch.bfloat16
        y = disp.combine(x_local * 2, meta)
    y.float().backward(dy)
    assert x.grad.dtype == torch.float32
    kept = int(counts.sum())
    assert torch.equal(y[:kept], (x0[:kept].bfloat16() * 2))


def test_dispatcher_timer_counts_every_all_to_all_and_changes_nothing():
    _spawn(_timed_dispatch, 2)


# ---- whole model: EP against EP=1 on the same global batch --------------------------------------


def _tiny_cfg():
    moe = MoEConfig(num_experts=4, top_k=2, ffn_dim=32, aux_loss_coeff=0.01)
    return ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, moe=moe)


def _build(cfg):
    from moe.model import build_model

    torch.manual_seed(0)
    return build_model(cfg)


def _model_grads(rank, world, ep):
    from torch.distributed.tensor import DTensor

    from trainer.parallel import apply_expert_parallel, clip_grad_norm_ep, reduce_gradients

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
    norm = clip_grad_norm_ep(model, float("inf"), env)
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
    model = apply_expert_parallel(fp8_model(), env, fp8_dispatch=False, timer=timer)
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
    fp8_wire = apply_expert_parallel(fp8_model(), env)  # the default: E4M3 rows on the wire
    assert all(l.dispatcher.fp8_recipe is l.experts.recipe for l in fp8_wire.moe_layers())
    assert all(l.dispatcher.timer is None for l in fp8_wire.moe_layers())


def test_fp8_experts_with_bf16_dispatch_match_single_process():
    _spawn(_fp8_bf16_wire, 2)


# ---- checkpoint under EP -------------------------------------------------------------------------


def _checkpoint(rank, world, path):
    from torch.distributed.tensor import DTensor

    from trainer.checkpoint import CheckpointConfig, CheckpointManager
    from trainer.optim import build_optimizer
    from trainer.config import OptimConfig
    from trainer.parallel import apply_expert_parallel, reduce_gradients

    env = _env(world, world)
    cfg = _tiny_cfg()
    model = apply_expert_parallel(_build(cfg), env)
    opt = build_optimizer(model, OptimConfig())
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(rank))
    model(tokens, tokens).loss.backward()
    reduce_gradients(model, env)  # replicated parameters stay equal on every rank
    opt.step()
    mgr = CheckpointManager(CheckpointConfig(dir=path), path, rank, world)
    mgr.save(1, {"model": model, "optim": opt, "meta": {"step": 1}})

    torch.manual_seed(123)
    fresh = apply_expert_parallel(_build(cfg), env)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_opt = build_optimizer(fresh, OptimConfig())
    meta = {"step": 0}
    mgr.load({"model": fresh, "optim": fresh_opt, "meta": meta})
    assert meta["step"] == 1
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        if isinstance(a, DTensor):
            a, b = a.to_local(), b.to_local()  # this rank's own experts came back
        assert torch.equal(a, b), name
    st_a, st_b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for k in st_a:
        a, b = st_a[k]["exp_avg"], st_b[k]["exp_avg"]
        if isinstance(a, DTensor):
            a, b = a.to_local(), b.to_local()
        assert torch.equal(a, b), k


def test_checkpoint_saves_and_loads_expert_shards():
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_checkpoint, 2, tmp)


# ---- configuration errors ------------------------------------------------------------------------


def test_ep_not_dividing_world_size_or_experts_is_a_clear_error():
    from trainer.config import TrainConfig
    from trainer.parallel import check_expert_parallel

    with pytest.raises(ValueError, match="parallel.ep=3 must divide the world size 4"):
        check_expert_parallel(ParallelConfig(ep=3), world_size=4)
    with pytest.raises(ValueError, match="parallel.ep=2 must divide model.moe.num_experts=3"):
        check_expert_parallel(ParallelConfig(ep=2), world_size=2, num_experts=3)
    cfg = TrainConfig()
    cfg.model.moe.num_experts, cfg.model.moe.top_k, cfg.parallel.ep = 6, 2, 4
    with pytest.raises(ValueError, match="parallel.ep=4 must divide model.moe.num_experts=6"):
        cfg.validate()


# ---- torchrun end to end -------------------------------------------------------------------------

TINY = [
    "model.dim=64", "model.n_layers=2", "model.moe.ffn_dim=64", "run.seq_len=64",
    "run.micro_batch_size=2", "run.eval_interval=0", "logging.wandb=disabled", "logging.interval=1",
    "run.dtype=float32",
]


def _train(env, out, *overrides, torchrun=0, check=True):
    cmd = [sys.executable, "train.py"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "train.py"]
    cmd += [*TINY, f"run.output_root={out}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _records(run_dir):
    import json

    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _records(run_dir)}


@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
    e = dict(os.environ, FP8MOE_CACHE=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1",
             PYTHONUNBUFFERED="1")
    e.pop("FP8MOE_RUN_ID", None)
    return e


def test_torchrun_ep2_matches_single_process_and_resumes(train_env, tmp_path):
    _train(train_env, tmp_path, "run.name=single", "run.grad_accum=2", "run.steps=4")
    proc = _train(train_env, tmp_path, "run.name=ep", "run.steps=4", "checkpoint.interval=2", "parallel.ep=2",
                  torchrun=2)
    single, ep = _losses(tmp_path / "single"), _losses(tmp_path / "ep")
    assert sorted(single) == sorted(ep) == [1, 2, 3, 4]
    for step in single:
        assert ep[step] == pytest.approx(single[step], rel=1e-5), (step, single, ep)
    # All-to-all time per step and its share of the step: EP only, every window (the first too).
    for r in _records(tmp_path / "single"):
        assert r["a2a_ms"] is None and r["a2a_share"] is None, r
    for r in _records(tmp_path / "ep"):
        assert r["a2a_ms"] > 0 and 0 < r["a2a_share"] < 1, r
    assert " | a2a " in proc.stdout + proc.stderr
    assert (tmp_path / "ep" / "checkpoints" / "step_000004").is_dir()
    # Resume the EP run from its step-2 checkpoint: steps 3 and 4 come out the same.
    proc = _train(train_env, tmp_path, "run.name=ep", "run.steps=4", "parallel.ep=2",
           f"checkpoint.resume={tmp_path / 'ep' / 'checkpoints' / 'step_000002'}",
           "checkpoint.dir=" + str(tmp_path / "resumed_ckpt"), torchrun=2)
    assert "resumed from step 2" in proc.stdout + proc.stderr
    resumed = _losses(tmp_path / "ep")  # appended records: the last of each step wins
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(ep[step], rel=1e-6), (step, ep, resumed)


def test_train_py_bad_ep_is_a_clear_error(train_env, tmp_path):
    proc = _train(train_env, tmp_path, "run.steps=1", "parallel.ep=3", check=False)
    assert proc.returncode != 0 and "parallel.ep=3" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("recipe", ["rowwise", "blockwise"])
def test_torchrun_ep2_fp8_tracks_single_process_fp8(train_env, tmp_path, recipe):
    """FP8 experts under EP=2 against one process, same global batch. The FP8 dispatch rounds
    once more (wgrad1's column copy is made from the received FP8 rows), so losses are not
    bitwise equal; the bound is 10x below the drift seen when each step's weight update failed
    to reach the cached FP8 weights (0.5-0.7% by step 4)."""
    env = dict(train_env, TRITON_INTERPRET="0")  # CPU: the kernels' pure-torch references
    common = ["run.steps=5", f"fp8={recipe}", "model.dim=128", "model.moe.ffn_dim=128"]
    _train(env, tmp_path, "run.name=single", "run.grad_accum=2", *common)
    _train(env, tmp_path, "run.name=ep", "parallel.ep=2", *common, torchrun=2)
    single, ep = _losses(tmp_path / "single"), _losses(tmp_path / "ep")
    assert sorted(single) == sorted(ep) == [1, 2, 3, 4, 5]
    for step in single:
        assert ep[step] == pytest.approx(single[step], rel=5e-4), (step, single, ep)
