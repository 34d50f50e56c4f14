"""Every parallel layout the config accepts trains like one process (4 gloo processes on CPU).

Layouts: FSDP x EP (EP=2 over FSDP=2), EP over all ranks (FSDP, and DDP), FSDP alone, DDP x EP and
DDP alone; one process runs the same global batch as 4 micro-batches, so every micro-batch meets
the same tokens (the router's balancing loss is per micro-batch). fp32, 10 steps: the losses and
the full gradients of every step equal one process's to 1e-5, the initial weights are identical
(trainer/sharded_init.py), and FSDP leaves each rank 1/4 of the parameter bytes. A checkpoint
saved at EP=2 x FSDP=2 resumes at EP=4 and on one process with the uninterrupted run's losses.
FP8 under FSDP all-gathers E4M3 expert weights (parallel.fp8_all_gather, the default); over 3
steps its losses equal, bit for bit, those of gathering BF16 (tests/test_fp8_all_gather.py has
the bytes and the gathered weights).
"""

import tempfile

import pytest
import torch

from ep_helpers import _spawn

pytestmark = [
    pytest.mark.slow,
    # The gradient capture wraps optimizer.step, which the LR scheduler notices.
    pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden"),
]

WORLD = 4
STEPS = 10
LAYOUTS = [("fsdp", 2), ("fsdp", 4), ("fsdp", 1), ("ddp", 2), ("ddp", 4), ("ddp", 1)]


def _cfg(backend: str, ep: int, grad_accum: int, recipe: str = "bf16", **run):
    from trainer.config import TrainConfig

    c = TrainConfig()
    m = c.model
    m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, m.max_seq_len = 48, 2, 4, 2, 97, 16
    m.moe.num_experts, m.moe.top_k, m.moe.ffn_dim = 4, 2, 32
    m.moe.expert_bias, m.moe.expert_bias_update_rate = True, 0.05  # the bias update runs at every layout
    c.data.kind, c.data.mock_vocab_size, c.data.num_workers = "mock", 97, 0
    c.run.seq_len, c.run.micro_batch_size, c.run.grad_accum, c.run.steps = 16, 2, grad_accum, STEPS
    c.run.dtype, c.run.device, c.run.eval_interval = "float32", "cpu", 0
    c.optim.warmup_steps = 2
    c.parallel.backend, c.parallel.ep = backend, ep
    c.fp8.experts = recipe
    c.logging.wandb = "disabled"
    c.checkpoint.interval_minutes, c.checkpoint.at_end = 0, False
    for key, value in run.items():
        if key == "aux_loss_coeff":
            m.moe.aux_loss_coeff = value
        elif key == "fp8_dispatch":
            c.parallel.fp8_dispatch = value
        elif key == "state_dtype":
            c.optim.state_dtype = value
        else:
            setattr(c.checkpoint if key.startswith("ckpt_") else c.run, key.removeprefix("ckpt_"), value)
    return c


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _env(backend: str, ep: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from trainer.parallel import DistEnv

    if ep == 0:  # one process inside the group: no mesh, no collective
        return DistEnv(0, 1, 0, torch.device("cpu"))
    mesh = init_device_mesh("cpu", (WORLD // ep, ep), mesh_dim_names=("dp", "ep"))
    return DistEnv(dist.get_rank(), WORLD, 0, torch.device("cpu"), ep, mesh, backend)


def _memoize_data():
    """Build each (layout's) mock dataset once per process: megatron's mock index takes seconds,
    and the layouts differ only in the model's parallelism."""
    import trainer.loop

    built, build = {}, trainer.loop.build_train_valid

    def cached(cfg, **kw):
        key = (repr(cfg), tuple(sorted(kw.items())))
        if key not in built:
            built[key] = build(cfg, **kw)
        return built[key]

    trainer.loop.build_train_valid = cached


def _capture_grads(trainer) -> list[dict]:
    """Every parameter's full gradient at each step, as the optimizer is about to use it."""
    grads, step = [], trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.append({n: _full(p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    return grads


def _train(cfg, env, run_dir, steps=STEPS, follow=None, record=False):
    """Train to `steps`; per step the loss and the full gradients. follow: a Trainer whose weights
    are copied in before each step (FP8: compare the gradients of the same weights)."""
    from trainer.loop import Trainer

    trainer = Trainer(cfg, run_dir, env)
    initial = {n: _full(p) for n, p in trainer.model.named_parameters()}
    trainer.resume()  # before the capture: a resume builds a new LR scheduler, which wraps step
    grads = _capture_grads(trainer)
    it = trainer.data.train(trainer.consumed_samples)
    losses = {}
    weights = []  # record: the full weights before each step
    while trainer.step < steps:
        if follow is not None:
            with torch.no_grad():
                for p, q in zip(trainer.model.parameters(), follow[trainer.step]):
                    p.copy_(q)
        if record:
            weights.append([_full(p) for p in trainer.model.parameters()])
        stats = trainer.train_step(it)
        losses[trainer.step] = stats["loss"]
        if trainer.checkpoint_due():
            trainer.save()
    return trainer, initial, losses, grads, weights


def _close(got, want, what):
    """Relative error of the whole tensor (its norm): elements near zero carry the summation-order
    noise of every earlier step, which an elementwise rtol would count against them."""
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert err <= 1e-5, f"{what}: relative error {err:.3g} > 1e-5"


def _layouts(rank, world, tmp, recipe, layouts, accum=1):
    """bf16: the layouts train free and must stay on the one-process trajectory. FP8: one rounding
    flip of an E4M3 weight (from an fp32 sum taken in another order) moves a trajectory by more
    than 1e-5 within a few steps, so one process computes each step from the weights the layout
    had at that step, and the loss and gradients of the same weights are compared. accum: the
    layouts' micro-batches a step (one process runs accum times as many)."""
    _memoize_data()
    refs = {}
    for backend, ep in layouts:
        what = f"{recipe} {backend} ep={ep}"
        # FP8 experts under EP see the rows of their whole EP group at once (rowwise wgrad scales
        # span the rows an expert sees), so there one micro-batch of one process holds an EP
        # group's sequences, and the balancing loss (a function of the micro-batch, not a sum
        # over tokens) is off.
        group = ep if recipe != "bf16" else 1
        # BF16 rows on the wire: FP8 dispatch quantizes wgrad1's columns from the rows' FP8 bytes,
        # not from the rows (moe/fp8/grouped_mlp.py), which one process never does.
        overrides = {"aux_loss_coeff": 0.0, "fp8_dispatch": False} if group > 1 else {}
        ref_cfg = _cfg("ddp", 1, accum * WORLD // group, recipe, micro_batch_size=2 * group, **overrides)
        cfg = _cfg(backend, ep, accum, recipe, **overrides)
        follow = recipe != "bf16"
        trainer, init, losses, grads, weights = _train(cfg, _env(backend, ep), f"{tmp}/{backend}{ep}", record=follow)
        if follow or group not in refs:
            refs[group] = _train(ref_cfg, _env("ddp", 0), f"{tmp}/one_{rank}", follow=weights if follow else None)
        _, ref_init, ref_losses, ref_grads, _ = refs[group]
        for name, w in ref_init.items():  # the same full weights at every layout
            assert torch.equal(init[name], w), f"{what}: initial {name} differs"
        assert sorted(losses) == sorted(ref_losses) == list(range(1, STEPS + 1)), (what, losses)
        for s, loss in ref_losses.items():
            assert losses[s] == pytest.approx(loss, rel=1e-5), (what, s, losses, ref_losses)
        for s, (g, ref) in enumerate(zip(grads, ref_grads), 1):
            assert g.keys() == ref.keys(), what
            for name in ref:
                _close(g[name], ref[name], f"{what} step {s} grad {name}")
        if backend == "fsdp" and recipe != "bf16":
            _fp8_all_gather_matches_bf16(trainer, losses, backend, ep, recipe, f"{tmp}/{backend}{ep}_gather")
        if backend == "fsdp":  # 1 / WORLD of the bytes on each rank, FSDP's dim-0 padding aside
            params = list(trainer.model.parameters())
            local = sum(p.to_local().numel() * p.element_size() for p in params)
            total = sum(p.numel() * p.element_size() for p in params)
            assert local == pytest.approx(total / WORLD, rel=0.05), (what, local, total)


def _fp8_all_gather_matches_bf16(trainer, losses, backend, ep, recipe, run_dir, steps=3):
    """FP8 experts under FSDP all-gather E4M3 weights (parallel.fp8_all_gather): the same losses,
    bit for bit, as gathering BF16 and quantizing after, over a few steps. EP=1: the run above
    (fp32) against a BF16-gather run; under EP both again with bf16 autocast, activation
    checkpointing (backward re-gathers for the recomputed forward) and 2 micro-batches."""
    from moe.fp8.fsdp_all_gather import Fp8ShardedWeight

    runs = {True: (trainer, losses)} if ep == 1 else {}
    accum, run = (1, {}) if ep == 1 else (2, {"dtype": "bfloat16", "activation_checkpointing": True})
    for fp8_gather in (True, False):
        if fp8_gather not in runs:
            cfg = _cfg(backend, ep, accum, recipe, **run)
            cfg.parallel.fp8_all_gather = fp8_gather
            t, _, run_losses, _, _ = _train(cfg, _env(backend, ep), f"{run_dir}_{fp8_gather}", steps=steps)
            runs[fp8_gather] = (t, run_losses)
    for fp8_gather, (t, _) in runs.items():
        sharded = [isinstance(layer.experts.w1._local_tensor, Fp8ShardedWeight) for layer in t.model.moe_layers()]
        assert sharded and all(s == fp8_gather for s in sharded), (backend, ep, fp8_gather)
    fp8, bf16 = runs[True][1], runs[False][1]
    assert bf16 == {s: fp8[s] for s in range(1, steps + 1)}, (backend, ep, bf16, fp8)


def test_every_layout_matches_one_process_bf16():
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_layouts, WORLD, tmp, "bf16", LAYOUTS)


def test_fsdp_layouts_match_one_process_fp8():
    # Emulated rowwise FP8 experts; DDP x EP with FP8 is covered by tests/test_ep_train.py.
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_layouts, WORLD, tmp, "rowwise", [("fsdp", 1), ("fsdp", 2)])


def test_ddp_with_fp8_gradient_accumulation_matches_one_process():
    """3 micro-batches a step: the second (outside DDP's sync) adds the FP8 expert gradients into
    .grad in the wgrad GEMM, the syncing last one returns them (trainer/loop.py); the all-reduced
    gradients are one process's, which adds in the GEMM on 11 of its 12 micro-batches."""
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_layouts, WORLD, tmp, "rowwise", [("ddp", 1)], 3)


def _bf16_moments_sharded_step(rank, world, tmp, steps=3):
    """Each step of the bf16-moment AdamW on FSDP x EP's DTensor shards equals, bit for bit, the
    same optimizer on one process over the full tensors (gathered before the step: weights,
    gradients, moments, step counters; compared after it). The trajectories themselves are not
    compared: a gradient differing in its last fp32 bit (another summation order) can flip a
    moment's bf16 rounding, which the bf16 rows of `_layouts` would count as a 1e-5 difference."""
    from trainer.loop import Trainer
    from trainer.fused_adamw import FusedAdamW

    _memoize_data()
    trainer = Trainer(_cfg("fsdp", 2, 1, state_dtype="bfloat16"), f"{tmp}/bf16_moments", _env("fsdp", 2))
    trainer.resume()
    opt, step = trainer.optimizer, trainer.optimizer.step
    assert isinstance(opt, FusedAdamW)
    checked = []

    def checked_step(*args, **kwargs):
        groups, state = [], {}
        for group in opt.param_groups:
            full = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                q = _full(p)
                q.grad = _full(p.grad)
                full.append(q)
                if opt.state[p]:
                    state[q] = {k: v.clone() if k == "step" else _full(v) for k, v in opt.state[p].items()}
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": full})
        ref = FusedAdamW(groups)
        ref.state.update(state)
        if getattr(opt, "grad_scale", None) is not None:  # a clipped step (trainer/optim.py clipped_step)
            ref.grad_scale = opt.grad_scale
        out = step(*args, **kwargs)
        ref.step()
        for group, ref_group in zip(opt.param_groups, ref.param_groups):
            live = [p for p in group["params"] if p.grad is not None]
            for p, q in zip(live, ref_group["params"]):
                assert torch.equal(_full(p), q), "a sharded step differs from the full one"
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(_full(opt.state[p][k]), ref.state[q][k]), k
                assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
                assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])
        checked.append(sum(len(g["params"]) for g in ref.param_groups))
        return out

    trainer.optimizer.step = checked_step
    it = trainer.data.train(trainer.consumed_samples)
    while trainer.step < steps:
        trainer.train_step(it)
    assert len(checked) == steps and min(checked) > 0, checked


def test_bf16_moments_under_fsdp_x_ep_step_as_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_bf16_moments_sharded_step, WORLD, tmp)


def _reshard(rank, world, tmp):
    _memoize_data()
    _, _, whole, _, _ = _train(_cfg("fsdp", 2, 1, ckpt_interval=5, ckpt_keep_last=2), _env("fsdp", 2), f"{tmp}/saved")
    ckpt = f"{tmp}/saved/checkpoints/step_000005"
    for backend, ep, accum in [("fsdp", 4, 1), ("ddp", 0, WORLD)]:
        cfg = _cfg(backend, max(ep, 1), accum, ckpt_resume=ckpt)
        _, _, losses, _, _ = _train(cfg, _env(backend, ep), f"{tmp}/{backend}{ep}_{rank}")
        assert sorted(losses) == list(range(6, STEPS + 1)), losses
        for s, loss in losses.items():
            assert loss == pytest.approx(whole[s], rel=1e-5), (backend, ep, s, losses, whole)


def test_checkpoint_from_fsdp_x_ep_resumes_at_other_layouts():
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_reshard, WORLD, tmp)
