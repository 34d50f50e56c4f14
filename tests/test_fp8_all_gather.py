"""FP8 expert weights on FSDP's all-gather (moe/fp8/fsdp_all_gather.py).

One process: the pure-torch reference of the mechanism (each shard quantized alone, the pieces
concatenated) equals quantizing the whole weight, byte for byte, at even and uneven splits (an
expert per rank, fewer experts than ranks). Two gloo processes: FSDP's all-gather carries E4M3
bytes + fp32 scales (counted on the collectives), the gathered FP8 weights equal what the bf16
path's quantizer makes from its gathered bf16 weight, also after an update (the re-gather that
refills the parameter in place) and through a checkpoint; a forward and backward give the bf16
path's outputs and gradients bit for bit. Training over 4 processes: tests/test_fsdp_ep.py.
"""

import contextlib
import tempfile

import pytest
import torch
import torch.distributed as dist

from ep_helpers import _spawn
from moe.dispatch import ExpertInput
from moe.fp8.fsdp_all_gather import gather_reference, gathered_fp8, shard_as_fp8
from moe.fp8.grouped_mlp import Fp8GroupedMLP, quantize_expert_weight
from moe.fp8.recipe import Fp8Recipe


@pytest.fixture(autouse=True)
def kernels_by_reference_on_cpu(monkeypatch):
    """The quantizers' pure-torch references on a CPU (bitwise the GPU kernels' bytes)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _assert_same(got, want, what):
    for name, g, w in zip(want._fields, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, name, g.shape, w.shape)
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)) if g.element_size() == 1 else torch.equal(g, w), (
            what, name)


def _chunks(w, ranks):
    """FSDP's dim-0 shards: torch.chunk's pieces, then empty ones for the ranks left over."""
    pieces = list(torch.chunk(w, ranks))
    return pieces + [w[:0]] * (ranks - len(pieces))


CASES = [("rowwise", (5, 48, 40), 2), ("rowwise", (5, 48, 40), 4), ("rowwise", (3, 16, 24), 8),
         ("blockwise", (3, 128, 256), 2), ("blockwise", (3, 256, 128), 4)]  # fmt: skip


def _reference_case(recipe, shape, ranks, pow2, device):
    torch.manual_seed(0)
    w = torch.randn(shape, device=device) * torch.logspace(-3, 1, shape[1], device=device)[None, :, None]
    r = Fp8Recipe(recipe, pow2)  # the rows' scales far apart
    _assert_same(gather_reference(_chunks(w, ranks), r), quantize_expert_weight(w, r), (recipe, ranks))


@pytest.mark.parametrize("recipe,shape,ranks", CASES)
@pytest.mark.parametrize("pow2", [False, True])
def test_reference_equals_the_whole_weight_quantized(recipe, shape, ranks, pow2):
    _reference_case(recipe, shape, ranks, pow2, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("recipe,shape,ranks", CASES + [("rowwise", (8, 28672, 4096), 8),
                                                        ("blockwise", (128, 2048, 768), 8)])  # fmt: skip
def test_reference_equals_the_whole_weight_quantized_gpu(recipe, shape, ranks):
    """The Triton quantizer on each shard gives the bytes it gives the whole weight (fp32 masters)."""
    _reference_case(recipe, shape, ranks, False, "cuda")


@contextlib.contextmanager
def _bytes_sent():
    """Bytes this rank puts into all-gathers (FSDP's and any other), per call."""
    sent, saved = [], {}
    for name in ("all_gather_into_tensor", "all_gather_single"):  # the latter: newer torch's FSDP
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def counting(output_tensor, input_tensor, *args, _fn=fn, **kwargs):
            sent.append(input_tensor.numel() * input_tensor.element_size())
            return _fn(output_tensor, input_tensor, *args, **kwargs)

        saved[name] = fn
        setattr(dist, name, counting)
    try:
        yield sent
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _expected_bytes(recipe, E, shapes, ranks):
    """Per rank and gather, both weights: (FP8 path, bf16 path)."""
    rows = -(-E // ranks)
    fp8 = bf16 = 0
    for N, K in shapes:
        scales = N + K if recipe == "rowwise" else (N // 128) * (K // 128)
        fp8 += rows * (N * K * (2 if recipe == "rowwise" else 1) + 4 * scales)
        bf16 += rows * N * K * 2
    return fp8, bf16


def _gather_case(rank, tmp, recipe, E, H, F, mesh):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = mesh.size()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mods, sent = {}, {}
    for fp8 in (True, False):
        torch.manual_seed(0)
        m = Fp8GroupedMLP(H, F, E, recipe=Fp8Recipe(recipe))
        m.reset_parameters(0.05)
        full = [m.w1.detach().clone(), m.w2.detach().clone()]
        assert shard_as_fp8(m, mesh) if fp8 else True
        mods[fp8] = fully_shard(m, mesh=mesh, mp_policy=mp)
        with _bytes_sent() as sent[fp8]:
            m.unshard()
    what = f"rank {rank} {recipe} E={E}"
    fp8_bytes, bf16_bytes = _expected_bytes(recipe, E, [full[0].shape[1:], full[1].shape[1:]], world)
    assert sum(sent[True]) == fp8_bytes and sum(sent[False]) == bf16_bytes, (what, sent, fp8_bytes, bf16_bytes)
    if recipe == "blockwise":
        assert fp8_bytes < 0.51 * bf16_bytes, what

    def check(step):
        for name, w in zip(("w1", "w2"), full):
            want = quantize_expert_weight(getattr(mods[False], name).detach(), Fp8Recipe(recipe))
            _assert_same(gathered_fp8(getattr(mods[True], name)), want, f"{what} {step} {name}")
            _assert_same(want, quantize_expert_weight(w.to(torch.bfloat16), Fp8Recipe(recipe)), f"{what} {step} bf16")

    check("first gather")
    for m in mods.values():  # an update of the masters, then a gather into the same parameter
        m.reshard()
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(-1.5)
        m.unshard()
    full = [-1.5 * w for w in full]
    check("after an update")

    # Two micro-batches, gradients reduced after the second: the outputs and the reduce-scattered
    # gradients of the bf16 path.
    torch.manual_seed(1)
    batches = []
    for _ in range(2):
        counts_E = torch.randint(0, 5, (E,))
        x = torch.randn(int(counts_E.sum()), H).to(torch.bfloat16)
        batches.append((counts_E, x, torch.randn_like(x)))
    out = {True: [], False: []}
    for fp8, m in mods.items():
        for i, (counts_E, x, dy) in enumerate(batches):
            m.set_requires_gradient_sync(i == len(batches) - 1)
            x = x.clone().requires_grad_()
            y = m(ExpertInput(x, counts_E))
            y.backward(dy)
            out[fp8] += [y, x.grad]
        out[fp8] += [p.grad.to_local() for p in m.parameters()]
    for got, want in zip(out[True], out[False], strict=True):
        assert torch.equal(got, want), what

    # A checkpoint saves the fp32 masters; loading them back gathers what they quantize to.
    m = mods[True]
    dcp.save({"m": m.state_dict()}, checkpoint_id=f"{tmp}/{recipe}{E}")
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    state = {"m": m.state_dict()}
    dcp.load(state, checkpoint_id=f"{tmp}/{recipe}{E}")
    m.load_state_dict(state["m"])
    for m in mods.values():
        m.unshard()
    check("after a checkpoint")


def _gather_cases(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    # Even and uneven splits: 4 and 2 experts over 2 ranks, 3 (2 + 1), and 1 (rank 1 holds none).
    for recipe, E, H, F in [("rowwise", 4, 32, 24), ("rowwise", 3, 32, 24), ("blockwise", 2, 128, 128),
                            ("blockwise", 1, 128, 128)]:  # fmt: skip
        _gather_case(rank, tmp, recipe, E, H, F, mesh)
    # A one-rank group (EP over all ranks) gathers nothing: its weights stay plain.
    alone = init_device_mesh("cpu", (world, 1), mesh_dim_names=("others", "me"))["me"]
    m = Fp8GroupedMLP(32, 24, 2, recipe=Fp8Recipe("rowwise"))
    assert not shard_as_fp8(m, alone) and type(m.w1.data) is torch.Tensor


@pytest.mark.slow
def test_fsdp_all_gathers_fp8_bytes_equal_to_the_bf16_paths_quantization():
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_gather_cases, 2, tmp)


def test_benchmark_refuses_without_a_gpu_and_bad_arguments(tmp_path, monkeypatch, capsys):
    from bench.fp8_all_gather import main

    out = tmp_path / "fp8_all_gather.json"
    with pytest.raises(SystemExit) as err:
        main(["--shapes", "llama", "--out", str(out)])
    assert err.value.code == 2 and "unknown shape 'llama'; allowed: seed, mixtral_8x7b" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU .* nothing was run or written"):
        main(["--out", str(out)])
    assert not out.exists()
