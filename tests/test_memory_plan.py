"""The memory plan (trainer/memory_plan.py, trainer/memory_activations.py): what `run.dry_run=true`
prints, the bytes of each layout against a hand count, the activations against what autograd
really saves, the refusal of a run that cannot fit, the presets and the README's table.

Its accuracy against measured peaks needs a GPU: bench/memory_plan.py.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.fp8.recipe import FP8Config
from moe.fp8.training import Fp8Training
from moe.model import build_model
from tools.memory_table import compose, large_models, readme_table, table
from trainer.config import TrainConfig
from trainer.memory_activations import block_activation_bytes, head_activation_bytes, weight_copy_bytes
from trainer.memory_plan import GIB, format_plan, meta_model, plan_memory, refuse_if_cannot_fit

REPO = Path(__file__).resolve().parents[1]
H100_BYTES = 85_029_158_912  # torch.cuda.get_device_properties(...).total_memory of an 80 GB H100


def _dry_run(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("FP8MOE_RUN_ID", "WORLD_SIZE")}
    cmd = [sys.executable, "train.py", *overrides, "run.dry_run=true", f"run.output_root={tmp_path}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _gib(proc: subprocess.Popen) -> tuple[float, list[str]]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = out.splitlines()
    match = re.fullmatch(r"memory_per_gpu_gib=(\d+\.\d+)", lines[-1])
    assert match, lines[-1]
    return float(match.group(1)), lines


def test_dry_run_prints_the_plan_mixtral_fits_two_nodes_not_ddp(tmp_path):
    # Both launches at once: each is mostly Python start-up and Hydra.
    fsdp = _dry_run(tmp_path, "model=mixtral_8x7b", "parallel=fsdp", "parallel.ep=8", "run.dry_run_gpus=16")
    ddp = _dry_run(tmp_path, "model=mixtral_8x7b", "parallel=single", "run.dry_run_gpus=8")
    gib, lines = _gib(fsdp)
    assert gib < 70, lines
    assert lines[0].startswith("params total=46702792704 ")
    assert "fsdp, ep=8 on 16 GPUs" in lines[2]
    names = [line.split("  ")[1].strip() for line in lines[3:-2]]
    for name in ("parameters", "gradients", "optimizer state", "FSDP unsharded", "FP8 weight copies",
                 "activations, no checkpointing", "activations, checkpointing",
                 "CUDA context + allocator reserve"):
        assert name in names, name
    assert sum(line.endswith("(used)") for line in lines) == 1  # the configured activations line
    gib, lines = _gib(ddp)
    assert gib > 80 and "ddp, ep=1 on 8 GPUs" in lines[2]
    assert "DDP gradient buckets" in "\n".join(lines)


def test_mixtral_fits_one_node_only_with_bf16_moments():
    """fp32 masters, fp32 gradients and AdamW's two fp32 moments: 16 bytes a parameter, / 8, more
    than an H100; with bf16 moments 12, and the one-node preset plans under an H100's memory."""
    cfg = compose(["model=mixtral_8x7b", "parallel=fsdp", "parallel.ep=8"])
    plan = plan_memory(cfg, 8)
    state = sum(plan.bytes_of(n) for n in ("parameters", "gradients", "optimizer state"))
    assert state == 16 * (46702792704 // 8)
    assert state / GIB > 80
    node = compose(["experiment=mixtral_8x7b_node"])
    assert node.optim.state_dtype == "bfloat16" and node.run.dry_run_gpus == 8
    plan = plan_memory(node, 8)
    state = sum(plan.bytes_of(n) for n in ("parameters", "gradients", "optimizer state"))
    assert state == 12 * (46702792704 // 8)
    assert plan.total_bytes < H100_BYTES, plan.gib


def _tiny_cfg(**run) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                            moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32))  # fmt: skip
    cfg.run.seq_len, cfg.run.micro_batch_size = 64, 2
    for key, value in run.items():
        setattr(cfg.run, key, value)
    return cfg


def _tiny_counts() -> tuple[int, int]:
    """(dense, expert) parameters of _tiny_cfg's model, by hand."""
    V, H, L, Q, J, E, F = 256, 64, 2, 4, 2, 4, 32
    D = H // Q
    attention = H * Q * D + 2 * H * J * D + Q * D * H
    dense = L * (attention + 2 * H + E * H) + 2 * V * H + H  # + norms, router; embedding, output, final norm
    return dense, L * E * 3 * F * H


@pytest.mark.parametrize("backend,ep,gpus", [("ddp", 1, 1), ("ddp", 1, 4), ("ddp", 2, 4), ("fsdp", 1, 4),
                                             ("fsdp", 2, 4)])
def test_state_bytes_of_each_layout_by_hand(backend, ep, gpus):
    cfg = _tiny_cfg()
    cfg.parallel.backend, cfg.parallel.ep = backend, ep
    plan = plan_memory(cfg, gpus)
    dense, experts = _tiny_counts()
    if backend == "fsdp" and gpus > 1:
        local = (dense + experts) // gpus  # every parameter sharded over every rank
    else:
        local = dense + experts // ep
    assert plan.bytes_of("parameters") == 4 * local
    assert plan.bytes_of("gradients") == 4 * local
    assert plan.bytes_of("optimizer state") == 8 * local
    assert plan.bytes_of("DDP gradient buckets") == (4 * local if backend == "ddp" and ep == 1 and gpus > 1 else 0)
    assert (plan.bytes_of("FSDP unsharded") > 0) == (backend == "fsdp" and gpus > 1)


def test_checkpointing_lowers_the_activations_and_the_peak():
    plain, ckpt = (plan_memory(_tiny_cfg(micro_batch_size=16, activation_checkpointing=ac), 1)
                   for ac in (False, True))
    for plan in (plain, ckpt):
        assert plan.bytes_of("activations, checkpointing") < plan.bytes_of("activations, no checkpointing")
    assert ckpt.total_bytes < plain.total_bytes
    assert [line.endswith("(used)") for line in format_plan(plain) if "activations" in line] == [True, False]
    assert [line.endswith("(used)") for line in format_plan(ckpt) if "activations" in line] == [False, True]


def test_fp8_experts_save_less_than_bf16():
    """The FP8 experts keep x's columns and h in E4M3; the BF16 ones x and h in bf16."""
    cfg = _tiny_cfg()
    saved = {}
    for recipe in ("bf16", "rowwise", "blockwise"):
        cfg.fp8 = FP8Config(experts=recipe)
        block = meta_model(cfg).layers[0]
        saved[recipe] = block_activation_bytes(block, T=4096, c=2)
    assert saved["rowwise"] < saved["bf16"] and saved["blockwise"] < saved["bf16"]


# ---- the activations against what autograd saves ------------------------------------------------------

# One layer for the FP8 cases: on a CPU their kernels run in Triton's interpreter (tests/conftest.py).
_BASE = dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
_FP8_BASE = {**_BASE, "n_layers": 1}
_MOE = dict(num_experts=4, top_k=2, ffn_dim=128, aux_loss_coeff=0.01, z_loss_coeff=0.001)
_DEEPSEEK = dict(num_experts=8, top_k=4, ffn_dim=128, score_func="sigmoid", num_groups=4, topk_groups=2,
                 routed_scaling_factor=2.5, expert_bias=True, seq_aux_loss_coeff=1e-4, num_shared_experts=1)
SAVED_CASES = {
    "bf16": (ModelConfig(**_BASE, moe=MoEConfig(**_MOE)), FP8Config(), torch.bfloat16),
    "rowwise": (ModelConfig(**_FP8_BASE, moe=MoEConfig(**_MOE)), FP8Config(experts="rowwise"), torch.bfloat16),
    "blockwise": (ModelConfig(**_FP8_BASE, moe=MoEConfig(**_MOE)), FP8Config(experts="blockwise"), torch.bfloat16),
    "rowwise_all": (ModelConfig(**_FP8_BASE, moe=MoEConfig(**_MOE)), FP8Config(experts="rowwise", dense="rowwise"),
                    torch.bfloat16),
    "qwen_gqa_qk_norm": (ModelConfig(**{**_BASE, "head_dim": 64, "n_kv_heads": 1}, qk_norm=True,
                                     moe=MoEConfig(num_experts=8, top_k=4, ffn_dim=128)),
                         FP8Config(), torch.bfloat16),
    "deepseek_dense_shared": (ModelConfig(**{**_BASE, "n_layers": 3}, first_k_dense=1, dense_ffn_dim=256,
                                          moe=MoEConfig(**_DEEPSEEK)), FP8Config(), torch.bfloat16),
    "gelu": (ModelConfig(**_BASE, moe=MoEConfig(**{**_MOE, "activation": "gelu"})), FP8Config(), torch.bfloat16),
    "fp32": (ModelConfig(**_BASE, moe=MoEConfig(**_MOE)), FP8Config(), torch.float32),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_activation_formula_counts_what_autograd_saves(case):
    """One forward under CPU autocast, every tensor autograd saves summed once by storage (the
    parameters and buffers themselves left out): the plan's activations plus the weight casts
    it counts. The formula names every saved tensor, so only scalars and small buffers may be
    missing from it: 2%, against the 10-15% the plan's accuracy would allow."""
    model_cfg, fp8, dtype = SAVED_CASES[case]
    torch.manual_seed(0)
    model = build_model(model_cfg)
    Fp8Training(fp8).convert(model)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B, S = 2, 32
    tokens, labels = (torch.randint(0, model_cfg.vocab_size, (B, S)) for _ in range(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            model(tokens, labels)
    c = 2 if dtype == torch.bfloat16 else 4
    T = B * S
    formula = sum(block_activation_bytes(b, T, c) for b in model.layers) + head_activation_bytes(model, T, c)
    formula += weight_copy_bytes(model, c)
    # Float8Linear saves dgrad's FP8 weight from its step cache (the plan's FP8 weight copies).
    formula += sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Float8Linear")
    measured = sum(saved.values())
    assert formula == pytest.approx(measured, rel=0.02), (case, formula, measured)


# ---- refusal ------------------------------------------------------------------------------------------


def test_refusal_names_the_estimate_the_device_and_what_fits():
    cfg = compose(["model=mixtral_8x7b", "parallel=single", "run.seq_len=4096", "run.micro_batch_size=2"])
    with pytest.raises(ValueError) as err:
        refuse_if_cannot_fit(cfg, 8, torch.device("cuda", 0), device_bytes=H100_BYTES)
    msg = str(err.value)
    plan = plan_memory(cfg, 8)
    assert f"needs {plan.gib:.1f} GiB per GPU (ddp, ep=1 on 8 GPUs" in msg and "79.2 GiB on cuda:0" in msg
    # DDP without EP holds everything on every rank: no single change fits, all of them together do,
    # on these 8 GPUs once the AdamW moments are bf16.
    fix = re.search(r"It would fit with: (.*) \((\d+\.\d) GiB\)", msg)
    assert fix, msg
    assert "parallel.backend=fsdp" in fix.group(1) and "parallel.ep=8" in fix.group(1), msg
    assert "optim.state_dtype=bfloat16" in fix.group(1) and "GPUs" not in fix.group(1), msg
    assert float(fix.group(2)) * GIB <= H100_BYTES


def test_refusal_offers_only_what_helps():
    cfg = _tiny_cfg(micro_batch_size=4096)  # 262,144 tokens: activations well above the fixed context line
    plain = plan_memory(cfg, 1)
    ckpt = plan_memory(_tiny_cfg(micro_batch_size=4096, activation_checkpointing=True), 1)
    budget = (plain.total_bytes + ckpt.total_bytes) // 2  # checkpointing fits, the plain run is 10%+ over
    assert plain.total_bytes > 1.1 * budget
    with pytest.raises(ValueError, match=r"this run cannot fit") as err:
        refuse_if_cannot_fit(cfg, 1, torch.device("cuda", 0), device_bytes=budget)
    msg = str(err.value)
    assert "run.activation_checkpointing=true" in msg and "run.micro_batch_size=" in msg
    assert "parallel.backend=fsdp" not in msg and "parallel.ep" not in msg  # one GPU: no layout to change
    refuse_if_cannot_fit(cfg, 1, torch.device("cuda", 0), device_bytes=plain.total_bytes)  # fits: silent
    refuse_if_cannot_fit(cfg, 1, torch.device("cuda", 0), device_bytes=int(plain.total_bytes / 1.05))  # warns
    refuse_if_cannot_fit(cfg, 1, torch.device("cpu"))  # a CPU run is never refused


# ---- run.dry_run_gpus -----------------------------------------------------------------------------------


def test_dry_run_gpus_is_validated(monkeypatch, capsys):
    from trainer.dry_run import dry_run

    cfg = _tiny_cfg(dry_run_gpus=-1)
    with pytest.raises(ValueError, match=r"run.dry_run_gpus must be >= 0 .* got -1"):
        cfg.validate()
    cfg = _tiny_cfg(dry_run_gpus=6)
    cfg.parallel.ep = 4
    with pytest.raises(ValueError, match=r"parallel.ep=4 must divide the world size 6"):
        dry_run(cfg)
    cfg.run.dry_run_gpus = 0  # the launch's world size
    monkeypatch.setenv("WORLD_SIZE", "8")
    dry_run(cfg)
    assert "ddp, ep=4 on 8 GPUs" in capsys.readouterr().out


def test_benchmark_refuses_without_gpu_and_writes_nothing(monkeypatch, tmp_path):
    from bench import memory_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "memory_plan.json"
    with pytest.raises(SystemExit, match="bench.memory_plan needs a CUDA GPU .*nothing was run or written"):
        memory_plan.main(["--models", "parity_300m", "--out", str(out)])
    assert not out.exists()


# ---- presets and the README ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*large_models(), "mixtral_8x7b_node"])
def test_each_large_preset_fits_the_gpus_it_names(name):
    """Each preset is laid out (run.dry_run_gpus) where it fits an 80 GB H100, and its comment
    quotes its plan."""
    cfg = compose([f"experiment={name}"])
    plan = plan_memory(cfg, cfg.run.dry_run_gpus)
    assert plan.total_bytes < H100_BYTES, (name, plan.gib)
    text = (REPO / "configs" / "experiment" / f"{name}.yaml").read_text()
    quoted = re.search(rf"Memory plan on {cfg.run.dry_run_gpus} GPUs .*?: (\d+\.\d) GiB a GPU", text, re.S)
    assert quoted and float(quoted.group(1)) == round(plan.gib, 1), (name, plan.gib)
    half = copy.deepcopy(cfg)
    n = cfg.run.dry_run_gpus // 2
    half.parallel.ep = min(cfg.parallel.ep, n)
    assert plan_memory(half, n).total_bytes > H100_BYTES  # the named size is the smallest that fits


def test_readme_table_is_what_the_tool_prints():
    assert readme_table((REPO / "README.md").read_text()) == table(), "python tools/memory_table.py --write"


@pytest.mark.gpu
def test_refusal_reads_the_device_memory():
    """On a GPU the device's own memory decides: Mixtral-8x7B in one process cannot fit any of
    them, the tiny model fits every one."""
    device = torch.device("cuda", torch.cuda.current_device())
    have = torch.cuda.get_device_properties(device).total_memory / GIB
    with pytest.raises(ValueError, match=rf"and the device has {have:.1f} GiB on {device}"):
        refuse_if_cannot_fit(compose(["model=mixtral_8x7b"]), 1, device)
    refuse_if_cannot_fit(_tiny_cfg(), 1, device)
